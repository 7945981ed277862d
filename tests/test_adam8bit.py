"""diffpo's own 8-bit AdamW update (``diffpo.adam8bit``, ``train.adam_8bit_kernel=diffpo``): the
nearest-code lookup against a brute-force search, the update against hand-computed values and
bitsandbytes' CPU update, the compiled and the Triton kernels against the eager update, and the
optimizer option (state layout shared with bitsandbytes both ways, clipping inside, the trainer)."""

from __future__ import annotations

import io
import math

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from diffpo import adam8bit  # noqa: E402
from diffpo.adam8bit import adamw8bit_update_, hyperparameters, nearest_code, nearest_code_tables  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


def _codes():
    return bnb_functional.create_dynamic_map(signed=True).float(), bnb_functional.create_dynamic_map(signed=False).float()


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_the_nearest_entry_except_at_exact_midpoints(signed):
    """Against a brute-force search over all 256 codes, on random values of every magnitude, every
    code, every midpoint and its float32 neighbours: the same index everywhere, except where y is
    exactly a (float32) midpoint of two codes, where either is nearest up to rounding."""
    code = bnb_functional.create_dynamic_map(signed=signed).float()
    base, mids = nearest_code_tables(code)
    torch.manual_seed(0)
    n = 300_000
    low = -1.0 if signed else 0.0
    mid = mids[:-1]
    y = torch.cat([
        torch.rand(n) * (1 - low) + low,
        (torch.rand(n) * 2 - 1) * torch.logspace(-9, 0, n),
        code, mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)),
        torch.tensor([0.0, 1.0, -0.0, 2.0**-23, 2.0**-24, 1e-30]),
    ])
    y = (y if signed else y.abs()).clamp(low, 1.0)
    got = nearest_code(y, base, mids)
    want = torch.cat([(chunk[:, None] - code[None]).abs().argmin(1) for chunk in y.split(50_000)])
    differ = got != want
    assert differ.sum() < 300  # a handful of exact ties
    at_midpoint = torch.isin(y[differ], mid)
    assert at_midpoint.all(), y[differ][~at_midpoint]
    gap = (y[differ] - code[got[differ]]).abs() - (y[differ] - code[want[differ]]).abs()
    assert gap.abs().max() <= 1e-7 * y[differ].abs().max()
    assert int(nearest_code(torch.tensor([float("nan"), 5.0, -5.0]), base, mids).max()) <= 255  # never out of the table


def test_nearest_code_tables_refuse_a_code_they_cannot_serve():
    with pytest.raises(ValueError, match="256 increasing values"):
        nearest_code_tables(torch.linspace(-1, 1, 128))
    fine = torch.cat([torch.linspace(-1, 0.9, 254), torch.tensor([0.9001, 0.9002])])  # two midpoints in one bucket
    with pytest.raises(ValueError, match="too fine"):
        nearest_code_tables(fine)


