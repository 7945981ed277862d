"""``sdxl``: Stable Diffusion XL, a UNet with ``text_time`` added conditioning and two CLIP text encoders.

SDXL micro-conditioning
-----------------------
``time_ids = (original_size, crop_top_left, target_size)``; we use the training resolution for
both sizes and crop (0, 0), as the Diffusion-DPO SDXL code does (``add_time_ids = [res, res, 0, 0,
res, res]``). MaPO's and diffusers' train_text_to_image_sdxl.py pass each image's true original
size and crop offset instead; threading those through the data pipeline is not done.
The resolution is read off the latents: latent size * the VAE's downsampling factor.

An fp16-fix VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``) can be used with
``SDXLFamily(vae_path=...)`` when building components by hand; there is no config key for it yet
(TODO: ``model.vae`` in ``ModelConfig``). A VAE whose config says ``force_upcast`` is moved to
float32 on first use and encodes in float32, as diffusers' SDXL script does.
"""

from __future__ import annotations

import torch
from torch import nn

from diffpo.config import ModelConfig
from diffpo.families.common import UNET_COMPILE_BLOCKS, LatentFamily, clip_embeds, vae_scale_factor
from diffpo.family import Components, from_subfolder, register_family
from diffpo.tiny import build_tokenizer, tiny_clip, tiny_vae

Tensor = torch.Tensor


def build_tiny_sdxl():
    """SDXL-shaped, after diffusers' fast test (tests/pipelines/stable_diffusion_xl): two CLIP
    encoders of width 32 (the second with projection), cross-attention 64 = 32 + 32, and the
    ``text_time`` added conditioning with 6 * 8 + 32 = 80 input features."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    text_encoder = tiny_clip(tokenizer, 32, with_projection=False)
    text_encoder_2 = tiny_clip(tokenizer_2, 32, with_projection=True)
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
        vae=tiny_vae(force_upcast=True), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


@register_family
class SDXLFamily(LatentFamily):
    """Stable Diffusion XL: UNet with ``text_time`` added conditioning, two CLIP text encoders."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    detect_pipeline_classes = ("StableDiffusionXLPipeline",)
    tiny_models = {"sdxl": build_tiny_sdxl}
    compile_blocks = UNET_COMPILE_BLOCKS
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    pooled_text_key = "text_embeds"
    sampling_default_settings = {"num_inference_steps": 30, "guidance_scale": 5.0, "scheduler": "euler"}
    """StableDiffusionXLPipeline's default guidance and SDXL's shipped Euler scheduler; the pipeline
    computes ``time_ids`` from the sampled height and width (original = target size, crop 0)."""

    def __init__(self, vae_path: str | None = None):
        self.vae_path = vae_path

    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        # Training noise schedule: DDPM over the model's betas (train_text_to_image_sdxl.py).
        unet, scheduler = self.load_network(path, cfg, UNet2DConditionModel, DDPMScheduler)
        if not encoders:  # time ids still need the VAE's downsampling factor: read its config only
            vae_config = AutoencoderKL.load_config(self.vae_path) if self.vae_path else AutoencoderKL.load_config(path, subfolder="vae", revision=cfg.revision)
            factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
            return Components(self, unet, scheduler, [], [], source=path, extras={"vae_scale_factor": factor})
        vae = AutoencoderKL.from_pretrained(self.vae_path) if self.vae_path else from_subfolder(AutoencoderKL, path, cfg, "vae")
        text_encoder = from_subfolder(CLIPTextModel, path, cfg, "text_encoder")
        text_encoder_2 = from_subfolder(CLIPTextModelWithProjection, path, cfg, "text_encoder_2")
        tokenizer, tokenizer_2 = (from_subfolder(AutoTokenizer, path, cfg, f, weights=False) for f in ("tokenizer", "tokenizer_2"))
        return Components(self, unet, scheduler, [text_encoder, text_encoder_2], [tokenizer, tokenizer_2], vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        (tok1, tok2), (enc1, enc2) = components.tokenizers, components.text_encoders
        hidden_1, _ = clip_embeds(tok1, enc1, prompts)
        hidden_2, pooled = clip_embeds(tok2, enc2, prompts)
        return {"encoder_hidden_states": torch.cat([hidden_1, hidden_2], dim=-1), "text_embeds": pooled}

    def time_ids(self, components: Components, latents: Tensor) -> Tensor:
        factor = components.extras.get("vae_scale_factor") or vae_scale_factor(components.vae)
        height, width = (s * factor for s in latents.shape[-2:])
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=latents.dtype, device=latents.device)
        return ids[None].repeat(latents.shape[0], 1)

    def predict(self, components, network, noisy, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"].to(noisy.dtype), "time_ids": self.time_ids(components, noisy)}
        return network(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype), added_cond_kwargs=added).sample

    def build_pipeline(self, components: Components, network: nn.Module | None = None):
        from diffusers import EulerDiscreteScheduler

        (tok1, tok2), (enc1, enc2) = components.tokenizers, components.text_encoders
        return self.pipeline_class(
            vae=components.vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok1, tokenizer_2=tok2,
            unet=network if network is not None else components.network,
            scheduler=EulerDiscreteScheduler.from_config(components.scheduler.config),
            add_watermarker=False,
        )
