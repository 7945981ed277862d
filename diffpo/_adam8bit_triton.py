"""The Triton kernel of ``diffpo.adam8bit.triton_update_`` (a module of its own: Triton reads a kernel's
helpers from its module's globals, and importing ``diffpo.adam8bit`` must not need Triton)."""

import triton
import triton.language as tl


@triton.jit
def _nearest(y, base_ptr, mids_ptr, SMALLEST: tl.constexpr, FIRST: tl.constexpr, BUCKETS: tl.constexpr, SHIFT: tl.constexpr):
    # nearest_code, in Triton: the bucket of |y| from its float32 bits, then one comparison
    bits = tl.maximum(tl.abs(y), SMALLEST).to(tl.int32, bitcast=True)
    row = tl.minimum(tl.maximum((bits >> SHIFT) - FIRST, 0), BUCKETS - 1) + tl.where(y < 0, BUCKETS, 0)
    start = tl.load(base_ptr + row)
    return start + (y > tl.load(mids_ptr + start)).to(tl.int32)


@triton.jit
def _load_tile(rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr):
    # one ROWS x BLOCK tile's state as the update reads it: both moments dequantized, and the masters
    m = tl.load(qmap1_ptr + tl.load(s1_ptr + offsets, mask=ok, other=0).to(tl.int32)) * tl.load(absmax1_ptr + rows, mask=row_ok, other=0.0)[:, None]
    v = tl.load(qmap2_ptr + tl.load(s2_ptr + offsets, mask=ok, other=0).to(tl.int32)) * tl.load(absmax2_ptr + rows, mask=row_ok, other=0.0)[:, None]
    master = tl.load(p_ptr + offsets, mask=ok, other=0.0)
    return m, v, master


@triton.jit
def _update_tile(
    grad, m, v, master, rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr,
    base1_ptr, mids1_ptr, base2_ptr, mids2_ptr, hyper_ptr,
    SMALLEST: tl.constexpr, FIRST: tl.constexpr, BUCKETS: tl.constexpr, SHIFT: tl.constexpr,
):
    # the update of one ROWS x BLOCK tile of the flat bucket (``offsets``) from its float32 gradient and
    # its state (``_load_tile``); stores the master, the moments' codes and maxima, and returns the new master
    lr = tl.load(hyper_ptr + 0)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    rest1 = tl.load(hyper_ptr + 3)
    rest2 = tl.load(hyper_ptr + 4)
    eps = tl.load(hyper_ptr + 5)
    weight_decay = tl.load(hyper_ptr + 6)
    correction1 = tl.load(hyper_ptr + 7)
    correction2 = tl.load(hyper_ptr + 8)
    scale = tl.load(hyper_ptr + 9)
    grad = grad * scale
    m = m * beta1 + grad * rest1
    v = v * beta2 + grad * grad * rest2
    master = master * (1 - lr * weight_decay) - (lr / correction1) * m / (tl.sqrt(v) / correction2 + eps)
    tl.store(p_ptr + offsets, master, mask=ok)
    max1 = tl.max(tl.abs(m), axis=1)
    max2 = tl.max(tl.abs(v), axis=1)
    # an all-zero block stays at code 0 -> 0.0 (its maximum 0 is divided as 1)
    y1 = m / tl.where(max1 > 0, max1, 1.0)[:, None]
    y2 = v / tl.where(max2 > 0, max2, 1.0)[:, None]
    tl.store(s1_ptr + offsets, _nearest(y1, base1_ptr, mids1_ptr, SMALLEST, FIRST, BUCKETS, SHIFT).to(tl.uint8), mask=ok)
    tl.store(s2_ptr + offsets, _nearest(y2, base2_ptr, mids2_ptr, SMALLEST, FIRST, BUCKETS, SHIFT).to(tl.uint8), mask=ok)
    tl.store(absmax1_ptr + rows, max1, mask=row_ok)
    tl.store(absmax2_ptr + rows, max2, mask=row_ok)
    return master