def _state(n: int, zero1: int):
    return dict(
        p=torch.zeros(n), s1=torch.full((n,), zero1, dtype=torch.uint8), s2=torch.zeros(n, dtype=torch.uint8),
        a1=torch.zeros(n // 256), a2=torch.zeros(n // 256),
    )


def _update(update, state, g, step, scale=1.0, **hyper):
    q1, q2 = _codes()
    h = hyperparameters(**{**HYPER, **hyper}, step=step, scale=scale, device="cpu")
    update(state["p"], g, state["s1"], state["s2"], state["a1"], state["a2"], q1, q2, nearest_code_tables(q1), nearest_code_tables(q2), h)


def test_update_matches_hand_computed_adamw_steps():
    """One block, one nonzero gradient: AdamW's two steps by hand (float64), the moments exactly
    representable (each the block's maximum: code 1.0), and the untouched weights only decayed."""
    q1, q2 = _codes()
    zero1, one1, one2 = int((q1 == 0).nonzero()), int((q1 == 1).nonzero()), int((q2 == 1).nonzero())
    state = _state(256, zero1)
    state["p"].fill_(1.0)
    g = torch.zeros(256)
    g[3] = 2.0
    lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
    _update(adamw8bit_update_, state, g, step=1, scale=0.5, lr=lr, weight_decay=wd)
    # by hand in float64, with the kernel's float32 betas where it multiplies the old moments
    f1, f2 = (torch.tensor(b, dtype=torch.float32).item() for b in (b1, b2))
    m, v = (1 - b1) * 1.0, (1 - b2) * 1.0  # the scaled gradient is 1
    p1 = 1.0 * (1 - lr * wd) - lr * (m / (1 - b1)) / (math.sqrt(v) / math.sqrt(1 - b2) + eps)
    assert state["p"][3].item() == pytest.approx(p1, rel=1e-6) and p1 == pytest.approx(0.899, rel=1e-6)
    assert torch.all(torch.cat([state["p"][:3], state["p"][4:]]) == torch.tensor(1 - lr * wd, dtype=torch.float32))
    assert state["s1"][3] == one1 and state["s2"][3] == one2 and (state["s1"] != one1).sum() == 255
    assert state["a1"].item() == pytest.approx(m, rel=1e-6) and state["a2"].item() == pytest.approx(v, rel=1e-6)
    _update(adamw8bit_update_, state, torch.zeros(256), step=2, lr=lr, weight_decay=wd)  # no gradient: momentum alone
    m, v = f1 * m, f2 * v
    p2 = p1 * (1 - lr * wd) - lr * (m / (1 - b1**2)) / (math.sqrt(v) / math.sqrt(1 - b2**2) + eps)
    assert state["p"][3].item() == pytest.approx(p2, rel=1e-6)


def test_update_tracks_bitsandbytes_and_rounds_moments_to_their_nearest_code():
    """From the same state and gradients (every magnitude from 1e-4 to 10, scaled 0.5), one step
    against bitsandbytes' CPU update: the same weights (the update uses the moments before they
    are rounded: differences of float rounding only) and block maxima; our moments' codes are the
    nearest to the exact moments, bitsandbytes' CPU quantizer's are up to four codes off for small
    values, so ours are at least as close, everywhere."""
    q1, q2 = _codes()
    torch.manual_seed(0)
    n = 256 * 64
    ours = _state(n, int((q1 == 0).nonzero()))
    ours["p"] = torch.randn(n)
    for step in range(1, 4):
        g = torch.randn(n) * torch.logspace(-4, 1, n)[torch.randperm(n)]
        theirs = {k: v.clone() for k, v in ours.items()}
        exact_m = bnb_functional.dequantize_blockwise(ours["s1"], absmax=ours["a1"], code=q1, blocksize=256) * 0.9 + 0.1 * 0.5 * g
        bnb_functional.optimizer_update_8bit_blockwise(
            "adam", g, theirs["p"], theirs["s1"], theirs["s2"], 0.9, 0.999, 0.0, 0.0, 1e-8, step, 1e-3, q1, q2, theirs["a1"], theirs["a2"], 1e-2, gnorm_scale=0.5
        )
        _update(adamw8bit_update_, ours, g, step=step, scale=0.5)
        assert (ours["p"] - theirs["p"]).abs().max() < 1e-3 * 1e-3  # 0.001 lr
        assert torch.allclose(ours["a1"], theirs["a1"], rtol=1e-5) and torch.allclose(ours["a2"], theirs["a2"], rtol=1e-5)
        blocks = exact_m.view(-1, 256)
        assert torch.allclose(ours["a1"], blocks.abs().amax(1), rtol=1e-6)
        our_error = (q1[ours["s1"].long()].view(-1, 256) * ours["a1"][:, None] - blocks).abs()
        their_error = (q1[theirs["s1"].long()].view(-1, 256) * theirs["a1"][:, None] - blocks).abs()
        assert (our_error <= their_error + 1e-6 * ours["a1"][:, None]).all()
        assert our_error.mean() < their_error.mean()


def _random_start(n: int, device="cpu", generator=None) -> dict:
    """A bucket of ``n`` values mid-training: random masters, codes and block maxima."""
    def draw(fn, *args, **kw):
        return fn(*args, generator=generator, device=device, **kw)
    return {
        "p": draw(torch.randn, n), "s1": draw(torch.randint, 0, 256, (n,), dtype=torch.uint8), "s2": draw(torch.randint, 0, 256, (n,), dtype=torch.uint8),
        "a1": draw(torch.rand, n // 256), "a2": draw(torch.rand, n // 256),
    }


def _assert_same_update(eager: dict, other: dict, start: dict, label) -> None:
    """``other`` is ``eager``'s update of ``start`` to float rounding: generated code may contract or
    reorder float operations, and so round a moment sitting on a midpoint to its other neighbour."""
    moved = (eager["p"] - start["p"]).abs()
    assert ((eager["p"] - other["p"]).abs() <= 1e-6 * eager["p"].abs() + 1e-5 * moved).all(), label
    for key in ("a1", "a2"):
        assert torch.allclose(eager[key], other[key], rtol=1e-6, atol=0), (label, key)
    for key in ("s1", "s2"):
        codes = (eager[key].long() - other[key].long()).abs()
        assert codes.max() <= 1 and (codes > 0).sum() <= eager["p"].numel() // 1000, (label, key)


def test_compiled_update_is_the_eager_update_and_compiles_once():
    """torch.compile's kernel (C++ here, Triton on a GPU) gives the eager update's results (to float
    rounding), and a bucket of another size, a later step and another scale reuse the same compiled code."""
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    compiled = adam8bit.compiled_update()
    frames = counters["stats"]["unique_graphs"]
    for n, step, scale in [(256 * 40, 1, 1.0), (256 * 40, 2, 0.3), (256 * 7, 3, 0.7)]:
        start = _random_start(n)
        start["a1"][0] = 0.0  # a block whose moments were all zero
        eager, fused = ({k: v.clone() for k, v in start.items()} for _ in range(2))
        g = torch.randn(n).to(torch.bfloat16)
        _update(adamw8bit_update_, eager, g, step=step, scale=scale)
        _update(compiled, fused, g, step=step, scale=scale)
        _assert_same_update(eager, fused, start, (n, step))
    assert counters["stats"]["unique_graphs"] - frames <= 1  # at most one compile (none if an earlier test compiled it)


def test_triton_kernel_is_the_eager_update():
    """Where Triton runs (a CUDA GPU, or its CPU interpreter: TRITON_INTERPRET=1 with Triton
    installed; CI has neither): the hand-written kernel gives the eager update's results, with a
    float32 and a bf16 gradient, a partial last program, an all-zero block, every tile shape the
    benchmark tries; and ``update_function`` picks it on a GPU, torch.compile on a CPU."""
    import os

    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert adam8bit.update_function("cpu") is adam8bit.compiled_update()
    if device == "cuda":
        assert adam8bit.update_function("cuda") is adam8bit.triton_update_
    q1, q2 = (q.to(device) for q in _codes())
    tables1, tables2 = nearest_code_tables(q1), nearest_code_tables(q2)
    generator = torch.Generator(device).manual_seed(0)
    for n, dtype, rows, warps in [(256 * 9, torch.float32, 4, 4), (256 * 5, torch.bfloat16, 2, 4), (256 * 33, torch.float32, 16, 8)]:
        start = _random_start(n, device, generator)
        start["a1"][1] = 0.0
        g = torch.randn(n, generator=generator, device=device).to(dtype)
        g[256:512] = 0.0  # with a1[1] = 0: block 1's first moment stays all zero
        eager, kernel = ({k: v.clone() for k, v in start.items()} for _ in range(2))
        hyper = hyperparameters(**HYPER, step=3, scale=0.7, device=device)
        for state, update, kw in ((eager, adamw8bit_update_, {}), (kernel, adam8bit.triton_update_, {"rows": rows, "num_warps": warps})):
            update(state["p"], g, state["s1"], state["s2"], state["a1"], state["a2"], q1, q2, tables1, tables2, hyper, **kw)
        _assert_same_update(eager, kernel, start, (n, dtype))
        assert kernel["a1"][1] == 0 and (q1[kernel["s1"][256:512].long()] == 0).all()
    with pytest.raises(ValueError, match="multiple of 256"):
        adam8bit.triton_update_(torch.zeros(100, device=device), *([torch.zeros(100, device=device)] * 3), None, None, q1, q2, tables1, tables2, hyper)


def _mlp(seed: int) -> list[torch.nn.Parameter]:
    """bf16 weights of 8192 elements (8-bit moments) and biases under bitsandbytes' 4096-element
    ``min_8bit_size`` (32-bit moments)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(torch.bfloat16)
    return list(net.parameters())


def _grads(params, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for param in params:
        param.grad = (1e-2 * torch.randn(param.shape, generator=generator)).to(torch.bfloat16)


def test_diffpo_kernel_option_steps_the_8bit_buckets_and_shares_bitsandbytes_state(monkeypatch):
    """``MasterWeightAdamW8bit(kernel="diffpo")``: the 8-bit buckets go through diffpo's update,
    the 32-bit ones through bitsandbytes; it scales the gradients inside (clipping); its update
    lands no farther from float32 AdamW than bitsandbytes' CPU update; and a checkpoint moves between the
    two kernels both ways, moments as they are, the next steps then close (0.01 lr)."""
    from benchmarks.optimizer_step import error_vs_adamw

    from diffpo.fastpath import MasterWeightAdamW8bit

    calls = []
    optimizer = MasterWeightAdamW8bit(_mlp(0), kernel="diffpo", lr=1e-3)
    assert optimizer.scales_gradients
    update = adam8bit.update_function("cpu")
    with monkeypatch.context() as patch:
        patch.setattr(adam8bit, "update_function", lambda device: (lambda p, *rest: calls.append((p.numel(), rest[-1][-1].item())) or update(p, *rest)))
        _grads(optimizer.model_params, 0)
        optimizer.set_gradient_scale(0.5)
        optimizer.step()
    assert calls == [(2 * 8192, 0.5)]  # the one 8-bit bucket; the biases' 32-bit bucket went to bitsandbytes
    torch.manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(shape)).to(torch.bfloat16)) for shape in [(64, 128), (300, 40), (5000,)]]
    grads = [(1e-3 * torch.randn(p.shape)).to(torch.bfloat16) for p in params]
    kinds = {"bitsandbytes": MasterWeightAdamW8bit, "diffpo": lambda ps, **kw: MasterWeightAdamW8bit(ps, kernel="diffpo", **kw)}
    errors = error_vs_adamw(params, grads, kinds)
    assert errors["diffpo"]["max_lr"] <= errors["bitsandbytes"]["max_lr"] and errors["diffpo"]["mean_lr"] <= errors["bitsandbytes"]["mean_lr"]
    for source_kernel, target_kernel in [("diffpo", "bitsandbytes"), ("bitsandbytes", "diffpo")]:
        source = MasterWeightAdamW8bit(_mlp(0), kernel=source_kernel, lr=1e-3)
        for step in range(2):
            _grads(source.model_params, step)
            source.step()
        saved = io.BytesIO()
        torch.save(source.state_dict(), saved)
        saved.seek(0)
        target = MasterWeightAdamW8bit(_mlp(1), kernel=target_kernel, lr=1e-3)
        target.load_state_dict(torch.load(saved, weights_only=False))
        for mine, theirs in zip(source.param_groups[0]["params"], target.param_groups[0]["params"]):
            for key in {"state1", "state2", "absmax1", "absmax2", "step"} & set(source.state[mine]):
                assert torch.equal(torch.as_tensor(source.state[mine][key]), torch.as_tensor(target.state[theirs][key])), key
        _grads(source.model_params, 2)
        _grads(target.model_params, 2)
        source.step()
        target.step()
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(source.masters, target.masters))


def test_diffpo_kernel_builds_one_hyperparameter_tensor_per_step_for_all_buckets(monkeypatch):
    """The 8-bit buckets of one step share one hyperparameter tensor (one copy to the device per step,
    not one per bucket); a new step or gradient scale builds a new one, and each bucket's update reads
    the values ``hyperparameters`` gives for that step and scale."""
    from diffpo.fastpath import MasterWeightAdamW8bit

    cls = type("Optimizer", (MasterWeightAdamW8bit,), {"bucket_elements": 8192})  # one 8-bit bucket per weight
    optimizer = cls(_mlp(0), kernel="diffpo", lr=1e-3)
    built, seen = [], []
    build, update = adam8bit.hyperparameters, adam8bit.update_function("cpu")
    monkeypatch.setattr(adam8bit, "hyperparameters", lambda **values: built.append(values) or build(**values))
    monkeypatch.setattr(adam8bit, "update_function", lambda device: (lambda p, *rest: seen.append(rest[-1]) or update(p, *rest)))
    for step, scale in [(1, 1.0), (2, 1.0), (3, 0.5)]:
        _grads(optimizer.model_params, step)
        optimizer.set_gradient_scale(scale)
        optimizer.step()
        assert [(v["step"], v["scale"]) for v in built] == [(s, c) for s, c in [(1, 1.0), (2, 1.0), (3, 0.5)][:step]]
        assert len(seen) == 2 * step and seen[-1] is seen[-2]  # the two 8-bit buckets, one tensor
        assert torch.equal(seen[-1], build(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=step, scale=scale, device="cpu"))


def test_trainer_runs_with_the_diffpo_kernel(tmp_path, pair_dir, model_cache, monkeypatch):
    """``train.adam_8bit_kernel=diffpo`` through ``diffpo train``: accepted only over bf16 masters
    with 8-bit AdamW; each step's 8-bit update goes through it with the clipping coefficient of
    that step's logged norm inside, and the run trains to its end with finite losses."""
    from conftest import read_metrics, tiny_run_config

    from diffpo.config import ConfigError, config_from_dict
    from diffpo.train import train

    with pytest.raises(ConfigError, match="adam_8bit_kernel.*use_8bit_adam=true and train.weight_dtype=bf16"):
        config_from_dict({"train": {"adam_8bit_kernel": "diffpo", "use_8bit_adam": True}})
    update, scales = adam8bit.update_function("cpu"), []
    monkeypatch.setattr(adam8bit, "update_function", lambda device: (lambda *args: scales.append((args[-1][-1].item(), args[-1][0].item())) or update(*args)))
    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "use_8bit_adam": True, "adam_8bit_kernel": "diffpo",
            "max_steps": 3, "checkpoint_every": 3, "learning_rate": 1e-3, "max_grad_norm": 0.05}
    out = tmp_path / "run"
    train(tiny_run_config(out, pair_dir, model={"lora": {"enabled": False}}, train=fast), cache_dir=model_cache)
    metrics = read_metrics(out)
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    assert [s for s, _ in scales] == [pytest.approx(0.05 / (m["grad_norm"] + 1e-6), rel=1e-5) for m in metrics]  # clipping active, inside
    assert [lr for _, lr in scales] == [pytest.approx(m["lr"], rel=1e-6) for m in metrics]  # the scheduler's rate of each step
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_nearest_code_tables_follow_the_qmaps_across_checkpoint_loads():
    """Each load brings new qmap tensors (a freed one's address can come back holding the other
    map): after every load and step the tables the optimizer used are those of the maps it holds."""
    from diffpo.fastpath import MasterWeightAdamW8bit

    optimizer = MasterWeightAdamW8bit(_mlp(0), kernel="diffpo", lr=1e-3)
    _grads(optimizer.model_params, 0)
    optimizer.step()
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    for step in range(1, 8):
        saved.seek(0)
        optimizer.load_state_dict(torch.load(saved, weights_only=False))
        _grads(optimizer.model_params, step)
        optimizer.step()
        fresh = MasterWeightAdamW8bit(_mlp(0), kernel="diffpo", lr=1e-3)  # the same load and step, nothing cached
        saved.seek(0)
        fresh.load_state_dict(torch.load(saved, weights_only=False))
        _grads(fresh.model_params, step)
        fresh.step()
        for mine, theirs in zip(optimizer.param_groups[0]["params"], fresh.param_groups[0]["params"]):
            assert torch.equal(mine, theirs) and torch.equal(optimizer.state[mine]["state1"], fresh.state[theirs]["state1"])
        (state,) = [s for s in optimizer.state.values() if s["state1"].dtype == torch.uint8]
        for qmap in (state["qmap1"], state["qmap2"]):
            cached_map, (base, mids) = optimizer._code_tables[id(qmap)]
            expected = nearest_code_tables(qmap)
            assert cached_map is qmap and torch.equal(base, expected[0]) and torch.equal(mids, expected[1])
        assert len(optimizer._code_tables) <= 2


# ---------------------------------------------------------------------------------------------
# The in-place 8-bit buckets: gradients read from each parameter's own .grad, weights written by the kernel


def _needs_triton():
    import os

    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


# awkward members of one 8-bit bucket (min_8bit_size 20): sizes off the 256-block, one-block members that
# put several members in one 4-row program, a channels_last conv weight; and two under 20 (32-bit bucket)
_SHAPES = [(70, 30), (33,), (8, 6, 3, 3), (300,), (21,), (7,), (64, 65), (5, 1), (40,)]
_CONV, _NO_GRAD = 2, 4
_ODD_WEIGHT, _ODD_GRAD = 6, 0  # a weight, and at odd steps a gradient, that are views at an address not 16-byte aligned


def _at_odd_address(tensor: torch.Tensor, shift: int) -> torch.Tensor:
    """A contiguous copy of ``tensor`` starting ``shift`` elements into a larger allocation (its address
    not 16-byte aligned for an odd shift: as a view into another tensor's storage may be, e.g. DDP's buckets)."""
    storage = torch.zeros(tensor.numel() + shift, dtype=tensor.dtype, device=tensor.device)
    view = storage[shift:].view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % 16
    return view


def _awkward_params(device, dtype=torch.bfloat16) -> list[torch.nn.Parameter]:
    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(shape, device=device).to(dtype)) for shape in _SHAPES]
    params[_CONV].data = params[_CONV].data.contiguous(memory_format=torch.channels_last)
    params[_ODD_WEIGHT].data = _at_odd_address(params[_ODD_WEIGHT].data, 3)
    return params


