"""``sd3``: Stable Diffusion 3 / 3.5, an MMDiT transformer trained by flow matching, with CLIP-L,
CLIP-G and (optionally) T5 text encoders. The per-sample error on flow models is defined in
``diffpo.families`` (the package docstring)."""

from __future__ import annotations

import torch
from torch import nn

from diffpo.config import ModelConfig
from diffpo.families.common import LatentFamily, clip_embeds, tokenize
from diffpo.family import Components, _has_component, from_subfolder, register_family
from diffpo.tiny import build_tokenizer, tiny_clip, tiny_t5, tiny_vae

Tensor = torch.Tensor


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
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=tiny_clip(tokenizers[0], 16, with_projection=True),
        text_encoder_2=tiny_clip(tokenizers[1], 16, with_projection=True),
        text_encoder_3=tiny_t5(tokenizers[2], 32),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2],
    )


@register_family
class SD3Family(LatentFamily):
    """Stable Diffusion 3 / 3.5: MMDiT transformer, flow matching, CLIP-L + CLIP-G + T5."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    detect_pipeline_classes = ("StableDiffusion3Pipeline",)
    tiny_models = {"sd3": build_tiny_sd3}
    compile_blocks = ("JointTransformerBlock",)
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    pooled_text_key = "pooled_projections"
    sampling_default_settings = {"num_inference_steps": 28, "guidance_scale": 7.0, "scheduler": "flow_euler"}
    """StableDiffusion3Pipeline's defaults."""
    schedulers = ("flow_euler",)
    network_subfolder = "transformer"
    lora_prefix_argument = "transformer_lora_layers"
    max_sequence_length = 77
    """T5 tokens (train_dreambooth_lora_sd3.py's default; the pipeline samples with 256)."""

    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        transformer, scheduler = self.load_network(path, cfg, SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler)
        if not encoders:
            return Components(self, transformer, scheduler, [], [], source=path)
        vae = from_subfolder(AutoencoderKL, path, cfg, "vae")
        encoders = [from_subfolder(CLIPTextModelWithProjection, path, cfg, f) for f in ("text_encoder", "text_encoder_2")]
        tokenizers = [from_subfolder(AutoTokenizer, path, cfg, f, weights=False) for f in ("tokenizer", "tokenizer_2")]
        if _has_component(path, "text_encoder_3"):  # SD3 may ship without T5: zeros then, as the pipeline does
            encoders.append(from_subfolder(T5EncoderModel, path, cfg, "text_encoder_3"))
            tokenizers.append(from_subfolder(AutoTokenizer, path, cfg, "tokenizer_3", weights=False))
        return Components(self, transformer, scheduler, encoders, tokenizers, vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt (no CFG, clip_skip None)."""
        encoders, tokenizers = components.text_encoders, components.tokenizers
        hidden_1, pooled_1 = clip_embeds(tokenizers[0], encoders[0], prompts)
        hidden_2, pooled_2 = clip_embeds(tokenizers[1], encoders[1], prompts)
        clip_hidden = torch.cat([hidden_1, hidden_2], dim=-1)
        joint_dim = components.network.config.joint_attention_dim
        if len(encoders) > 2:
            tokenizer_3, t5 = tokenizers[2], encoders[2]
            length = min(self.max_sequence_length, tokenizer_3.model_max_length)
            t5_hidden = t5(tokenize(tokenizer_3, prompts, length).to(t5.device))[0]
        else:
            t5_hidden = torch.zeros(len(prompts), self.max_sequence_length, joint_dim, device=clip_hidden.device, dtype=clip_hidden.dtype)
        clip_hidden = nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        prompt_embeds = torch.cat([clip_hidden, t5_hidden.to(clip_hidden.dtype)], dim=-2)
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": torch.cat([pooled_1, pooled_2], dim=-1)}

    def predict(self, components, network, noisy, timesteps, cond):
        return network(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype),
        ).sample

    def build_pipeline(self, components: Components, network: nn.Module | None = None):
        encoders, tokenizers = components.text_encoders, components.tokenizers
        return self.pipeline_class(
            transformer=network if network is not None else components.network,
            scheduler=components.scheduler,
            vae=components.vae,
            text_encoder=encoders[0], text_encoder_2=encoders[1], text_encoder_3=encoders[2] if len(encoders) > 2 else None,
            tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2] if len(tokenizers) > 2 else None,
        )
