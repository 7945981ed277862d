"""Where a UNet's activations are, block by block: the prediction behind selective checkpointing.

    python -m benchmarks.activation_memory --arch sdxl --images 8

Runs the architecture on the ``meta`` device (no weights, no memory, seconds on a CPU) under
``torch.autograd.graph.saved_tensors_hooks`` and ``FlopCounterMode``, and reports per top-level block
(``down_blocks.i``, ``mid_block``, ``up_blocks.i``): the bytes autograd saves for the backward pass
in eager mode with bf16 weights, and the block's share of the forward FLOPs, which is what
checkpointing that block costs again in the backward pass. Attention is counted as a fused kernel
(FlashAttention / cuDNN SDPA save q, k, v and the output, not the attention matrix; on ``meta`` SDPA
would fall back to the math kernel and count the N x N matrix). torch.compile saves less than eager
(its partitioner recomputes cheap pointwise ops: on the H200, SDXL at 4 pairs peaked at 100.5 GiB
eager and 79.2 GiB compiled), so read the GiB as an upper bound and the ratios as the prediction.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.archs import ARCHS


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel saves (q, k, v, out), with the output's shape; values are
    irrelevant on ``meta``."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _inputs(arch, images: int):
    kw = dict(device="meta", dtype=torch.bfloat16)
    hidden = sum(cfg["hidden_size"] for cfg in arch.text_encoders)
    args = (torch.randn(images, 4, arch.latent_size, arch.latent_size, **kw), torch.zeros(images, device="meta", dtype=torch.long), torch.randn(images, arch.text_length, hidden, **kw))
    extra = {}
    if arch.family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(images, arch.text_encoders[-1]["projection_dim"], **kw), "time_ids": torch.randn(images, 6, **kw)}
    return args, extra


def measure(arch_name: str, images: int) -> dict:
    from diffusers import UNet2DConditionModel

    arch = ARCHS[arch_name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet).to(torch.bfloat16)
    unet.train()
    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    args, extra = _inputs(arch, images)

    # forward FLOPs per block (the real SDPA: its FLOPs are counted)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(*args, **extra)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    flops = {b: sum(counts.get(f"{type(unet).__name__}.{b}", {}).values()) for b in blocks}

    # saved bytes per block, attention as a fused kernel
    current, saved = ["other"], collections.Counter()
    hooks = [unet.get_submodule(b).register_forward_pre_hook(lambda m, a, b=b: current.__setitem__(0, b)) for b in blocks]
    hooks += [unet.get_submodule(b).register_forward_hook(lambda m, a, o: current.__setitem__(0, "other")) for b in blocks]

    def pack(tensor):
        saved[current[0]] += tensor.numel() * tensor.element_size()
        return tensor

    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FusedAttention.apply(q, k, v)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(*args, **extra)
    finally:
        F.scaled_dot_product_attention = sdpa
        for hook in hooks:
            hook.remove()
    all_saved = sum(saved.values())
    rows = [{"block": b, "saved_gib": saved[b] / 2**30, "saved_share": saved[b] / all_saved, "forward_flops_share": flops[b] / total} for b in blocks]
    return {"arch": arch_name, "images": images, "saved_gib_total": all_saved / 2**30, "forward_tflop": total / 1e12, "blocks": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.activation_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sdxl")
    parser.add_argument("--images", type=int, default=8, help="images per forward (2 per pair)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = measure(args.arch, args.images)
    print(f"{args.arch}, {args.images} images: {result['saved_gib_total']:.1f} GiB saved (eager, bf16), {result['forward_tflop']:.1f} TFLOP forward")
    print("| block | saved GiB | share of saved | share of forward FLOPs |\n| --- | --- | --- | --- |")
    for row in result["blocks"]:
        print(f"| {row['block']} | {row['saved_gib']:.2f} | {row['saved_share']:.1%} | {row['forward_flops_share']:.1%} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
