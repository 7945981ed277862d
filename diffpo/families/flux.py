"""``flux``: Flux.1, an MMDiT + single-stream transformer on 2x2-packed latents, trained by flow
matching, with a CLIP (pooled) and a T5 (tokens) text encoder. The per-sample error on flow models
is defined in ``diffpo.families`` (the package docstring)."""

from __future__ import annotations

import torch
from torch import nn

from diffpo.config import ModelConfig
from diffpo.families.common import LatentFamily, tokenize
from diffpo.family import Components, from_subfolder, register_family
from diffpo.tiny import build_tokenizer, tiny_clip, tiny_t5, tiny_vae

Tensor = torch.Tensor


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
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=tiny_clip(tokenizer, 32, with_projection=False),
        text_encoder_2=tiny_t5(tokenizer_2, 32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
    )


@register_family
class FluxFamily(LatentFamily):
    """Flux.1: MMDiT + single-stream transformer on 2x2-packed latents, CLIP pooled + T5 tokens.

    ``predict`` packs the (B, C, H, W) latents into (B, H/2 * W/2, 4C) tokens, runs the
    transformer with RoPE image/text ids (and the guidance embedding when the model has one,
    ``guidance_scale`` as train_dreambooth_lora_flux.py's default 3.5), and unpacks the
    prediction back to (B, C, H, W), so errors are computed exactly as for SD3.
    """

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    detect_pipeline_classes = ("FluxPipeline",)
    tiny_models = {"flux": build_tiny_flux}
    compile_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    pooled_text_key = "pooled_projections"
    sampling_default_settings = {"num_inference_steps": 28, "guidance_scale": 3.5, "scheduler": "flow_euler"}
    """FluxPipeline's defaults (FLUX.1-dev). The guidance goes into the guidance embedding when the
    transformer has one (``config.guidance_embeds``); FLUX.1-schnell has none and ignores it (sample
    it with 4 steps)."""
    schedulers = ("flow_euler",)
    default_sample_size = 128
    """FluxPipeline.default_sample_size: the transformer's config has no sample size."""
    network_subfolder = "transformer"
    lora_prefix_argument = "transformer_lora_layers"
    max_sequence_length = 512
    """T5 tokens (train_dreambooth_lora_flux.py's default; use 256 for FLUX.1-schnell)."""
    guidance_scale = 3.5

    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        transformer, scheduler = self.load_network(path, cfg, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler)
        if not encoders:
            return Components(self, transformer, scheduler, [], [], source=path)
        vae = from_subfolder(AutoencoderKL, path, cfg, "vae")
        clip = from_subfolder(CLIPTextModel, path, cfg, "text_encoder")
        t5 = from_subfolder(T5EncoderModel, path, cfg, "text_encoder_2")
        tokenizers = [from_subfolder(AutoTokenizer, path, cfg, f, weights=False) for f in ("tokenizer", "tokenizer_2")]
        return Components(self, transformer, scheduler, [clip, t5], tokenizers, vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        """As FluxPipeline.encode_prompt: CLIP ``pooler_output`` + T5 last hidden state."""
        (clip, t5), (tok_clip, tok_t5) = components.text_encoders, components.tokenizers
        ids = tokenize(tok_clip, prompts, tok_clip.model_max_length).to(clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        length = min(self.max_sequence_length, tok_t5.model_max_length)
        prompt_embeds = t5(tokenize(tok_t5, prompts, length).to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def predict(self, components, network, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        prompt_embeds = cond["encoder_hidden_states"].to(noisy.dtype)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        config = getattr(network, "config", None) or network.module.config
        guidance = torch.full((batch,), self.guidance_scale, device=noisy.device, dtype=noisy.dtype) if config.guidance_embeds else None
        out = network(
            hidden_states=packed,
            timestep=timesteps.to(noisy.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        # _unpack_latents takes pixel sizes and the VAE factor; factor 1 with latent sizes is the same.
        return FluxPipeline._unpack_latents(out, height, width, 1)

    def build_pipeline(self, components: Components, network: nn.Module | None = None):
        (clip, t5), (tok_clip, tok_t5) = components.text_encoders, components.tokenizers
        return self.pipeline_class(
            transformer=network if network is not None else components.network,
            scheduler=components.scheduler, vae=components.vae,
            text_encoder=clip, tokenizer=tok_clip, text_encoder_2=t5, tokenizer_2=tok_t5,
        )
