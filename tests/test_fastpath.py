"""The fast path: bf16 weights with float32 masters, compilation, and their training runs."""

from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_run_config
from safetensors.torch import load_file

from diffpo.config import ConfigError, config_from_dict, load_config
from diffpo.fastpath import MasterWeightAdamW, compile_network, compiled_regions
from diffpo.train import train


def _grads(step: int, shape) -> torch.Tensor:
    """A steady descent direction with noise: Adam's steps are then about lr each."""
    return 1.0 + 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(step))


def test_master_weights_follow_float32_adamw_where_pure_bf16_loses_updates():
    # start from bf16-representable values so that all three optimizers start equal
    init = (1.0 + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16).float()
    lr = 1e-5  # a step of ~lr is below half a bf16 ulp (2^-8) of weights near 1

    fp32 = torch.nn.Parameter(init.clone())
    ref = torch.optim.AdamW([fp32], lr=lr, weight_decay=0.0)
    bf16 = torch.nn.Parameter(init.to(torch.bfloat16))
    master_opt = MasterWeightAdamW([bf16], lr=lr, weight_decay=0.0)
    pure = torch.nn.Parameter(init.to(torch.bfloat16))
    pure_opt = torch.optim.AdamW([pure], lr=lr, weight_decay=0.0)
    for step in range(200):
        g = _grads(step, init.shape)
        fp32.grad, bf16.grad, pure.grad = g.clone(), g.to(torch.bfloat16), g.to(torch.bfloat16)
        for opt in (ref, master_opt, pure_opt):
            opt.step()
            opt.zero_grad()

    master = master_opt.param_groups[0]["params"][0]
    moved = (fp32.detach() - init).abs()
    assert moved.mean() > 1e-3  # 200 steps of ~1e-5 moved the float32 weights
    # the masters track float32 AdamW up to bf16 rounding of the gradients
    torch.testing.assert_close(master, fp32.detach(), rtol=0, atol=2e-5)
    # the bf16 weights are the masters rounded
    assert torch.equal(bf16.detach(), master.to(torch.bfloat16))
    # pure bf16 AdamW dropped every update: the weights never left their initial bf16 values
    assert torch.equal(pure.detach(), init.to(torch.bfloat16))
    assert bf16.grad is None  # the low-precision gradient is freed once upcast


def test_master_weights_survive_state_dict_round_trip():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-5)
    for step in range(5):
        p.grad = _grads(step, p.shape).to(torch.bfloat16)
        opt.step()
    state = opt.state_dict()
    q = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    fresh = MasterWeightAdamW([q], lr=1e-5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.param_groups[0]["params"][0], opt.param_groups[0]["params"][0])
    assert not torch.equal(fresh.param_groups[0]["params"][0], torch.ones(8))  # float32 values, not bf16 ones
    assert torch.equal(q.detach(), p.detach())


def test_bf16_weights_require_bf16_mixed_precision():
    with pytest.raises(ConfigError, match="train.weight_dtype"):
        config_from_dict({"model": {"pretrained": "tiny:sd"}, "data": {"source": "x"}, "train": {"weight_dtype": "bf16"}})


def test_bf16_weight_training_resumes_exactly_and_saves_float32_masters(tmp_path, pair_dir, model_cache):
    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "max_steps": 4, "checkpoint_every": 2}
    full = tmp_path / "full"
    train(tiny_run_config(full, pair_dir, train=fast), cache_dir=model_cache)
    part = tmp_path / "part"
    train(tiny_run_config(part, pair_dir, train={**fast, "max_steps": 2}), cache_dir=model_cache)
    train(tiny_run_config(part, pair_dir, train={**fast, "resume": "latest"}), cache_dir=model_cache)
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)

    lora = load_file(full / "final" / "pytorch_lora_weights.safetensors")
    tensors = list(lora.values())
    assert all(t.dtype == torch.float32 for t in tensors)
    # float32 masters, not bf16-rounded values: some weight is not representable in bf16
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in tensors)


def test_regional_compile_marks_the_repeated_blocks():
    from diffpo.models import FAMILIES
    from diffpo.tiny import tiny_unet

    unet = tiny_unet(4, 16)
    compile_network(unet, "regional", FAMILIES["sd"].compile_blocks)
    names = compiled_regions(unet)
    assert any("resnets" in n for n in names) and any("attentions" in n for n in names)
    assert "" not in names  # the network itself stays eager


