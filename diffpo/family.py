"""The model-family protocol: ``Components``, the ``Family`` base class and the ``FAMILIES``
registry, plus the registry of pixel-space samplers that plugins fill.

A *family* adapter hides what differs between model families (text encoders, extra
conditioning, latent scaling, which pipeline class loads the result); the trainer only sees
``Components`` and the four family methods ``encode_prompts``, ``encode_image_moments``, ``predict`` and
``save``. Each family is one file of ``diffpo.families`` (``sd``, ``sdxl``, ``sd3``, ``flux``) and
declares, on its class, everything the rest of diffpo needs to know about it: the pipeline classes
``model.family: auto`` recognises (``detect_pipeline_classes``), its tiny random models
(``tiny_models``, the ``tiny:<name>`` ids), the blocks ``train.compile=regional`` compiles
(``compile_blocks``), and its text encoders' classes and pooled-text key (the benchmarks build
random ones). ``register_family`` makes it known; nothing else is edited to add one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from diffpo.config import ModelConfig

Tensor = torch.Tensor


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the path/id and the reason."""


@dataclass
class Components:
    """Everything a family needs at training time. ``network`` is the trained denoiser."""

    family: "Family"
    network: nn.Module
    scheduler: Any
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    vae: nn.Module | None = None
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in [self.vae, *self.text_encoders] if m is not None]


