"""Model architectures for the throughput benchmarks, from the published config values, random weights.

No download: the UNet, VAE and text-encoder configs below are the values of the published
``config.json`` files (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0; keys left at their
diffusers/transformers defaults are omitted). The weights are random, which changes nothing about
the time or memory of a step. ``tiny-sd`` and ``tiny-sdxl`` keep each family's structure at toy size
for the CPU smoke run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # "sd" or "sdxl": the diffpo family whose encode/predict code runs (and whose text encoders are built)
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    vae_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def text_length(self) -> int:
        return self.text_encoders[0]["max_position_embeddings"]


ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", "sd", 512, SD15_UNET, VAE, (CLIP_L,), {"scaling_factor": 0.18215, "sample_size": 512}),
    "sdxl": Arch("sdxl", "sdxl", 1024, SDXL_UNET, VAE, (CLIP_L, CLIP_BIGG), {"scaling_factor": 0.13025, "sample_size": 1024, "force_upcast": True}),
    "tiny-sd": Arch(
        "tiny-sd", "sd", 32,
        dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8),
        (dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16, projection_dim=32),),
        {"scaling_factor": 0.18215},
    ),
    "tiny-sdxl": Arch(
        "tiny-sdxl", "sdxl", 32,
        dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
        dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8),
        (
            dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16, projection_dim=32),
            dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16, projection_dim=32),
        ),
        {"scaling_factor": 0.13025, "force_upcast": True},
    ),
}


def build_unet(arch: Arch, device: torch.device | str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: SDXL's 2.6B parameters init in seconds there
        return UNet2DConditionModel(**arch.unet)


def build_encoders(arch: Arch, device: torch.device | str):
    """(vae, text_encoders, tokenizers) with random weights. The tokenizer is the shapes world's word
    tokenizer padded to the encoder's 77 positions: the text encoders' cost depends on the sequence
    length, not on the vocabulary."""
    import transformers
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    from diffpo.models import FAMILIES
    from diffpo.toy.tokenizer import build_tokenizer

    classes = FAMILIES[arch.family].text_encoder_classes  # e.g. SDXL's second is the projected one
    with torch.device(device):
        vae = AutoencoderKL(**arch.vae, **arch.vae_extra)
        encoders = []
        for cfg, class_name in zip(arch.text_encoders, classes, strict=True):
            config = CLIPTextConfig(**cfg, bos_token_id=2, eos_token_id=3, pad_token_id=0)
            encoders.append(getattr(transformers, class_name)(config))
    tokenizers = [build_tokenizer(max_length=arch.text_length) for _ in encoders]
    return vae, encoders, tokenizers
