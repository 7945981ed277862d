"""What the latent families share: CLIP prompt encoding, the VAE's downsampling factor and
force_upcast, and the repeated blocks of diffusers' UNet2DConditionModel."""

from __future__ import annotations

import torch

from diffpo.family import Components, Family

Tensor = torch.Tensor

UNET_COMPILE_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")
"""UNet2DConditionModel's repeated blocks. Transformer2DModel (not its inner BasicTransformerBlocks:
nested compiled regions) is one region."""


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def tokenize(tokenizer, prompts: list[str], max_length: int) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def clip_embeds(tokenizer, encoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(penultimate hidden states, first output) of a CLIP text encoder. The first output is the
    projected ``text_embeds`` of CLIPTextModelWithProjection, the ``pooler_output`` otherwise."""
    ids = tokenize(tokenizer, prompts, tokenizer.model_max_length).to(encoder.device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def upcast_vae_if_needed(vae) -> None:
    if vae is not None and getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32:
        vae.to(torch.float32)


class LatentFamily(Family):
    """A family with a VAE whose config may ask for float32 encoding (``force_upcast``)."""

    def encode_image_moments(self, components: Components, pixels: Tensor):
        upcast_vae_if_needed(components.vae)
        return super().encode_image_moments(components, pixels)