class Family:
    """Base adapter. Subclasses set ``name``, ``pipeline_class`` and the model-specific parts."""

    name = "base"
    pipeline_class_name = "DiffusionPipeline"
    """The diffusers pipeline class ``build_pipeline`` assembles (saving, sampling, LoRA files)."""
    network_subfolder = "unet"
    lora_prefix_argument = "unet_lora_layers"

    # --- declarations: read by the registry, not by the trainer ----------------------------------
    detect_pipeline_classes: tuple[str, ...] = ()
    """``_class_name`` values of ``model_index.json`` that ``model.family: auto`` reads as this
    family. Only a class's own declaration counts: a subclass claims nothing unless it says so."""
    tiny_models: Mapping[str, Callable[[], Any]] = {}
    """``tiny:<name>`` ids -> a function that builds the tiny random pipeline (``diffpo.tiny``); own
    declaration only, like ``detect_pipeline_classes``."""
    compile_blocks: tuple[str, ...] = ()
    """Class names of the network's repeated blocks, compiled one by one by ``train.compile=regional``
    (``diffpo.fastpath.compile_network``); inherited by subclasses, which share the network."""
    text_encoder_classes: tuple[str, ...] = ()
    """The transformers classes of the text encoders, in ``Components.text_encoders`` order."""
    pooled_text_key: str | None = None
    """The key of the pooled text vector in ``encode_prompts``' output, when the network takes one."""

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    # --- loading -------------------------------------------------------------------------------
    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:  # pragma: no cover - abstract
        """``encoders=False``: only the network and scheduler (training from a latent cache)."""
        raise NotImplementedError

    def load_network(self, path: str, cfg: ModelConfig, network_class, scheduler_class) -> tuple[nn.Module, Any]:
        """The trained network (from ``network_subfolder``) and the training scheduler of a pipeline."""
        return from_subfolder(network_class, path, cfg, self.network_subfolder), from_subfolder(scheduler_class, path, cfg, "scheduler", weights=False)

    # --- training-time computation ---------------------------------------------------------------
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError  # pragma: no cover

    def encode_image_moments(self, components: Components, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Pixels in [-1, 1] -> the scaled latent mode and standard deviation (pixels and None
        without a VAE). Training draws ``mode + std * randn`` per pair (``objectives.sample_latents``),
        the latent cache stores both."""
        vae = components.vae
        if vae is None:
            return pixels, None
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (dist.mode() - shift) * vae.config.scaling_factor, dist.std * vae.config.scaling_factor

    def predict(self, components: Components, network: nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    # --- sampling (diffpo.sampling.generate) ----------------------------------------------------
    sampling_default_settings: dict[str, Any] = {"num_inference_steps": 30, "guidance_scale": 7.5, "scheduler": "ddim"}
    """``SamplerSettings`` a family samples with unless told otherwise."""
    schedulers: tuple[str, ...] = ("ddim", "euler", "dpm++")
    """Names in ``diffpo.sampling.SCHEDULERS`` that fit the family's training objective."""
    default_sample_size: int | None = None
    """Latent side used when the network's config has no ``sample_size`` (Flux)."""

    def sampling_defaults(self, components: Components) -> dict[str, Any]:
        hook = self.pixel_sampler(components)
        return dict(hook.defaults if hook is not None else self.sampling_default_settings)

    def sampling_schedulers(self, components: Components) -> tuple[str, ...]:
        hook = self.pixel_sampler(components)
        return hook.schedulers if hook is not None else self.schedulers

    def pixel_sampler(self, components: Components) -> "PixelSampler | None":
        """The sampler registered for this family's models without a VAE (``register_pixel_sampler``),
        or for the nearest base family that has one (a subclass of ``sd`` samples as ``sd``); None
        for latent models, which sample through the family's pipeline."""
        if components.vae is not None:
            return None
        names = [cls.__dict__["name"] for cls in type(self).__mro__ if "name" in cls.__dict__]
        return next((hook for hook in map(pixel_sampler, names) if hook is not None), None)

    def default_resolution(self, components: Components) -> int:
        """Image side the pipeline would pick: the network's sample size times the VAE factor."""
        size = getattr(components.network.config, "sample_size", None) or self.default_sample_size
        vae = components.vae
        return size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)

    def sampler(self, components: Components, network: nn.Module, settings, device) -> Callable[[list[str], list[int]], list]:
        """A callable (prompts, seeds) -> PIL images for ``diffpo.sampling.generate``: the family's
        diffusers pipeline around ``network``, built once per ``generate`` call."""
        from diffpo.sampling import PipelineSampler, SamplingError

        if components.vae is None:  # no diffusers pipeline runs pixel-space models: a plugin's loop
            hook = self.pixel_sampler(components)
            if hook is None:
                raise SamplingError(
                    f"family '{self.name}' samples latent models only, and '{components.source}' has no VAE "
                    "(no plugin registers a pixel-space sampler for it: diffpo.family.register_pixel_sampler)"
                )
            return hook.build(components, network, settings, device)
        return PipelineSampler(self.build_pipeline(components, network), settings, device)

    # --- saving --------------------------------------------------------------------------------
    def build_pipeline(self, components: Components, network: nn.Module | None = None):
        raise NotImplementedError  # pragma: no cover

    def save_full(self, components: Components, network: nn.Module, out_dir: Path) -> None:
        """Save a complete diffusers pipeline folder that ``from_pretrained`` loads."""
        self.build_pipeline(components, network).save_pretrained(out_dir)

    def save_lora(self, network: nn.Module, out_dir: Path) -> None:
        """Save adapters in the diffusers LoRA format (``pipeline.load_lora_weights(out_dir)``)."""
        from peft.utils import get_peft_model_state_dict
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(network))
        # The adapter config (rank, alpha, targets) travels as metadata: without it diffusers loads
        # with alpha = rank, which silently rescales any LoRA trained with alpha != rank.
        metadata = network.peft_config["default"].to_dict()
        metadata_argument = self.lora_prefix_argument.replace("_lora_layers", "_lora_adapter_metadata")
        self.pipeline_class.save_lora_weights(out_dir, **{self.lora_prefix_argument: state, metadata_argument: metadata})


FAMILIES: dict[str, type[Family]] = {}


def own_declaration(cls: type[Family], attribute: str, default: Any) -> Any:
    """What ``cls`` itself declares for ``attribute`` (not what it inherits)."""
    return cls.__dict__.get(attribute, default)


