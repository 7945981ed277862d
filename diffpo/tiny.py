"""Tiny random diffusers pipelines built in-process from configs (no download).

They are written to a local folder with ``save_pretrained`` and then loaded through exactly the
path a real hub id takes, so tests and CPU runs exercise the real loading code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

TINY_BUILDERS: dict[str, Callable[[], object]] = {}


def _tiny(name: str):
    def wrap(fn):
        TINY_BUILDERS[name] = fn
        return fn

    return wrap


def _text_parts(hidden_size: int = 32):
    from transformers import CLIPTextModel

    from diffpo.toy.tokenizer import build_tokenizer, text_encoder_config

    tokenizer = build_tokenizer()
    encoder = CLIPTextModel(text_encoder_config(tokenizer, hidden_size=hidden_size, layers=2, heads=2))
    return tokenizer, encoder


def tiny_unet(in_channels: int, sample_size: int, cross_attention_dim: int = 32, block_out_channels=(32, 64)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


@_tiny("sd")
def build_tiny_sd():
    """A Stable-Diffusion-shaped pipeline: 32px images, a 2x VAE (16x16x4 latents), a tiny UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, text_encoder = _text_parts()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    unet = tiny_unet(in_channels=4, sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny(name: str, out_dir: Path) -> Path:
    """Build tiny model ``name`` into ``out_dir`` once (atomically); return the folder."""
    if name not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny model 'tiny:{name}' (valid: {', '.join('tiny:' + n for n in TINY_BUILDERS)})")
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with torch.random.fork_rng():  # building must not disturb the caller's RNG stream
            TINY_BUILDERS[name]().save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
