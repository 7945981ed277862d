"""The shapes world's base model: a tiny pixel-space text-to-image diffusion model.

A Stable-Diffusion-shaped pipeline without a VAE (the UNet works on 32x32 RGB pixels in [-1, 1]),
with the word-level tokenizer and a tiny CLIP text encoder, both trained from scratch on solid
renders of every base prompt. It is saved as a regular diffusers folder (``vae`` null), so the
trainer and the evaluation load it through the same path as a real model id. The committed
weights live in ``diffpo/assets/toy_base`` with ``pretrain.json`` (command, seed, measured
faithfulness); ``model.pretrained: toy:base`` points there.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffpo.toy.grammar import SHAPES, all_prompts
from diffpo.toy.render import render

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_base"
RESOLUTION = 32


def build_toy_pipeline(seed: int = 0):
    """Randomly initialised toy pipeline (UNet attention only at 8x8 keeps CPU sampling fast)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffpo.toy.tokenizer import build_tokenizer, text_encoder_config

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, hidden_size=64, layers=2, heads=4))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False,
        steps_offset=1, timestep_spacing="trailing",  # trailing spacing samples well in few DDIM steps
    )
    return StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def render_bank(per_prompt: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Solid renders of every base prompt: (N, 3, 32, 32) in [-1, 1] and their prompt texts."""
    images, texts = [], []
    for p_index, prompt in enumerate(all_prompts(shapes=SHAPES)):
        for j in range(per_prompt):
            array = np.asarray(render(prompt, seed=seed * 1_000_003 + p_index * 1000 + j), dtype=np.float32)
            images.append(torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1))
            texts.append(prompt.text)
    return torch.stack(images), texts


def pretrain(
    out_dir: str | Path,
    *,
    steps: int = 6000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    per_prompt: int = 64,
    device: str = "cpu",
    cond_dropout: float = 0.1,
    progress: bool = True,
) -> Path:
    """Train the toy base from scratch and save it as a diffusers folder with ``pretrain.json``.

    Plain epsilon-prediction DDPM training on the render bank, with 10% empty prompts so that
    classifier-free guidance works, and an EMA of the weights (what gets saved).
    """
    from diffusers.training_utils import EMAModel

    started = time.perf_counter()
    torch.manual_seed(seed)
    pipe = build_toy_pipeline(seed)
    unet, text_encoder, tokenizer, scheduler = pipe.unet.to(device), pipe.text_encoder.to(device), pipe.tokenizer, pipe.scheduler
    bank, texts = render_bank(per_prompt, seed)
    bank = bank.to(device)
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    lr_at = lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    ema_unet = EMAModel(unet.parameters(), decay=0.999, foreach=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=0.999, foreach=True)
    # All randomness on the training device: no host round trips in the loop (launch-bound model).
    generator = torch.Generator(device=device).manual_seed(seed)
    alphas = scheduler.alphas_cumprod.to(device)
    losses = []
    for step in tqdm(range(steps), desc="toy pretrain", disable=not progress):
        index = torch.randint(0, len(bank), (batch_size,), generator=generator, device=device)
        x0 = bank[index]
        flip = torch.rand(batch_size, generator=generator, device=device) < 0.5  # mirror-symmetric world
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        batch_ids = torch.where((torch.rand(batch_size, generator=generator, device=device) < cond_dropout)[:, None], empty, ids[index])
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=device)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            pred = unet(noisy, t, encoder_hidden_states=text_encoder(batch_ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        losses.append(loss.detach())
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to("cpu").save_pretrained(tmp)
    info = {
        "command": f"diffpo toy pretrain --out {out_dir} --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed} --device {device}",
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "per_prompt": per_prompt, "device": device,
        "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
        "final_loss_mean_last_200": float(torch.stack(losses[-200:]).mean()),
    }
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_toy_model(model_path: str | Path, device: str = "cpu"):
    """A shapes-world model folder (the committed base, or a tuned one) as ``Components`` ready to
    sample on ``device`` (pixel space: no VAE to move)."""
    from diffpo.config import ModelConfig
    from diffpo.models import load_components

    components = load_components(ModelConfig(pretrained=str(model_path), family="sd"))
    for module in (components.network, *components.text_encoders):
        module.to(device)
    return components


def measure_faithfulness(model_path: str | Path, *, per_prompt: int = 8, steps: int = 10, guidance_scale: float = 3.0, device: str = "cpu", progress: bool = False, **sampler) -> dict[str, float]:
    """Color/shape/background accuracy of the model's samples over every base prompt."""
    from diffpo.sampling import generate
    from diffpo.toy.checker import faithfulness

    components = load_toy_model(model_path, device)
    prompts = [p for p in all_prompts(shapes=SHAPES) for _ in range(per_prompt)]
    seeds = list(range(len(prompts)))
    images = generate(components, [p.text for p in prompts], seeds, num_inference_steps=steps, guidance_scale=guidance_scale, device=device, progress=progress, batch_size=256, **sampler)
    return faithfulness(images, prompts)
