"""The programmatic judge, measured: accuracy on clean and corrupted renders, and sanity off-distribution."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffpo.toy.checker import Detection, check, detect, faithfulness, position_of
from diffpo.toy.grammar import BACKGROUNDS, COLORS, EXTRA_SHAPES, SHAPES, ShapePrompt, all_prompts
from diffpo.toy.render import render, unit_vertices

# Every (shape incl. star, colour, background, size) prompt in every style: severity 0 of
# outline/striped is byte-identical to solid (tests/toy/test_render.py), so solid covers it.
CONDITIONS = [("solid", 1.0), ("outline", 0.5), ("outline", 1.0), ("striped", 0.5), ("striped", 1.0)]
PROMPTS = all_prompts(SHAPES + EXTRA_SHAPES, with_size=True)


def corrupt(image: Image.Image, seed: int, noise_std: float = 20.0, blur: float = 0.6) -> np.ndarray:
    """Slight Gaussian blur, then i.i.d. Gaussian pixel noise (std in 0..255 units)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur))).astype(float)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise_std, blurred.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _dataset(noisy: bool) -> tuple[list[Image.Image | np.ndarray], list[ShapePrompt]]:
    images, prompts = [], []
    for c, (style, severity) in enumerate(CONDITIONS):
        for i, prompt in enumerate(PROMPTS):
            seed = 1000 * c + i
            image = render(prompt, style=style, severity=severity, seed=seed)
            images.append(corrupt(image, seed) if noisy else image)
            prompts.append(prompt)
    return images, prompts


@pytest.fixture(scope="module")
def clean_scores() -> dict[str, float]:
    return faithfulness(*_dataset(noisy=False))


@pytest.fixture(scope="module")
def noisy_scores() -> dict[str, float]:
    return faithfulness(*_dataset(noisy=True))


def test_clean_renders_are_judged_correctly(clean_scores: dict[str, float]) -> None:
    # Measured: 1.0 on every key (720 images).
    assert clean_scores["color"] >= 0.97
    assert clean_scores["shape"] >= 0.97
    assert clean_scores["background"] == 1.0
    assert clean_scores["size"] >= 0.97
    assert clean_scores["overall"] == (clean_scores["color"] + clean_scores["shape"]) / 2


def test_noisy_blurred_renders_are_judged_correctly(noisy_scores: dict[str, float]) -> None:
    # Measured: 1.0 on every key (720 images, noise std 20/255 after a 0.6 px blur).
    assert noisy_scores["color"] >= 0.9
    assert noisy_scores["shape"] >= 0.9
    assert noisy_scores["background"] >= 0.97
    assert noisy_scores["size"] >= 0.9


def test_positions_are_judged_correctly_clean_and_noisy() -> None:
    prompts = all_prompts(SHAPES + EXTRA_SHAPES, with_size=True, with_position=True)[::4]
    clean = [render(p, seed=i) for i, p in enumerate(prompts)]
    assert faithfulness(clean, prompts)["position"] == 1.0
    assert faithfulness([corrupt(im, i) for i, im in enumerate(clean)], prompts)["position"] >= 0.95


def test_every_attribute_is_falsifiable() -> None:
    image = render(ShapePrompt("red", "circle", "black", size="small", position="left"), seed=0)
    wrong = ShapePrompt("blue", "square", "white", size="large", position="right")
    keys = ("color", "shape", "background", "size", "position")
    assert check(image, wrong) == dict.fromkeys(keys, False)
    right = ShapePrompt("red", "circle", "black", size="small", position="left")
    assert check(image, right) == dict.fromkeys(keys, True)
    assert set(check(image, ShapePrompt("red", "circle", "black"))) == {"color", "shape", "background"}


def test_detection_fields_and_input_types() -> None:
    image = render(ShapePrompt("yellow", "star", "white", size="large", position="center"), seed=2)
    found = detect(image)
    assert (found.color, found.shape, found.background, found.size, found.position) == (
        "yellow", "star", "white", "large", "center"
    )
    assert 0.6 <= found.extent <= 0.75  # "large" renders are 0.60-0.70 wide, plus rotation
    x, y = unit_vertices("star").T  # unit width; shoelace area ~0.366
    unit_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert found.area_fraction == pytest.approx(unit_area * found.extent**2, rel=0.15)
    assert found.shape_score > 0.8 and found.shape_margin > 0.05
    assert found.color_distance < 20
    assert detect(np.asarray(image)) == found
    assert detect(image, shapes=SHAPES).shape in SHAPES  # the star is not a candidate any more


def test_higher_resolution_renders() -> None:
    prompts = all_prompts(SHAPES + EXTRA_SHAPES)[::5]
    scores = faithfulness([render(p, seed=i, resolution=64) for i, p in enumerate(prompts)], prompts)
    assert scores["color"] == scores["shape"] == 1.0


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_uniform_image_has_no_shape(background: str) -> None:
    found = detect(np.full((32, 32, 3), BACKGROUNDS[background], dtype=np.uint8))
    assert found == Detection(None, None, background, 0.0, (0.5, 0.5), 0.0, np.inf, 0.0, 0.0)
    assert found.size is None and found.position is None


def test_uniform_foreground_colour_is_no_shape() -> None:
    assert detect(Image.new("RGB", (32, 32), COLORS["blue"])).shape is None


def test_pure_noise_does_not_crash_and_is_not_a_confident_shape() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        found = detect(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert found.background in BACKGROUNDS
        assert found.shape is None or found.shape_score < 0.9
        assert 0.0 <= found.area_fraction <= 1.0


def test_position_of_thresholds() -> None:
    assert position_of((0.5, 0.5)) == position_of((0.52, 0.48)) == "center"
    assert position_of((0.3, 0.45)) == "left"
    assert position_of((0.7, 0.6)) == "right"
    assert position_of((0.45, 0.2)) == "top"
    assert position_of((0.5, 0.9)) == "bottom"


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        faithfulness([np.zeros((32, 32, 3), np.uint8)] * 2, [ShapePrompt("red", "circle", "black")])
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((32, 32), np.uint8))