def test_fsdp_save_rebuilds_a_whole_float32_network_from_the_gathered_state():
    """FSDP cannot run on CPUs (accelerate runs it as DDP), so the save path is checked with the
    accelerator's two calls stood in: the gathered full state dict becomes a whole network."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffpo.tiny import tiny_unet
    from diffpo.train import _gather_sharded

    trained = tiny_unet(4, 16).to(torch.bfloat16)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True, get_state_dict=lambda net: state, unwrap_model=lambda net: net)
    whole = _gather_sharded(fake, trained)
    assert whole is not trained and all(p.dtype == torch.float32 for p in whole.parameters())
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(value, state[key].float())
    # other ranks take part in the gather but get nothing; without FSDP nothing is gathered
    assert _gather_sharded(SimpleNamespace(**{**vars(fake), "is_main_process": False}), trained) is None
    assert _gather_sharded(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), trained) is None


# ---------------------------------------------------------------------------------------------
# Issue 16: selective gradient checkpointing, the compile cache folder, one host sync per step
# ---------------------------------------------------------------------------------------------


def _unet_grads(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    cond = torch.randn(2, 8, 32, generator=g)
    unet.zero_grad(set_to_none=True)
    unet(x, t, cond).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_selective_checkpointing_flags_only_the_named_blocks_and_keeps_the_gradients():
    from diffpo.fastpath import set_gradient_checkpointing
    from diffpo.tiny import tiny_unet

    unet = tiny_unet(4, 16).train()
    reference = _unet_grads(unet)
    chosen = set_gradient_checkpointing(unet, ["down_blocks.0"])
    flags = {n: m.gradient_checkpointing for n, m in unet.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert len(chosen) > 1 and all(n.startswith("down_blocks.0") for n in chosen)  # the block and its transformer
    assert {n for n, on in flags.items() if on} == set(chosen)
    assert any(not on for n, on in flags.items() if n.startswith("up_blocks"))  # the other blocks keep their activations
    recomputed = _unet_grads(unet)
    for name, grad in reference.items():  # recomputation changes memory and time, not the gradients
        assert torch.allclose(recomputed[name], grad, rtol=1e-5, atol=1e-7), name
    assert len(set_gradient_checkpointing(unet, True)) == len(flags)
    with pytest.raises(ValueError, match="no module named 'up_blocks.9'"):
        set_gradient_checkpointing(unet, ["up_blocks.9"])


def test_gradient_checkpointing_config_takes_true_false_or_block_names():
    base = {"model": {"pretrained": "tiny:sd"}, "train": {"mixed_precision": "no"}}
    assert config_from_dict({**base, "model": {"pretrained": "tiny:sd", "gradient_checkpointing": ["down_blocks.1", "up_blocks.0"]}}).model.gradient_checkpointing == ["down_blocks.1", "up_blocks.0"]
    assert config_from_dict({**base, "model": {"pretrained": "tiny:sd", "gradient_checkpointing": True}}).model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        config_from_dict({**base, "model": {"pretrained": "tiny:sd", "gradient_checkpointing": 3}})


def test_compile_cache_dir_moves_inductor_and_triton_caches(tmp_path, monkeypatch):
    from diffpo.fastpath import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert use_compile_cache(None) is None and "TORCHINDUCTOR_CACHE_DIR" not in __import__("os").environ
    cache = use_compile_cache("~/compile")
    assert cache == (tmp_path / "compile").resolve() and cache.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")  # a folder the user chose is kept
    use_compile_cache(tmp_path / "other")
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "other").resolve())


def test_trainer_syncs_the_host_once_per_optimizer_step(tmp_path, pair_dir, model_cache, monkeypatch):
    """Gradient accumulation 2 over 3 steps: one read of losses, gradient norm and the previous
    update's weights check per optimizer step (not one per micro-step), and the weights are still
    checked before each save; the logged metrics stay those of the window."""
    from diffpo import train as train_module

    reads, checks = [], []
    host_rows, check_weights = train_module._host_rows, train_module.check_weights
    monkeypatch.setattr(train_module, "_host_rows", lambda acc, values: reads.append(len(values)) or host_rows(acc, values))
    monkeypatch.setattr(train_module, "check_weights", lambda acc, pending, out: checks.append(pending is not None) or check_weights(acc, pending, out))
    out = tmp_path / "sync"
    train(tiny_run_config(out, pair_dir, train={"max_steps": 3, "gradient_accumulation_steps": 2, "checkpoint_every": 2}), cache_dir=model_cache)
    assert reads == [2 + 2] * 3  # two micro-batch losses + gradient norm + weights check, once a step
    assert checks == [True, True, False]  # before checkpoint-2, before checkpoint-3 (the last step); at the end none is pending
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] is not None and m["grad_norm"] > 0 and m["step_seconds"] > 0 and m["data_seconds"] >= 0 for m in metrics)


def test_trainer_takes_the_next_batch_before_the_steps_host_sync(tmp_path, pair_dir, model_cache, monkeypatch):
    """The next micro-batch is taken from the loader while the device still runs the backward,
    before the step's one host sync (after it, the device would idle while the host fetches and
    copies the batch); with accumulation 2, each micro-step takes the next one after its backward."""
    from diffpo import train as train_module

    events = []
    host_rows, micro_batches = train_module._host_rows, train_module.micro_batches

    def logged_batches(*args):
        for batch in micro_batches(*args):
            events.append("batch")
            yield batch

    monkeypatch.setattr(train_module, "_host_rows", lambda acc, values: events.append("sync") or host_rows(acc, values))
    monkeypatch.setattr(train_module, "micro_batches", logged_batches)
    out = tmp_path / "prefetch"
    train(tiny_run_config(out, pair_dir, train={"max_steps": 2, "gradient_accumulation_steps": 2}), cache_dir=model_cache)
    assert events == ["batch", "batch", "batch", "sync", "batch", "batch", "sync"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Issue 16: 8-bit AdamW moments over the float32 masters (bitsandbytes is a test dependency)
# ---------------------------------------------------------------------------------------------


def _bf16_mlp(seed: int) -> torch.nn.Module:
    """8192-element weights, whose moments bitsandbytes quantizes (it keeps 32-bit moments for
    tensors under min_8bit_size = 4096 elements: here the biases)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(torch.bfloat16)


