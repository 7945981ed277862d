"""``sd``: Stable Diffusion 1.x / 2.x (epsilon or v prediction), and pixel-space models (no VAE).

A model without a VAE trains like any other; sampling it needs a loop a plugin registers
(``diffpo.family.register_pixel_sampler``; the shapes world does, for its base model).
"""

from __future__ import annotations

import torch
from torch import nn

from diffpo.config import ModelConfig
from diffpo.families.common import UNET_COMPILE_BLOCKS
from diffpo.family import Components, Family, _has_component, from_subfolder, register_family
from diffpo.tiny import tiny_text_parts, tiny_unet, tiny_vae

Tensor = torch.Tensor


def build_tiny_sd():
    """A Stable-Diffusion-shaped pipeline: 32px images, a 2x VAE (16x16x4 latents), a tiny UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, text_encoder = tiny_text_parts()
    vae = tiny_vae()
    unet = tiny_unet(in_channels=4, sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sd2v():
    """The tiny ``sd`` model with an SD 2.x-style v-prediction scheduler."""
    from diffusers import DDPMScheduler

    pipe = build_tiny_sd()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.register_modules(scheduler=pipe.scheduler)
    return pipe


@register_family
class StableDiffusionFamily(Family):
    """SD 1.x / 2.x (epsilon or v prediction), and pixel-space models when there is no VAE."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    detect_pipeline_classes = ("StableDiffusionPipeline",)
    tiny_models = {"sd": build_tiny_sd, "sd2v": build_tiny_sd2v}
    compile_blocks = UNET_COMPILE_BLOCKS
    text_encoder_classes = ("CLIPTextModel",)

    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        unet, scheduler = self.load_network(path, cfg, UNet2DConditionModel, DDPMScheduler)
        if not encoders:
            return Components(self, unet, scheduler, [], [], source=path)
        vae = from_subfolder(AutoencoderKL, path, cfg, "vae") if _has_component(path, "vae") else None
        text_encoder = from_subfolder(CLIPTextModel, path, cfg, "text_encoder")
        tokenizer = from_subfolder(AutoTokenizer, path, cfg, "tokenizer", weights=False)
        return Components(self, unet, scheduler, [text_encoder], [tokenizer], vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden = encoder(ids.to(encoder.device))[0]
        return {"encoder_hidden_states": hidden}

    def predict(self, components, network, noisy, timesteps, cond):
        return network(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype)).sample

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
