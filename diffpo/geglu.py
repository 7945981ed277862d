"""GEGLU with a backward that writes the projection's gradient in one pass (``train.fused_geglu``).

diffusers' ``GEGLU`` (the feed-forward activation of every SD/SDXL transformer block) splits one
projection ``h = x W^T + b`` into value and gate, ``out = value * gelu(gate)``. Autograd's backward
of that split is a concatenation of the two halves' gradients, and inductor lowers it as one masked
kernel over ``h``'s shape: in issue 16's SDXL profile it took 350 us per block, 4.4 times the forward's kernel for 1.7 times its bytes
(24.5 ms of a 423 ms step). ``fused_backward`` reads value, gate and the output's gradient once and
writes both halves of ``dh`` (a hand-written Triton kernel on CUDA; the same arithmetic in torch ops
elsewhere). The forward stays torch ops: under torch.compile the same kernel as before.

Math (exact GELU, as diffusers uses): gelu(g) = g Phi(g), gelu'(g) = Phi(g) + g phi(g), so
``d value = dout * gelu(gate)`` and ``d gate = dout * value * gelu'(gate)``, in float32 (float64 for
float64 tensors) and rounded once to the tensors' dtype, as inductor's kernel does. Not twice
differentiable: a second backward through it fails with torch's "no autograd formula" error.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def reference_backward(projected: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``d projected`` in torch ops (the CPU path, and what the Triton kernel is tested against)."""
    compute = torch.promote_types(projected.dtype, torch.float32)
    value, gate = projected.to(compute).chunk(2, dim=-1)
    grad = grad_out.to(compute)
    cdf = 0.5 * (1.0 + torch.erf(gate * _SQRT_HALF))
    pdf = torch.exp(-0.5 * gate * gate) * _INV_SQRT_2PI
    return torch.cat([grad * gate * cdf, grad * value * (cdf + gate * pdf)], dim=-1).to(projected.dtype)


def _triton_backward(projected: torch.Tensor, grad_out: torch.Tensor, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    from diffpo._geglu_triton import geglu_backward_kernel  # needs Triton: imported on first use

    half = grad_out.shape[-1]
    if projected.numel() == 0:
        return torch.empty_like(projected, memory_format=torch.contiguous_format)
    rows = grad_out.numel() // half
    projected = projected.contiguous()
    grad_out = grad_out.contiguous()
    grad = torch.empty_like(projected)
    geglu_backward_kernel[(rows, -(-half // block))](projected, grad_out, grad, half, BLOCK=block, num_warps=num_warps)
    return grad


@torch.library.custom_op("diffpo::geglu_backward", mutates_args=())
def fused_backward(projected: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Gradient of ``value * gelu(gate)`` with respect to ``projected = cat([value, gate], -1)``.

    An opaque op to torch.compile: inductor calls it as it is instead of tracing into it (the
    point is to replace inductor's own kernel for this step)."""
    if projected.device.type == "cuda" and projected.dtype != torch.float64 and _triton_available():
        return _triton_backward(projected, grad_out)
    return reference_backward(projected, grad_out)


@fused_backward.register_fake
def _(projected: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(projected, memory_format=torch.contiguous_format)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401  (CUDA builds of torch ship it)
    except ImportError:
        return False
    return True


class _GegluFunction(torch.autograd.Function):
    @staticmethod
    def forward(projected: torch.Tensor) -> torch.Tensor:
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        return torch.ops.diffpo.geglu_backward(projected, grad_out)


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` of ``projected = cat([value, gate], -1)``, with the one-pass backward."""
    return _GegluFunction.apply(projected)


class FusedGEGLU(nn.Module):
    """Drop-in for diffusers' ``GEGLU``: the same ``proj`` child (so the same state-dict keys and the
    same LoRA targets), the same forward values, the one-pass backward."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return geglu(self.proj(hidden_states))


def fuse_geglu(network: nn.Module) -> list[str]:
    """Replace every diffusers ``GEGLU`` in ``network`` by a ``FusedGEGLU`` sharing its ``proj``;
    returns the replaced modules' names (none for networks without GEGLU, e.g. SD3's and Flux's
    transformers, whose feed-forwards use tanh-approximated GELU)."""
    from diffusers.models.activations import GEGLU

    replaced = []
    for name, module in list(network.named_modules()):
        if type(module) is GEGLU:  # subclasses may change the forward: left alone
            parent_name, _, child = name.rpartition(".")
            parent = network.get_submodule(parent_name) if parent_name else network
            setattr(parent, child, FusedGEGLU(module.proj))
            replaced.append(name)
    return replaced


def allow_cached_autograd_functions() -> None:
    """Let torch.compile's AOTAutograd cache keep graphs that hold a custom ``autograd.Function``
    (``FusedGEGLU``'s). PyTorch bypasses that cache for them by default (``torch._functorch.config.
    autograd_cache_allow_custom_autograd_functions``), so every run re-traced the transformer blocks'
    joint graphs: a warm first step of 27.7 s instead of 14.1 on SDXL; with the cache allowed 18.0 and
    19.1 s on two H200s, 19 cache hits and no bypass (BENCHMARKS.md, issue 16).
    Safe here: the Function's forward and backward are traced into the cached graph, and the custom
    op they call is looked up at run time. Process-wide; a no-op on PyTorch versions without it."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
