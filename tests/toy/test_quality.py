"""The shapes world's image-quality measure (grain on the flat background) and its scorer."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffpo.toy.grammar import ShapePrompt, all_prompts
from diffpo.toy.quality import grain, laplacian_energy, quality
from diffpo.toy.render import render

PROMPTS = all_prompts()[::5]  # 11 prompts: every colour, shape and background


def _renders(style="solid", severity=1.0):
    return [render(p, style=style, severity=severity, seed=i) for i, p in enumerate(PROMPTS)]


def _noisy(image, std, z):
    return Image.fromarray(np.clip(np.asarray(image, dtype=float) + std * z, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("style,severity", [("solid", 1.0), ("outline", 0.5), ("outline", 1.0), ("striped", 1.0)])
def test_clean_renders_score_best(style, severity):
    """Every render, in every style, has a flat background: grain 0, quality exactly 1."""
    for image in _renders(style, severity):
        assert grain(image) == 0.0 and quality(image) == 1.0
    # ... while the whole-image Laplacian sees the edges (and the stripes): it cannot tell clean from grainy
    assert np.mean([laplacian_energy(im) for im in _renders(style, severity)]) > 0.03


def test_gaussian_noise_lowers_quality_monotonically_and_as_calibrated():
    z = np.random.default_rng(0).standard_normal((32, 32, 3))
    images = _renders("outline", 0.5)
    means = [np.mean([quality(_noisy(im, std, z)) for im in images]) for std in (0, 2, 4, 8, 16, 32)]
    assert means[0] == 1.0
    assert all(a > b for a, b in zip(means, means[1:])), means
    # grain of i.i.d. noise of std s (0..1 scale) is sqrt(20 * 2 / pi) s = 3.57 s before 8-bit clipping
    assert 1 - means[3] == pytest.approx(3.57 * 8 / 255, rel=0.1)


def test_speckles_lower_quality_monotonically():
    rng = np.random.default_rng(1)
    order = rng.permutation(32 * 32)  # the same pixels, more of them each time
    image = render(ShapePrompt("red", "circle", "white", size="small"), seed=0)
    scores = []
    for fraction in (0.0, 0.01, 0.03, 0.1):
        array = np.asarray(image).copy().reshape(-1, 3)
        array[order[: int(fraction * len(array))]] = 0  # black specks on white
        scores.append(quality(Image.fromarray(array.reshape(32, 32, 3))))
    assert scores[0] == 1.0 and all(a > b for a, b in zip(scores, scores[1:])), scores


def test_blur_and_wrong_colour_are_not_grain():
    """Blur and content are outside the score by design: faithfulness judges the colour, and a
    blurred render's background stays flat (only its edges spread, inside the margin)."""
    for image in _renders():
        assert quality(image.filter(ImageFilter.GaussianBlur(1.0))) > 0.999
    red = render(ShapePrompt("red", "square", "black"), seed=3)
    blue = render(ShapePrompt("blue", "square", "black"), seed=3)  # same geometry, the wrong colour for "red"
    assert quality(red) == quality(blue) == 1.0


def test_an_image_without_a_shape_is_judged_all_background():
    flat = Image.new("RGB", (32, 32), (255, 255, 255))
    assert quality(flat) == 1.0
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert quality(noise) < 0.5


def test_registered_scorer_scores_through_the_protocol():
    from diffpo.evaluate.scorers import load_scorer

    scorer = load_scorer("shapes_quality")
    z = np.random.default_rng(0).standard_normal((32, 32, 3))
    clean = render(PROMPTS[0], seed=0)
    scores = scorer.score([clean, _noisy(clean, 8, z)], [PROMPTS[0].text] * 2)
    assert scores[0] == 1.0 and scores[1] < 0.93
    assert scorer.describe()["name"] == "shapes_quality"
