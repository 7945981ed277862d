"""Inductor settings on SDXL's compiled blocks, forward and backward, side by side (a CUDA GPU).

    python -m benchmarks.compile_levers --out benchmarks/results/compile_levers.json

Two settings of ``train.compile=regional`` that issue 16's profile points at:

- ``train.compile_dynamic``. One block class meets several shapes in a UNet (a ResnetBlock2D at 320,
  640 and 1280 channels); under torch.compile's default the second shape recompiles it with symbolic
  sizes, so its kernels index with sizes known only at run time, and inductor skips its layout
  optimization (convolutions in channels_last) for symbolic shapes. ``false`` compiles a static
  graph per shape.
- ``train.compile_options: {max_pointwise_cat_inputs: 1}``. diffusers' ``GEGLU`` splits one
  projection into value and gate; the backward concatenates their gradients. Inductor lowers a
  concatenation of at most 8 pointwise inputs as one masked kernel over the result (each element
  computes both branches); with 1 each input writes its slice of one buffer, and the two writers
  can share a kernel over half the elements. In the profile that backward kernel took 346 us per
  transformer block (24 ms of a 431 ms step), 2.5 times what its bytes need at the forward's rate.

``--blocks transformer`` times SDXL's whole transformer blocks with two more levers (``VARIANTS``):
``train.fused_geglu`` (diffpo's one-pass GEGLU backward) and torchao's FP8 training on their linears.

Each variant compiles the blocks as the trainer does (one instance per shape, shapes in the UNet's
order, so the default recompiles with symbolic sizes), then times each shape's forward+backward on
8 images (4 pairs, both images) at 1024 px (latents 128x128) and lists its top kernels; gradient
norms check that the variants compute the same thing (to rounding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

IMAGES = 8
# (channels, latent side, blocks of this shape in SDXL's UNet)
FEED_FORWARDS = ((640, 64, 10), (1280, 32, 60))
# by output channels (17 in all); the benchmark's blocks keep in = out, some of SDXL's take wider inputs
RESNETS = ((320, 128, 5), (640, 64, 5), (1280, 32, 7))
# label: (inductor options, dynamic, changes to the block before compiling)
VARIANTS = {
    "default": ({}, None, ()),
    "static": ({}, False, ()),
    "catk": ({"max_pointwise_cat_inputs": 1}, None, ()),
    "static+catk": ({"max_pointwise_cat_inputs": 1}, False, ()),
    "static+geglu": ({}, False, ("geglu",)),
    "static+fp8ff": ({}, False, ("fp8ff",)),
    "static+fp8ff_row": ({}, False, ("fp8ff_row",)),
    "static+fp8ff+geglu": ({}, False, ("fp8ff", "geglu")),
    "static+fp8lin+geglu": ({}, False, ("fp8lin", "geglu")),
}
# SDXL's transformer blocks: (channels, latent side, blocks); 64 channels per head, text of 77 x 2048
TRANSFORMERS = ((640, 64, 10), (1280, 32, 60))
TOKENS, TEXT_DIM = 77, 2048


def _change(block, names: tuple[str, ...]) -> None:
    """``geglu``: diffpo's one-pass GEGLU backward (``train.fused_geglu``); ``fp8ff`` / ``fp8ff_row``:
    torchao's float8 training (tensorwise / rowwise scaling) on the feed-forward's two linears;
    ``fp8lin``: on every linear whose token count is a multiple of 16 (not cross-attention's K/V,
    8 x 77 tokens)."""
    for name in names:
        if name == "geglu":
            from diffpo.geglu import fuse_geglu

            fuse_geglu(block)
        elif name.startswith("fp8"):
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            config = Float8LinearConfig.from_recipe_name("rowwise" if name.endswith("_row") else "tensorwise")
            if name.startswith("fp8ff"):
                keep = lambda module, fqn: "ff." in f".{fqn}" or fqn.startswith("net.")  # noqa: E731
            else:
                keep = lambda module, fqn: not fqn.endswith(("attn2.to_k", "attn2.to_v"))  # noqa: E731
            convert_to_float8_training(block, config=config, module_filter_fn=keep)
        else:
            raise ValueError(name)


def _feed_forward(dim: int, side: int, device):
    from diffusers.models.attention import FeedForward

    block = FeedForward(dim, mult=4, activation_fn="geglu").to(device, torch.bfloat16)
    x = torch.randn(IMAGES, side * side, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    return block, (x,)


def _transformer(dim: int, side: int, device):
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(dim, max(1, dim // 64), 64, cross_attention_dim=TEXT_DIM, activation_fn="geglu").to(device, torch.bfloat16)
    x = torch.randn(IMAGES, side * side, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    text = torch.randn(IMAGES, TOKENS, TEXT_DIM, device=device, dtype=torch.bfloat16)
    return block, (x, None, text)


def _resnet(dim: int, side: int, device):
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=dim, out_channels=dim, temb_channels=1280).to(device, torch.bfloat16)
    x = torch.randn(IMAGES, dim, side, side, device=device, dtype=torch.bfloat16, requires_grad=True)
    temb = torch.randn(IMAGES, 1280, device=device, dtype=torch.bfloat16)
    return block, (x, temb)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, options: dict, dynamic: bool | None, reps: int, device: str = "cuda", scale: int = 1, changes: tuple[str, ...] = ()) -> list[dict]:
    """``scale`` > 1 divides channels and sides (a CPU smoke run)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    make, shapes = {"feed_forward": (_feed_forward, FEED_FORWARDS), "resnet": (_resnet, RESNETS), "transformer": (_transformer, TRANSFORMERS)}[kind]
    shapes = [(dim // scale, side // scale, count) for dim, side, count in shapes]
    kwargs = {"options": options} if options else {}
    if dynamic is not None:
        kwargs["dynamic"] = dynamic
    built = []
    for dim, side, count in shapes:
        block, inputs = make(dim, side, device)
        _change(block, changes)
        block.compile(**kwargs)
        built.append((dim, side, count, block, inputs))

    def step(block, inputs):
        out = block(*inputs)
        out.backward(torch.ones_like(out))

    for _ in range(2):  # compile every shape first (the later shapes recompile), as the UNet's order does
        for *_, block, inputs in built:
            step(block, inputs)
    _sync(device)
    rows = []
    for dim, side, count, block, inputs in built:
        start = time.perf_counter()
        for _ in range(reps):
            step(block, inputs)
        _sync(device)
        ms = (time.perf_counter() - start) * 1000 / reps
        activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            step(block, inputs)
            _sync(device)
        kernels = [
            {"name": e.key[:100], "us": round(_time(e, device), 1), "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -_time(e, device))
            if _time(e, device) > 0 and not e.key.startswith(("aten::", "Memcpy", "Memset"))
        ][:8]
        grads = [round(inputs[0].grad.float().norm().item(), 2)] + [round(p.grad.float().norm().item(), 2) for p in list(block.parameters())[:4]]
        for p in block.parameters():
            p.grad = None
        inputs[0].grad = None
        rows.append({"block": kind, "dim": dim, "side": side, "sdxl_blocks": count, "fwd_bwd_ms": round(ms, 4), "kernels": kernels, "grad_norms": grads})
    return rows


def _time(event, device: str) -> float:
    return event.device_time_total if device == "cuda" else event.self_cpu_time_total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--blocks", default="feed_forward,resnet")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=int, default=1, help="divide channels and sides by this (a CPU smoke run)")
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": name, "torch": torch.__version__, "rows": [], "sdxl_ms_per_step": {}}
    for label in args.variants.split(","):
        options, dynamic, changes = VARIANTS[label]
        for kind in args.blocks.split(","):
            try:
                rows = measure(kind, options, dynamic, args.reps, args.device, args.scale, changes)
            except Exception as err:  # record and go on: one variant's failure is a result too
                result["rows"].append({"variant": label, "block": kind, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(label, kind, "failed:", err, flush=True)
                continue
            for row in rows:
                row["variant"] = label
                print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
                for k in row["kernels"][:4]:
                    print("   ", k, flush=True)
            result["rows"] += rows
            result["sdxl_ms_per_step"][f"{label}/{kind}"] = round(sum(r["fwd_bwd_ms"] * r["sdxl_blocks"] for r in rows), 2)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    print("SDXL's blocks of each kind, forward+backward per step (ms):", result["sdxl_ms_per_step"], flush=True)
    return result


if __name__ == "__main__":
    main()
