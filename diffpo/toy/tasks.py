"""Preference tasks of the shapes world, written in the formats the trainer reads for real data.

* ``style`` (MaPO's style adaptation, "reference mismatch"): chosen = the prompt rendered in a style
  the base model never saw (``outline`` or ``striped``; ``severity`` in [0, 1] sets how far from the
  base's solid fill), rejected = a base-model sample of the same prompt. Written as a manifest.
* ``reward`` (Pick-a-Pic): two base-model samples per prompt, labelled by a programmatic judge
  (``diffpo.toy.rewards``) with optional label noise and ties. Written as a Pick-a-Pic-schema parquet
  table (caption, jpg_0, jpg_1, label_0), so the tie policy and column handling are exercised.

Both take an optional ``cache`` (``diffpo.image_cache.ImageCache``) for the base samples.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


from diffpo.toy.grammar import SHAPES, ShapePrompt, all_prompts, split_prompts
from diffpo.toy.render import STYLES, render
from diffpo.toy.rewards import REWARDS

TASKS = ("style", "reward")


@dataclass
class Sampler:
    """Sampling settings shared by pair building and evaluation (defaults from the sampler sweep)."""

    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    batch_size: int = 256

    def as_dict(self) -> dict:
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale, "batch_size": self.batch_size}


def prompt_split(seed: int = 0) -> tuple[list[ShapePrompt], list[ShapePrompt]]:
    """(train, held-out) base prompts; held-out prompts are new combinations of seen words."""
    return split_prompts(all_prompts(shapes=SHAPES), heldout_fraction=0.2, seed=seed)


def base_samples(components, prompts: Sequence[ShapePrompt], seeds: Sequence[int], sampler: Sampler, device: str, progress: bool, desc: str, cache=None):
    from diffpo.sampling import generate

    return generate(components, [p.text for p in prompts], list(seeds), device=device, progress=progress, desc=desc, cache=cache, **sampler.as_dict())


def build_style_pairs(
    components, out_dir: Path, prompts: Sequence[ShapePrompt], *, per_prompt: int, style: str = "outline", severity: float = 1.0,
    seed: int = 0, sampler: Sampler = Sampler(), device: str = "cpu", progress: bool = True, cache=None,
) -> Path:
    """Chosen = style renders, rejected = base samples; returns the manifest path.

    Built the way a user builds a style dataset with ``diffpo pairs from-images --chosen
    out_dir/chosen --prompts captions``: the renders are written to a folder with a caption file
    each, read back through ``list_images``/``read_prompts`` and handed to
    ``build_pairs_from_images``, so the testbed exercises that path end to end. Render k and
    rejected sample k both use seed ``seed * 100_000 + k`` (the seeds the task has always used).
    """
    from diffpo.data.from_images import build_pairs_from_images, list_images, read_prompts
    from diffpo.data.pairs import DataError

    if style not in STYLES or style == "solid":
        raise ValueError(f"style task needs a new style: one of {[s for s in STYLES if s != 'solid']}, got {style!r}")
    out_dir = Path(out_dir)
    folder = out_dir / "chosen"
    folder.mkdir(parents=True, exist_ok=True)
    first_seed = seed * 100_000
    items = [p for p in prompts for _ in range(per_prompt)]
    for k, prompt in enumerate(items):
        render(prompt, style=style, severity=severity, seed=first_seed + k).save(folder / f"{k:05d}.png")
        (folder / f"{k:05d}.txt").write_text(prompt.text + "\n")
    chosen = list_images(folder)
    if len(chosen) != len(items):  # a folder reused from a larger task would add stale images
        raise DataError(f"{folder}: {len(chosen)} images, expected the {len(items)} just rendered; use a fresh out_dir")
    settings = sampler.as_dict()
    return build_pairs_from_images(
        components, chosen, read_prompts("captions", chosen), out_dir, seed=first_seed, batch_size=settings.pop("batch_size"),
        sampler=settings, device=device, progress=progress, cache=cache,
    )


def build_reward_pairs(
    components, out_dir: Path, prompts: Sequence[ShapePrompt], *, per_prompt: int, reward: str = "size", label_noise: float = 0.0,
    tie_margin: float = 0.0, seed: int = 0, sampler: Sampler = Sampler(), device: str = "cpu", progress: bool = True, cache=None,
) -> Path:
    """Two base samples per (prompt, j), judged by ``reward``; returns the parquet path.

    ``tie_margin``: reward differences at most this are labelled 0.5 (a tie). ``label_noise``: that
    fraction of labels is flipped (seeded), as a noisy human judge would.
    """
    import datasets

    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r} (valid: {', '.join(REWARDS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = [(p, seed * 100_000 + 2 * (i * per_prompt + j)) for i, p in enumerate(prompts) for j in range(per_prompt)]
    flat_prompts = [p for p, _ in items for _ in range(2)]
    flat_seeds = [s + d for _, s in items for d in (0, 1)]
    images = base_samples(components, flat_prompts, flat_seeds, sampler, device, progress, "base samples (pairs)", cache)
    scores = REWARDS[reward](images, flat_prompts)
    rng = random.Random(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "reward_0": [], "reward_1": []}
    for k, (prompt, _) in enumerate(items):
        r0, r1 = float(scores[2 * k]), float(scores[2 * k + 1])
        label = 0.5 if abs(r0 - r1) <= tie_margin else float(r0 > r1)
        if label != 0.5 and rng.random() < label_noise:
            label = 1.0 - label
        rows["caption"].append(prompt.text)
        rows["jpg_0"].append(_png(images[2 * k]))
        rows["jpg_1"].append(_png(images[2 * k + 1]))
        rows["label_0"].append(label)
        rows["reward_0"].append(r0)
        rows["reward_1"].append(r1)
    path = out_dir / "pairs.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_agreement(path: Path) -> float:
    """Fraction of non-tie labels that agree with the stored rewards (1 - effective noise)."""
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    labels, r0, r1 = (np.array(table[c]) for c in ("label_0", "reward_0", "reward_1"))
    decided = labels != 0.5
    return float(np.mean((labels[decided] == 1.0) == (r0[decided] > r1[decided])))