def _awkward_grads(params, step: int) -> None:
    """Step ``step``'s gradients; none for one parameter (stepped with a zero gradient); the conv
    weight's in its own channels_last layout at even steps, row-major at odd ones; one at an unaligned
    address at odd steps."""
    generator = torch.Generator().manual_seed(100 + step)
    for index, param in enumerate(params):
        grad = (1e-2 * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype)
        if index == _ODD_GRAD and step % 2:
            grad = _at_odd_address(grad, 1)
        param.grad = None if index == _NO_GRAD else grad.contiguous(memory_format=torch.channels_last) if index == _CONV and step % 2 == 0 else grad


def _awkward_optimizer(monkeypatch, in_place: bool, device, dtype=torch.bfloat16):
    from diffpo.fastpath import MasterWeightAdamW8bit

    monkeypatch.setattr(adam8bit, "update_function", lambda device: adam8bit.triton_update_)  # Triton's interpreter on a CPU too
    monkeypatch.setattr(adam8bit, "FP_FUSION", False)  # both kernels unfused: the same rounding, so the paths compare bit for bit
    cls = type("Optimizer", (MasterWeightAdamW8bit,), {"in_place_8bit": in_place})
    return cls(_awkward_params(device, dtype), kernel="diffpo", min_8bit_size=20, lr=1e-2, weight_decay=0.1)