def register_family(cls: type[Family]) -> type[Family]:
    """Make ``model.family: <cls.name>`` (and ``auto`` for its pipeline classes, and its ``tiny:``
    ids) resolve to ``cls``. A name, pipeline class or tiny id another family holds is refused."""
    others = [other for name, other in FAMILIES.items() if name != cls.name]
    held = FAMILIES.get(cls.name)
    # The same class again (its module re-imported) replaces itself; another class under the name is refused.
    if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"model family {cls.name!r} is already registered ({held.__module__}.{held.__qualname__}); unregister_family({cls.name!r}) first")
    for attribute in ("detect_pipeline_classes", "tiny_models"):
        taken = {key: other.name for other in others for key in own_declaration(other, attribute, ())}
        clash = [key for key in own_declaration(cls, attribute, ()) if key in taken]
        if clash:
            raise ValueError(f"family {cls.name!r}: {attribute} {clash[0]!r} is already declared by family {taken[clash[0]]!r}")
    FAMILIES[cls.name] = cls
    return cls


def unregister_family(name: str) -> None:
    FAMILIES.pop(name, None)


def family_for_pipeline(class_name: str) -> str | None:
    """The registered family whose ``detect_pipeline_classes`` names ``class_name``, or None."""
    return next((name for name, cls in FAMILIES.items() if class_name in own_declaration(cls, "detect_pipeline_classes", ())), None)


# ----------------------------------------------------------------------------------------------
# Reading a model folder or hub repo
# ----------------------------------------------------------------------------------------------


def from_subfolder(cls, path: str, cfg: ModelConfig, subfolder: str, *, weights: bool = True):
    """``cls.from_pretrained`` of one part of a pipeline folder or hub repo at ``model.revision``;
    parts with weights also at ``model.variant`` (tokenizers and schedulers have no variants)."""
    kwargs = {"variant": cfg.variant} if weights else {}
    return cls.from_pretrained(path, subfolder=subfolder, revision=cfg.revision, **kwargs)


def _has_component(path: str, name: str) -> bool:
    """Whether a local folder or hub repo holds the sub-model ``name`` (a null entry = absent)."""
    index = _read_model_index(path)
    if index is not None:
        entry = index.get(name)
        return bool(entry) and entry[0] is not None
    return Path(path, name).is_dir()


def _read_model_index(path: str) -> dict | None:
    local = Path(path, "model_index.json")
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists():
        return None
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise ModelLoadError(f"model folder not found: {path}")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())
    except Exception as err:  # network, missing repo, gated model: say which id failed and why
        raise ModelLoadError(f"cannot read model_index.json of '{path}': {err}") from None


# ----------------------------------------------------------------------------------------------
# Pixel-space samplers (a plugin's hook)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelSampler:
    """How a family samples models without a VAE, which no diffusers pipeline runs.

    The shapes world registers its DDIM loop for the ``sd`` family (``diffpo.toy.plugin``)."""

    build: Callable[..., Callable[[list[str], list[int]], list]]
    """``build(components, network, settings, device)`` -> a callable (prompts, seeds) -> PIL images."""
    defaults: Mapping[str, Any]
    """``SamplerSettings`` used unless told otherwise (steps, guidance, scheduler, clip_sample)."""
    schedulers: tuple[str, ...] = ("ddim",)
    """Names in ``diffpo.sampling.SCHEDULERS`` the loop accepts."""


PIXEL_SAMPLERS: dict[str, PixelSampler] = {}
"""Family name -> the sampler for that family's models without a VAE."""


def register_pixel_sampler(family: str, sampler: PixelSampler, *, overwrite: bool = False) -> None:
    if family in PIXEL_SAMPLERS and not overwrite:
        raise ValueError(f"a pixel-space sampler for family {family!r} is already registered; pass overwrite=True to replace it")
    PIXEL_SAMPLERS[family] = sampler


def pixel_sampler(family: str) -> PixelSampler | None:
    """The registered sampler of ``family`` (plugins are loaded on a miss), or None."""
    if family not in PIXEL_SAMPLERS:
        from diffpo.plugins import load_plugins

        load_plugins()
    return PIXEL_SAMPLERS.get(family)
