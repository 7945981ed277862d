"""The CPU demo's network work and the rate this machine runs it at (issue 16, target 5).

    python -m benchmarks.demo_flops --out benchmarks/results/cpu_2026-12-03/demo_flops.json
    python -m benchmarks.demo_flops --batch 8 --repeats 1   # smoke run

Counts the FLOPs of one forward of the shapes world's base UNet per image (``torch.utils.flop_counter``), times
that forward at the demo's sampling batch (one guided batch of evaluation images: 2 x 176), splits its time by
operator with ``torch.profiler``, and multiplies out what ``diffpo demo``'s default settings ask of the network:
every sampled image (the pairs' rejected images, both models' evaluation images) x sampling steps x 2 (guidance),
and every training step's images x 3 (forward and a backward of about twice its FLOPs). Run it with the malloc
settings of ``scripts/demo.sh`` to time what the demo sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def demo_images(settings) -> dict[str, int]:
    """Images the demo samples and trains on, from its settings and the shapes world's prompt split."""
    from diffpo.toy.tasks import prompt_split

    train_prompts, heldout = prompt_split(seed=0)
    return {
        "sampled": len(train_prompts) * settings.pairs_per_prompt + 2 * len(heldout) * settings.eval_per_prompt,
        "trained": settings.steps * settings.batch_size * 2,  # chosen and rejected image of each pair
    }


def measure(batch: int, repeats: int) -> dict:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffpo.toy.base import ASSET_DIR

    unet = UNet2DConditionModel.from_pretrained(str(Path(ASSET_DIR) / "unet")).eval()
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(batch, channels, size, size)
    t = torch.full((batch,), 500)
    context = torch.randn(batch, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(x, t, context)
        flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        unet(x, t, context)  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            unet(x, t, context)
            seconds.append(time.perf_counter() - started)
        with torch.profiler.profile() as profile:
            unet(x, t, context)
    by_op = {e.key: e.self_cpu_time_total / 1e6 for e in profile.key_averages()}
    profiled = sum(by_op.values())
    conv_s = by_op.get("aten::mkldnn_convolution", 0.0) + by_op.get("aten::_slow_conv2d_forward", 0.0)
    total = sum(flops.values())
    forward_s = statistics.median(seconds)
    return {
        "batch": batch,
        "gflop_per_image_forward": total / batch / 1e9,
        "gflop_by_op": {op: n / 1e9 for op, n in flops.items()},
        "forward_s": forward_s,
        "gflops": total / forward_s / 1e9,
        "conv_share_of_time": conv_s / profiled,
        "conv_gflops": flops.get("aten.convolution", 0) / conv_s / 1e9 if conv_s else None,
        "top_ops_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:8]),
    }


def main(argv: list[str] | None = None) -> None:
    from diffpo.toy.demo import DemoSettings
    from diffpo.toy.tasks import prompt_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default: one guided batch of the demo's evaluation images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    settings = DemoSettings()
    images = demo_images(settings)
    _, heldout = prompt_split(seed=0)
    batch = args.batch or 2 * len(heldout) * settings.eval_per_prompt
    result = measure(batch, args.repeats)
    per_image = result["gflop_per_image_forward"]
    sampling = images["sampled"] * settings.num_inference_steps * 2 * per_image / 1e3
    training = images["trained"] * 3 * per_image / 1e3
    result.update(
        demo_images=images,
        demo_tflop={"sampling": sampling, "training": training, "total": sampling + training},
        demo_network_s_at_this_rate=(sampling + training) * 1e3 / result["gflops"],
        environment={
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(), "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        },
    )
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