def _assert_same_optimizers(a, b) -> None:
    for x, y in zip(a.masters, b.masters):
        assert torch.equal(x, y)
    for x, y in zip(a.model_params, b.model_params):
        assert torch.equal(x, y) and x.stride() == y.stride() and x.grad is None and y.grad is None
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert a.state[p].keys() == b.state[q].keys()
        for key, value in a.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.state[q][key])), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_place_8bit_bucket_is_the_upcast_path_bit_for_bit(monkeypatch, dtype):
    """The in-place update of an 8-bit bucket (its kernel reads each member's bf16 ``.grad`` and
    writes its bf16 weight) against the upcast path (float32 gradient bucket, the same kernel, the
    masters copied into the weights), over 3 steps with a gradient scale: the same masters, moments,
    block maxima and weights, bit for bit, for bf16 (the trainer's) and fp16 weights; a parameter without a gradient, a channels_last weight
    with either layout of gradient, a weight and a gradient at unaligned addresses (the kernel's general
    path) beside aligned whole blocks (its 16-byte vector path) included. No float32 gradient is made for that bucket; the 32-bit
    bucket's is, as before."""
    device = _needs_triton()
    in_place, upcast = (_awkward_optimizer(monkeypatch, flag, device, dtype) for flag in (True, False))
    launches = []
    real = adam8bit.triton_indirect_update_
    monkeypatch.setattr(adam8bit, "triton_indirect_update_", lambda p, *a, **k: launches.append(p.numel()) or real(p, *a, **k))
    eight_bit, small = in_place._buckets
    assert (eight_bit.kind, small.kind) == ("8bit", "32bit") and eight_bit.members == [0, 1, 2, 3, 4, 6, 8]
    assert eight_bit.flat.numel() // 256 % 4  # a partial last program of 4 rows
    for step in range(3):
        for optimizer in (in_place, upcast):
            _awkward_grads(optimizer.model_params, step)
            optimizer.set_gradient_scale(0.7)
            optimizer.prepare_step()
        assert eight_bit.flat.grad is None and eight_bit.taken is not None and all(p.grad is None for p in in_place.model_params)
        assert small.flat.grad.dtype == torch.float32 and upcast._buckets[0].flat.grad.dtype == torch.float32
        in_place.step()
        upcast.step()
        assert eight_bit.taken is None  # the gradients it held are released
        _assert_same_optimizers(in_place, upcast)
        assert bool(in_place.updated_weights_finite()) and bool(upcast.updated_weights_finite())
    assert launches == [eight_bit.flat.numel()] * 3
    conv = in_place.model_params[_CONV]
    assert conv.is_contiguous(memory_format=torch.channels_last) and torch.equal(conv, in_place.masters[_CONV].to(dtype))
    assert all(torch.equal(p, m.to(dtype)) for p, m in zip(in_place.model_params, in_place.masters))
    _awkward_grads(in_place.model_params, 3)
    in_place.prepare_step()
    monkeypatch.setattr(type(in_place), "_runs_own_loop", lambda self: False)  # e.g. stepped on another stream
    with pytest.raises(RuntimeError, match="default stream"):  # bitsandbytes' loop would skip the bucket
        in_place.step()