@triton.jit
def adamw8bit_kernel(
    p_ptr, g_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr,
    base1_ptr, mids1_ptr, base2_ptr, mids2_ptr, hyper_ptr, n_blocks,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, SMALLEST: tl.constexpr, FIRST: tl.constexpr, BUCKETS: tl.constexpr, SHIFT: tl.constexpr,
):
    # one program: ROWS quantization blocks of BLOCK values, as a ROWS x BLOCK tile
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    offsets = rows.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    ok = row_ok[:, None]
    grad = tl.load(g_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    m, v, master = _load_tile(rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr)
    _update_tile(
        grad, m, v, master, rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr,
        base1_ptr, mids1_ptr, base2_ptr, mids2_ptr, hyper_ptr, SMALLEST, FIRST, BUCKETS, SHIFT,
    )


@triton.jit
def adamw8bit_indirect_kernel(
    p_ptr, member_ptr, first_ptr, numel_ptr, grads_ptr, weights_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr,
    base1_ptr, mids1_ptr, base2_ptr, mids2_ptr, hyper_ptr, nonfinite_ptr, n_blocks,
    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, SMALLEST: tl.constexpr, FIRST: tl.constexpr, BUCKETS: tl.constexpr, SHIFT: tl.constexpr,
    EARLY: tl.constexpr,
):
    # adamw8bit_kernel's update, the gradient read from each member's own tensor and the new master
    # rounded into its weight (DTYPE: bf16 or fp16), through the members' addresses in grads_ptr and
    # weights_ptr (0: no gradient, read as zero; no weight to write). A block belongs to one member
    # (member_ptr); its values past the member's numel are the gap before the next block. A program that
    # writes a non-finite weight sets nonfinite_ptr[0] to 1 (the trainer's check of the updated weights,
    # without a pass of its own over them).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    offsets = rows.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    ok = row_ok[:, None]
    if EARLY:
        # the state's loads issued first, so that their latency overlaps the member lookups' chain of
        # dependent loads (member -> address -> gradient) rather than following it
        m, v, master = _load_tile(rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr)
    cols = tl.arange(0, BLOCK)
    member = tl.load(member_ptr + rows, mask=row_ok, other=0)
    start = rows.to(tl.int64) * BLOCK - tl.load(first_ptr + member)  # each row's first value within its member
    left = tl.load(numel_ptr + member) - start  # the member's values from there on
    valid = ok & (cols[None, :] < left[:, None])
    grad_at = tl.load(grads_ptr + member)
    weight_at = tl.load(weights_ptr + member)
    grads = grad_at.to(tl.pointer_type(DTYPE)) + start
    weights = weight_at.to(tl.pointer_type(DTYPE)) + start
    # Whole rows at 16-byte aligned addresses (every block of an allocator-made tensor but its last):
    # masks per row and the alignment stated, so that Triton loads and stores the bf16 values 8 at a
    # time (16 bytes) rather than one by one; where the masks per value would defeat that (a member's
    # last, partial block) or an address is not aligned (a gradient that is a view at an odd offset,
    # e.g. of DDP's buckets), the program takes the general path. Issue 16, one 1 GiB bucket on an H200
    # (python -m benchmarks.adam8bit_kernel): 2.87 ms with this path, 3.10 ms with every program on the
    # general one, 1.83 ms for adamw8bit_kernel from a float32 gradient bucket (the same 16 bytes per
    # value), all at 4 blocks x 4 warps per program: vectorizing explained a fifth of that gap; the rest
    # was the dependent lookups' latency, which more, smaller programs hide (adam8bit.INDIRECT_LAUNCH:
    # one block on one warp, 2.07 ms).
    whole = tl.sum((row_ok & ((left < BLOCK) | (grad_at % 16 != 0) | (weight_at % 16 != 0))).to(tl.int32), axis=0) == 0
    if whole:
        grad = tl.load(tl.multiple_of(grads, 16)[:, None] + cols[None, :], mask=(row_ok & (grad_at != 0))[:, None], other=0.0).to(tl.float32)
    else:
        grad = tl.load(grads[:, None] + cols[None, :], mask=valid & (grad_at != 0)[:, None], other=0.0).to(tl.float32)
    if not EARLY:
        m, v, master = _load_tile(rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr)
    master = _update_tile(
        grad, m, v, master, rows, row_ok, offsets, ok, p_ptr, s1_ptr, s2_ptr, absmax1_ptr, absmax2_ptr,
        base1_ptr, mids1_ptr, base2_ptr, mids2_ptr, hyper_ptr, SMALLEST, FIRST, BUCKETS, SHIFT,
    )
    if DTYPE == tl.bfloat16:
        # round to nearest even on the float32 bits, as torch rounds float32 to bf16 (Triton's own cast does
        # on a GPU, but its CPU interpreter truncates: the tests compare the weights bit for bit there)
        bits = master.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(master != master, 0x7FC0, bits)
        weight = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        broken = (bits & 0x7F80) == 0x7F80  # an all-ones exponent: inf or nan (also a finite master past bf16's range)
    else:
        weight = master.to(DTYPE)
        wide = weight.to(tl.float32)
        broken = (wide != wide) | (tl.abs(wide) == float("inf"))
    if whole:
        rows_written = (row_ok & (weight_at != 0))[:, None]
        tl.store(tl.multiple_of(weights, 16)[:, None] + cols[None, :], weight, mask=rows_written)
        written = rows_written & (cols[None, :] < BLOCK)  # (as a [ROWS, BLOCK] mask, the other branch's shape)
    else:
        written = valid & (weight_at != 0)[:, None]
        tl.store(weights[:, None] + cols[None, :], weight, mask=written)
    # only a program that found one writes (no contention on the flag in a healthy step)
    tl.store(nonfinite_ptr, 1, mask=tl.max((broken & written).to(tl.int32)) > 0)
