"""Per-sample denoising errors for a batch of preference pairs.

LOSSES.md: a batch of B pairs becomes one batch of 2B inputs ``[winners; losers]``. The two images
of a pair share one noise sample and one timestep (as in every method's public training code), so
their errors differ only through the images. ``err_i`` is the float32 mean over all non-batch
dimensions of (prediction_i - target_i)^2.

Targets, by scheduler:
- DDPM family (``scheduler.config.prediction_type``): ``epsilon`` -> the noise; ``v_prediction``
  -> ``scheduler.get_velocity(x0, noise, t)``; ``sample`` -> x0.
- Flow matching (FlowMatchEulerDiscreteScheduler, SD3/Flux): x_t = (1 - sigma) x0 + sigma noise,
  and the network predicts the velocity dx_t/dsigma = noise - x0 (diffusers' SD3 training script,
  examples/dreambooth/train_dreambooth_sd3.py, uses ``target = noise - model_input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

Tensor = torch.Tensor


@dataclass
class NoisedPairs:
    """Network inputs for 2B samples ``[winners; losers]`` and their regression targets."""

    noisy: Tensor  # (2B, C, H, W)
    timesteps: Tensor  # (2B,)
    target: Tensor  # (2B, C, H, W)
    sigmas: Tensor | None = None  # (2B,) flow-matching noise levels, None for DDPM schedulers


def is_flow_matching(scheduler) -> bool:
    """Flow-matching schedulers carry ``sigmas`` over a shifted time grid and no alphas."""
    return not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas")


def _expand(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _one_per_pair(generators: Sequence[torch.Generator], batch: int) -> list[torch.Generator]:
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} pairs")
    return list(generators)


def noise_pairs(
    scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    timestep_sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> NoisedPairs:
    """Noise both images of each pair with the same noise and timestep.

    ``generator`` (CPU) makes noise and timesteps reproducible independently of the device, so a
    resumed run draws exactly what an uninterrupted one would. Given one generator per pair, each
    pair's draws depend only on its own generator: the trainer seeds them by the pair's position
    in the global batch, so N processes with batch B draw what one process with batch N*B draws.
    The ``timestep_sampling``/``logit_*`` arguments apply to flow matching only (SD3 defaults).
    """
    if latents_w.shape != latents_l.shape:
        raise ValueError(f"winner and loser latents differ in shape: {tuple(latents_w.shape)} vs {tuple(latents_l.shape)}")
    batch = latents_w.shape[0]
    x0 = torch.cat([latents_w, latents_l])
    num_train_timesteps = scheduler.config.num_train_timesteps
    flow = is_flow_matching(scheduler)
    if isinstance(generator, (list, tuple)):
        generators = _one_per_pair(generator, batch)
        noise = torch.stack([torch.randn(latents_w.shape[1:], generator=g, dtype=torch.float32) for g in generators])
        draw = torch.cat([_draw_time(flow, 1, num_train_timesteps, g, timestep_sampling, logit_mean, logit_std, mode_scale) for g in generators])
    else:
        noise = torch.randn(latents_w.shape, generator=generator, dtype=torch.float32)
        draw = _draw_time(flow, batch, num_train_timesteps, generator, timestep_sampling, logit_mean, logit_std, mode_scale)
    noise = noise.to(latents_w.device, latents_w.dtype)
    noise = torch.cat([noise, noise])

    if flow:
        indices = (draw * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
        timesteps = scheduler.timesteps[indices].to(x0.device).repeat(2)
        sigmas = scheduler.sigmas[indices].to(x0.device, torch.float32).repeat(2)
        s = _expand(sigmas, x0)
        noisy = (1.0 - s) * x0 + s * noise
        return NoisedPairs(noisy=noisy, timesteps=timesteps, target=noise - x0, sigmas=sigmas)

    timesteps = draw.to(x0.device).repeat(2)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    elif prediction_type == "sample":
        target = x0
    else:
        raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")
    return NoisedPairs(noisy=noisy, timesteps=timesteps, target=target)


def _draw_time(flow: bool, n: int, num_train_timesteps: int, generator, scheme: str, logit_mean: float, logit_std: float, mode_scale: float) -> Tensor:
    """Flow matching: u in [0, 1] from SD3's density; DDPM: an integer timestep."""
    if flow:
        return compute_density_for_timestep_sampling(scheme, n, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=generator)
    return torch.randint(0, num_train_timesteps, (n,), generator=generator)


def sample_latents(mode: Tensor, std: Tensor | None, generators: Sequence[torch.Generator] | None) -> Tensor:
    """A VAE posterior sample ``mode + std * randn`` per image, one generator per image (or the
    mode itself when ``generators`` is None or there is no std: pixel space, deterministic mode)."""
    if std is None or generators is None:
        return mode.float()
    noise = torch.stack([torch.randn(mode.shape[1:], generator=g, dtype=torch.float32) for g in _one_per_pair(generators, mode.shape[0])])
    return mode.float() + std.float() * noise.to(mode.device)


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every non-batch dimension, in float32: shape (N,)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def split_pairs(errors: Tensor) -> tuple[Tensor, Tensor]:
    """``[winners; losers]`` (2B,) -> (err_w, err_l), each (B,)."""
    if errors.shape[0] % 2:
        raise ValueError(f"expected an even number of samples [winners; losers], got {errors.shape[0]}")
    return errors.chunk(2)