def _set_grads(params, step: int, reference=None) -> None:
    """Step ``step``'s gradients on ``params``; the same gradients, upcast, on ``reference`` (the
    float32 parameters a bitsandbytes optimizer steps for comparison)."""
    for index, param in enumerate(params):
        param.grad = _grads(100 * step + index, param.shape).to(param.device, param.dtype)
    for param, ref in zip(params, reference or ()):
        ref.grad = param.grad.float()


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage counted once (bitsandbytes shares its
    quantization maps between parameters)."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def test_8bit_master_weights_step_as_bitsandbytes_steps_float32_weights():
    import bitsandbytes as bnb

    from diffpo.fastpath import MasterWeightAdamW8bit, find_master_optimizer

    network = _bf16_mlp(0)
    params = list(network.parameters())
    initial = [p.detach().float().clone() for p in params]
    reference = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = MasterWeightAdamW8bit(params, lr=1e-3)
    reference_optimizer = bnb.optim.AdamW8bit(reference, lr=1e-3)
    for step in range(3):
        _set_grads(params, step, reference)
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()

    for master, ref, param, start in zip(optimizer.masters, reference, params, initial):
        assert master.dtype == torch.float32 and not torch.equal(master, start)  # it trained
        assert torch.equal(master, ref.detach())  # bit for bit bitsandbytes' float32 step
        assert torch.equal(param.detach(), master.to(torch.bfloat16))  # the weights are the masters rounded
        assert param.grad is None
    # the masters live in two flat buckets, one per kind of moments: the weights' (8-bit), the biases' (too small to quantize)
    buckets = optimizer.param_groups[0]["params"]
    moments = sorted((b.numel(), optimizer.state[b]["state1"].dtype, optimizer.state[b]["state2"].dtype) for b in buckets)
    assert moments == [(2 * 256, torch.float32, torch.float32), (2 * 8192, torch.uint8, torch.uint8)]  # each starts on a 256-block
    assert find_master_optimizer(optimizer) is optimizer

    float32_moments = MasterWeightAdamW([p for p in _bf16_mlp(0).parameters()], lr=1e-3)
    _set_grads(float32_moments.model_params, 0)
    float32_moments.step()
    assert _state_bytes(optimizer) < 0.30 * _state_bytes(float32_moments)


def test_8bit_master_weights_resume_bit_identically_from_a_saved_state():
    import io

    from diffpo.fastpath import MasterWeightAdamW8bit

    network = _bf16_mlp(0)
    optimizer = MasterWeightAdamW8bit(network.parameters(), lr=1e-3)
    for step in range(3):
        _set_grads(optimizer.model_params, step)
        optimizer.step()
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)  # as accelerate's save_state / load_state
    saved.seek(0)
    other = _bf16_mlp(1)
    resumed = MasterWeightAdamW8bit(other.parameters(), lr=1e-3)
    resumed.load_state_dict(torch.load(saved, weights_only=True))

    masters, restored = optimizer.masters, resumed.masters
    for master, again in zip(masters, restored):
        assert torch.equal(again, master)
    # float32 values, not their bf16 rounding
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in restored)
    for step in range(3, 5):
        for opt in (optimizer, resumed):
            _set_grads(opt.model_params, step)
            opt.step()
    for master, again in zip(masters, restored):
        assert torch.equal(again, master)
    for bucket, again in zip(optimizer.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        for key in ("state1", "state2"):
            assert torch.equal(resumed.state[again][key], optimizer.state[bucket][key])
    for a, b in zip(network.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_8bit_adam_with_bf16_weights_builds_the_8bit_master_optimizer(monkeypatch):
    import sys

    from diffpo.fastpath import MasterWeightAdamW8bit
    from diffpo.train import TrainingError, build_optimizer

    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "use_8bit_adam": True}
    cfg = config_from_dict({"model": {"pretrained": "tiny:sd"}, "data": {"source": "x"}, "train": fast})
    assert cfg.train.use_8bit_adam and cfg.train.weight_dtype == "bf16"  # no longer refused
    optimizer = build_optimizer(_bf16_mlp(0).parameters(), cfg)
    assert type(optimizer) is MasterWeightAdamW8bit
    assert optimizer.param_groups[0]["lr"] == cfg.train.learning_rate and optimizer.param_groups[0]["betas"] == (cfg.train.adam_beta1, cfg.train.adam_beta2)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(TrainingError, match="needs bitsandbytes"):
        build_optimizer(_bf16_mlp(0).parameters(), cfg)


def test_8bit_master_weight_training_resumes_exactly(tmp_path, pair_dir, model_cache):
    """Full fine-tuning of the tiny UNet (LoRA adapters are too small to quantize). Steps 2 and 3
    run after the resume: step 3's loss and the saved weights depend on the restored masters and
    8-bit moments."""
    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "use_8bit_adam": True, "max_steps": 3, "checkpoint_every": 1}
    model = {"lora": {"enabled": False}}
    full = tmp_path / "full"
    train(tiny_run_config(full, pair_dir, model=model, train=fast), cache_dir=model_cache)
    part = tmp_path / "part"
    train(tiny_run_config(part, pair_dir, model=model, train={**fast, "max_steps": 1}), cache_dir=model_cache)
    train(tiny_run_config(part, pair_dir, model=model, train={**fast, "resume": "latest"}), cache_dir=model_cache)
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    weights = [load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors") for run in (full, part)]
    assert all(torch.equal(weights[0][key], value) for key, value in weights[1].items())
    # the saved weights are the float32 masters, not their bf16 rounding
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights[0].values())

    state = torch.load(full / "checkpoint-1" / "optimizer.bin", weights_only=True)
    quantized = [s["__bnb_optimizer_quant_state__"]["state1"].dtype for s in state["state"].values()]
    assert torch.uint8 in quantized  # the checkpoint holds 8-bit moments
    assert all(m.dtype == torch.float32 for m in state["master_weights"])  # and the float32 masters


