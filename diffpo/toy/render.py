"""Procedural, seeded rendering of shapes-world prompts.

Shapes are polygons drawn on a supersampled canvas and box-downsampled, which
gives clean anti-aliased edges at 32x32.  All randomness (size, placement,
rotation, colour jitter) comes from ``seed`` and is drawn in the same order for
every style, so the same seed gives the same geometry in every style: a style
change is a pure appearance shift, which is what a distribution-shift study needs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from diffpo.toy.grammar import BACKGROUNDS, COLORS, RGB, ShapePrompt

STYLES: tuple[str, ...] = ("solid", "outline", "striped")

SUPERSAMPLE = 4
"""Drawing happens at this multiple of the output resolution, then box-downsampled."""

SIZE_RANGES: dict[str | None, tuple[float, float]] = {
    "small": (0.30, 0.40),
    "large": (0.60, 0.70),
    None: (0.40, 0.65),
}
"""Nominal shape width as a fraction of the canvas, per size word."""

MAX_ROTATION_DEG = 6.0
"""Rotation jitter of squares, triangles and stars (circles are not rotated)."""

FG_JITTER = 10
BG_JITTER = 5
"""Per-channel colour jitter of foreground and background (uniform integers in +-jitter)."""

MARGIN = 0.05
"""Minimum gap between a shape and the canvas edge, as a fraction of the canvas.

At 32x32 this is 1.6 pixels, so the outermost pixel ring is pure background,
which is what the checker reads the background colour from."""

POSITION_JITTER = 0.02
"""Spread of placement around a position word's anchor, as a fraction of the canvas."""

THIN_STROKE_PX = 1.5
"""Outline/rim width (in output pixels at 32x32) at severity 1."""

STRIPE_PERIOD_PX = 4.0
"""Diagonal stripe period (in output pixels at 32x32) of the striped style."""

_CIRCLE_VERTICES = 96
_STAR_POINTS = 5
_STAR_INNER_RATIO = 0.45  # fatter than a classic star so the points survive 32x32


