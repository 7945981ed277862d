"""diffpo's own 8-bit AdamW update of flat buckets (``train.adam_8bit_kernel=diffpo``): bitsandbytes' state layout.

Why: bitsandbytes' CUDA kernel for blockwise 8-bit Adam took 72 ms of each 487 ms SDXL step on an H200
(issue 16's profile), where the bytes it moves (float32 master and gradient, two 8-bit moments, read
and written: 16 bytes per parameter, 41 GB) take ~10 ms at the card's bandwidth: its time goes to
finding each moment's nearest code (a search in a 256-entry table). Here the nearest code takes two
table lookups (``nearest_code_tables``). On a GPU a hand-written Triton kernel (``triton_update_``)
runs the whole update of a bucket in one pass: 1.85 ms per 1 GiB bucket on an H200 against
bitsandbytes' 7.47 (2.3 TB/s counting those 16 bytes; ``python -m benchmarks.adam8bit_kernel``).
On a CPU the same update in torch ops (``adamw8bit_update_``, the reference the kernel is tested
against) runs through torch.compile (``compiled_update``, C++). On a GPU torch.compile's
code for it took 7.0 ms per bucket, about bitsandbytes' 7.47: hence the kernel.

The state is bitsandbytes' to the byte: each moment an index into bitsandbytes' dynamic code
(``state["qmap1"]``, ``state["qmap2"]``) scaled by the float32 maximum of its block of 256
(``absmax1``, ``absmax2``), the new maximum taken after the update, as bitsandbytes' kernel does. A
checkpoint written under one kernel resumes under the other. The update is bitsandbytes' CPU
reference's (``backends/cpu/ops.py``): m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
p = p (1 - lr wd) - lr/c1 * m / (sqrt(v)/c2 + eps), c1 = 1-b1^t, c2 = sqrt(1-b2^t), with g the gradient
times the clipping scale. Where it differs: each moment is rounded to its *nearest* code
(bitsandbytes' CPU quantizer lands up to four codes off on small values; on an H200 this update
and its CUDA kernel land equally close to float32 AdamW, BENCHMARKS.md); the weight decay comes
before the Adam step, as in the CPU reference (an order of lr^2 wd from applying it after); and a
non-finite gradient makes its whole block's moments non-finite: the trainer skips a step whose
gradient norm is not finite before it reaches the optimizer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

BLOCK = 256  # bitsandbytes' block of values sharing one float32 maximum
# Whether the Triton kernels let the compiler contract a * b + c into fused multiply-adds (Triton's
# ``enable_fp_fusion``; its default, and what every GPU timing of these kernels ran with). Where it
# contracts is its choice per kernel, so ``triton_update_`` and ``triton_indirect_update_`` can round
# the same update differently in the last bits: on an H200 the in-place tests comparing the two bit
# for bit failed with it on (4 failed) and passed with it off (6 passed; BENCHMARKS.md, issue 16).
# The tests turn it off to compare the two paths' logic exactly; training keeps it on (both roundings
# are equally valid: Triton's float32 division and square root are not correctly rounded either).
FP_FUSION = True

# A normalized moment y in [-1, 1] finds its code through a table indexed by the top bits of |y|'s
# float32 representation: its exponent and ``_MANTISSA_BITS`` leading mantissa bits (``_bucket``).
# Every magnitude below 2**-23 shares the first bucket (bitsandbytes' dynamic code has no entry
# that small but 0: its smallest are ~3e-7).
_MANTISSA_BITS = 7
_SHIFT = 23 - _MANTISSA_BITS
_SMALLEST = 2.0**-23
_FIRST = torch.tensor(_SMALLEST, dtype=torch.float32).view(torch.int32).item() >> _SHIFT
_BUCKETS = (torch.tensor(1.0, dtype=torch.float32).view(torch.int32).item() >> _SHIFT) - _FIRST + 1


def _bucket(magnitude: torch.Tensor) -> torch.Tensor:
    """The table row of each float32 ``magnitude`` in [0, 1] (larger, infinite or NaN: the last)."""
    bits = magnitude.clamp_min(_SMALLEST).view(torch.int32)
    return ((bits >> _SHIFT) - _FIRST).clamp(0, _BUCKETS - 1)


@functools.lru_cache(maxsize=8)
def _tables_on_cpu(code: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(code, dtype=torch.float64)
    if values.numel() != 256 or not bool((values[1:] > values[:-1]).all()) or values.abs().max() > 1:
        raise ValueError("the code must hold 256 increasing values in [-1, 1] (bitsandbytes' dynamic code)")
    # nearest code of y = the number of midpoints below y (y exactly on a midpoint: the lower code);
    # float32 midpoints, as the comparison runs in float32
    mids = ((values[1:] + values[:-1]) / 2).to(torch.float32)
    edges = torch.arange(_FIRST, _FIRST + _BUCKETS + 1, dtype=torch.int32) << _SHIFT
    edges = edges.view(torch.float32).to(torch.float64)
    edges[0] = 0.0  # the first bucket holds every magnitude below its upper edge
    low, high = edges[:-1], edges[1:]  # bucket b holds magnitudes in [low, high)
    mids64 = mids.to(torch.float64)
    # positive y in [low, high): codes below low are all below y; negative y in (-high, -low]: so are those <= -high
    base_pos = torch.searchsorted(mids64, low, right=False)
    base_neg = torch.searchsorted(mids64, -high, right=True)
    # one comparison with the next midpoint settles y only if at most one midpoint lies in the bucket
    inside_pos = torch.searchsorted(mids64, high, right=False) - base_pos
    inside_neg = torch.searchsorted(mids64, -low, right=True) - base_neg
    if int(inside_pos.max()) > 1 or int(inside_neg.max()) > 1:
        raise ValueError(f"the code is too fine for {_MANTISSA_BITS} mantissa bits of lookup: two codes' midpoints share a bucket")
    base = torch.cat([base_pos, base_neg]).to(torch.int32)
    mids = torch.cat([mids, torch.tensor([float("inf")])])  # base 255 (above the last midpoint): never exceeded
    return base, mids


def nearest_code_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two lookup tables ``nearest_code`` uses for the sorted 256-entry ``code`` (on its device).

    ``base[bucket]`` (int32, 2 x ``_BUCKETS``: positive then negative values) is the nearest code
    index of the bucket's smallest value; ``mids`` (float32, 256) the midpoints between neighbouring
    codes, +inf last. Each bucket holds at most one midpoint (checked), so y's nearest code is
    ``base + (y > mids[base])``: two gathers from small tables where a binary search takes eight."""
    base, mids = _tables_on_cpu(tuple(code.detach().to("cpu", torch.float64).tolist()))
    return base.to(code.device), mids.to(code.device)


