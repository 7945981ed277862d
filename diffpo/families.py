"""Model families beyond SD 1.x/2.x: SDXL (UNet, two CLIP encoders), SD3 and Flux (flow matching).

Each family follows ``StableDiffusionFamily`` in ``diffpo.models`` (base class: ``diffpo.family``):
``load`` reads a diffusers folder or hub id, ``encode_prompts`` returns batch-first conditioning
tensors (the trainer duplicates them for ``[winners; losers]``), ``predict`` runs the denoiser and
returns a prediction with the latents' shape (B, C, H, W), ``build_pipeline`` assembles the
diffusers pipeline that ``save_full`` writes and that ``diffpo.sampling.generate`` samples with
(the class attribute ``sampling_default_settings`` gives the family's steps, guidance and
scheduler), and LoRA saves through the pipeline's ``save_lora_weights``.

SD 2.x v-prediction needs no family: the ``sd`` family with a scheduler whose
``prediction_type`` is ``v_prediction`` trains against the velocity (``diffpo.objectives``).

Per-sample error on flow-matching models (SD3, Flux)
-----------------------------------------------------
MaPO, DMPO and Diffusion-DPO were published, with code, for DDPM-type UNets (SD 1.5 / SDXL); no
public code applies them to flow models, so this is our definition, stated once here:

- x_t = (1 - sigma) x0 + sigma * noise, with the pair's two images sharing noise and sigma;
- the network predicts a velocity and ``err = mean((v_pred - (noise - x0))^2)`` over all latent
  dimensions (float32), per image, like the epsilon MSE of the DDPM case;
- no extra loss weighting (diffusers' ``weighting_scheme="none"``) and no output preconditioning
  (train_dreambooth_lora_sd3.py's ``--precondition_outputs`` is not used: it would weight the
  error by sigma^2);
- timesteps are drawn logit-normal(0, 1) on the scheduler's (shifted) sigma grid, as SD3's
  training script does (``compute_density_for_timestep_sampling``).
The objectives then use these errors exactly as they use epsilon errors (beta and any
SNR-dependent term keep their DDPM meaning only approximately: tune beta per family).

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
from diffpo.family import Components, Family, _has_component, register_family

Tensor = torch.Tensor


def _vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def _clip_embeds(tokenizer, encoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(penultimate hidden states, first output) of a CLIP text encoder. The first output is the
    projected ``text_embeds`` of CLIPTextModelWithProjection, the ``pooler_output`` otherwise."""
    ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length).to(encoder.device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _upcast_vae_if_needed(vae) -> None:
    if vae is not None and getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32:
        vae.to(torch.float32)


class _LatentFamily(Family):
    def encode_image_moments(self, components: Components, pixels: Tensor):
        _upcast_vae_if_needed(components.vae)
        return super().encode_image_moments(components, pixels)


@register_family
class SDXLFamily(_LatentFamily):
    """Stable Diffusion XL: UNet with ``text_time`` added conditioning, two CLIP text encoders."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    sampling_default_settings = {"num_inference_steps": 30, "guidance_scale": 5.0, "scheduler": "euler"}
    """StableDiffusionXLPipeline's default guidance and SDXL's shipped Euler scheduler; the pipeline
    computes ``time_ids`` from the sampled height and width (original = target size, crop 0)."""

    def __init__(self, vae_path: str | None = None):
        self.vae_path = vae_path

    def load(self, path: str, cfg: ModelConfig, encoders: bool = True) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        kw = {"revision": cfg.revision}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=cfg.variant, **kw)
        # Training noise schedule: DDPM over the model's betas (train_text_to_image_sdxl.py).
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if not encoders:  # time ids still need the VAE's downsampling factor: read its config only
            vae_config = AutoencoderKL.load_config(self.vae_path) if self.vae_path else AutoencoderKL.load_config(path, subfolder="vae", **kw)
            factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
            return Components(self, unet, scheduler, [], [], source=path, extras={"vae_scale_factor": factor})
        if self.vae_path:
            vae = AutoencoderKL.from_pretrained(self.vae_path)
        else:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=cfg.variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=cfg.variant, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=cfg.variant, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        return Components(self, unet, scheduler, [text_encoder, text_encoder_2], [tokenizer, tokenizer_2], vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        (tok1, tok2), (enc1, enc2) = components.tokenizers, components.text_encoders
        hidden_1, _ = _clip_embeds(tok1, enc1, prompts)
        hidden_2, pooled = _clip_embeds(tok2, enc2, prompts)
        return {"encoder_hidden_states": torch.cat([hidden_1, hidden_2], dim=-1), "text_embeds": pooled}

    def time_ids(self, components: Components, latents: Tensor) -> Tensor:
        factor = components.extras.get("vae_scale_factor") or _vae_scale_factor(components.vae)
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


@register_family
class SD3Family(_LatentFamily):
    """Stable Diffusion 3 / 3.5: MMDiT transformer, flow matching, CLIP-L + CLIP-G + T5."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
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

        kw = {"revision": cfg.revision}
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", variant=cfg.variant, **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if not encoders:
            return Components(self, transformer, scheduler, [], [], source=path)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=cfg.variant, **kw)
        encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=f, variant=cfg.variant, **kw) for f in ("text_encoder", "text_encoder_2")]
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f, **kw) for f in ("tokenizer", "tokenizer_2")]
        if _has_component(path, "text_encoder_3"):  # SD3 may ship without T5: zeros then, as the pipeline does
            encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", variant=cfg.variant, **kw))
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **kw))
        return Components(self, transformer, scheduler, encoders, tokenizers, vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt (no CFG, clip_skip None)."""
        encoders, tokenizers = components.text_encoders, components.tokenizers
        hidden_1, pooled_1 = _clip_embeds(tokenizers[0], encoders[0], prompts)
        hidden_2, pooled_2 = _clip_embeds(tokenizers[1], encoders[1], prompts)
        clip_hidden = torch.cat([hidden_1, hidden_2], dim=-1)
        joint_dim = components.network.config.joint_attention_dim
        if len(encoders) > 2:
            tokenizer_3, t5 = tokenizers[2], encoders[2]
            length = min(self.max_sequence_length, tokenizer_3.model_max_length)
            t5_hidden = t5(_tokenize(tokenizer_3, prompts, length).to(t5.device))[0]
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


@register_family
class FluxFamily(_LatentFamily):
    """Flux.1: MMDiT + single-stream transformer on 2x2-packed latents, CLIP pooled + T5 tokens.

    ``predict`` packs the (B, C, H, W) latents into (B, H/2 * W/2, 4C) tokens, runs the
    transformer with RoPE image/text ids (and the guidance embedding when the model has one,
    ``guidance_scale`` as train_dreambooth_lora_flux.py's default 3.5), and unpacks the
    prediction back to (B, C, H, W), so errors are computed exactly as for SD3.
    """

    name = "flux"
    pipeline_class_name = "FluxPipeline"
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

        kw = {"revision": cfg.revision}
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", variant=cfg.variant, **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if not encoders:
            return Components(self, transformer, scheduler, [], [], source=path)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=cfg.variant, **kw)
        clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=cfg.variant, **kw)
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", variant=cfg.variant, **kw)
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f, **kw) for f in ("tokenizer", "tokenizer_2")]
        return Components(self, transformer, scheduler, [clip, t5], tokenizers, vae=vae, source=path)

    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, Tensor]:
        """As FluxPipeline.encode_prompt: CLIP ``pooler_output`` + T5 last hidden state."""
        (clip, t5), (tok_clip, tok_t5) = components.text_encoders, components.tokenizers
        ids = _tokenize(tok_clip, prompts, tok_clip.model_max_length).to(clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        length = min(self.max_sequence_length, tok_t5.model_max_length)
        prompt_embeds = t5(_tokenize(tok_t5, prompts, length).to(t5.device), output_hidden_states=False)[0]
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