@pytest.mark.parametrize("weight_dtype", ["bf16", "float32"])
def test_8bit_adam_skips_bitsandbytes_per_parameter_waits(weight_dtype, monkeypatch):
    # bitsandbytes' own step synchronizes the GPU after every parameter (~1700 waits per SDXL step,
    # +270 ms on an H200); diffpo's 8-bit optimizers (over float32 masters, or plain for the recipe
    # configs) run the same updates without the waits and fall back to bitsandbytes' step where the
    # shortcut is not known to be safe (paged states).
    import bitsandbytes as bnb

    from diffpo.config import config_from_dict
    from diffpo.train import build_optimizer

    cfg = config_from_dict({"train": {"use_8bit_adam": True, "weight_dtype": weight_dtype, "mixed_precision": "bf16", "learning_rate": 1e-3}})
    network = _bf16_mlp(1).to(torch.bfloat16 if weight_dtype == "bf16" else torch.float32)
    params = list(network.parameters())
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    optimizer = build_optimizer(params, cfg)
    reference_optimizer = bnb.optim.AdamW8bit(reference, lr=1e-3)
    waits = []
    monkeypatch.setattr(bnb.optim.optimizer, "sync_gpu", lambda tensor: waits.append(tensor.shape))
    for step in range(2):
        _set_grads(params, step, reference)
        optimizer.step()
        optimizer.zero_grad()
        assert waits == []
        reference_optimizer.step()  # bitsandbytes' own step: the same numbers, a wait per parameter
        assert len(waits) >= len(params)
        waits.clear()
    for param, ref in zip(params, reference):
        assert torch.equal(param.detach(), ref.detach().to(param.dtype))
    optimizer.is_paged = True
    waits.clear()
    _set_grads(params, 2)
    optimizer.step()
    assert len(waits) >= len(optimizer.param_groups[0]["params"])  # bf16: one per flat bucket of masters


def test_8bit_masters_step_each_bucket_once_and_match_bitsandbytes_across_bucket_boundaries(monkeypatch):
    """The flat buckets' point: one bitsandbytes update call per bucket, not per parameter (host
    overhead ~1700 times per SDXL step). With a bucket cap that splits the parameters over several
    buckets, each parameter still steps bit for bit as bitsandbytes steps it alone; a parameter
    without a gradient steps with a zero one (DeepSpeed's flat-optimizer rule)."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    from diffpo.fastpath import MasterWeightAdamW8bit

    torch.manual_seed(3)
    shapes = [(70, 300), (5000,), (33,), (4096,), (64, 65), (7,)]  # odd sizes: gaps before the next 256-block
    params = [torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16)) for shape in shapes]
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    optimizer = type("SmallBuckets", (MasterWeightAdamW8bit,), {"bucket_elements": 25_000})(params, lr=1e-2)
    reference_optimizer = bnb.optim.AdamW8bit(reference, lr=1e-2)
    kinds = [(bucket.kind, [shapes[i] for i in bucket.members]) for bucket in optimizer._buckets]
    assert kinds == [("8bit", [(70, 300)]), ("8bit", [(5000,), (4096,), (64, 65)]), ("32bit", [(33,), (7,)])]
    calls = []
    for name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    for step in range(3):
        _set_grads(params, step)
        params[4].grad = None if step == 1 else params[4].grad  # no gradient at step 1: a zero one
        for param, ref in zip(params, reference):
            ref.grad = param.grad.float() if param.grad is not None else torch.zeros_like(ref)
        calls.clear()
        optimizer.step()
        assert calls == ["optimizer_update_8bit_blockwise", "optimizer_update_8bit_blockwise", "optimizer_update_32bit"]
        calls.clear()
        reference_optimizer.step()
        assert len(calls) == len(params)
    for master, ref, param in zip(optimizer.masters, reference, params):
        assert torch.equal(master, ref.detach())
        assert torch.equal(param.detach(), master.to(torch.bfloat16))


def test_cudnn_benchmark_follows_the_run_config_both_ways(tmp_path, monkeypatch):
    """Process-wide: an earlier run's setting must not leak into the next run of the same process."""
    from diffpo.train import setup_accelerator

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after the test
    for setting in (True, False):
        cfg = config_from_dict({"output_dir": str(tmp_path), "model": {"pretrained": "tiny:sd"}, "data": {"source": "x"}, "train": {"cudnn_benchmark": setting}})
        setup_accelerator(cfg)
        assert torch.backends.cudnn.benchmark is setting
    fast = load_config(Path(__file__).resolve().parents[1] / "configs" / "sdxl_mapo_fast.yaml")
    assert fast.train.cudnn_benchmark  # the harness times its cases with it on: the trainer's fast config too