def nearest_code(y: torch.Tensor, base: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """The index (int64) of the code nearest to each float32 ``y`` in [-1, 1] (``nearest_code_tables``)."""
    row = _bucket(y.abs()) + torch.where(y < 0, _BUCKETS, 0)
    start = base[row].long()
    return start + (y > mids[start]).long()


def adamw8bit_update_(
    p: torch.Tensor,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    tables1: tuple[torch.Tensor, torch.Tensor],
    tables2: tuple[torch.Tensor, torch.Tensor],
    hyper: torch.Tensor,
) -> None:
    """One blockwise 8-bit AdamW step of the flat float32 ``p`` (a multiple of 256 values) in place.

    ``g``: its gradient (any float dtype); ``state1``/``state2``: the uint8 codes of the moments,
    ``absmax1``/``absmax2`` their blocks' maxima, ``qmap1``/``qmap2`` the codes' values, ``tables1``/
    ``tables2`` their ``nearest_code_tables``. ``hyper`` (float32, on p's device): lr, beta1, beta2,
    1-beta1, 1-beta2, eps, weight decay, 1-beta1^t, sqrt(1-beta2^t), gradient scale
    (``hyperparameters``): a tensor, so that a new step or scale reuses the compiled kernels (a
    Python float would be compiled in)."""
    lr, beta1, beta2, rest1, rest2, eps, weight_decay, correction1, correction2, scale = hyper.unbind()
    blocks = p.numel() // BLOCK
    grad = g.view(blocks, BLOCK).to(torch.float32) * scale
    m = qmap1[state1.view(blocks, BLOCK).long()] * absmax1.view(blocks, 1)
    v = qmap2[state2.view(blocks, BLOCK).long()] * absmax2.view(blocks, 1)
    m = m * beta1 + grad * rest1
    v = v * beta2 + grad * grad * rest2
    master = p.view(blocks, BLOCK)
    stepped = master * (1 - lr * weight_decay) - (lr / correction1) * m / (v.sqrt() / correction2 + eps)
    new_max1 = m.abs().amax(dim=1, keepdim=True)
    new_max2 = v.abs().amax(dim=1, keepdim=True)
    # an all-zero block stays at code 0 -> 0.0 (its maximum 0 is divided as 1; bitsandbytes divides by 0)
    codes1 = nearest_code(m / torch.where(new_max1 > 0, new_max1, 1.0), *tables1)
    codes2 = nearest_code(v / torch.where(new_max2 > 0, new_max2, 1.0), *tables2)
    master.copy_(stepped)
    state1.view(blocks, BLOCK).copy_(codes1)
    state2.view(blocks, BLOCK).copy_(codes2)
    absmax1.view(blocks, 1).copy_(new_max1)
    absmax2.view(blocks, 1).copy_(new_max2)


def hyperparameters(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, scale: float, device) -> torch.Tensor:
    """``adamw8bit_update_``'s ``hyper`` for optimizer step ``step`` (from 1), computed in float64
    (1 - 0.999 in float32 arithmetic would be 1.3e-5 off) and rounded once, as bitsandbytes does."""
    values = [lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay, 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5, scale]
    # from pinned memory: a copy from pageable memory can make the host wait for the device's queue, once per
    # bucket per step; pinned, it is queued behind the update before it like any kernel
    pinned = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=torch.float32, pin_memory=pinned).to(device, non_blocking=True)


