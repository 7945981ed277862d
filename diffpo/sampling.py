"""Batched, seeded sampling for SD-family models, with or without a VAE.

Every image gets its own seed, so base and tuned models compared "on the same seeds" start from
the same initial noise image by image, whatever the batch size. The loop is the standard
classifier-free-guidance DDIM loop of diffusers' StableDiffusionPipeline; we keep our own copy
because the pipeline cannot run pixel-space models (no VAE) and draws one noise tensor per batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffpo.models import Components


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One (C, H, W) standard-normal tensor per seed, stacked; independent of batch layout."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


@torch.no_grad()
def generate(
    components: Components,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    network: torch.nn.Module | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    resolution: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "sampling",
    clip_sample: bool | None = None,
) -> list[Image.Image]:
    """Sample one image per (prompt, seed) with DDIM and classifier-free guidance.

    ``clip_sample`` clips DDIM's x0 estimate to [-1, 1]; by default on for pixel-space models (where
    that range is the data's) and off for latent models. Without it, an epsilon model's x0 estimate
    at the first, almost pure-noise step is amplified by 1/sqrt(alpha_bar) and washes colours out.
    """
    from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    network = network if network is not None else components.network
    network.eval()
    vae = components.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    sample_size = network.config.sample_size
    size = (resolution // scale) if resolution else sample_size
    channels = network.config.in_channels
    if clip_sample is None:
        clip_sample = vae is None
    scheduler = DDIMScheduler.from_config(components.scheduler.config, clip_sample=clip_sample, set_alpha_to_one=False)
    family = components.family
    dtype = next(network.parameters()).dtype
    uncond = family.encode_prompts(components, [""])["encoder_hidden_states"]

    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2):
        batch_prompts = list(prompts[start : start + batch_size])
        cond = family.encode_prompts(components, batch_prompts)["encoder_hidden_states"]
        context = torch.cat([uncond.expand(len(batch_prompts), -1, -1), cond]).to(device, dtype)
        latents = initial_noise(seeds[start : start + batch_size], (channels, size, size)).to(device, dtype)
        scheduler.set_timesteps(num_inference_steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise_uncond, noise_cond = network(model_in, t, encoder_hidden_states=context).sample.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        if vae is not None:
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        images.extend(to_pil(latents))
    return images
