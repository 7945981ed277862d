"""The image cache: images of the same weights, prompt, seed and settings are sampled once."""

import numpy as np
import pytest
import torch

from diffpo.config import ModelConfig
from diffpo.image_cache import ImageCache, weights_digest
from diffpo.models import load_components
from diffpo.sampling import generate

PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a red circle on a white background"]
SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def toy():
    return load_components(ModelConfig(pretrained="toy:base"))


def _count_sampling(monkeypatch, components):
    """Count the images the family's sampler makes."""
    made = []
    original = components.family.sampler

    def counting(*args, **kwargs):
        sample = original(*args, **kwargs)
        return lambda prompts, seeds: made.extend(seeds) or sample(prompts, seeds)

    monkeypatch.setattr(components.family, "sampler", counting)
    return made


def test_cached_images_are_the_sampled_ones_and_are_not_sampled_again(toy, tmp_path, monkeypatch):
    made = _count_sampling(monkeypatch, toy)
    cache = ImageCache(tmp_path)
    first = generate(toy, PROMPTS, SEEDS, num_inference_steps=2, progress=False, cache=cache)
    assert sorted(made) == SEEDS and len(list(tmp_path.rglob("*.png"))) == 3
    again = generate(toy, PROMPTS, SEEDS, num_inference_steps=2, progress=False, cache=cache)
    assert sorted(made) == SEEDS  # nothing sampled the second time
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    # a new seed is sampled alone; other settings are another key
    generate(toy, PROMPTS[:2], [1, 9], num_inference_steps=2, progress=False, cache=cache)
    assert sorted(made) == [1, 2, 3, 9]
    generate(toy, PROMPTS[:1], [1], num_inference_steps=3, progress=False, cache=cache)
    assert sorted(made) == [1, 1, 2, 3, 9]


def test_other_weights_never_match(toy, tmp_path, monkeypatch):
    import copy

    cache = ImageCache(tmp_path)
    generate(toy, PROMPTS[:1], [1], num_inference_steps=2, progress=False, cache=cache)
    tuned = copy.deepcopy(toy.network)
    with torch.no_grad():
        next(tuned.parameters()).add_(1e-3)
    assert weights_digest(toy, tuned) != weights_digest(toy)
    made = _count_sampling(monkeypatch, toy)
    generate(toy, PROMPTS[:1], [1], network=tuned, num_inference_steps=2, progress=False, cache=cache)
    assert made == [1]
