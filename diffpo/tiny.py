"""Tiny random diffusers pipelines built in-process from configs (no download): ``tiny:<name>`` ids.

Each family declares its tiny models next to its code (``Family.tiny_models`` in
``diffpo/families/<name>.py``); this module holds the parts they share (word tokenizer, CLIP and T5
encoders, VAE, UNet at toy size) and ``build_tiny``, which saves one to a folder.

They are written to a local folder with ``save_pretrained`` and then loaded through exactly the
path a real hub id takes, so tests and CPU runs exercise the real loading code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

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


def tiny_text_parts(hidden_size: int = 32):
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


def tiny_vae(latent_channels: int = 4, **kwargs):
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


def tiny_clip(tokenizer, hidden_size: int, with_projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffpo.word_tokenizer import text_encoder_config

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(text_encoder_config(tokenizer, hidden_size=hidden_size, layers=2, heads=2))


def tiny_t5(tokenizer, d_model: int = 32):
    """A tiny T5 encoder on the word-level tokenizer (relative positions: any max_length works)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)



def tiny_builders() -> dict[str, Callable[[], Any]]:
    """``tiny:<name>`` -> the function that builds it, from every registered family's ``tiny_models``."""
    import diffpo.families  # noqa: F401  (registers the built-in families)
    from diffpo.family import FAMILIES, own_declaration

    return {name: builder for family in FAMILIES.values() for name, builder in own_declaration(family, "tiny_models", {}).items()}


def tiny_builder(name: str) -> Callable[[], Any]:
    """The builder of ``tiny:<name>`` (plugins are loaded when no family declares it)."""
    builders = tiny_builders()
    if name not in builders:
        from diffpo.plugins import load_plugins

        load_plugins()
        builders = tiny_builders()
    if name not in builders:
        raise ValueError(f"unknown tiny model 'tiny:{name}' (valid: {', '.join('tiny:' + n for n in builders)})")
    return builders[name]


def build_tiny(name: str, out_dir: Path) -> Path:
    """Build tiny model ``name`` into ``out_dir`` once (atomically); return the folder."""
    builder = tiny_builder(name)
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with torch.random.fork_rng():  # building must not disturb the caller's RNG stream
            builder().save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