@functools.cache
def compiled_update():
    """``adamw8bit_update_`` compiled (one graph; dynamic sizes, so buckets of any size share it)."""
    return torch.compile(adamw8bit_update_, fullgraph=True, dynamic=True)


def triton_update_(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, tables1, tables2, hyper, *, rows: int = 4, num_warps: int = 4) -> None:
    """``adamw8bit_update_`` as one hand-written Triton kernel (CUDA; or Triton's CPU interpreter).

    Why not torch.compile of ``adamw8bit_update_`` on the GPU: its generated code took 7.0 ms per
    1 GiB bucket on an H200, this kernel 1.85 (bitsandbytes' CUDA kernel 7.47), reading and writing
    each value once. The hyperparameters are read from ``hyper`` on the
    device, so no value is compiled in: one kernel for every step, scale and bucket size. Each
    program updates ``rows`` blocks of 256 values with ``num_warps`` warps."""
    for name, tensor in (("p", p), ("g", g), ("state1", state1), ("state2", state2)):
        if not tensor.is_contiguous() or tensor.numel() != p.numel():
            raise ValueError(f"{name} must be contiguous with p's {p.numel()} values")
    if p.numel() % BLOCK or p.dtype != torch.float32:
        raise ValueError(f"p must be float32 with a multiple of {BLOCK} values")
    from diffpo._adam8bit_triton import adamw8bit_kernel  # needs Triton: imported on first use

    blocks = p.numel() // BLOCK
    adamw8bit_kernel[(-(-blocks // rows),)](
        p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, tables1[0], tables1[1], tables2[0], tables2[1], hyper, blocks,
        BLOCK=BLOCK, ROWS=rows, SMALLEST=_SMALLEST, FIRST=_FIRST, BUCKETS=_BUCKETS, SHIFT=_SHIFT, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )


class MemberTables(NamedTuple):
    """Where the members of a flat bucket sit, for ``triton_indirect_update_`` (``member_tables``)."""

    member: torch.Tensor  # int32, one per block of 256 values: the index of the member it belongs to
    first: torch.Tensor  # int64, one per member: the offset of its first value in the bucket
    numel: torch.Tensor  # int64, one per member: its number of values
    dtype: torch.dtype  # of the members' weights and gradients: bf16 or fp16


def member_tables(numels: list[int], dtype: torch.dtype, device) -> MemberTables:
    """The ``MemberTables`` of a bucket holding tensors of ``numels`` values one after the other, each
    starting on a block of 256 (``diffpo.fastpath.FlatMasterWeights``' layout), for weights of ``dtype``."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the indirect update reads bf16 or fp16 gradients, not {dtype}")
    blocks = torch.tensor([-(-n // BLOCK) for n in numels], dtype=torch.int64)
    first = (torch.cumsum(blocks, 0) - blocks) * BLOCK
    member = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    return MemberTables(member.to(device), first.to(device), torch.tensor(numels, dtype=torch.int64).to(device), dtype)


# triton_indirect_update_'s launch: ROWS blocks per program, its warps, and whether the state's loads come
# before the member lookups (``EARLY``). Module-level so a benchmark can try others end to end
# (benchmarks/train_e2e.py --indirect). Why one block per program on one warp: the kernel waits on a chain of
# dependent loads (member, address, gradient) before its data moves, so it runs fastest with the most
# programs in flight; one 1 GiB bucket on an H200 (python -m benchmarks.adam8bit_kernel, issue 16):
# 1x1 2.07 ms, 2x2 2.39, 2x4 2.55 (2.62 with the state loaded after the lookups), 4x4 2.97, 2x8 3.35;
# adamw8bit_kernel from a float32 bucket, 1.83 (one machine, the same run).
INDIRECT_LAUNCH = {"rows": 1, "num_warps": 1, "early": True}


def triton_indirect_update_(
    p, members: MemberTables, addresses, state1, state2, absmax1, absmax2, qmap1, qmap2, tables1, tables2, hyper, *, nonfinite: torch.Tensor | None = None,
    rows: int | None = None, num_warps: int | None = None, early: bool | None = None,
) -> None:
    """``triton_update_`` of a flat bucket of masters ``p`` whose gradient is read where autograd left
    it, each member's own bf16 (or fp16) ``.grad``, and whose new masters are rounded into the members'
    weights in the same pass. ``addresses`` (int64, 2 x members, on p's device): each member's gradient
    and weight ``data_ptr()``, row-major with its ``numel`` values (0: no gradient, stepped as a zero
    one; no weight written: the caller copies it). The masters and moments are ``triton_update_``'s, bit
    for bit, and the weights are the masters rounded to nearest even, as torch rounds them.
    ``nonfinite`` (int32, one value on p's device, zeroed by the caller): set to 1 if a weight written is
    not finite (inf or nan, also a finite master past the weight dtype's range), checked as the values are
    written, so the trainer's check of the updated weights needs no pass of its own over them.

    Why: the flat path first upcasts every gradient into a float32 bucket (a cast-copy per bucket) and
    after the update copies every master into its weight: for SDXL's 2.6B parameters ~31 GB of memory
    traffic per step, which issue 16's profile put at ~9 ms of a ~405 ms step on an H200 (the foreach
    copies: 8.9 ms), and a host-bound loop over the tensors that the device waited for. Reading and
    writing the bf16 tensors in place removes both: SDXL's optimizer step alone on an H200 took 34.4 ms
    of wall time against 39.4 (medians of 10 with overlapping ranges, both kernels without multiply-add
    contraction) and 11.5 ms of host time against 20.8 (``python -m benchmarks.optimizer_step``). The
    kernel itself is slower than ``triton_update_`` from a float32 bucket, 2.87 against 1.83 ms per 1 GiB
    bucket (``python -m benchmarks.adam8bit_kernel``, H200) at its first launch (4 blocks x 4 warps), so end
    to end the two paths measured even (413.6 ms per SDXL step in place, 408.3 through the copies, one
    machine); launched as ``INDIRECT_LAUNCH`` (one block per program, one warp) it takes 2.07 ms
    (BENCHMARKS.md, issue 16)."""
    blocks = p.numel() // BLOCK
    if p.numel() % BLOCK or p.dtype != torch.float32 or members.member.numel() != blocks:
        raise ValueError(f"p must be float32 with a multiple of {BLOCK} values, one entry of members.member per block")
    if addresses.dtype != torch.int64 or addresses.shape != (2, members.numel.numel()):
        raise ValueError("addresses must be int64, a gradient and a weight address per member")
    import triton.language as tl

    from diffpo._adam8bit_triton import adamw8bit_indirect_kernel  # needs Triton: imported on first use

    rows = INDIRECT_LAUNCH["rows"] if rows is None else rows
    num_warps = INDIRECT_LAUNCH["num_warps"] if num_warps is None else num_warps
    early = INDIRECT_LAUNCH["early"] if early is None else early
    if nonfinite is None:
        nonfinite = torch.zeros(1, dtype=torch.int32, device=p.device)
    elif nonfinite.dtype != torch.int32 or nonfinite.numel() != 1:
        raise ValueError("nonfinite must be one int32 value")
    adamw8bit_indirect_kernel[(-(-blocks // rows),)](
        p, members.member, members.first, members.numel, addresses[0], addresses[1], state1, state2, absmax1, absmax2, qmap1, qmap2,
        tables1[0], tables1[1], tables2[0], tables2[1], hyper, nonfinite, blocks,
        DTYPE=tl.bfloat16 if members.dtype == torch.bfloat16 else tl.float16,
        BLOCK=BLOCK, ROWS=rows, SMALLEST=_SMALLEST, FIRST=_FIRST, BUCKETS=_BUCKETS, SHIFT=_SHIFT, EARLY=bool(early), num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )


def update_function(device: torch.device):
    """The 8-bit update for tensors on ``device``: the Triton kernel on a CUDA GPU (the eager
    ``adamw8bit_update_`` where Triton does not import), else ``adamw8bit_update_`` compiled (C++ on a CPU)."""
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401  (CUDA builds of torch ship it)
        except ImportError:  # torch.compile needs Triton on a GPU too: the eager update, correct but slow
            return adamw8bit_update_
        return triton_update_
    return compiled_update()


def indirect_update_function(device: torch.device):
    """``triton_indirect_update_`` where ``update_function`` is the Triton kernel (a CUDA GPU with
    Triton), else None: the caller upcasts the gradients into its bucket and copies the weights."""
    return triton_indirect_update_ if update_function(device) is triton_update_ else None
