"""Judge rewards: shapes, ranges, determinism, and that each one prefers what it claims to."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from diffpo.toy.grammar import BACKGROUNDS, ShapePrompt
from diffpo.toy.render import render
from diffpo.toy.rewards import REWARDS, centering, faithful_size, saturation, size


def test_registry_output_shape_and_determinism() -> None:
    assert {"saturation", "centering", "size", "faithful_size"} <= set(REWARDS)
    prompts = [ShapePrompt("red", "circle", "black"), ShapePrompt("green", "star", "white", size="large")]
    images = [render(p, seed=i) for i, p in enumerate(prompts)]
    for name, reward in REWARDS.items():
        scores = reward(images, prompts)
        assert scores.shape == (2,) and scores.dtype == np.float64, name
        np.testing.assert_array_equal(scores, reward([np.asarray(im) for im in images], prompts))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        size(images, prompts[:1])


def test_centering_prefers_the_centre_and_lies_in_range() -> None:
    prompts = [ShapePrompt("blue", "square", "gray", size="small", position=p) for p in ("center", "left", "top")]
    scores = centering([render(p, seed=0) for p in prompts], prompts)
    assert -0.05 < scores[0] <= 0.0
    assert -1.0 <= scores[1] < scores[0] and -1.0 <= scores[2] < scores[0]
    # a small square against the left side sits ~0.28 of the canvas left of centre
    assert scores[1] == pytest.approx(-0.28 / math.sqrt(0.5), abs=0.05)


def test_size_is_the_silhouette_area_fraction() -> None:
    prompts = [ShapePrompt("orange", "circle", "black", size=s) for s in ("small", "large")]
    images = [render(p, seed=1) for p in prompts]
    small, large = size(images, prompts)
    assert large > 2.5 * small
    pixels = np.asarray(images[1]).astype(float)
    drawn = np.linalg.norm(pixels - BACKGROUNDS["black"], axis=2) > 100  # independent area estimate
    assert large == pytest.approx(drawn.mean(), abs=0.02)


def test_saturation_prefers_vivid_colour() -> None:
    prompt = ShapePrompt("red", "circle", "gray", size="large")
    vivid = np.asarray(render(prompt, seed=0)).astype(float)
    gray = np.array(BACKGROUNDS["gray"], dtype=float)
    faded = np.round(gray + 0.5 * (vivid - gray)).astype(np.uint8)  # halfway to the background
    scores = saturation([vivid.astype(np.uint8), faded], [prompt, prompt])
    assert scores[0] == pytest.approx((210 - 30) / 210, abs=0.1)  # HSV saturation of red (210, 30, 30)
    assert scores[1] < scores[0] - 0.2


def test_faithful_size_only_rewards_the_prompted_shape() -> None:
    prompt = ShapePrompt("purple", "triangle", "white", size="large")
    image = render(prompt, seed=3)
    wrong = [ShapePrompt("purple", "circle", "white"), ShapePrompt("green", "triangle", "white")]
    np.testing.assert_array_equal(faithful_size([image], [prompt]), size([image], [prompt]))
    np.testing.assert_array_equal(faithful_size([image, image], wrong), [0.0, 0.0])


def test_no_shape_gets_the_worst_scores() -> None:
    blank = [Image.new("RGB", (32, 32), BACKGROUNDS["white"])]
    prompt = [ShapePrompt("red", "circle", "white")]
    assert (saturation(blank, prompt)[0], centering(blank, prompt)[0], size(blank, prompt)[0]) == (0.0, -1.0, 0.0)
    assert faithful_size(blank, prompt)[0] == 0.0