@pytest.mark.parametrize("in_place", [True, False])
def test_updated_weights_finite_flags_a_weight_the_step_broke(monkeypatch, in_place):
    """``updated_weights_finite`` after a step (the trainer's check before any save, without reading every
    weight): true for a healthy step; false where one value of one weight became nan (a nan gradient),
    and where a finite float32 master rounds to inf in bf16 (3.40e38 decayed to 3.3966e38, past bf16's
    3.3895e38 + half a unit), in the in-place kernel's bucket (its flag) and in the 32-bit bucket (the
    masters' largest magnitude), on the upcast path as in place; the same answer as reading the weights."""
    from diffpo.fastpath import _rounds_to_inf_from, weights_finite_flag

    from diffpo.fastpath import MasterWeightAdamW8bit

    def new_optimizer():  # in place: the Triton kernel (a GPU, or its interpreter); else the upcast path's own update (CI: compiled, on a CPU)
        if in_place:
            return _awkward_optimizer(monkeypatch, True, _needs_triton())
        return MasterWeightAdamW8bit(_awkward_params("cpu"), kernel="diffpo", min_8bit_size=20, lr=1e-2, weight_decay=0.1)

    optimizer = new_optimizer()
    assert optimizer.updated_weights_finite() is None  # before any step: the caller reads the weights
    eight_bit, small = optimizer._buckets
    big, tiny = 3, 5  # a member of the 8-bit bucket, one of the 32-bit bucket
    assert big in eight_bit.members and tiny in small.members

    def step(step, *, nan_in=None, huge=None):
        _awkward_grads(optimizer.model_params, step)
        if nan_in is not None:
            optimizer.model_params[nan_in].grad.view(-1)[3] = float("nan")
        if huge is not None:
            optimizer.masters[huge].view(-1)[0] = 3.40e38
        optimizer.step()
        assert (eight_bit.nonfinite is not None and eight_bit.nonfinite.item() in (0, 1)) if in_place else True
        flag = bool(optimizer.updated_weights_finite())
        assert flag == bool(weights_finite_flag(optimizer.model_params))
        return flag

    assert step(0)
    for member in (big, tiny):
        optimizer = new_optimizer()
        eight_bit, small = optimizer._buckets
        assert step(0) and not step(1, nan_in=member)
        optimizer = new_optimizer()
        eight_bit, small = optimizer._buckets
        assert not step(0, huge=member) and torch.isinf(optimizer.model_params[member].view(-1)[0])
        assert torch.isfinite(optimizer.masters[member]).all()  # the master is finite: its bf16 rounding is not
    limit = _rounds_to_inf_from(torch.bfloat16)
    assert torch.tensor(limit).to(torch.bfloat16).isinf() and torch.nextafter(torch.tensor(limit), torch.tensor(0.0)).to(torch.bfloat16).isfinite()
    assert _rounds_to_inf_from(torch.float16) == 65520.0 and _rounds_to_inf_from(torch.float32) == math.inf


