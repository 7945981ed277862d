"""Batched, seeded sampling for every model family: one entry point, ``generate``.

Evaluation (``diffpo eval``), training-time validation and ``diffpo pairs from-images`` all sample
through ``generate(components, prompts, seeds, network=..., settings=...)``. Latent models run their
family's diffusers pipeline (``Family.build_pipeline``: StableDiffusion[XL|3]Pipeline,
FluxPipeline) rather than a re-written loop, so SDXL's ``time_ids`` and pooled embeddings, SD3's
and Flux's flow-matching schedulers and Flux's guidance embedding are the pipeline's own.
Pixel-space models, which no pipeline runs, sample with the loop a plugin registers for their
family (``diffpo.family.PixelSampler``; the shapes world's DDIM loop for its base model).

Same noise whatever the batch size: image k is drawn from its own CPU ``torch.Generator`` seeded
with ``seeds[k]``; pipelines accept one generator per image and draw each image's initial latents
from its own generator (``diffusers.utils.torch_utils.randn_tensor``). Base and tuned images of
one (prompt, seed) therefore start from the same noise, on CPU or GPU, at any batch size. Keeping
the generators on the CPU makes CPU and GPU runs draw the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffpo.models import Components

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SamplingError(ValueError):
    """The model cannot be sampled with these settings; the message says why."""


def _ddim(config):
    from diffusers import DDIMScheduler

    # SD 1.x/2.x ship clip_sample=False, set_alpha_to_one=False; the training DDPMScheduler's
    # defaults (clip_sample=True) are wrong for latents. prediction_type (epsilon / v) is kept.
    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)


def _euler(config):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


def _dpm(config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config)


def _flow_euler(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


SCHEDULERS: dict[str, Callable[[Any], Any]] = {"ddim": _ddim, "euler": _euler, "dpm++": _dpm, "flow_euler": _flow_euler}
"""Sampling schedulers by name, each built from the model's training scheduler config (a fresh
object: pipelines call ``set_timesteps``, which must not touch the scheduler training uses)."""


@dataclass(frozen=True)
class SamplerSettings:
    """How images are sampled. ``None`` means the family's default (``Family.sampling_defaults``).
    The ``flag`` of each field is its name on the command line (``diffpo eval``, ``diffpo pairs``)."""

    num_inference_steps: int | None = field(default=None, metadata={"flag": "--steps"})
    """Sampling steps; None: the family's (30 for SD/SDXL, 28 for SD3/Flux, 25 for toy:base)."""
    guidance_scale: float | None = field(default=None, metadata={"flag": "--guidance"})
    """Classifier-free guidance; None: the family's (7.5 SD, 5.0 SDXL, 7.0 SD3, 3.5 Flux, 3.0
    toy:base). Flux models with a guidance embedding (FLUX.1-dev) take it as the embedded guidance
    instead, as FluxPipeline does."""
    resolution: int | None = field(default=None, metadata={"flag": "--resolution"})
    """Square image side in pixels; None: the model's default (its sample size * VAE factor)."""
    scheduler: str | None = field(default=None, metadata={"flag": "--scheduler"})
    """One of ``SCHEDULERS`` the family supports (ddim, euler, dpm++, flow_euler); None: the
    family's (ddim SD, euler SDXL, flow_euler SD3/Flux)."""
    dtype: Literal["fp32", "bf16", "fp16"] | None = field(default=None, metadata={"flag": "--dtype"})
    """Cast the model (in place) to this dtype before sampling; None keeps its dtype (float32 as loaded)."""
    cpu_offload: bool = field(default=False, metadata={"flag": "--cpu-offload"})
    """``pipeline.enable_model_cpu_offload``: one sub-model on the GPU at a time (less memory,
    slower; needs a GPU)."""
    vae_tiling: bool = field(default=False, metadata={"flag": "--vae-tiling"})
    """``vae.enable_tiling()``: decode in overlapping tiles (large images, less memory)."""
    vae_slicing: bool = field(default=False, metadata={"flag": "--vae-slicing"})
    """``vae.enable_slicing()``: decode one image of the batch at a time."""
    clip_sample: bool | None = field(default=None, metadata={"flag": "--clip-sample"})
    """Pixel-space models only: clip DDIM's x0 estimate to [-1, 1] (None: on)."""

    def __post_init__(self):
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise SamplingError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.resolution is not None and self.resolution < 1:
            raise SamplingError(f"resolution must be >= 1, got {self.resolution}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SamplingError(f"unknown dtype '{self.dtype}' (valid: {', '.join(DTYPES)})")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise SamplingError(f"unknown scheduler '{self.scheduler}' (valid: {', '.join(SCHEDULERS)})")

    @classmethod
    def from_any(cls, settings: "SamplerSettings | Mapping[str, Any] | None" = None, **overrides) -> "SamplerSettings":
        """Settings from a ``SamplerSettings``, a dict of its fields, or keywords (which win)."""
        base = asdict(settings) if isinstance(settings, SamplerSettings) else dict(settings or {})
        merged = {**base, **overrides}
        unknown = set(merged) - {f.name for f in fields(cls)}
        if unknown:
            raise SamplingError(f"unknown sampler settings {sorted(unknown)}; valid: {', '.join(f.name for f in fields(cls))}")
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_settings(components: Components, settings: SamplerSettings | Mapping[str, Any] | None = None, **overrides) -> SamplerSettings:
    """The settings ``generate`` will use: ``None`` fields filled from the family's defaults,
    the resolution from the model, the scheduler checked against what the family supports."""
    settings = SamplerSettings.from_any(settings, **overrides)
    family = components.family
    defaults = family.sampling_defaults(components)
    filled = {k: defaults.get(k) if getattr(settings, k) is None else getattr(settings, k) for k in ("num_inference_steps", "guidance_scale", "scheduler", "clip_sample")}
    if settings.resolution is None:
        filled["resolution"] = family.default_resolution(components)
    resolved = replace(settings, **filled)
    allowed = family.sampling_schedulers(components)
    if resolved.scheduler not in allowed:
        raise SamplingError(f"scheduler '{resolved.scheduler}' does not fit family '{family.name}' (valid: {', '.join(allowed)})")
    return resolved


def generate(
    components: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    network: torch.nn.Module | None = None,
    settings: SamplerSettings | Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "sampling",
    **overrides,
) -> list[Image.Image]:
    """One image per (prompt, seed); ``network`` (default ``components.network``) is the denoiser,
    e.g. a LoRA-adapted copy. ``overrides`` are ``SamplerSettings`` fields and win over ``settings``."""
    return [image for batch in iter_generate(components, prompts, seeds, network=network, settings=settings, batch_size=batch_size, device=device, progress=progress, desc=desc, **overrides) for image in batch]


def iter_generate(
    components: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    network: torch.nn.Module | None = None,
    settings: SamplerSettings | Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "sampling",
    **overrides,
) -> Iterator[list[Image.Image]]:
    """``generate`` one batch at a time, so callers can save and drop images as they come."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise SamplingError(f"batch_size must be >= 1, got {batch_size}")
    settings = resolve_settings(components, settings, **overrides)
    device = torch.device(device)
    if settings.cpu_offload and device.type == "cpu":
        raise SamplingError("cpu_offload moves sub-models between the CPU and a GPU: it needs a GPU device")
    if not components.text_encoders:
        raise SamplingError(f"'{components.source}' was loaded without its text encoders, so it cannot be sampled")
    network = network if network is not None else components.network
    # In place: a no-op during training-time validation (already there, dtype None); eval and
    # from-images own their models. With cpu_offload the pipeline's hooks place each sub-model.
    move = {} if settings.cpu_offload else {"device": device}
    if settings.dtype is not None:
        move["dtype"] = DTYPES[settings.dtype]
    for module in (network, *components.frozen_modules()):
        if move:
            module.to(**move)
    network.eval()
    try:
        sample = components.family.sampler(components, network, settings, device)
    except NotImplementedError:
        raise SamplingError(f"diffpo cannot sample models of family '{components.family.name}' (it has no pipeline to sample with)") from None
    starts = range(0, len(prompts), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2):
            yield sample(list(prompts[start : start + batch_size]), list(seeds[start : start + batch_size]))


class PipelineSampler:
    """Samples through a family's diffusers pipeline with one CPU generator per image."""

    def __init__(self, pipeline, settings: SamplerSettings, device: torch.device):
        self.pipeline, self.settings, self.device = pipeline, settings, device
        pipeline.scheduler = SCHEDULERS[settings.scheduler](pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        if settings.cpu_offload:
            pipeline.enable_model_cpu_offload(device=device)
        if settings.vae_tiling:
            pipeline.vae.enable_tiling()
        if settings.vae_slicing:
            pipeline.vae.enable_slicing()

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        s = self.settings
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        with _autocast_if_mixed(self.pipeline, self.device):
            return self.pipeline(
                prompt=prompts, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                height=s.resolution, width=s.resolution, generator=generators, output_type="pil",
            ).images


def _autocast_if_mixed(pipeline, device: torch.device):
    """Autocast to the lowest precision among the sub-models when their dtypes differ.

    During training the trained network may be float32 (master weights) while the frozen text
    encoders and VAE run in bf16/fp16 (``train.py``); pipelines pass tensors between sub-models
    in the text encoder's dtype, which a float32 network cannot take without autocast.
    """
    dtypes = {m.dtype for m in pipeline.components.values() if isinstance(m, torch.nn.Module) and hasattr(m, "dtype")}
    if len(dtypes) < 2:
        return contextlib.nullcontext()
    low = torch.float16 if torch.float16 in dtypes else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=low)
