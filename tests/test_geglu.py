"""diffpo's GEGLU with a one-pass backward (``diffpo.geglu``, ``train.fused_geglu``): the hand-written
gradient against autograd in float64, the module against diffusers' ``GEGLU`` (values, gradients,
state-dict keys; eager and compiled), the swap in a real UNet, and the Triton kernel against the
torch ops where Triton runs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward

from diffpo import geglu as geglu_module
from diffpo.geglu import FusedGEGLU, fuse_geglu, reference_backward


def _autograd_reference(projected: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    h = projected.detach().double().requires_grad_()
    value, gate = h.chunk(2, dim=-1)
    (value * F.gelu(gate)).backward(grad_out.double())
    return h.grad


def test_reference_backward_is_autograds_gradient_in_float64():
    torch.manual_seed(0)
    projected = torch.randn(3, 7, 2 * 11, dtype=torch.float64) * 3  # gates far into both tails too
    grad_out = torch.randn(3, 7, 11, dtype=torch.float64)
    got = reference_backward(projected, grad_out)
    assert got.dtype == torch.float64 and got.shape == projected.shape
    # reference_backward computes in float32: agreement to float32 rounding
    torch.testing.assert_close(got, _autograd_reference(projected, grad_out), rtol=1e-5, atol=1e-5)
    # a hand-computed point: value 2, gate 0 -> d value = gelu(0) = 0, d gate = 2 * (Phi(0) + 0) = 1
    point = reference_backward(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0]]))
    assert point.tolist() == [[0.0, 1.0]]


def _pair(dtype):
    torch.manual_seed(0)
    ours = FeedForward(48, mult=4, activation_fn="geglu").to(dtype)
    theirs = FeedForward(48, mult=4, activation_fn="geglu").to(dtype)
    theirs.load_state_dict(ours.state_dict())
    assert fuse_geglu(ours) == ["net.0"]
    return ours, theirs


def _run(block, x, grad):
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(grad)
    return out.detach(), x.grad, [p.grad for p in block.parameters()]


def test_fused_geglu_matches_diffusers_in_float32_eager_and_compiled():
    ours, theirs = _pair(torch.float32)
    assert isinstance(ours.net[0], FusedGEGLU) and list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 30, 48)
    grad = torch.randn(2, 30, 48)
    want = _run(theirs, x, grad)
    for block in (ours, torch.compile(ours)):
        out, x_grad, param_grads = _run(block, x, grad)
        torch.testing.assert_close(out, want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(x_grad, want[1], rtol=1e-5, atol=1e-6)
        for got, expected in zip(param_grads, want[2]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        ours.zero_grad(set_to_none=True)


def test_fused_geglu_in_bf16_is_no_farther_from_float64_than_diffusers():
    """In bf16 diffusers' eager backward rounds after each op; ours rounds once: the projection's
    gradient must be at least as close to the float64 truth, and the two agree to bf16 rounding."""
    torch.manual_seed(1)
    projected = (torch.randn(64, 2 * 96) * 2).bfloat16()
    grad_out = torch.randn(64, 96).bfloat16()
    truth = _autograd_reference(projected, grad_out)
    ours = reference_backward(projected, grad_out).double()
    h = projected.clone().requires_grad_()
    value, gate = h.chunk(2, dim=-1)
    (value * F.gelu(gate)).backward(grad_out)
    theirs = h.grad.double()
    assert (ours - truth).abs().max() <= (theirs - truth).abs().max()
    assert (ours - truth).abs().mean() < (theirs - truth).abs().mean()
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_fuse_geglu_swaps_every_geglu_of_a_unet_and_keeps_its_weights(tmp_path):
    from diffpo.tiny import tiny_unet

    unet = tiny_unet(in_channels=4, sample_size=16)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    geglus = [name for name, m in unet.named_modules() if type(m) is GEGLU]
    assert geglus  # the tiny UNet has transformer blocks
    assert fuse_geglu(unet) == geglus
    assert not any(type(m) is GEGLU for m in unet.modules())
    after = unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert fuse_geglu(unet) == []  # already fused: nothing left to swap
    # the same weights save and load as a plain diffusers UNet (with diffusers' own GEGLU)
    unet.save_pretrained(tmp_path / "unet")
    reloaded = type(unet).from_pretrained(tmp_path / "unet")
    assert [name for name, m in reloaded.named_modules() if type(m) is GEGLU] == geglus
    assert all(torch.equal(value, after[key]) for key, value in reloaded.state_dict().items())


def test_fused_geglu_keeps_a_lora_wrapped_projection_trainable():
    """LoRA injected on ``proj`` before the swap: the fused block computes what the unfused one does,
    and its LoRA weights get the same gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    theirs = FeedForward(32, mult=2, activation_fn="geglu")
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), theirs)
    ours = FeedForward(32, mult=2, activation_fn="geglu")
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), ours)
    ours.load_state_dict(theirs.state_dict())
    assert fuse_geglu(ours) == ["net.0"] and "lora_A" in str(ours.net[0].proj)
    x, grad = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    want, got = _run(theirs, x, grad), _run(ours, x, grad)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    names = [n for n, _ in ours.named_parameters()]
    lora = [i for i, n in enumerate(names) if "lora_" in n]
    assert lora and all(got[2][i] is not None and got[2][i].abs().sum() > 0 for i in lora)
    for i in lora:
        torch.testing.assert_close(got[2][i], want[2][i], rtol=1e-5, atol=1e-6)