def test_in_place_8bit_checkpoints_are_the_upcast_paths(monkeypatch):
    """The state is the upcast path's, so checkpoints go both ways: a state saved under one loads under
    the other and the next steps are bit for bit those of an uninterrupted run."""
    device = _needs_triton()
    runs = {flag: _awkward_optimizer(monkeypatch, flag, device) for flag in (True, False)}
    for step in range(2):
        for optimizer in runs.values():
            _awkward_grads(optimizer.model_params, step)
            optimizer.step()
    for source, target in [(True, False), (False, True), (True, True)]:
        saved = io.BytesIO()
        torch.save(runs[source].state_dict(), saved)
        saved.seek(0)
        resumed = _awkward_optimizer(monkeypatch, target, device)
        resumed.load_state_dict(torch.load(saved, weights_only=False))
        _assert_same_optimizers(resumed, runs[target])
        reference = _awkward_optimizer(monkeypatch, target, device)
        reference.load_state_dict(runs[target].state_dict())
        for optimizer in (resumed, reference):
            _awkward_grads(optimizer.model_params, 2)
            optimizer.set_gradient_scale(0.5)
            optimizer.step()
        _assert_same_optimizers(resumed, reference)


def test_a_step_skipped_after_prepare_step_releases_the_gradients_and_the_next_is_the_upcast_paths(monkeypatch):
    """The trainer takes the gradients before its host sync (``prepare_step``) and may then skip the
    step (a non-finite loss) and call ``zero_grad``: the in-place bucket lets go of what it took, and
    the next step is the upcast path's, bit for bit."""
    device = _needs_triton()
    in_place, upcast = (_awkward_optimizer(monkeypatch, flag, device) for flag in (True, False))
    eight_bit = in_place._buckets[0]
    _awkward_grads(in_place.model_params, 0)
    in_place.prepare_step()
    assert eight_bit.taken is not None
    in_place.zero_grad(set_to_none=True)
    assert eight_bit.taken is None and all(p.grad is None for p in in_place.model_params)
    for optimizer in (in_place, upcast):
        _awkward_grads(optimizer.model_params, 1)
        optimizer.step()
    _assert_same_optimizers(in_place, upcast)


