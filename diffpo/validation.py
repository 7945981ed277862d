"""Validation sampling during training: a fixed prompt set, fixed seeds, every N steps.

What users of diffusers' training scripts expect: a grid of samples per validation step, saved to
OUTPUT_DIR/samples/step-N.png and logged to the active trackers (tensorboard, wandb), so a run's
drift can be seen, not just read off the loss. Every family samples through its diffusers pipeline
(``diffpo.sampling.generate``), with the family's default steps and guidance unless set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffpo.config import LoggingConfig
from diffpo.models import Components

logger = logging.getLogger(__name__)


def validation_grid(components: Components, network: torch.nn.Module, cfg: LoggingConfig, device) -> Image.Image:
    from diffpo.evaluate.grid import image_grid
    from diffpo.sampling import generate

    n = cfg.validation_images_per_prompt
    prompts = [p for p in cfg.validation_prompts for _ in range(n)]
    seeds = [j for _ in cfg.validation_prompts for j in range(n)]  # same seeds at every step
    was_training = network.training
    images = generate(
        components, prompts, seeds, network=network, num_inference_steps=cfg.validation_inference_steps,
        guidance_scale=cfg.validation_guidance_scale, resolution=cfg.validation_resolution, device=device, progress=False,
    )
    network.train(was_training)
    rows = [images[i * n : (i + 1) * n] for i in range(len(cfg.validation_prompts))]
    return image_grid(rows, row_labels=list(cfg.validation_prompts), col_labels=[f"seed {j}" for j in range(n)])


def run_validation(accelerator, components: Components, network: torch.nn.Module, cfg: LoggingConfig, output_dir: Path, step: int) -> Path | None:
    """Sample, save ``samples/step-N.png`` and log it; main process only. Returns the file."""
    grid = validation_grid(components, network, cfg, accelerator.device)
    path = Path(output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":  # pragma: no cover - needs wandb
            import wandb

            tracker.log({"validation": [wandb.Image(grid)]}, step=step)
    return path