def test_the_op_passes_torch_library_checks_on_any_shape():
    """``torch.library.opcheck``: the fake (meta) function matches the real one, and torch.compile
    can trace it, for 2-D, 3-D, empty and non-contiguous inputs; empty inputs give empty gradients."""
    torch.manual_seed(0)
    cases = [
        (torch.randn(6, 20), torch.randn(6, 10)),
        (torch.randn(2, 3, 16), torch.randn(2, 3, 8)),
        (torch.randn(0, 16), torch.randn(0, 8)),
        (torch.randn(5, 16), torch.randn(8, 5).t()),
    ]
    for projected, grad_out in cases:
        torch.library.opcheck(torch.ops.diffpo.geglu_backward.default, (projected, grad_out))
    assert geglu_module.fused_backward(torch.randn(0, 16), torch.randn(0, 8)).shape == (0, 16)


def test_compile_cache_keeps_graphs_with_the_fused_geglu(tmp_path, monkeypatch):
    """PyTorch's AOTAutograd cache skips graphs holding a custom autograd.Function unless allowed
    (``allow_cached_autograd_functions``, which the trainer calls with ``train.fused_geglu``): without
    it a recompilation is a bypass, with it a hit (an earlier run's joint graphs are reused)."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters

    from diffpo.geglu import allow_cached_autograd_functions

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def compile_once() -> dict:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        block = FeedForward(16, mult=2, activation_fn="geglu")
        fuse_geglu(block)
        torch.compile(block)(torch.randn(2, 4, 16, requires_grad=True)).sum().backward()
        return dict(counters["aot_autograd"])

    with functorch_config.patch(autograd_cache_allow_custom_autograd_functions=False):  # PyTorch's default, restored after
        assert compile_once().get("autograd_cache_bypass") == 1
        allow_cached_autograd_functions()
        assert functorch_config.autograd_cache_allow_custom_autograd_functions is True
        assert compile_once().get("autograd_cache_saved") == 1
        assert compile_once().get("autograd_cache_hit") == 1
    torch._dynamo.reset()


def test_triton_kernel_is_the_torch_backward():
    """Where Triton runs (a CUDA GPU, or its CPU interpreter: TRITON_INTERPRET=1 with Triton
    installed): bf16 and float32, widths that are and are not multiples of the block, a
    non-contiguous output gradient; equal to the torch ops up to one rounding of the result."""
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for dtype, rows, half, block in ((torch.bfloat16, 33, 300, 128), (torch.float32, 5, 256, 128), (torch.bfloat16, 4, 2560, 1024), (torch.bfloat16, (2, 3), 96, 64)):
        leading = rows if isinstance(rows, tuple) else (rows,)
        projected = (torch.randn(*leading, 2 * half, device=device) * 2).to(dtype)
        grad_out = torch.randn(half, *leading[::-1], device=device).to(dtype).permute(*range(len(leading), 0, -1), 0)  # non-contiguous
        got = geglu_module._triton_backward(projected, grad_out, block=block)
        want = reference_backward(projected, grad_out)
        assert got.dtype == dtype and got.shape == projected.shape
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # float32: erf/exp of another library
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
    if device == "cuda":  # the op dispatches to the kernel on CUDA
        projected = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
        grad_out = torch.randn(8, 32, device=device, dtype=torch.bfloat16)
        torch.testing.assert_close(geglu_module.fused_backward(projected, grad_out), geglu_module._triton_backward(projected, grad_out), rtol=0, atol=0)


def test_trainer_with_fused_geglu_trains_the_same_weights(tmp_path, pair_dir, model_cache, monkeypatch):
    """``train.fused_geglu``: every GEGLU of the trained UNet and of the frozen reference swapped
    (full fine-tuning with Diffusion-DPO), the same losses and the same saved weights (same keys) as
    the run without it, to float32 rounding."""
    from conftest import read_metrics, tiny_run_config
    from safetensors.torch import load_file

    import diffpo.train as train_module
    from diffpo.train import train

    import torch._functorch.config as functorch_config

    swapped, references = [], []
    monkeypatch.setattr(train_module, "fuse_geglu", lambda network: swapped.append(fuse_geglu(network)) or swapped[-1])
    real_reference = train_module.Reference

    def recording_reference(network, use_lora):
        reference = real_reference(network, use_lora)
        references.append(reference)
        return reference

    monkeypatch.setattr(train_module, "Reference", recording_reference)
    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused_{fused}"
        settings = {"model": {"lora": {"enabled": False}}, "loss": {"name": "diffusion_dpo"}, "train": {"fused_geglu": fused, "learning_rate": 1e-4}}
        with functorch_config.patch(autograd_cache_allow_custom_autograd_functions=False):  # PyTorch's default, restored after
            train(tiny_run_config(out, pair_dir, **settings), cache_dir=model_cache)
            allowed = functorch_config.autograd_cache_allow_custom_autograd_functions
        assert allowed is fused  # set only where the swap happened
        (weights,) = (out / "final").rglob("unet/*.safetensors")
        runs[fused] = ([m["loss"] for m in read_metrics(out)], load_file(weights))
    assert len(swapped) == 1 and swapped[0]  # once, before the reference is copied from the network
    unfused, fused = (sum(isinstance(m, FusedGEGLU) for m in r.frozen.modules()) for r in references)
    assert unfused == 0 and fused == len(swapped[0])
    (loss_a, weights_a), (loss_b, weights_b) = runs[False], runs[True]
    # Adam divides by the gradient's running scale: rounding-level gradient differences on weights
    # whose gradient is ~0 move them by up to the learning rate per step, and DPO's loss (model minus
    # reference) sees that: the second loss agrees to 1e-3, the weights to two steps of lr 1e-4
    assert loss_b[0] == loss_a[0] and loss_b == pytest.approx(loss_a, rel=1e-3)
    assert list(weights_a) == list(weights_b)
    differ = 0
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=0, atol=2.1e-4)
        differ += int(((weights_b[key] - weights_a[key]).abs() > 1e-6).sum())
    assert differ < 0.01 * sum(w.numel() for w in weights_a.values())


@pytest.mark.parametrize("name, swapped", [("sd", True), ("sd2v", True), ("sdxl", True), ("sd3", False), ("flux", False)])
def test_fuse_geglu_in_every_familys_network(name, swapped):
    """SD 1.x/2.x and SDXL UNets use GEGLU and get the swap; SD3's and Flux's transformers (tanh GELU
    feed-forwards) are left exactly as they were."""
    from diffpo.tiny import tiny_builder

    with torch.random.fork_rng():
        pipeline = tiny_builder(name)()
    network = getattr(pipeline, "unet", None) or pipeline.transformer
    before = [(n, type(m)) for n, m in network.named_modules()]
    fused = fuse_geglu(network)
    assert bool(fused) is swapped
    after = [(n, type(m)) for n, m in network.named_modules()]
    assert [n for n, t in after if t is FusedGEGLU] == fused
    if not swapped:
        assert after == before


def test_sdxl_training_with_fused_geglu_matches(tmp_path, pair_dir, model_cache):
    """The SDXL family end to end (LoRA MaPO, the tiny SDXL): the same losses with and without the swap."""
    from conftest import read_metrics, tiny_run_config

    from diffpo.train import train

    losses = []
    for fused in (False, True):
        out = tmp_path / f"fused_{fused}"
        train(tiny_run_config(out, pair_dir, pretrained="tiny:sdxl", train={"fused_geglu": fused}), cache_dir=model_cache)
        losses.append([m["loss"] for m in read_metrics(out)])
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
