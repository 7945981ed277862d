"""Programmatic judge rewards for shapes-world preference tasks.

Each reward maps ``(images, prompts)`` to one float per image, higher is
better, and is a deterministic function of the pixels, so preference pairs
built from it are reproducible and its optimum is known.  All of them read the
checker's foreground segmentation, so "the shape" means the same thing to the
rewards as to the faithfulness metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from diffpo.toy.checker import ImageLike, detect, segment
from diffpo.toy.grammar import ShapePrompt

RewardFn = Callable[[Sequence[ImageLike], Sequence[ShapePrompt]], np.ndarray]


def _validate(images: Sequence[ImageLike], prompts: Sequence[ShapePrompt]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


def saturation(images: Sequence[ImageLike], prompts: Sequence[ShapePrompt]) -> np.ndarray:
    """Mean HSV saturation (0..1) of the foreground pixels; 0 when there is no shape."""
    _validate(images, prompts)
    scores = []
    for image in images:
        seg = segment(image)
        fg = seg.pixels[seg.foreground]
        if not len(fg):
            scores.append(0.0)
            continue
        high, low = fg.max(axis=1), fg.min(axis=1)
        scores.append(float(np.mean(np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0.0))))
    return np.array(scores)


def centering(images: Sequence[ImageLike], prompts: Sequence[ShapePrompt]) -> np.ndarray:
    """Minus the silhouette centroid's distance from the canvas centre, over the
    centre-to-corner distance: in [-1, 0], 0 = centred, -1 when there is no shape."""
    _validate(images, prompts)
    scores = []
    for image in images:
        seg = segment(image)
        if not seg.filled.any():
            scores.append(-1.0)
            continue
        x, y = seg.center
        scores.append(-math.hypot(x - 0.5, y - 0.5) / math.sqrt(0.5))
    return np.array(scores)


def size(images: Sequence[ImageLike], prompts: Sequence[ShapePrompt]) -> np.ndarray:
    """Silhouette area as a fraction of the canvas (0 when there is no shape)."""
    _validate(images, prompts)
    return np.array([segment(image).area_fraction for image in images])


def faithful_size(images: Sequence[ImageLike], prompts: Sequence[ShapePrompt]) -> np.ndarray:
    """Area fraction if colour and shape match the prompt, else 0.

    Unlike ``size``, this cannot be maximised by drawing a big blob of the
    wrong kind: a reward-hacking control for the plain ``size`` reward.
    """
    _validate(images, prompts)
    scores = []
    for image, prompt in zip(images, prompts):
        found = detect(image)
        faithful = found.color == prompt.color and found.shape == prompt.shape
        scores.append(found.area_fraction if faithful else 0.0)
    return np.array(scores)


REWARDS: dict[str, RewardFn] = {
    "saturation": saturation,
    "centering": centering,
    "size": size,
    "faithful_size": faithful_size,
}