def test_8bit_moments_for_the_largest_tensors_only(monkeypatch):
    """train.adam_8bit_min_size: tensors under it keep float32 moments (bitsandbytes' min_8bit_size).
    Raised above the small weights, only the largest are quantized: the masters still step bit for
    bit as bitsandbytes steps each tensor with the same setting, and the state lies between the
    all-8-bit and the all-32-bit sizes. Changing it changes the state's layout: a resume refuses it."""
    import bitsandbytes as bnb

    from diffpo.runs import identity_changes, run_identity
    from diffpo.train import build_optimizer

    shapes = [(256, 256), (64, 128), (128, 64), (300,), (64, 64)]
    torch.manual_seed(4)
    initial = [torch.randn(shape).to(torch.bfloat16) for shape in shapes]
    optimizers, states = {}, {}
    for min_size in (4096, 20_000):
        cfg = config_from_dict({"train": {"use_8bit_adam": True, "weight_dtype": "bf16", "mixed_precision": "bf16", "learning_rate": 1e-2, "adam_8bit_min_size": min_size}})
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        reference = [torch.nn.Parameter(t.float()) for t in initial]
        optimizer = build_optimizer(params, cfg)
        reference_optimizer = bnb.optim.AdamW8bit(reference, lr=1e-2, weight_decay=cfg.train.adam_weight_decay, min_8bit_size=min_size)
        for step in range(3):
            _set_grads(params, step, reference)
            optimizer.step()
            reference_optimizer.step()
        assert all(torch.equal(m, r.detach()) for m, r in zip(optimizer.masters, reference))
        optimizers[min_size], states[min_size] = optimizer, _state_bytes(optimizer)
    kinds = [(bucket.kind, [shapes[i] for i in bucket.members]) for bucket in optimizers[20_000]._buckets]
    assert kinds == [("8bit", [(256, 256)]), ("32bit", [(64, 128), (128, 64), (300,), (64, 64)])]
    float32_moments = MasterWeightAdamW([torch.nn.Parameter(t.clone()) for t in initial], lr=1e-2)
    _set_grads(float32_moments.model_params, 0)
    float32_moments.step()
    assert states[4096] < states[20_000] < _state_bytes(float32_moments)

    def identity(min_size):
        cfg = config_from_dict({"model": {"pretrained": "tiny:sd"}, "data": {"source": "x"}, "train": {"use_8bit_adam": True, "adam_8bit_min_size": min_size}})
        return run_identity(cfg, 1, "fingerprint")

    assert identity(4096)["train.adam_8bit_min_size"] is None  # bitsandbytes' default: as checkpoints from before the key
    assert identity_changes(identity(4096), identity(20_000)) == ["train.adam_8bit_min_size"]
    with pytest.raises(ConfigError, match="adam_8bit_min_size"):
        config_from_dict({"train": {"adam_8bit_min_size": 0}})


def test_8bit_masters_apply_a_gradient_scale_inside_the_update_for_one_step():
    """Clipping folded into the update (``set_gradient_scale``: bitsandbytes' kernels multiply each
    gradient by the scale as they read it): bit for bit bitsandbytes stepping the float32 gradients
    multiplied by the scale first, for the 8-bit and the 32-bit (small tensors) buckets alike; the
    scale holds for the next step only. Optimizers that cannot scale inside refuse it."""
    import bitsandbytes as bnb

    from diffpo.fastpath import MasterWeightAdamW8bit

    params = list(_bf16_mlp(0).parameters())
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    optimizer = MasterWeightAdamW8bit(params, lr=1e-3)
    reference_optimizer = bnb.optim.AdamW8bit(reference, lr=1e-3)
    for step, scale in enumerate([0.3, 1.0, 0.7]):  # not powers of two: the product rounds
        _set_grads(params, step, reference)
        for ref in reference:
            ref.grad.mul_(scale)  # what clip_grad_norm_ does to float32 gradients
        if scale != 1.0:
            optimizer.set_gradient_scale(scale)
        optimizer.step()
        reference_optimizer.step()
        assert optimizer._gradient_scale == 1.0  # spent
    for master, ref in zip(optimizer.masters, reference):
        assert torch.equal(master, ref.detach())
    unscaled = MasterWeightAdamW8bit(list(_bf16_mlp(0).parameters()), lr=1e-3)
    _set_grads(unscaled.model_params, 0)
    unscaled.step()
    assert not all(torch.equal(a, b) for a, b in zip(unscaled.masters, [p.detach().float() for p in _bf16_mlp(0).parameters()]))
    with pytest.raises(NotImplementedError, match="cannot scale"):
        MasterWeightAdamW(list(_bf16_mlp(0).parameters()), lr=1e-3).set_gradient_scale(0.5)


