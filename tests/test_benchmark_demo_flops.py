"""benchmarks/demo_flops.py: the CPU demo's network work (issue 16, target 5)."""

import pytest

from benchmarks.demo_flops import demo_images, measure
from diffpo.toy.demo import DemoSettings


def test_demo_images_follow_the_settings_and_the_prompt_split():
    from diffpo.toy.tasks import prompt_split

    train, heldout = prompt_split(seed=0)
    assert demo_images(DemoSettings()) == {"sampled": 4 * len(train) + 2 * 16 * len(heldout), "trained": 60 * 16 * 2}
    assert demo_images(DemoSettings(steps=10, batch_size=4, eval_per_prompt=2)) == {"sampled": 4 * len(train) + 2 * 2 * len(heldout), "trained": 80}


def test_measure_counts_the_forward_per_image_whatever_the_batch():
    one, three = measure(batch=1, repeats=1), measure(batch=3, repeats=1)
    assert one["gflop_per_image_forward"] == pytest.approx(three["gflop_per_image_forward"], rel=1e-6)
    assert one["gflop_by_op"]["aten.convolution"] > 0.9 * sum(one["gflop_by_op"].values())  # the toy UNet is convolutions
    assert 0 < three["conv_share_of_time"] <= 1 and three["gflops"] > 0