def test_in_place_bucket_cast_after_building_falls_back_to_the_upcast_path(monkeypatch):
    """The in-place kernel reads and writes raw addresses in the dtype its tables were built for: a
    member cast afterwards (here to float32) sends its bucket through the upcast path, which casts,
    instead of reading float32 bits as bf16. Runs without Triton (the update itself is the eager one)."""
    from diffpo.fastpath import MasterWeightAdamW8bit

    optimizer = MasterWeightAdamW8bit(_awkward_params("cpu"), kernel="diffpo", min_8bit_size=20, lr=1e-2)
    eight_bit = optimizer._buckets[0]
    monkeypatch.setattr(adam8bit, "update_function", lambda device: adam8bit.adamw8bit_update_)
    monkeypatch.setattr(adam8bit, "indirect_update_function", lambda device: adam8bit.triton_indirect_update_)  # as on a GPU
    _awkward_grads(optimizer.model_params, 0)
    optimizer.prepare_step()
    assert eight_bit.taken is not None and eight_bit.flat.grad is None  # as built: taken in place
    optimizer.zero_grad()
    first = optimizer.model_params[0]
    first.data = first.data.float()  # e.g. module.float() after the optimizer was built
    _awkward_grads(optimizer.model_params, 0)
    optimizer.prepare_step()
    assert eight_bit.taken is None and eight_bit.flat.grad.dtype == torch.float32  # the upcast path took them
    before = optimizer.masters[0].clone()
    optimizer.step()
    assert first.dtype == torch.float32 and torch.equal(first, optimizer.masters[0]) and not torch.equal(before, optimizer.masters[0])