@pytest.mark.parametrize("eight_bit", [True, False])
def test_prepare_step_takes_the_gradients_early_with_the_same_update(eight_bit):
    """``prepare_step`` (the trainer calls it before its host sync) takes the gradients into the
    masters and frees the model's; the step that follows is bit for bit the plain step; a second
    call changes nothing; ``zero_grad`` in between discards them (a skipped window)."""
    from diffpo.fastpath import MasterWeightAdamW8bit

    cls = MasterWeightAdamW8bit if eight_bit else MasterWeightAdamW
    early, plain = (cls(list(_bf16_mlp(0).parameters()), lr=1e-3) for _ in range(2))
    for step in range(3):
        _set_grads(early.model_params, step)
        _set_grads(plain.model_params, step)
        early.prepare_step()
        assert all(p.grad is None for p in early.model_params)
        taken = [m.grad.clone() for m in early.param_groups[0]["params"]]
        early.prepare_step()  # nothing more: the model's gradients are gone, the taken ones stay
        assert all(torch.equal(a, m.grad) for a, m in zip(taken, early.param_groups[0]["params"]))
        early.step()
        plain.step()
        early.zero_grad()
        plain.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(early.masters, plain.masters))
    _set_grads(early.model_params, 7)
    early.prepare_step()
    early.zero_grad()  # the window is skipped: its gradients must not reach the next step
    assert all(m.grad is None for m in early.param_groups[0]["params"])
    _set_grads(early.model_params, 3)
    _set_grads(plain.model_params, 3)
    early.step()
    plain.step()
    assert all(torch.equal(a, b) for a, b in zip(early.masters, plain.masters))


def test_trainer_clips_inside_the_8bit_update_after_taking_the_gradients_before_its_sync(tmp_path, pair_dir, model_cache, monkeypatch):
    """With 8-bit masters the trainer takes the gradients into the masters before its host sync
    (the host-bound upcast then overlaps the backward) and clips inside the update with torch's
    coefficient max_norm / (norm + 1e-6) of the logged norm. Against the same runs with torch's
    clip_grad_norm_ (the bf16 gradients rescaled, then taken after the sync): bit for bit equal
    where clipping is inactive; where it is active the first norms agree exactly and the losses
    to 1% (the bf16 rounding of the rescaled gradients differs, and 8-bit moments amplify it)."""
    from diffpo import train as train_module
    from diffpo.fastpath import MasterWeightAdamW8bit, find_master_optimizer

    fast = {"mixed_precision": "bf16", "weight_dtype": "bf16", "use_8bit_adam": True, "max_steps": 3, "checkpoint_every": 3, "learning_rate": 1e-3}
    model = {"lora": {"enabled": False}}
    at_sync, scales = [], []
    host_rows, end_window, set_scale = train_module._host_rows, train_module.end_window, MasterWeightAdamW8bit.set_gradient_scale

    def watched_end_window(accelerator, optim, *args):
        master = find_master_optimizer(optim.optimizer)
        monkeypatch.setattr(train_module, "_host_rows", lambda acc, values: at_sync.append((master._gradients_taken, all(p.grad is None for p in optim.params))) or host_rows(acc, values))
        return end_window(accelerator, optim, *args)

    monkeypatch.setattr(train_module, "end_window", watched_end_window)
    monkeypatch.setattr(MasterWeightAdamW8bit, "set_gradient_scale", lambda self, scale: scales.append(scale) or set_scale(self, scale))
    runs = {}
    for max_norm in (1e6, 0.05):
        runs["inside", max_norm] = tmp_path / f"inside_{max_norm}"
        train(tiny_run_config(runs["inside", max_norm], pair_dir, model=model, train={**fast, "max_grad_norm": max_norm}), cache_dir=model_cache)
    assert at_sync == [(True, True)] * 6  # taken before every sync
    norms = [m["grad_norm"] for m in read_metrics(runs["inside", 0.05])]
    assert all(n > 5 * 0.05 for n in norms)  # clipping was active in the second run
    assert scales == [1.0] * 3 + [pytest.approx(0.05 / (n + 1e-6), rel=1e-6) for n in norms]
    monkeypatch.setattr(train_module, "end_window", end_window)
    monkeypatch.setattr(MasterWeightAdamW8bit, "scales_gradients", False)  # torch's clip_grad_norm_ instead
    for max_norm in (1e6, 0.05):
        runs["outside", max_norm] = tmp_path / f"outside_{max_norm}"
        train(tiny_run_config(runs["outside", max_norm], pair_dir, model=model, train={**fast, "max_grad_norm": max_norm}), cache_dir=model_cache)
    assert len(scales) == 6  # the outside runs never scale inside
    weights = {key: load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors") for key, run in runs.items()}
    assert all(torch.equal(value, weights["outside", 1e6][key]) for key, value in weights["inside", 1e6].items())
    assert read_metrics(runs["inside", 1e6]) == [{**m, "step_seconds": n["step_seconds"], "data_seconds": n["data_seconds"]} for m, n in zip(read_metrics(runs["outside", 1e6]), read_metrics(runs["inside", 1e6]))]
    a, b = read_metrics(runs["inside", 0.05]), read_metrics(runs["outside", 0.05])
    assert a[0]["grad_norm"] == b[0]["grad_norm"] and a[0]["loss"] == b[0]["loss"]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-2 * y["loss"] for x, y in zip(a, b))
    assert not any(torch.equal(value, weights["inside", 1e6][key]) for key, value in weights["inside", 0.05].items() if value.numel() > 64)  # clipping changed the run