def unit_vertices(shape: str, angle_deg: float = 0.0) -> np.ndarray:
    """Vertices (N, 2) in x-right/y-down units of a shape of nominal width 1.

    The origin is the shape's incenter, so scaling the polygon about the origin
    insets every edge by the same distance (used for outlines and rims).
    Triangles and stars point up.
    """
    if shape == "circle":
        theta = np.linspace(0.0, 2 * math.pi, _CIRCLE_VERTICES, endpoint=False)
        points = 0.5 * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    elif shape == "square":
        points = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif shape == "triangle":
        height = math.sqrt(3) / 2
        points = np.array([[0.0, -2 * height / 3], [0.5, height / 3], [-0.5, height / 3]])
    elif shape == "star":
        outer = 0.5 / math.sin(math.radians(72))  # makes the star's width exactly 1
        radii = np.tile([outer, outer * _STAR_INNER_RATIO], _STAR_POINTS)
        theta = -math.pi / 2 + np.arange(2 * _STAR_POINTS) * math.pi / _STAR_POINTS
        points = radii[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    angle = math.radians(angle_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rotation.T


def _inradius(vertices: np.ndarray) -> float:
    """Distance from the origin to the nearest edge line of a polygon."""
    starts, ends = vertices, np.roll(vertices, -1, axis=0)
    edges = ends - starts
    cross = np.abs(edges[:, 0] * starts[:, 1] - edges[:, 1] * starts[:, 0])
    return float(np.min(cross / np.linalg.norm(edges, axis=1)))


def _polygon_mask(vertices_px: np.ndarray, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a polygon given in pixel coordinates."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in vertices_px.tolist()], fill=255)
    return np.asarray(canvas) > 127


def polygon_coverage(vertices_px: np.ndarray, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased (size, size) coverage in [0, 1] of a polygon given in pixel coordinates."""
    mask = _polygon_mask(vertices_px * supersample, size * supersample)
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def _jitter_color(color: RGB, amount: int, rng: random.Random) -> np.ndarray:
    return np.clip(np.array(color) + [rng.randint(-amount, amount) for _ in range(3)], 0, 255)


def _place(vertices: np.ndarray, position: str | None, rng: random.Random) -> np.ndarray:
    """Incenter (canvas fractions) keeping the whole shape ``MARGIN`` inside the canvas.

    A position word is about the shape's bounding box (which is also what the
    checker measures): "center" centres the box, a side word pushes it against
    that side.  Jitter is small and never moves a side-anchored shape inwards by
    more than half of it, so even large shapes stay clearly off-centre.
    """
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    half = (high - low) / 2
    box_low, box_high = MARGIN + half, 1.0 - MARGIN - half  # range of the box centre
    if position is None:
        box = np.array([rng.uniform(box_low[0], box_high[0]), rng.uniform(box_low[1], box_high[1])])
    else:
        jitter = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)]) * POSITION_JITTER
        inwards = np.abs(jitter) / 2
        box = {
            "center": 0.5 + jitter,
            "left": np.array([box_low[0] + inwards[0], 0.5 + jitter[1]]),
            "right": np.array([box_high[0] - inwards[0], 0.5 + jitter[1]]),
            "top": np.array([0.5 + jitter[0], box_low[1] + inwards[1]]),
            "bottom": np.array([0.5 + jitter[0], box_high[1] - inwards[1]]),
        }[position]
    return np.clip(box, box_low, box_high) - (low + high) / 2


def _stripe_mask(size: int, period_px: float) -> np.ndarray:
    """Diagonal stripes: True on the 'off' half of each period."""
    y, x = np.mgrid[0:size, 0:size]
    return ((x + y) // (period_px / 2)).astype(int) % 2 == 1


def render(
    prompt: ShapePrompt,
    *,
    style: str = "solid",
    severity: float = 1.0,
    seed: int = 0,
    resolution: int = 32,
) -> Image.Image:
    """Draw ``prompt`` as an RGB image of ``resolution`` x ``resolution``.

    ``style`` and ``severity`` control an appearance shift away from the solid
    base style: ``"outline"`` thins the filled shape to an outline of
    ``THIN_STROKE_PX`` at severity 1; ``"striped"`` keeps a thin rim and fades
    alternate diagonal stripes of the fill towards the background (pure
    background at severity 1).  Severity 0 is identical to ``"solid"``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {list(STYLES)}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    rng = random.Random(seed)
    fg = _jitter_color(COLORS[prompt.color], FG_JITTER, rng)
    bg = _jitter_color(BACKGROUNDS[prompt.background], BG_JITTER, rng)
    width = rng.uniform(*SIZE_RANGES[prompt.size])
    angle = 0.0 if prompt.shape == "circle" else rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    vertices = unit_vertices(prompt.shape, angle) * width
    center = _place(vertices, prompt.position, rng)

    hi = resolution * SUPERSAMPLE
    px_per_ref = hi / 32.0  # stroke and stripe sizes are specified at 32x32
    canvas = np.broadcast_to(bg.astype(float), (hi, hi, 3)).copy()
    canvas[_polygon_mask((vertices + center) * hi, hi)] = fg
    if style != "solid" and severity > 0.0:
        full = _inradius(vertices) * hi
        thin = THIN_STROKE_PX * px_per_ref
        stroke = (1.0 - severity) * full + severity * thin if style == "outline" else thin
        inner = _polygon_mask((vertices * max(0.0, 1.0 - stroke / full) + center) * hi, hi)
        if style == "outline":
            canvas[inner] = bg
        else:
            faded = inner & _stripe_mask(hi, STRIPE_PERIOD_PX * px_per_ref)
            canvas[faded] = (1.0 - severity) * fg + severity * bg
    small = canvas.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(small).astype(np.uint8))


def render_batch(
    prompts: Sequence[ShapePrompt],
    *,
    style: str = "solid",
    severity: float = 1.0,
    seeds: Sequence[int],
    resolution: int = 32,
) -> list[Image.Image]:
    """Render each prompt with its own seed (``len(seeds) == len(prompts)``)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    return [
        render(p, style=style, severity=severity, seed=s, resolution=resolution)
        for p, s in zip(prompts, seeds)
    ]
