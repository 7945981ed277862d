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

The master logic (``MasterWeights``) is a mixin over any torch optimizer class, for 8-bit moments:
the public MaPO recipe trains SDXL with bitsandbytes' ``AdamW8bit`` (``--use_8bit_adam``), and
AdamW's two float32 moments of SDXL's 2.57B UNet parameters take 20.6 GB (19.1 GiB) where 8-bit
ones take 5.1 GB plus a float32 scale per 256 values. Issue 16: the fast path without gradient
checkpointing peaked at 77.4 GiB (limit 76 GiB for an 80 GB H100); 8-bit moments brought it to
64.9 GiB on an H200 (BENCHMARKS.md, issue 16).
``MasterWeightAdamW8bit`` (``train.use_8bit_adam`` with ``train.weight_dtype=bf16``) keeps the
float32 masters in flat buckets (``FlatMasterWeights``) and steps them with ``AdamW8bit``: 85 ms per
SDXL step on an H200 against 95-122 ms tensor by tensor and 41 ms for 32-bit fused AdamW
(``python -m benchmarks.optimizer_step``; host time 11 vs 88 ms); with diffpo's 8-bit kernel
(``kernel="diffpo"``, ``diffpo.adam8bit``) 30 ms, against 89 ms with bitsandbytes' on the same
machine. bitsandbytes stays optional, imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Hashable, Iterable, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

CompileMode = Literal["none", "regional", "full"]
ADAM_8BIT_KERNELS = ("bitsandbytes", "triton", "diffpo")  # MasterWeightAdamW8bit's kernels for its 8-bit buckets