def test_member_tables_place_every_block_of_the_flat_buckets():
    """Without Triton: with ``kernel="diffpo"`` each 8-bit bucket of bf16 weights gets its member tables
    (a block's member, each member's offset and size: where its master sits in the flat bucket); the
    32-bit bucket none; on a CPU the step keeps the upcast path (the compiled update) and takes nothing
    in place; the channels_last weight's master is row-major, its moments in the upcast path's order."""
    from diffpo.fastpath import MasterWeightAdamW8bit

    optimizer = MasterWeightAdamW8bit(_awkward_params("cpu"), kernel="diffpo", min_8bit_size=20, lr=1e-2)
    eight_bit, small = optimizer._buckets
    assert small.tables is None and eight_bit.tables.dtype == torch.bfloat16
    members, first, numel, _ = eight_bit.tables
    assert members.dtype == torch.int32 and members.numel() * 256 == eight_bit.flat.numel()
    for position, index in enumerate(eight_bit.members):
        master = optimizer.masters[index]
        offset = (master.data_ptr() - eight_bit.flat.data_ptr()) // 4
        assert (first[position], numel[position]) == (offset, master.numel()) and master.is_contiguous()
        assert (members[offset // 256 : -(-(offset + master.numel()) // 256)] == position).all()
    assert MasterWeightAdamW8bit(_awkward_params("cpu"), min_8bit_size=20, lr=1e-2)._buckets[0].tables is None  # bitsandbytes' kernel
    assert adam8bit.indirect_update_function("cpu") is None
    _awkward_grads(optimizer.model_params, 0)
    optimizer.prepare_step()
    assert eight_bit.taken is None and eight_bit.flat.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="bf16 or fp16"):
        adam8bit.member_tables([300], torch.float32, "cpu")


def test_trainer_in_place_8bit_buckets_give_the_same_run(tmp_path, pair_dir, model_cache, monkeypatch):
    """``train.adam_8bit_kernel=diffpo`` through ``diffpo train`` with its Triton kernel (channels_last
    weights, clipping inside the update): the run with the 8-bit buckets updated in place has the
    same losses, norms and saved weights, bit for bit, as the run through the upcast path."""
    from conftest import read_metrics, tiny_run_config
    from safetensors.torch import load_file

    from diffpo.fastpath import MasterWeightAdamW8bit
    from diffpo.train import train

    _needs_triton()
    monkeypatch.setattr(adam8bit, "update_function", lambda device: adam8bit.triton_update_)
    monkeypatch.setattr(adam8bit, "FP_FUSION", False)  # the two kernels' rounding made equal (adam8bit.FP_FUSION)
    launches = []
    real = adam8bit.triton_indirect_update_
    monkeypatch.setattr(adam8bit, "triton_indirect_update_", lambda *a, **k: launches.append(1) or real(*a, **k))
    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "use_8bit_adam": True, "adam_8bit_kernel": "diffpo", "adam_8bit_min_size": 1024,
            "channels_last": True, "max_steps": 3, "checkpoint_every": 3, "learning_rate": 1e-3, "max_grad_norm": 0.05}
    runs = {}
    for in_place in (True, False):
        launches.clear()
        monkeypatch.setattr(MasterWeightAdamW8bit, "in_place_8bit", in_place)
        runs[in_place] = tmp_path / f"in_place_{in_place}"
        train(tiny_run_config(runs[in_place], pair_dir, model={"lora": {"enabled": False}}, train=fast), cache_dir=model_cache)
        assert len(launches) == (3 if in_place else 0)  # one 8-bit bucket, each step
    metrics = {key: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in read_metrics(run)] for key, run in runs.items()}
    assert len(metrics[True]) == 3 and metrics[True] == metrics[False]
    weights = {key: load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors") for key, run in runs.items()}
    assert weights[True].keys() == weights[False].keys() and all(torch.equal(v, weights[False][k]) for k, v in weights[True].items())
