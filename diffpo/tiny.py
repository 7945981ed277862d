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

TINY_WORDS: tuple[str, ...] = (
    "a", "on", "the", "at", "in", "background",
    "red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray",
    "circle", "square", "triangle", "star", "small", "large",
    "left", "right", "top", "bottom", "center", "sks", "zxq", "vlt",
)
"""The tiny models' vocabulary: the words of the prompts tests feed them ("a red circle on a gray
background"), plus three rare words for DreamBooth-style identifiers. Kept word for word and in
order as it was when these models borrowed the shapes world's tokenizer: the vocabulary size
sets the embedding shape and so every random weight drawn after it, and the ids decide what a
prompt encodes to, so any change here changes every tiny model."""


def build_tokenizer():
    """The tiny models' word-level tokenizer (``diffpo.word_tokenizer``, 16 tokens with bos/eos)."""
    from diffpo.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(TINY_WORDS)


TINY_BUILDERS: dict[str, Callable[[], object]] = {}


def _tiny(name: str):
    def wrap(fn):
        TINY_BUILDERS[name] = fn
        return fn

    return wrap


def _text_parts(hidden_size: int = 32):
    from transformers import CLIPTextModel

    from diffpo.word_tokenizer import text_encoder_config

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
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, text_encoder = _text_parts()
    vae = _tiny_vae()
    unet = tiny_unet(in_channels=4, sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_vae(latent_channels: int = 4, **kwargs):
    """A 2x-downsampling VAE (32px images -> 16x16 latents), as in the tiny ``sd`` model."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        **kwargs,
    )


def _clip(tokenizer, hidden_size: int, with_projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffpo.word_tokenizer import text_encoder_config

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(text_encoder_config(tokenizer, hidden_size=hidden_size, layers=2, heads=2))


def _t5(tokenizer, d_model: int = 32):
    """A tiny T5 encoder on the word-level tokenizer (relative positions: any max_length works)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


@_tiny("sd2v")
def build_tiny_sd2v():
    """The tiny ``sd`` model with an SD 2.x-style v-prediction scheduler."""
    from diffusers import DDPMScheduler

    pipe = build_tiny_sd()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.register_modules(scheduler=pipe.scheduler)
    return pipe


@_tiny("sdxl")
def build_tiny_sdxl():
    """SDXL-shaped, after diffusers' fast test (tests/pipelines/stable_diffusion_xl): two CLIP
    encoders of width 32 (the second with projection), cross-attention 64 = 32 + 32, and the
    ``text_time`` added conditioning with 6 * 8 + 32 = 80 input features."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    text_encoder = _clip(tokenizer, 32, with_projection=False)
    text_encoder_2 = _clip(tokenizer_2, 32, with_projection=True)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(force_upcast=True), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


@_tiny("sd3")
def build_tiny_sd3():
    """SD3-shaped, after diffusers' fast test (tests/pipelines/stable_diffusion_3): two CLIP
    encoders with projection (width 16 each: pooled 32, token features 32 padded to the T5 width),
    a T5 encoder of width 32, a one-layer MMDiT with patch 2, the SD3 flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizers = [build_tokenizer() for _ in range(3)]
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizers[0], 16, with_projection=True),
        text_encoder_2=_clip(tokenizers[1], 16, with_projection=True),
        text_encoder_3=_t5(tokenizers[2], 32),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2],
    )


@_tiny("flux")
def build_tiny_flux():
    """Flux-shaped, after diffusers' fast test (tests/pipelines/flux): a CLIP encoder for the pooled
    vector, a T5 encoder for the tokens, one double- and one single-stream block with RoPE axes
    (4, 4, 8), guidance embedding (as FLUX.1-dev), 4 latent channels packed 2x2 -> 16 features."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, 32, with_projection=False),
        text_encoder_2=_t5(tokenizer_2, 32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
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