def test_gradient_norm_is_clip_grad_norms_also_without_get_total_norm(monkeypatch):
    """The trainer's norm for clipping inside the update equals the one torch's clip_grad_norm_
    reports, with torch.nn.utils.get_total_norm (torch >= 2.6) and with the fallback for older torch."""
    from diffpo.fastpath import _bitsandbytes_takes_gnorm_scale
    from diffpo.train import _gradient_norm

    params = list(_bf16_mlp(0).parameters())
    _set_grads(params, 5)
    params[1].grad = None  # a parameter without a gradient is left out, as clip_grad_norm_ leaves it
    expected = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    assert torch.equal(_gradient_norm(params), expected)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    assert torch.equal(_gradient_norm(params), expected)
    assert _gradient_norm([torch.nn.Parameter(torch.ones(2))]).item() == 0.0
    assert _bitsandbytes_takes_gnorm_scale()  # the installed bitsandbytes: the trainer clips inside its update


def test_triton_8bit_kernel_option_is_checked_before_training(monkeypatch):
    """``train.adam_8bit_kernel=triton``: only over bf16 masters with 8-bit AdamW (a config error
    otherwise), only on CUDA, and a clear error where Triton or bitsandbytes' Triton kernels are missing."""
    import sys

    from diffpo.train import TrainingError, build_optimizer

    with pytest.raises(ConfigError, match="adam_8bit_kernel.*use_8bit_adam=true and train.weight_dtype=bf16"):
        config_from_dict({"train": {"adam_8bit_kernel": "triton", "use_8bit_adam": True}})
    with pytest.raises(ConfigError, match="adam_8bit_kernel"):
        config_from_dict({"train": {"adam_8bit_kernel": "cuda"}})
    cfg = config_from_dict({"train": {"adam_8bit_kernel": "triton", "use_8bit_adam": True, "weight_dtype": "bf16", "mixed_precision": "bf16"}})
    params = list(_bf16_mlp(0).parameters())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TrainingError, match="runs on CUDA GPUs"):
        build_optimizer(params, cfg, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter: past the device check
    for name in ("triton", "bitsandbytes.backends.triton", "bitsandbytes.backends.triton.kernels_optim"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    with pytest.raises(TrainingError, match="needs Triton"):
        build_optimizer(params, cfg, "cpu")


def test_triton_8bit_kernel_updates_the_8bit_buckets_in_the_same_state_layout(monkeypatch):
    """Where Triton runs (a CUDA GPU, or its CPU interpreter: TRITON_INTERPRET=1 with Triton
    installed; CI has neither): the 8-bit buckets go through bitsandbytes' Triton kernel, the 32-bit
    ones through bitsandbytes as before; its update lands about as close to float32 AdamW as
    bitsandbytes' own; the state is the same layout (each optimizer loads the other's and goes on);
    clipping stays outside (its kernel compiles the scale in)."""
    import io
    import os

    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    from benchmarks.optimizer_step import error_vs_adamw

    from diffpo.fastpath import MasterWeightAdamW8bit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    triton_kind = lambda params, **kw: MasterWeightAdamW8bit(params, kernel="triton", **kw)  # noqa: E731
    optimizer = triton_kind([p.to(device) for p in _bf16_mlp(0).parameters()], lr=1e-3)
    real = optimizer._triton_update
    optimizer._triton_update = lambda **kw: calls.append(kw["p"].numel()) or real(**kw)
    _set_grads(optimizer.model_params, 0)
    optimizer.step()
    assert calls == [2 * 8192] and not optimizer.scales_gradients  # the one 8-bit bucket; biases: 32-bit, bitsandbytes
    torch.manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(shape, device=device)).to(torch.bfloat16)) for shape in [(64, 128), (300, 40), (5000,)]]
    grads = [(1e-3 * torch.randn(p.shape, device=device)).to(torch.bfloat16) for p in params]
    errors = error_vs_adamw(params, grads, {"bitsandbytes": MasterWeightAdamW8bit, "triton": triton_kind})
    assert errors["triton"]["max_lr"] < 1.5 * errors["bitsandbytes"]["max_lr"] and errors["triton"]["mean_lr"] < 1.5 * errors["bitsandbytes"]["mean_lr"]
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    other = MasterWeightAdamW8bit([p.to(device) for p in _bf16_mlp(1).parameters()], lr=1e-3)
    other.load_state_dict(torch.load(saved, weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(other.masters, optimizer.masters))
    for mine, theirs in zip(optimizer.param_groups[0]["params"], other.param_groups[0]["params"]):
        assert optimizer.state[mine].keys() == other.state[theirs].keys()
        for key in set(optimizer.state[mine]) & {"state1", "state2", "absmax1", "absmax2", "step"}:
            a, b = optimizer.state[mine][key], other.state[theirs][key]
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), key  # the moments carried over as they are
    _set_grads(other.model_params, 1)
    _set_grads(optimizer.model_params, 1)
    other.step()
    optimizer.step()
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(other.masters, optimizer.masters))  # 0.01 lr: only the codes' rounding differs


