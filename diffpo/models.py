"""Loading diffusers models, LoRA through peft, the reference model, and saving results.

A *family* adapter hides what differs between model families (text encoders, extra
conditioning, latent scaling, which pipeline class loads the result); the trainer only sees
``Components`` and the four family methods ``encode_prompts``, ``encode_image_moments``, ``predict`` and
``save``. This file holds the Stable Diffusion 1.x/2.x family, which also covers pixel-space
models (no VAE: the shapes world). Other families register themselves in ``FAMILIES``.

Reference model (LOSSES.md): with LoRA it is the same network with adapters disabled; with full
fine-tuning it is a frozen copy. Reference-free objectives never build or run it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from diffpo.config import LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

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
    network_subfolder = "unet"
    lora_prefix_argument = "unet_lora_layers"

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    # --- loading -------------------------------------------------------------------------------
    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:  # pragma: no cover - abstract
        """``encoders=False``: only the network and scheduler (training from a latent cache)."""
        raise NotImplementedError

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
        return dict(self.sampling_default_settings)

    def sampling_schedulers(self, components: Components) -> tuple[str, ...]:
        return self.schedulers

    def default_resolution(self, components: Components) -> int:
        """Image side the pipeline would pick: the network's sample size times the VAE factor."""
        size = getattr(components.network.config, "sample_size", None) or self.default_sample_size
        vae = components.vae
        return size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)

    def sampler(self, components: Components, network: nn.Module, settings, device) -> Callable[[list[str], list[int]], list]:
        """A callable (prompts, seeds) -> PIL images for ``diffpo.sampling.generate``: the family's
        diffusers pipeline around ``network``, built once per ``generate`` call."""
        from diffpo.sampling import PipelineSampler, SamplingError

        if components.vae is None:
            raise SamplingError(f"family '{self.name}' samples latent models only, and '{components.source}' has no VAE")
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


FAMILIES: dict[str, Callable[[], Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.name] = cls
    return cls


@register_family
class StableDiffusionFamily(Family):
    """SD 1.x / 2.x (epsilon or v prediction), and pixel-space models when there is no VAE."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"revision": cfg.revision}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=cfg.variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if not encoders:
            return Components(self, unet, scheduler, [], [], source=path)
        vae = None
        if _has_component(path, "vae"):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=cfg.variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=cfg.variant, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        return Components(self, unet, scheduler, [text_encoder], [tokenizer], vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden = encoder(ids.to(encoder.device))[0]
        return {"encoder_hidden_states": hidden}

    def predict(self, components, network, noisy, timesteps, cond):
        return network(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype)).sample

    PIXEL_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 3.0, "scheduler": "ddim", "clip_sample": True}
    """Pixel-space models (no VAE): the shapes world's calibrated settings and its own DDIM loop."""

    def sampling_defaults(self, components: Components) -> dict[str, Any]:
        return dict(self.PIXEL_SAMPLING) if components.vae is None else super().sampling_defaults(components)

    def sampling_schedulers(self, components: Components) -> tuple[str, ...]:
        return ("ddim",) if components.vae is None else super().sampling_schedulers(components)

    def sampler(self, components: Components, network: nn.Module, settings, device):
        if components.vae is not None:
            return super().sampler(components, network, settings, device)
        from diffpo.toy.sampling import sample_pixels  # no pipeline runs pixel-space UNets

        def sample(prompts: list[str], seeds: list[int]) -> list:
            return sample_pixels(
                components, network, prompts, seeds, num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale, resolution=settings.resolution, device=device, clip_sample=settings.clip_sample,
            )

        return sample

    def build_pipeline(self, components: Components, network: nn.Module | None = None):
        from diffusers import DDIMScheduler

        return self.pipeline_class(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            unet=network if network is not None else components.network,
            scheduler=DDIMScheduler.from_config(components.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# ----------------------------------------------------------------------------------------------
# Resolving and loading
# ----------------------------------------------------------------------------------------------


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


_PIPELINE_TO_FAMILY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def detect_family(path: str) -> str:
    index = _read_model_index(path) or {}
    pipeline = index.get("_class_name", "")
    try:
        return _PIPELINE_TO_FAMILY[pipeline]
    except KeyError:
        raise ModelLoadError(f"'{path}': cannot tell the model family from pipeline class '{pipeline}'; set model.family") from None


def resolve_pretrained(pretrained: str, cache_dir: Path | None = None) -> str:
    """``tiny:<name>`` -> build the tiny model once into a local folder; ``toy:base`` -> the
    committed shapes-world base model; anything else (hub id, folder) as is."""
    if pretrained == "toy:base":
        from diffpo.toy.base import ASSET_DIR

        return str(ASSET_DIR)
    if not pretrained.startswith("tiny:"):
        return pretrained
    from diffpo.tiny import build_tiny

    name = pretrained.split(":", 1)[1]
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "diffpo" / "tiny")
    return str(build_tiny(name, cache_dir / name))


def resolve_family(cfg: ModelConfig, cache_dir: Path | None = None) -> tuple[str, str]:
    """(local folder or hub id, family name) of ``cfg.pretrained``."""
    path = resolve_pretrained(cfg.pretrained, cache_dir)
    family_name = detect_family(path) if cfg.family == "auto" else cfg.family
    if family_name not in FAMILIES:
        raise ModelLoadError(f"unknown model family '{family_name}' (valid: {', '.join(FAMILIES)})")
    return path, family_name


def load_components(cfg: ModelConfig, cache_dir: Path | None = None, with_encoders: bool = True) -> Components:
    """``with_encoders=False`` loads only the network and scheduler: no VAE, no text encoders
    (training from a latent cache, ``diffpo.cache``)."""
    path, family_name = resolve_family(cfg, cache_dir)
    family = FAMILIES[family_name]()
    try:
        components = family.load(path, cfg, encoders=with_encoders)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load '{cfg.pretrained}' as family '{family_name}': {err}") from err
    for module in components.frozen_modules():
        module.requires_grad_(False).eval()
    return components


# ----------------------------------------------------------------------------------------------
# LoRA and the reference model
# ----------------------------------------------------------------------------------------------


def add_lora(network: nn.Module, cfg: LoraConfig) -> None:
    """Freeze the network and add trainable LoRA adapters through peft (diffusers' add_adapter)."""
    from peft import LoraConfig as PeftLoraConfig

    network.requires_grad_(False)
    network.add_adapter(
        PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian", target_modules=cfg.target_modules)
    )


class Reference:
    """Computes the frozen reference prediction: adapters off (LoRA) or a frozen copy (full)."""

    def __init__(self, network: nn.Module, use_lora: bool):
        self.use_lora = use_lora
        self.frozen = None if use_lora else copy.deepcopy(network).requires_grad_(False).eval()

    @contextlib.contextmanager
    def network(self, trained: nn.Module):
        if self.frozen is not None:
            yield self.frozen
            return
        trained.disable_adapters()
        try:
            yield trained
        finally:
            trained.enable_adapters()


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    return [p for p in network.parameters() if p.requires_grad]


from diffpo import families as _families  # noqa: E402,F401  (registers sdxl, sd3, flux)