class MasterWeights:
    """Float32 master copies of low-precision parameters, over any torch optimizer class.

    Mixed in before the optimizer class (``class X(MasterWeights, torch.optim.AdamW)``). ``params``
    are the network's (e.g. bf16) parameters; the optimizer's own param groups hold their float32
    masters, so learning-rate schedulers, ``state_dict`` and accelerate work as with the plain
    optimizer. ``step`` upcasts each gradient into its master's ``.grad`` (freeing the
    low-precision gradient at once, so the two never coexist for all parameters; ``prepare_step``
    does this part ahead of ``step``), lets the optimizer step the masters, and copies them back. The masters are part of ``state_dict``: a
    resumed run continues from the float32 values, not from their bf16 rounding.
    """

    scales_gradients = False
    """Whether ``set_gradient_scale`` is applied inside the update (``MasterWeightAdamW8bit``); where
    not, a caller that clips scales the gradients itself before ``step``."""

    def __init__(self, params: Iterable[nn.Parameter], **kwargs):
        self.model_params = [p for p in params]
        self._gradients_taken = False  # prepare_step ran since the last step / zero_grad
        self._gradient_scale = 1.0
        self.masters, stepped = self._new_masters()
        super().__init__(stepped, **self._optimizer_kwargs(stepped, kwargs))

    def _new_masters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The float32 master of each model parameter, and the tensors the optimizer steps (here
        the masters themselves; ``FlatMasterWeights``: the flat buckets that hold them)."""
        masters = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in self.model_params]
        return masters, masters

    def _optimizer_kwargs(self, masters: list[torch.Tensor], kwargs: dict) -> dict:
        """The optimizer's keyword arguments, given its masters (a subclass adds defaults)."""
        return kwargs

    def _masters(self) -> list[torch.Tensor]:
        return self.masters

    @torch.no_grad()
    def prepare_step(self) -> None:
        """Take the gradients into the masters now (``_upcast_gradients``) rather than in ``step``;
        a second call before ``step`` or ``zero_grad`` does nothing.

        Why: the trainer reads the step's losses and gradient norm on the host (one sync) before it
        steps. The upcast is host-bound (a view and a copy per parameter: ~3400 for SDXL), so done
        after that sync the device idled while the host prepared it: 14 ms of each 497 ms SDXL step
        on an H200 (issue 16's profile: the optimizer's range took 95 ms in the trainer, 81 ms in the
        harness, which steps without a sync). Called before the sync, the host does that work while
        the device still runs the backward."""
        if not self._gradients_taken:
            self._upcast_gradients()
            self._gradients_taken = True

    def set_gradient_scale(self, scale: float) -> None:
        """Multiply the gradients by ``scale`` inside the next ``step`` only (gradient clipping's
        coefficient; needs ``scales_gradients``)."""
        if not self.scales_gradients:
            raise NotImplementedError(f"{type(self).__name__} cannot scale the gradients inside its update: scale them before step()")
        self._gradient_scale = float(scale)

    @torch.no_grad()
    def step(self, closure=None):
        self.prepare_step()
        try:
            loss = super().step(closure)
            params, masters = self._weights_to_round()
        finally:
            self._end_step()
        torch._foreach_copy_(params, masters)  # round the float32 masters into the weights
        return loss

    def _weights_to_round(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model parameters whose update did not write them itself, and their masters."""
        return self.model_params, self.masters

    def updated_weights_finite(self) -> torch.Tensor | None:
        """After ``step``: whether every model weight it wrote is finite, as a bool tensor on the device
        (no host sync), found more cheaply than by reading every weight; None where this optimizer has no
        such way (the caller reads the weights)."""
        return None

    def _end_step(self) -> None:
        """Forget what ``prepare_step`` took and the gradient scale (after a step, or at ``zero_grad``)."""
        self._gradients_taken, self._gradient_scale = False, 1.0

    def _upcast_gradients(self) -> None:
        """Each model gradient, upcast, becomes its master's ``.grad``; the model's is freed."""
        with_grad = []
        for param, master in zip(self.model_params, self.masters):
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()
        super().zero_grad(set_to_none=set_to_none)
        self._end_step()

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


@dataclass
class _Bucket:
    """One flat float32 tensor the optimizer steps, holding the masters of ``members`` (indices
    into ``model_params``) at block-aligned offsets, with the gaps between them."""

    flat: torch.Tensor
    members: list[int]
    sizes: list[int]  # the split of ``flat`` into pieces: member, gap, member, ... (gaps may be 0)
    kind: Hashable
    tables: object = None  # a subclass's, where its update reads the members' own gradients (MasterWeightAdamW8bit)
    taken: _Taken | None = None  # between prepare_step and step: the gradients the update reads in place
    nonfinite: torch.Tensor | None = None  # with tables: int32, set by an in-place update that wrote a non-finite weight


@dataclass
class _Taken:
    """A bucket's gradients taken in place by ``prepare_step``: its update reads them from the model's
    own tensors (``update``, with their addresses), and writes the weights of ``written`` itself."""

    update: object
    addresses: torch.Tensor
    grads: list  # held until the update is launched: the caching allocator then orders any reuse after it
    written: list[int]


class FlatMasterWeights(MasterWeights):
    """``MasterWeights`` whose masters are views into a few flat buckets, which the optimizer steps
    as its parameters: one update call per bucket instead of one per parameter.

    Why: an optimizer that updates tensor by tensor from Python (bitsandbytes' 8-bit AdamW) pays
    its host overhead per parameter, ~1700 times per SDXL step (~45 us each on a 2-core CPU,
    measured with the kernel mocked out), while the GPU waits at the step (issue 16). DeepSpeed's
    bf16 optimizer and ZeRO step flattened float32 partitions for the same reason.

    Each master starts on a multiple of ``block`` elements (bitsandbytes quantizes the moments in
    blocks of 256), so no block holds two parameters: a blockwise optimizer's update of a member
    is bit for bit its update as a tensor of its own (tested against bitsandbytes). The gaps'
    gradients are zero. Parameters of different ``_bucket_kind`` never share a bucket (8-bit
    AdamW: tensors under ``min_8bit_size`` keep 32-bit moments). As in DeepSpeed's flat
    optimizers, a parameter without a gradient at a step is stepped with a zero gradient
    (weight decay and momentum still move it; torch's optimizers skip it); diffpo's trainable
    parameters all get one every step.
    """

    bucket_elements = 2**28  # float32 elements per bucket (1 GiB): bitsandbytes' kernels index with int32
    block = 256

    def _bucket_kind(self, param: torch.Tensor) -> Hashable:
        return None

    def _new_masters(self):
        open_buckets: dict[Hashable, list[int]] = {}
        filled: dict[Hashable, int] = {}  # elements of each open bucket, members padded to whole blocks
        layouts = []  # (kind, [member indices])
        for index, param in enumerate(self.model_params):
            key = (param.device, self._bucket_kind(param))
            members = open_buckets.get(key)
            if members is None or (members and filled[key] + param.numel() > self.bucket_elements):
                members = open_buckets[key] = []
                filled[key] = 0
                layouts.append((key, members))
            members.append(index)
            filled[key] += -(-param.numel() // self.block) * self.block
        self._buckets, masters = [], [None] * len(self.model_params)
        for (device, kind), members in layouts:
            sizes = []
            for index in members:
                numel = self.model_params[index].numel()
                sizes += [numel, -numel % self.block]
            flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            pieces = flat.split(sizes)  # views of a tensor without autograd history: the masters
            for index, piece in zip(members, pieces[::2]):
                piece.copy_(self.model_params[index].detach().reshape(-1))
                masters[index] = piece.view(self.model_params[index].shape)
            stepped = flat.detach().requires_grad_(True)  # the same memory, as the optimizer's leaf
            self._buckets.append(_Bucket(stepped, members, sizes, kind))
        return masters, [bucket.flat for bucket in self._buckets]

    def _upcast_gradients(self) -> None:
        for bucket in self._buckets:
            params = [self.model_params[i] for i in bucket.members]
            if all(p.grad is None for p in params):
                bucket.flat.grad = None
                continue
            if self._take_in_place(bucket):
                continue
            grad = torch.empty_like(bucket.flat)
            pieces = grad.split(bucket.sizes)
            missing = [piece for param, piece in zip(params, pieces[::2]) if param.grad is None]
            zeroed = [piece for piece in pieces[1::2] if piece.numel()] + missing
            if zeroed:
                torch._foreach_zero_(zeroed)
            with_grad = [(param, piece) for param, piece in zip(params, pieces[::2]) if param.grad is not None]
            # one fused cast-copy per bucket (per-tensor copies cost a launch each: ~1700 in SDXL)
            torch._foreach_copy_([piece for _, piece in with_grad], [param.grad.reshape(-1) for param, _ in with_grad])
            for param in params:
                param.grad = None
            bucket.flat.grad = grad

    def _bucket_of(self, flat: torch.Tensor) -> _Bucket | None:
        """The bucket whose flat tensor the optimizer steps as ``flat`` (None for any other tensor)."""
        return next((bucket for bucket in self._buckets if bucket.flat is flat), None)

    def _take_in_place(self, bucket: _Bucket) -> bool:
        """Whether ``bucket``'s update this step reads its members' gradients where they are and writes
        their weights (``bucket.taken``), rather than from an upcast bucket gradient (here: never)."""
        return False

    def _weights_to_round(self):
        # (called by step alone, after the update: what updated_weights_finite checks)
        self._stepped_in_place = {i: set(bucket.taken.written) for i, bucket in enumerate(self._buckets) if bucket.taken is not None}
        written = {index for members in self._stepped_in_place.values() for index in members}
        if not written:
            return super()._weights_to_round()
        unwritten = [i for i in range(len(self.model_params)) if i not in written]
        return [self.model_params[i] for i in unwritten], [self.masters[i] for i in unwritten]

    def updated_weights_finite(self) -> torch.Tensor | None:
        """``MasterWeights.updated_weights_finite`` from the buckets: a few reductions where the trainer
        read all ~1,700 SDXL weights (``torch._foreach_norm``: ~6 ms of host time and ~2 ms of device
        time per step on an H200, issue 16), with the same answer:

        - a bucket updated in place (``_take_in_place``): its kernel's flag, set as it wrote a
          non-finite weight;
        - a bucket whose members' weights are all of one dtype, copied from their masters by ``step``:
          its masters' largest magnitude below the smallest float32 that rounds to inf in that dtype
          (``_rounds_to_inf_from``; nan fails the comparison): the rounded weights are finite exactly
          when it holds;
        - any other weight (members of mixed dtypes, a weight an in-place update left to the copy): its
          own norm (``weights_finite_flag``, the trainer's check).

        None before the first step."""
        stepped = getattr(self, "_stepped_in_place", None)
        if stepped is None:
            return None
        checks, read = [], []
        for i, bucket in enumerate(self._buckets):
            if i in stepped:
                checks.append(bucket.nonfinite == 0)
                read += [self.model_params[m] for m in bucket.members if m not in stepped[i]]
                continue
            if not bucket.flat.numel():  # members without values: nothing to check
                continue
            dtypes = {self.model_params[m].dtype for m in bucket.members}
            if len(dtypes) == 1:
                # one reduction (aminmax propagates nan), not abs() then amax(): abs() wrote a copy of the
                # 1 GiB bucket (15 per SDXL step, 4.8 ms of device time on an H200, issue 16)
                low, high = torch.aminmax(bucket.flat.detach())
                limit = _rounds_to_inf_from(dtypes.pop())
                checks.append(((high < limit) & (low > -limit)).reshape(1))
            else:
                read += [self.model_params[m] for m in bucket.members]
        if any(p.numel() for p in read):
            checks.append(weights_finite_flag(read).reshape(1))
        if not checks:
            return None
        device = checks[0].device
        return torch.cat([check.to(device) for check in checks]).all()

    def _end_step(self) -> None:
        super()._end_step()
        for bucket in self._buckets:
            bucket.taken = None  # the gradients it held go back to the allocator

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=True)  # a bucket's gradient is built anew at each step


def weights_finite_flag(params: list[torch.Tensor]) -> torch.Tensor:
    """Whether every weight is finite, as a tensor on the device (no host sync): one fused norm per
    tensor (an inf/nan element makes its tensor's norm non-finite). Local shards under FSDP."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    local = [p.detach() for p in local if p.numel()]
    if not local:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(torch._foreach_norm(local)).float()).all()


def _rounds_to_inf_from(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to inf in ``dtype`` (round to nearest even): its largest finite
    value plus half a unit in its last place (that value's last bit is odd: the midpoint rounds up); inf
    for float32, which the masters already are."""
    if dtype in (torch.float32, torch.float64):
        return math.inf
    info = torch.finfo(dtype)
    return info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2


class MasterWeightAdamW(MasterWeights, torch.optim.AdamW):
    """``torch.optim.AdamW`` over float32 masters (``MasterWeights``); its fused kernel on CUDA."""

    def _optimizer_kwargs(self, masters, kwargs):
        if "fused" not in kwargs and masters and masters[0].is_cuda:
            kwargs = {**kwargs, "fused": True}
        return kwargs


@functools.cache
def _adamw8bit() -> type:
    import bitsandbytes  # optional: only the 8-bit optimizers need it (pip install bitsandbytes)

    class AdamW8bit(bitsandbytes.optim.AdamW8bit):
        """bitsandbytes' ``AdamW8bit`` without its per-parameter GPU waits, same updates.

        bitsandbytes 0.50's ``Optimizer8bit.step`` calls ``torch.cuda.synchronize()`` after every
        parameter: ~1700 host waits per SDXL step, which made the 8-bit step 270 ms slower than the
        32-bit one on an H200 (issue 16, BENCHMARKS.md); upstream removes them (bitsandbytes PR
        #2050). Its kernels run on the legacy default stream, so on the default stream the order
        needs no wait: ``step`` is that loop without the waits. Anywhere else (another stream, paged
        states, a bitsandbytes without these hooks) bitsandbytes' own step runs.
        """

        _HOOKS = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")

        def _runs_own_loop(self) -> bool:
            """Whether ``step`` runs its own loop (else bitsandbytes' step, with its waits)."""
            on_default_stream = not torch.cuda.is_available() or torch.cuda.current_stream() == torch.cuda.default_stream()
            return not self.is_paged and on_default_stream and all(hasattr(self, h) for h in self._HOOKS)

        def _steps_without_grad(self, p) -> bool:
            """Whether ``p`` is stepped though its ``.grad`` is None (``MasterWeightAdamW8bit``: a bucket
            whose update reads its members' gradients in place; only this class's own loop asks)."""
            return False

        @torch.no_grad()
        def step(self, closure=None):
            if not self._runs_own_loop():
                if any(self._steps_without_grad(p) for group in self.param_groups for p in group["params"]):  # bitsandbytes' loop would skip them
                    raise RuntimeError("gradients were taken in place for this optimizer's own loop: step on the default stream, as prepare_step ran")
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None and not self._steps_without_grad(p):
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
            return loss

    AdamW8bit.__module__, AdamW8bit.__qualname__ = __name__, "AdamW8bit"
    return AdamW8bit


@functools.cache
def _master_weight_adamw8bit() -> type:
    class MasterWeightAdamW8bit(FlatMasterWeights, _adamw8bit()):
        """8-bit AdamW (``AdamW8bit``: bitsandbytes' without its per-parameter waits) over float32
        masters held in flat buckets (``FlatMasterWeights``: one update call per bucket): the
        moments in 8 bits (blockwise quantized; tensors under ``min_8bit_size`` elements, 4096 by
        default, keep 32-bit moments, in buckets of their own), the masters and the update in
        float32. bitsandbytes' per-parameter overrides (``GlobalOptimManager``) name the network's
        parameters, not the buckets: they do not apply here.

        With ``kernel="diffpo"`` on a GPU (its Triton kernel), an 8-bit bucket of bf16 (or fp16) weights
        skips the float32 gradient bucket and the copy back: its update reads each member's own
        ``.grad`` and rounds the new master into its weight (``adam8bit.triton_indirect_update_``),
        same masters, moments and weights; ``in_place_8bit = False`` turns this off."""

        in_place_8bit = True

        def __init__(self, params, min_8bit_size: int = 4096, kernel: str = "bitsandbytes", **kwargs):
            if kernel not in ADAM_8BIT_KERNELS:
                raise ValueError(f"kernel must be one of {', '.join(ADAM_8BIT_KERNELS)}, got {kernel!r}")
            self._min_8bit_size, self.kernel = min_8bit_size, kernel
            self._triton_update = _bitsandbytes_triton_update() if kernel == "triton" else None
            self._code_tables: dict = {}  # kernel="diffpo": id(qmap) -> (qmap, its nearest_code_tables)
            self._hyper = None  # kernel="diffpo": (the last hyperparameters, their tensor on the device)
            super().__init__(params, min_8bit_size=min_8bit_size, **kwargs)
            if kernel == "diffpo":
                from diffpo import adam8bit

                for bucket in self._buckets:
                    dtypes = {self.model_params[i].dtype for i in bucket.members}
                    if bucket.kind == "8bit" and len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}:
                        bucket.tables = adam8bit.member_tables(bucket.sizes[::2], dtypes.pop(), bucket.flat.device)
                        bucket.nonfinite = torch.zeros(1, dtype=torch.int32, device=bucket.flat.device)

        def _take_in_place(self, bucket):
            """An 8-bit bucket with member tables, where the diffpo update is the Triton kernel: its
            members' gradients stay where autograd left them (each parameter's ``.grad`` is dropped, the
            tensor held until the update is launched) and their addresses go to the device now, while
            it still runs the backward (``prepare_step``). The kernel reads each member in its master's
            row-major order: a non-contiguous gradient is copied first, and a non-contiguous weight
            (channels_last) is left to the copy after the step. The kernel reads and writes raw
            addresses with the dtype its tables were built for: a member whose weight or gradient no
            longer has that dtype, device or size (cast after the optimizer was built) sends the bucket
            through the upcast path, which casts (raw writes also leave ``param._version`` as it was)."""
            from diffpo import adam8bit

            update = bucket.tables is not None and self.in_place_8bit and self._runs_own_loop() and adam8bit.indirect_update_function(bucket.flat.device)
            if not update:
                return False
            dtype, device = bucket.tables.dtype, bucket.flat.device
            grads, addresses, written = [], ([], []), []
            for index, numel in zip(bucket.members, bucket.sizes[::2]):
                param = self.model_params[index]
                grad = param.grad
                if param.dtype != dtype or param.device != device or param.numel() != numel or (grad is not None and (grad.dtype != dtype or grad.shape != param.shape)):
                    return False  # nothing taken yet: the upcast path takes them all
                if grad is not None and not grad.is_contiguous():
                    grad = grad.contiguous()
                grads.append(grad)
                addresses[0].append(0 if grad is None else grad.data_ptr())  # 0: no gradient, stepped as a zero one
                contiguous = param.is_contiguous()
                addresses[1].append(param.data_ptr() if contiguous else 0)
                if contiguous:
                    written.append(index)
            for index in bucket.members:
                self.model_params[index].grad = None  # held in ``grads`` until the update is launched
            addresses = torch.tensor(addresses, dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)
            bucket.flat.grad = None
            bucket.taken = _Taken(update, addresses, grads, written)
            return True

        def _steps_without_grad(self, p):
            bucket = self._bucket_of(p)
            return bucket is not None and bucket.taken is not None

        def _bucket_kind(self, param):
            return "8bit" if param.numel() >= self._min_8bit_size else "32bit"

        def init_state(self, group, p, gindex, pindex):
            super().init_state(group, p, gindex, pindex)
            absmax = self.state[p].get("absmax1")
            if absmax is not None and absmax.numel() * self.block != p.numel():  # buckets are whole blocks of ours
                raise RuntimeError(
                    f"bitsandbytes quantizes the 8-bit moments in blocks of {p.numel() / absmax.numel():g} values, "
                    f"not {self.block}: flat master buckets would mix parameters in one block; this bitsandbytes is not supported"
                )

        # kernel="triton": bitsandbytes' Triton kernel compiles the scale in (a new kernel for every clipping
        # coefficient); kernel="diffpo" scales inside its own, but its 32-bit buckets need bitsandbytes' to take it
        scales_gradients = property(lambda self: self.kernel in ("bitsandbytes", "diffpo") and _bitsandbytes_takes_gnorm_scale())

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            """bitsandbytes' update with the gradient scale (``set_gradient_scale``) passed to its
            kernels, which multiply each gradient by it as they read it (``gnorm_scale``): clipping
            then needs no rescaling pass over the gradients (torch's ``clip_grad_norm_`` reads and
            writes all of them after reading them for the norm: 3.5 ms per SDXL step on an H200,
            issue 16). Without a scale, bitsandbytes' own ``update_step``; with one, its body for the
            two kinds of state the buckets hold (bitsandbytes 0.50 ``Optimizer2State.update_step``,
            which passes 1.0), with keyword arguments (``_bitsandbytes_takes_gnorm_scale`` checks
            them, else the trainer clips as before). With ``kernel="triton"`` the 8-bit buckets go
            to bitsandbytes' Triton kernel instead, with the same arguments."""
            state = self.state[p]
            eight_bit = state["state1"].dtype == torch.uint8
            if eight_bit and self.kernel == "diffpo":
                return self._diffpo_update_step(group, p, gindex, pindex)
            triton = self._triton_update is not None and eight_bit  # kernel="triton": never a scale (scales_gradients)
            if not triton and self._gradient_scale == 1.0:
                return super().update_step(group, p, gindex, pindex)
            from bitsandbytes import functional as F

            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            betas = config["betas"]
            kwargs = dict(
                optimizer_name=self.optimizer_name, g=p.grad, p=p, state1=state["state1"], state2=state["state2"],
                beta1=betas[0], beta2=betas[1], beta3=betas[2] if len(betas) >= 3 else 0.0, alpha=config.get("alpha", 0.0),
                eps=config["eps"], step=state["step"], lr=config["lr"], weight_decay=config["weight_decay"],
                gnorm_scale=self._gradient_scale, skip_zeros=config["skip_zeros"],
            )
            if eight_bit:
                kwargs.update(qmap1=state["qmap1"], qmap2=state["qmap2"], absmax1=state["absmax1"], absmax2=state["absmax2"])
                if triton:  # bitsandbytes' Triton op takes the same arguments, on p's device as its own wrapper runs it
                    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
                        self._triton_update(**kwargs)
                else:
                    F.optimizer_update_8bit_blockwise(**kwargs)
            elif state["state1"].dtype == torch.float32:
                unorm = state["unorm_vec"] if config["max_unorm"] > 0.0 else None
                F.optimizer_update_32bit(**kwargs, unorm_vec=unorm, max_unorm=config["max_unorm"])
            else:
                raise RuntimeError(f"unexpected optimizer state dtype {state['state1'].dtype}")

        def _diffpo_update_step(self, group, p, gindex, pindex):
            """``kernel="diffpo"``: diffpo's 8-bit update of an 8-bit bucket (``diffpo.adam8bit``: its
            Triton kernel on a GPU, torch.compile elsewhere), with bitsandbytes' state and
            hyperparameters (``get_config``) and the gradient scale inside the update."""
            from diffpo import adam8bit

            state, config = self.state[p], self.get_config(gindex, pindex, group)
            unsupported = config.get("alpha", 0.0) or config["skip_zeros"] or config.get("max_unorm", 0.0) > 0.0
            if unsupported or getattr(self.args, "percentile_clipping", 100) < 100 or not getattr(self.args, "block_wise", True):
                raise NotImplementedError("kernel='diffpo' runs plain blockwise AdamW: no AdEMAMix alpha, skip_zeros, max_unorm or percentile_clipping")
            state["step"] += 1
            tables = []
            for qmap in (state["qmap1"], state["qmap2"]):
                # keyed by the tensor itself (held in the entry, so its id cannot be reused by another
                # map while cached): a loaded checkpoint brings new qmap tensors
                cached = self._code_tables.get(id(qmap))
                if cached is None or cached[0] is not qmap:
                    cached = self._code_tables[id(qmap)] = (qmap, adam8bit.nearest_code_tables(qmap))
                tables.append(cached[1])
            betas = config["betas"]
            values = dict(
                lr=config["lr"], beta1=betas[0], beta2=betas[1], eps=config["eps"], weight_decay=config["weight_decay"],
                step=state["step"], scale=self._gradient_scale, device=p.device,
            )
            # every bucket of a group shares one step's hyperparameters: one tensor (and one copy to the device)
            # per step instead of one per bucket; read-only in the kernels, so the buckets can share it
            if self._hyper is None or self._hyper[0] != values:
                self._hyper = (values, adam8bit.hyperparameters(**values))
            hyper = self._hyper[1]
            moments = (state["state1"], state["state2"], state["absmax1"], state["absmax2"], state["qmap1"], state["qmap2"], tables[0], tables[1], hyper)
            bucket = self._bucket_of(p)
            if bucket.taken is not None:  # the gradients read and the weights written in place (_take_in_place)
                bucket.nonfinite.zero_()
                bucket.taken.update(p, bucket.tables, bucket.taken.addresses, *moments, nonfinite=bucket.nonfinite)
            else:
                adam8bit.update_function(p.device)(p, p.grad, *moments)

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            self._code_tables.clear()  # the loaded state brings its own qmap tensors

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            flat = self.param_groups[gindex]["params"][pindex]
            bucket = self._bucket_of(flat)
            if bucket is not None and bucket.kind == "32bit":  # small tensors: 32-bit moments, as bitsandbytes gives each
                config["optim_bits"] = 32
            return config

    MasterWeightAdamW8bit.__module__, MasterWeightAdamW8bit.__qualname__ = __name__, "MasterWeightAdamW8bit"
    return MasterWeightAdamW8bit


def _bitsandbytes_triton_update():
    """bitsandbytes' Triton 8-bit update (``bitsandbytes.backends.triton``, written for Intel GPUs;
    plain Triton), or ImportError saying what is missing."""
    try:
        from bitsandbytes.backends.triton import kernels_optim
    except ImportError as err:
        raise ImportError(f"train.adam_8bit_kernel=triton needs Triton and a bitsandbytes with its Triton kernels ({err})") from None
    return kernels_optim.optimizer_update_8bit_blockwise_impl


@functools.cache
def _bitsandbytes_takes_gnorm_scale() -> bool:
    """Whether this bitsandbytes' functional updates take every keyword ``update_step`` passes
    (bitsandbytes >= 0.44, with AdEMAMix's ``beta3`` and ``alpha``)."""
    import inspect

    from bitsandbytes import functional as F

    needed = {"optimizer_name", "g", "p", "state1", "state2", "beta1", "beta2", "beta3", "alpha", "eps", "step", "lr", "weight_decay", "gnorm_scale", "skip_zeros"}
    names_32 = set(inspect.signature(F.optimizer_update_32bit).parameters)
    names_8 = set(inspect.signature(F.optimizer_update_8bit_blockwise).parameters)
    return needed | {"unorm_vec", "max_unorm"} <= names_32 and needed | {"qmap1", "qmap2", "absmax1", "absmax2"} <= names_8


def __getattr__(name: str):
    # ``AdamW8bit`` and ``MasterWeightAdamW8bit`` subclass a bitsandbytes class: built on first use, so that
    # importing this module does not need bitsandbytes (ImportError when it is missing)
    if name == "MasterWeightAdamW8bit":
        return _master_weight_adamw8bit()
    if name == "AdamW8bit":
        return _adamw8bit()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def find_master_optimizer(optimizer) -> MasterWeights | None:
    """The master-weight optimizer (``MasterWeightAdamW`` or ``MasterWeightAdamW8bit``) inside an
    accelerate-wrapped optimizer, if any."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, MasterWeights) else None


def compile_network(network: nn.Module, mode: CompileMode, blocks: Collection[str] = (), options: dict | None = None, dynamic: bool | None = None) -> nn.Module:
    """``regional``: compile in place each module whose class name is in ``blocks`` (the family's
    repeated blocks, ``Family.compile_blocks``: the graphs are small, compile in seconds each, and
    identical blocks share their compiled code; the default recompile limit of 8 is raised because
    one block class appears at many shapes in a UNet, and hitting the limit silently falls back to
    eager); ``full``: the whole network in place. ``options``: inductor options for every compiled
    graph, backward included (``train.compile_options``); ``dynamic``: torch.compile's
    (``train.compile_dynamic``). Returns the network.

    ``dynamic`` defaults to torch.compile's ``None``: a block met at a second shape is recompiled with
    symbolic sizes. ``False`` (static graphs only; ``configs/sdxl_mapo_fast.yaml``) made SDXL's step
    3.5% faster on an H200 (static kernels, and inductor's channels_last convolutions inside the
    resnets, which it skips for symbolic shapes) and its warm first step 14 s against 21 s
    (BENCHMARKS.md, issue 16, static compiled graphs; 12.4 -> 8.4 s on a CPU stand-in,
    benchmarks/WARM_START.md), but it compiles new graphs for every further shape a block meets
    (validation and evaluation batch sizes), where the default compiles one symbolic graph.
    Switching changes the graphs' cache keys (an existing cache serves 4 of 38 lookups, once).
    """
    if mode == "none":
        return network
    import torch._dynamo

    config = torch._dynamo.config
    for name, floor in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024), ("accumulated_cache_size_limit", 1024)):
        if hasattr(config, name):  # names differ across torch versions (2.6 renamed cache_size_limit)
            setattr(config, name, max(getattr(config, name), floor))
    kwargs: dict = {"dynamic": dynamic} if dynamic is not None else {}
    if options:
        kwargs["options"] = inductor_options(options)
    if mode == "full":
        network.compile(**kwargs)
        return network
    count = 0
    for module in network.modules():
        if type(module).__name__ in blocks:
            module.compile(**kwargs)
            count += 1
    if count == 0:
        logger.warning("torch.compile regional: no block of %s is one of %s; nothing compiled", type(network).__name__, sorted(blocks) or "(the family declares none)")
    logger.info("torch.compile: %d blocks compiled", count)
    return network


def inductor_options(options: dict) -> dict:
    """``train.compile_options`` as torch.compile takes them: nested mappings flattened to dotted names
    (``{triton: {cudagraphs: true}}`` is ``triton.cudagraphs``), a whole number given for a float option made
    a float (YAML reads ``50`` as an int), each name and type checked as torch.compile checks them, but with
    the key named (torch raises a RuntimeError listing all of its options)."""
    import typing

    from torch._inductor import config

    flat: dict = {}

    def walk(prefix: str, tree: dict) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", options)
    known = config.get_config_copy()
    checked = {}
    for name, value in flat.items():
        attr = name.replace("-", "_")
        if attr not in known:
            raise ValueError(f"train.compile_options: {name!r} is not an inductor option (torch._inductor.config) of torch {torch.__version__}")
        kind = config.get_type(attr)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typing.get_origin(kind) is None and not isinstance(value, kind):  # torch skips generic types too
            raise ValueError(f"train.compile_options.{name}: must be {kind.__name__} like its default {known[attr]!r}, got {value!r}")
        checked[name] = value
    return checked


def compiled_regions(network: nn.Module) -> list[str]:
    """Names of the modules compiled by ``compile_network`` (for tests and logs)."""
    return [name for name, module in network.named_modules() if getattr(module, "_compiled_call_impl", None) is not None]


def use_compile_cache(path: str | Path | None) -> Path | None:
    """Keep torch.compile's caches in ``path`` (``train.compile_cache_dir``), so that a later run
    starts from compiled code instead of compiling again.

    Inductor's on-disk caches (FX graphs, AOTAutograd graphs, autotuning results) and Triton's
    kernel binaries go to ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``; PyTorch's default is
    ``/tmp/torchinductor_$USER``, which a reboot (or a fresh cloud machine) empties. Both are read
    when compilation first needs them, so this must run before the first compiled call. A
    ``TRITON_CACHE_DIR`` the user set already is kept. Dynamo still traces the Python code in every
    new process (seconds per region); what the cache skips is the graph compilation after it (the
    FX-graph and AOTAutograd caches are on by default in PyTorch >= 2.6; this only moves them).
    """
    if path is None:
        return None
    cache = Path(path).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    logger.info("torch.compile caches in %s", cache)
    return cache


def set_gradient_checkpointing(network: nn.Module, setting: bool | list[str]) -> list[str]:
    """Gradient checkpointing of every block (``True``), of none (``False``), or of the blocks under
    the given module names only (e.g. ``["down_blocks.1", "up_blocks.1"]``): their activations are
    recomputed in the backward pass, the others' kept. Returns the names of the modules that
    checkpoint.

    Selective checkpointing trades less compute for less memory than checkpointing everything:
    on SDXL each block's saved activations are roughly proportional to its forward FLOPs, so
    checkpointing the blocks that hold a fraction f of the activations costs about f of one extra
    forward pass (BENCHMARKS.md, issue 16). A name matches a module whose dotted name contains it
    as whole components (``up_blocks.1`` matches ``up_blocks.1.attentions.0`` and, under LoRA,
    ``base_model.model.up_blocks.1``, but not ``up_blocks.10``)."""
    if not setting:
        return []
    network.enable_gradient_checkpointing()  # diffusers sets each block's flag and its checkpoint function
    if setting is True:
        return [name for name, module in network.named_modules() if getattr(module, "gradient_checkpointing", False)]
    prefixes = list(setting)
    names = [name for name, _ in network.named_modules()]
    unknown = [p for p in prefixes if not any(_under(name, p) for name in names)]
    if unknown:
        raise ValueError(f"model.gradient_checkpointing: no module named {unknown[0]!r} in {type(network).__name__} (e.g. {', '.join(n for n in names if n.count('.') == 1)[:200]})")
    chosen = []
    for name, module in network.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = any(_under(name, p) for p in prefixes)
            if module.gradient_checkpointing:
                chosen.append(name)
    if not chosen:
        raise ValueError(f"model.gradient_checkpointing: none of {prefixes} holds a block that can checkpoint")
    return chosen


def _under(name: str, prefix: str) -> bool:
    return f".{prefix}." in f".{name}."
