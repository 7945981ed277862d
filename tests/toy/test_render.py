"""Procedural renderer: determinism, placement, size ranges and style semantics, measured on pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffpo.toy.grammar import BACKGROUNDS, COLORS, EXTRA_SHAPES, POSITIONS, SHAPES, ShapePrompt, all_prompts
from diffpo.toy.render import STYLES, render, render_batch

ALL_SHAPES = SHAPES + EXTRA_SHAPES


def _foreground(image: Image.Image, prompt: ShapePrompt) -> np.ndarray:
    """Pixels clearly away from the prompt's background colour (independent of the checker)."""
    pixels = np.asarray(image).astype(float)
    return np.linalg.norm(pixels - BACKGROUNDS[prompt.background], axis=2) > 60


def _extent(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / mask.shape[0]


@pytest.mark.parametrize("resolution", [32, 64])
def test_output_is_rgb_at_the_requested_resolution(resolution: int) -> None:
    image = render(ShapePrompt("red", "star", "white"), resolution=resolution)
    assert image.mode == "RGB" and image.size == (resolution, resolution)


def test_deterministic_in_seed() -> None:
    prompt = ShapePrompt("green", "triangle", "gray")
    assert render(prompt, seed=3).tobytes() == render(prompt, seed=3).tobytes()
    assert render(prompt, seed=3).tobytes() != render(prompt, seed=4).tobytes()


@pytest.mark.parametrize("style", ["outline", "striped"])
def test_severity_zero_is_the_solid_style(style: str) -> None:
    prompt = ShapePrompt("blue", "square", "black", size="large")
    assert render(prompt, style=style, severity=0.0, seed=1).tobytes() == render(prompt, seed=1).tobytes()


def test_styles_share_geometry_for_a_seed() -> None:
    prompt = ShapePrompt("orange", "circle", "black", size="large")
    masks = [_foreground(render(prompt, style=s, seed=5), prompt) for s in STYLES]
    boxes = [(np.nonzero(m.any(0))[0][[0, -1]], np.nonzero(m.any(1))[0][[0, -1]]) for m in masks]
    assert all(np.array_equal(np.concatenate(b), np.concatenate(boxes[0])) for b in boxes)


def _interior_contrast(image: Image.Image, prompt: ShapePrompt) -> float:
    """Mean distance from the background over a window inside a large centred shape."""
    pixels = np.asarray(image).astype(float)[10:22, 10:22]
    return float(np.linalg.norm(pixels - BACKGROUNDS[prompt.background], axis=2).mean())


def test_outline_hollows_and_stripes_fade_the_fill() -> None:
    prompt = ShapePrompt("red", "square", "black", size="large", position="center")
    solid = _interior_contrast(render(prompt, seed=0), prompt)
    assert solid > 150
    assert _interior_contrast(render(prompt, style="outline", severity=1.0, seed=0), prompt) < 5
    for severity in (0.5, 1.0):  # the faded half of the stripes moves `severity` of the way to the background
        striped = _interior_contrast(render(prompt, style="striped", severity=severity, seed=0), prompt)
        assert striped / solid == pytest.approx(1 - severity / 2, abs=0.03)
    areas = [_foreground(render(prompt, style="outline", severity=s, seed=0), prompt).sum() for s in (0, 0.5, 1)]
    assert areas[0] > areas[1] > areas[2] > 0


def test_unknown_style_and_bad_severity_are_rejected() -> None:
    prompt = ShapePrompt("red", "circle", "black")
    with pytest.raises(ValueError, match=r"'dotted'.*solid.*outline.*striped"):
        render(prompt, style="dotted")
    with pytest.raises(ValueError, match="severity"):
        render(prompt, severity=1.5)


def test_shapes_stay_inside_the_canvas_and_colors_are_near_their_prototype() -> None:
    prompts = all_prompts(ALL_SHAPES, with_size=True, with_position=True)[::3]
    for seed, prompt in enumerate(prompts):
        pixels = np.asarray(render(prompt, seed=seed)).astype(float)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert np.abs(border - BACKGROUNDS[prompt.background]).max() <= 5  # only background jitter: no shape
        core = pixels[np.linalg.norm(pixels - COLORS[prompt.color], axis=2) < 30]
        assert len(core) > 20
        assert np.abs(np.median(core, axis=0) - COLORS[prompt.color]).max() <= 10


def test_size_words_set_the_extent() -> None:
    extents: dict[str | None, list[float]] = {"small": [], "large": [], None: []}
    for seed, shape in enumerate(ALL_SHAPES * 4):
        for size in extents:
            prompt = ShapePrompt("blue", shape, "white", size=size)
            extents[size].append(_extent(_foreground(render(prompt, seed=seed), prompt)))
    assert 0.25 <= min(extents["small"]) and max(extents["small"]) <= 0.47
    assert 0.55 <= min(extents["large"]) and max(extents["large"]) <= 0.85
    means = [np.mean(extents[size]) for size in ("small", None, "large")]
    assert means == sorted(means)


@pytest.mark.parametrize("position", POSITIONS)
def test_position_words_move_the_box_centre(position: str) -> None:
    expected = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}[position]
    for seed, (shape, size) in enumerate([(s, z) for s in ALL_SHAPES for z in ("small", "large")]):
        prompt = ShapePrompt("purple", shape, "gray", size=size, position=position)
        mask = _foreground(render(prompt, seed=seed), prompt)
        ys, xs = np.nonzero(mask)
        offset = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]) / 32 - 0.5
        for axis, sign in enumerate(expected):
            if sign == 0:
                assert abs(offset[axis]) <= 0.04
            else:
                assert sign * offset[axis] >= 0.04


def test_render_batch_matches_single_renders() -> None:
    prompts = all_prompts()[:4]
    batch = render_batch(prompts, style="striped", severity=0.5, seeds=[7, 8, 9, 10])
    assert [im.tobytes() for im in batch] == [
        render(p, style="striped", severity=0.5, seed=s).tobytes() for p, s in zip(prompts, [7, 8, 9, 10])
    ]
    with pytest.raises(ValueError, match="4 prompts but 2 seeds"):
        render_batch(prompts, seeds=[0, 1])
