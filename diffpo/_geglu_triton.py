"""The Triton kernel of ``diffpo.geglu.fused_backward`` (a module of its own: importing ``diffpo.geglu``
must not need Triton)."""

import triton
import triton.language as tl


@triton.jit
def geglu_backward_kernel(h_ptr, dout_ptr, dh_ptr, HALF, BLOCK: tl.constexpr):
    # one program: BLOCK columns of one row; h and dh rows are [value | gate], 2 * HALF wide
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HALF
    h_row = h_ptr + row * 2 * HALF
    dh_row = dh_ptr + row * 2 * HALF
    value = tl.load(h_row + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(h_row + HALF + cols, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * HALF + cols, mask=ok, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
    pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
    tl.store(dh_row + cols, (dout * gate * cdf).to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dh_row + HALF + cols, (dout * value * (cdf + gate * pdf)).to(dh_ptr.dtype.element_ty), mask=ok)