# ---------------------------------------------------------------------------------------------
# Issue 16: train.compile_options, inductor options for every compiled graph


def test_compile_options_reach_every_compiled_block_and_the_whole_network(monkeypatch):
    from diffpo.models import FAMILIES
    from diffpo.tiny import tiny_unet

    calls = []
    real_compile = torch.compile

    def recording_compile(fn, *args, **kwargs):
        calls.append(kwargs.get("options"))
        dynamics.append(kwargs.get("dynamic", "unset"))
        return real_compile(fn, *args, **kwargs)  # the real one: it checks the options too

    dynamics = []

    monkeypatch.setattr(torch, "compile", recording_compile)
    options = {"max_pointwise_cat_inputs": 1}
    unet = tiny_unet(4, 16)
    compile_network(unet, "regional", FAMILIES["sd"].compile_blocks, options)
    assert len(calls) == len(compiled_regions(unet)) > 4 and all(c == options for c in calls)
    calls.clear()
    compile_network(tiny_unet(4, 16), "regional", FAMILIES["sd"].compile_blocks)
    assert calls and all(c is None for c in calls)  # no options: PyTorch's defaults
    calls.clear()
    compile_network(tiny_unet(4, 16), "full", options=options)
    assert calls == [options]
    assert set(dynamics) == {"unset"}  # train.compile_dynamic null: torch.compile's own default
    dynamics.clear()
    compile_network(tiny_unet(4, 16), "regional", FAMILIES["sd"].compile_blocks, dynamic=False)
    assert dynamics and set(dynamics) == {False}


def test_compile_options_are_checked_at_setup_with_the_key_named():
    from diffpo.config import config_from_dict, load_config, parse_overrides
    from diffpo.fastpath import inductor_options
    from diffpo.tiny import tiny_unet

    with pytest.raises(ValueError, match="'max_pointwise_cat_input' is not an inductor option"):
        compile_network(tiny_unet(4, 16), "regional", ("ResnetBlock2D",), {"max_pointwise_cat_input": 1})
    with pytest.raises(ValueError, match=r"train.compile_options.max_pointwise_cat_inputs: must be int like its default 8, got 'one'"):
        compile_network(tiny_unet(4, 16), "regional", ("ResnetBlock2D",), {"max_pointwise_cat_inputs": "one"})
    # as torch.compile takes them: a whole number for a float option (YAML's 50), null for an optional
    # one, nested mappings as dotted names; torch.compile itself accepts the result
    options = inductor_options({"cpu_gpu_bw": 50, "compile_threads": None, "triton": {"cudagraphs": False}})
    assert options == {"cpu_gpu_bw": 50.0, "compile_threads": None, "triton.cudagraphs": False} and type(options["cpu_gpu_bw"]) is float
    torch.compile(torch.nn.Linear(2, 2), options=options)
    # as a command-line override, the option's own dotted key
    tree = parse_overrides(["train.compile=regional", "train.compile_options.max_pointwise_cat_inputs=1", "train.compile_dynamic=false"])
    cfg = config_from_dict({"data": {"source": "x"}, **tree})
    assert (cfg.train.compile_options, cfg.train.compile_dynamic) == ({"max_pointwise_cat_inputs": 1}, False)
    # compile: none ignores them: the fast config still runs uncompiled (the CPU benchmark turns it off)
    fast = load_config(Path(__file__).resolve().parents[1] / "configs" / "sdxl_mapo_fast.yaml", ["train.compile=none"])
    assert fast.train.compile == "none" and fast.train.compile_dynamic is False


def test_trainer_compiles_with_train_compile_options(tmp_path, pair_dir, model_cache, monkeypatch):
    """The trainer hands train.compile_options and compile_dynamic to every compilation (recorded, not compiled: the
    compiled run itself is the GPU benchmark's), and an unknown option stops it at setup with its name."""
    import diffpo.train as train_module
    from diffpo.train import TrainingError

    seen = []
    monkeypatch.setattr(train_module, "compile_network", lambda network, mode, blocks, options=None, dynamic=None: seen.append((mode, options, dynamic)) or network)
    options = {"max_pointwise_cat_inputs": 1}
    settings = {"compile": "regional", "compile_options": options, "compile_dynamic": False, "max_steps": 1}
    result = train(tiny_run_config(tmp_path / "a", pair_dir, train=settings), cache_dir=model_cache)
    assert result.steps == 1 and seen == [("regional", options, False)]
    monkeypatch.undo()
    with pytest.raises(TrainingError, match="'no_such_option' is not an inductor option"):
        train(tiny_run_config(tmp_path / "b", pair_dir, train={"compile": "regional", "compile_options": {"no_such_option": 1}, "max_steps": 1}), cache_dir=model_cache)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # stopped before the first step
