"""Pixel-space sampling: the DDIM loop for models without a VAE (the shapes-world model).

No diffusers pipeline runs a pixel-space text-to-image UNet, so this one model keeps its own loop,
registered for the ``sd`` family's models without a VAE (``diffpo.toy.plugin``,
``diffpo.family.PixelSampler``):
the classifier-free-guidance DDIM loop of diffusers' StableDiffusionPipeline, minus the VAE. Every
image gets its own seed (``initial_noise``), so base and tuned models compared "on the same seeds"
start from the same noise image by image, whatever the batch size. Latent models sample through
their family's pipeline instead (``diffpo.sampling``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


PIXEL_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 3.0, "scheduler": "ddim", "clip_sample": True}
"""The shapes world's calibrated settings: ``SamplerSettings`` defaults for pixel-space models."""


def build_sampler(components, network: torch.nn.Module, settings, device):
    """``PixelSampler.build``: (prompts, seeds) -> images with ``sample_pixels`` and the resolved
    ``diffpo.sampling.SamplerSettings``."""

    def sample(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return sample_pixels(
            components, network, prompts, seeds, num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale, resolution=settings.resolution, device=device, clip_sample=settings.clip_sample,
        )

    return sample


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One (C, H, W) standard-normal tensor per seed, stacked; independent of batch layout."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


@torch.inference_mode()
def sample_pixels(
    components,
    network: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int | None = None,
    device: str | torch.device = "cpu",
    clip_sample: bool = True,
) -> list[Image.Image]:
    """One image per (prompt, seed), all in one batch, with DDIM and classifier-free guidance.

    ``clip_sample`` clips DDIM's x0 estimate to [-1, 1], the data's range in pixel space. Without
    it, an epsilon model's x0 estimate at the first, almost pure-noise step is amplified by
    1/sqrt(alpha_bar) and washes colours out.
    """
    from diffusers import DDIMScheduler

    size = resolution or network.config.sample_size
    channels = network.config.in_channels
    scheduler = DDIMScheduler.from_config(components.scheduler.config, clip_sample=clip_sample, set_alpha_to_one=False)
    family = components.family
    dtype = next(network.parameters()).dtype
    uncond = family.encode_prompts(components, [""])["encoder_hidden_states"]
    cond = family.encode_prompts(components, list(prompts))["encoder_hidden_states"]
    context = torch.cat([uncond.expand(len(prompts), -1, -1), cond]).to(device, dtype)
    latents = initial_noise(seeds, (channels, size, size)).to(device, dtype)
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise_uncond, noise_cond = network(model_in, t, encoder_hidden_states=context).sample.chunk(2)
        noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return to_pil(latents)
