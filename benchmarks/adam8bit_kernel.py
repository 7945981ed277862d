"""One 8-bit AdamW update of one flat bucket, kernel by kernel, side by side (issue 16).

    python -m benchmarks.adam8bit_kernel --out benchmarks/results/adam8bit_kernel.json     # a CUDA GPU
    TRITON_INTERPRET=1 python -m benchmarks.adam8bit_kernel --device cpu --values 65536 --reps 1   # smoke run
    python -m benchmarks.adam8bit_kernel --only diffpo-triton-4x4,diffpo-indirect,diffpo-indirect-unaligned

A bucket of ``--values`` float32 masters (2**28: one of ``MasterWeightAdamW8bit``'s 1 GiB buckets;
SDXL's UNet fills ten) with a float32 gradient and bitsandbytes' 8-bit state, updated by:

- ``bitsandbytes``: its CUDA kernel (``optimizer_update_8bit_blockwise``; on a CPU its CPU one);
- ``bitsandbytes-triton``: its Triton kernel (``train.adam_8bit_kernel=triton``);
- ``diffpo-triton-RxW``: diffpo's Triton kernel (``diffpo.adam8bit.triton_update_``) with R blocks
  of 256 values per program and W warps (``train.adam_8bit_kernel=diffpo`` uses the default);
- ``diffpo-compiled``: ``diffpo.adam8bit.adamw8bit_update_`` through torch.compile (what the
  option runs on a CPU);
- ``diffpo-indirect``: diffpo's in-place kernel (``diffpo.adam8bit.triton_indirect_update_``, what the
  trainer runs on a GPU), the bucket's members SDXL-sized tensors of their own (1280 x 1280 values) with a
  bf16 gradient each, the new masters rounded into their bf16 weights; ``diffpo-indirect-unaligned``:
  the same with every gradient at an address off 16 bytes, which sends every program down the kernel's
  general path (a mask per value, one bf16 value per load and store: the kernel before its 16-byte
  vector path); ``diffpo-indirect-RxW``: the in-place kernel launched with R blocks per program and W
  warps, the state's loads before the member lookups (``-late``: after them, the kernel before issue 16's
  session 13).

Per kernel: the median time of ``--reps`` updates (CUDA events after warm-up) and the bandwidth it
reaches counting 16 bytes per value (float32 master read and written, float32 gradient read, two
8-bit moments read and written; the indirect rows: a bf16 gradient read and a bf16 weight written in
place of the float32 gradient, the same 16 bytes). Before timing, each diffpo kernel's result after one update is
checked against the eager ``adamw8bit_update_`` on the same device (``check``): the largest master
difference and how many moment codes differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

BYTES_PER_VALUE = 16


def _state(values: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator(device).manual_seed(seed)
    blocks = values // 256
    return {
        "p": torch.randn(values, generator=generator, device=device),
        "g": 1e-3 * torch.randn(values, generator=generator, device=device),
        "s1": torch.randint(0, 256, (values,), generator=generator, device=device, dtype=torch.uint8),
        "s2": torch.randint(0, 256, (values,), generator=generator, device=device, dtype=torch.uint8),
        "a1": 1e-3 * torch.rand(blocks, generator=generator, device=device),
        "a2": 1e-6 * torch.rand(blocks, generator=generator, device=device),
    }


def _kernels(device: torch.device) -> dict:
    """name -> update(state, step)"""
    from bitsandbytes import functional as F

    from diffpo import adam8bit

    q1 = F.create_dynamic_map(signed=True).float().to(device)
    q2 = F.create_dynamic_map(signed=False).float().to(device)
    t1, t2 = adam8bit.nearest_code_tables(q1), adam8bit.nearest_code_tables(q2)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)

    def bnb(s, step):
        F.optimizer_update_8bit_blockwise("adam", s["g"], s["p"], s["s1"], s["s2"], 0.9, 0.999, 0.0, 0.0, 1e-8, step, 1e-4, q1, q2, s["a1"], s["a2"], 1e-2, gnorm_scale=1.0)

    def diffpo(update, **kw):
        def run(s, step):
            h = adam8bit.hyperparameters(**hyper, step=step, scale=1.0, device=device)
            update(s["p"], s["g"], s["s1"], s["s2"], s["a1"], s["a2"], q1, q2, t1, t2, h, **kw)
        return run

    kernels = {"bitsandbytes": bnb}
    try:
        from bitsandbytes.backends.triton.kernels_optim import optimizer_update_8bit_blockwise_impl as bnb_triton

        if device.type == "cuda":
            kernels["bitsandbytes-triton"] = lambda s, step: bnb_triton(
                optimizer_name="adam", g=s["g"], p=s["p"], state1=s["s1"], state2=s["s2"], beta1=0.9, beta2=0.999, beta3=0.0, alpha=0.0,
                eps=1e-8, step=step, lr=1e-4, qmap1=q1, qmap2=q2, absmax1=s["a1"], absmax2=s["a2"], weight_decay=1e-2, gnorm_scale=1.0, skip_zeros=False,
            )
    except ImportError:
        pass
    try:
        import triton  # noqa: F401

        for rows, warps in ((4, 4), (2, 4), (8, 4), (8, 8), (16, 8)):
            kernels[f"diffpo-triton-{rows}x{warps}"] = diffpo(adam8bit.triton_update_, rows=rows, num_warps=warps)
        kernels["diffpo-indirect"] = _indirect(adam8bit, q1, q2, t1, t2, hyper, device, aligned=True)
        kernels["diffpo-indirect-unaligned"] = _indirect(adam8bit, q1, q2, t1, t2, hyper, device, aligned=False)
        for rows, warps in ((1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (2, 8), (4, 2), (4, 4), (8, 4), (8, 8), (16, 8)):
            for early in (True, False):
                launch = dict(rows=rows, num_warps=warps, early=early)
                kernels[f"diffpo-indirect-{rows}x{warps}" + ("" if early else "-late")] = _indirect(adam8bit, q1, q2, t1, t2, hyper, device, aligned=True, launch=launch)
    except ImportError:
        pass
    kernels["diffpo-compiled"] = diffpo(adam8bit.compiled_update())
    kernels["_eager"] = diffpo(adam8bit.adamw8bit_update_)
    return kernels


MEMBER_VALUES = 1280 * 1280  # an SDXL attention projection's weight


def _indirect(adam8bit, q1, q2, t1, t2, hyper, device, *, aligned: bool, launch: dict | None = None):
    """``triton_indirect_update_`` of a bucket whose members are tensors of their own: each reads its slice
    of the state's gradient as a bf16 tensor (made at the first call) and writes its bf16 weight.
    ``launch``: the kernel's rows, num_warps and early (default: ``adam8bit.INDIRECT_LAUNCH``)."""
    members: dict = {}

    def run(s, step):
        if "tables" not in members:
            values = s["p"].numel()
            sizes = [MEMBER_VALUES] * (values // MEMBER_VALUES) + ([values % MEMBER_VALUES] if values % MEMBER_VALUES else [])
            shift = 0 if aligned else 1
            grads = []
            for piece in s["g"].to(torch.bfloat16).split(sizes):
                storage = torch.empty(piece.numel() + shift, dtype=torch.bfloat16, device=device)
                grads.append(storage[shift:].copy_(piece))
            weights = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in sizes]
            members.update(
                tables=adam8bit.member_tables(sizes, torch.bfloat16, device), grads=grads, weights=weights,
                addresses=torch.tensor([[g.data_ptr() for g in grads], [w.data_ptr() for w in weights]], dtype=torch.int64, device=device),
            )
        h = adam8bit.hyperparameters(**hyper, step=step, scale=1.0, device=device)
        adam8bit.triton_indirect_update_(s["p"], members["tables"], members["addresses"], s["s1"], s["s2"], s["a1"], s["a2"], q1, q2, t1, t2, h, **(launch or {}))

    run.members = members
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--values", type=int, default=2**28)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default="", help="comma-separated kernel names to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from benchmarks.train_step import environment, write_json

    kernels = _kernels(device)
    eager = kernels.pop("_eager")
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(kernels))
        if unknown:
            parser.error(f"--only: no kernel {', '.join(unknown)} here (have: {', '.join(kernels)})")
        kernels = {name: kernels[name] for name in wanted}
    start = _state(args.values, device)
    reference = {k: v.clone() for k, v in start.items()}
    eager(reference, 3)
    result = {"values": args.values, "environment": environment(device, "benchmarks.adam8bit_kernel"), "rows": []}
    for name, update in kernels.items():
        row = {"kernel": name}
        state = {k: v.clone() for k, v in start.items()}
        begin = time.perf_counter()
        update(state, 3)  # the first call compiles
        _sync(device)
        row["first_call_s"] = time.perf_counter() - begin
        if name.startswith("diffpo"):
            expected = reference
            if hasattr(update, "members"):  # the eager update from the same bf16 gradient
                expected = {k: v.clone() for k, v in start.items()}
                expected["g"] = expected["g"].to(torch.bfloat16).float()
                eager(expected, 3)
            row["check"] = {
                "max_master_diff": float((state["p"] - expected["p"]).abs().max()),
                "codes_differ": int((state["s1"] != expected["s1"]).sum() + (state["s2"] != expected["s2"]).sum()),
                "max_absmax_rel_diff": max(float(((state[k] - expected[k]).abs() / expected[k].clamp_min(1e-30)).max()) for k in ("a1", "a2")),
            }
            if hasattr(update, "members"):  # every weight the new master rounded
                row["check"]["weights_equal_masters"] = bool(torch.equal(torch.cat(update.members["weights"]), state["p"].to(torch.bfloat16)))
            del expected
        for _ in range(args.warmup):
            update(state, 4)
        times = []
        for _ in range(args.reps):
            if device.type == "cuda":
                events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                events[0].record()
                update(state, 4)
                events[1].record()
                torch.cuda.synchronize()
                times.append(events[0].elapsed_time(events[1]))
            else:
                begin = time.perf_counter()
                update(state, 4)
                times.append(1e3 * (time.perf_counter() - begin))
        row["ms"] = statistics.median(times)
        row["gb_per_s"] = BYTES_PER_VALUE * args.values / row["ms"] / 1e6
        result["rows"].append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        del state
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
