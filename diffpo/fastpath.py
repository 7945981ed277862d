"""The GPU fast path: bf16 compute weights with float32 master weights, and torch.compile.

Why bf16 weights with a master copy, not autocast over float32 weights (issue 7's measurements on an
H100, SDXL UNet, 4 pairs): autocast keeps a float32 weight *and* casts a bf16 copy of it at every
use, so it costs memory (float32 weights under autocast ran out of 80 GB where bf16 weights took
50 GiB) and time (508 vs 444 ms with torch.compile). Pure bf16 weights are not an option either:
bf16 keeps 8 significant bits, so an update below 2^-9 of a weight's magnitude rounds away; Adam's
steps are about lr, so at lr 1e-5 every weight larger than ~5e-3 would never change. ``MasterWeightAdamW`` keeps the float32
weights inside the optimizer: the network computes in bf16, the gradients are upcast, AdamW steps
the float32 copy, and the result is rounded into the bf16 weights. Nothing is lost between steps
because the float32 copy, not the rounded weight, carries the state (and is checkpointed).

This is the scheme of apex's ``FusedAdam(master_weights=True)`` and DeepSpeed's bf16 optimizer,
written here in a few lines on ``torch.optim.AdamW`` (fused kernel on CUDA) so it works with plain
accelerate (single GPU and DDP). FSDP and DeepSpeed keep their own float32 shards: use their
mixed-precision settings instead (``train.weight_dtype=bf16`` is refused there).
"""

from __future__ import annotations

import logging
from typing import Collection, Iterable, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

CompileMode = Literal["none", "regional", "full"]



class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over float32 copies of low-precision parameters.

    ``params`` are the network's (e.g. bf16) parameters; the optimizer's own param groups hold
    their float32 masters, so learning-rate schedulers, ``state_dict`` and accelerate work as with
    any AdamW. ``step`` upcasts each gradient into its master's ``.grad`` (freeing the low-precision
    gradient at once, so the two never coexist for all parameters), steps, and copies the masters
    back. The masters are part of ``state_dict``: a resumed run continues from the float32 values,
    not from their bf16 rounding.
    """

    def __init__(self, params: Iterable[nn.Parameter], **kwargs):
        self.model_params = [p for p in params]
        masters = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in self.model_params]
        if "fused" not in kwargs and masters and masters[0].is_cuda:
            kwargs["fused"] = True
        super().__init__(masters, **kwargs)

    def _masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        masters = self._masters()
        with_grad = []
        for param, master in zip(self.model_params, masters):
            if param.grad is None:
                master.grad = None
            else:
                with_grad.append((param, master))
        if with_grad:
            # one fused cast-copy for all gradients (per-tensor copies cost a launch each: ~1700 in SDXL)
            upcast = [torch.empty_like(master) for _, master in with_grad]
            torch._foreach_copy_(upcast, [param.grad for param, _ in with_grad])
            for (param, master), grad in zip(with_grad, upcast):
                master.grad = grad
                param.grad = None
        loss = super().step(closure)
        torch._foreach_copy_(self.model_params, masters)  # round the float32 masters into the weights
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [m.detach().clone() for m in self._masters()]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for master, saved, param in zip(self._masters(), masters, self.model_params):
                    master.copy_(saved)
                    param.copy_(master)

    @torch.no_grad()
    def write_masters_into(self, network: nn.Module) -> None:
        """Copy the float32 masters into ``network``'s parameters (after ``network.float()``, for
        saving: the saved model carries the float32 weights, not their bf16 rounding)."""
        ids = {id(p): i for i, p in enumerate(self.model_params)}
        masters = self._masters()
        for param in network.parameters():
            index = ids.get(id(param))
            if index is not None:
                param.copy_(masters[index])


def find_master_optimizer(optimizer) -> MasterWeightAdamW | None:
    """The MasterWeightAdamW inside an accelerate-wrapped optimizer, if any."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, MasterWeightAdamW) else None


def compile_network(network: nn.Module, mode: CompileMode, blocks: Collection[str] = ()) -> nn.Module:
    """``regional``: compile in place each module whose class name is in ``blocks`` (the family's
    repeated blocks, ``Family.compile_blocks``: the graphs are small, compile in seconds each, and
    identical blocks share their compiled code; the default recompile limit of 8 is raised because
    one block class appears at many shapes in a UNet, and hitting the limit silently falls back to
    eager); ``full``: the whole network in place. Returns the network."""
    if mode == "none":
        return network
    import torch._dynamo

    config = torch._dynamo.config
    for name, floor in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024), ("accumulated_cache_size_limit", 1024)):
        if hasattr(config, name):  # names differ across torch versions (2.6 renamed cache_size_limit)
            setattr(config, name, max(getattr(config, name), floor))
    if mode == "full":
        network.compile()
        return network
    count = 0
    for module in network.modules():
        if type(module).__name__ in blocks:
            module.compile()
            count += 1
    if count == 0:
        logger.warning("torch.compile regional: no block of %s is one of %s; nothing compiled", type(network).__name__, sorted(blocks) or "(the family declares none)")
    logger.info("torch.compile: %d blocks compiled", count)
    return network


def compiled_regions(network: nn.Module) -> list[str]:
    """Names of the modules compiled by ``compile_network`` (for tests and logs)."""
    return [name for name, module in network.named_modules() if getattr(module, "_compiled_call_impl", None) is not None]
