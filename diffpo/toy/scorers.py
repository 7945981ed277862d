"""Shapes-world scorers behind the evaluation protocol (``score(images, prompts) -> floats``).

They sit in the same registry as PickScore or HPS (``diffpo.evaluate.scorers``), so ``diffpo eval``
scores the shapes world with the same code path as real models:

* ``shapes_style``: thinness, the fraction of foreground pixels that lie on an edge: ~0.26 for the
  base's solid fill, ~1 for outlines, ~0.9 for stripes. The task reward of the style task.
* ``shapes_color`` / ``shapes_shape``: 1 if the checker finds the prompt's colour / shape, else 0;
  their means are the faithfulness accuracies.
* ``shapes_quality``: 1 - grain, the high-frequency energy of the background, which is flat in every
  render (``diffpo.toy.quality``): 1.0 for a clean render, lower the grainier.
* ``shapes_<reward>`` for each programmatic judge in ``diffpo.toy.rewards`` (size, saturation, ...).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from diffpo.toy.checker import _dilate, detect, segment
from diffpo.toy.grammar import ShapePrompt
from diffpo.toy.quality import quality
from diffpo.toy.rewards import REWARDS


def thinness(image) -> float:
    """Fraction of foreground pixels on an edge (a 4-neighbour is not foreground).

    Solid fills score ~0.26 (only their rim), outlines ~1 and dense stripes ~0.9, and a model
    that only half-learned a new style lands in between, so the score grows with the style.
    Measured on renders of every prompt: solid 0.26, outline@1 0.98, striped@1 0.88.
    """
    seg = segment(image)
    if not seg.filled.any():
        return 0.0
    distance = np.linalg.norm(seg.pixels - seg.background_rgb, axis=-1)
    region = _dilate(_dilate(seg.filled))  # the shape and a 2-pixel margin: ignore far speckles
    foreground = (distance > 0.5 * np.percentile(distance[seg.filled], 90)) & region
    if not foreground.any():
        return 0.0
    padded = np.pad(foreground, 1)
    interior = foreground & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return float(1.0 - interior.sum() / foreground.sum())


def _color_correct(image, prompt: ShapePrompt) -> float:
    return float(detect(image).color == prompt.color)


def _shape_correct(image, prompt: ShapePrompt) -> float:
    return float(detect(image).shape == prompt.shape)


class ShapesScorer:
    """Adapts a per-image function of (image, ShapePrompt) to the scorer protocol."""

    def __init__(self, name: str, fn: Callable[[Sequence, Sequence[ShapePrompt]], Sequence[float]], description: str):
        self.name, self._fn, self._description = name, fn, description

    def score(self, images, prompts: Sequence[str]) -> list[float]:
        parsed = [ShapePrompt.parse(p) for p in prompts]
        return [float(v) for v in self._fn(images, parsed)]

    def describe(self) -> dict:
        return {"name": self.name, "model": "programmatic (diffpo.toy)", "description": self._description}


def _per_image(fn):
    return lambda images, prompts: [fn(image, prompt) for image, prompt in zip(images, prompts)]


SHAPES_SCORERS: dict[str, tuple[Callable, str]] = {
    "shapes_style": (lambda images, prompts: [thinness(im) for im in images], "thinness: fraction of foreground pixels on an edge (solid ~0.26, outline ~1)"),
    "shapes_color": (_per_image(_color_correct), "1 if the checker finds the prompt's colour"),
    "shapes_shape": (_per_image(_shape_correct), "1 if the checker finds the prompt's shape"),
    "shapes_quality": (lambda images, prompts: [quality(im) for im in images], "1 - grain: mean |Laplacian| of the flat background (clean render 1.0)"),
    **{f"shapes_{name}": (fn, f"programmatic reward '{name}' (diffpo.toy.rewards)") for name, fn in REWARDS.items()},
}


def register_shapes_scorers() -> None:
    from diffpo.evaluate.scorers import SCORERS, register_scorer

    for name, (fn, description) in SHAPES_SCORERS.items():
        if name not in SCORERS:
            register_scorer(name, lambda model=None, device="cpu", dtype=None, _n=name, _f=fn, _d=description, **kw: ShapesScorer(_n, _f, _d))


def diversity(images: Sequence, groups: Sequence[int]) -> float:
    """Mean over prompts of the mean pairwise RMS pixel distance (0..1) between that prompt's images."""
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    groups = np.asarray(groups)
    values = []
    for g in np.unique(groups):
        x = arrays[groups == g].reshape((groups == g).sum(), -1)
        if len(x) < 2:
            continue
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).mean(-1))
        values.append(d[np.triu_indices(len(x), 1)].mean())
    return float(np.mean(values)) if values else 0.0
