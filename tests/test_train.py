"""The trainer end to end on a tiny in-process SD model: every objective, LoRA and full fine-tuning,
checkpoints, exact resume, non-finite handling and the diffusers round trip of the result."""

from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_run_config as make_cfg, write_shape_pairs

from diffpo import losses as losses_module
from diffpo.checkpoint import CheckpointError, list_checkpoints
from diffpo.runs import RunFolderError
from diffpo.train import TrainingError, train


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The network state of a checkpoint folder, or the LoRA of a final/ folder."""
    from safetensors.torch import load_file

    file = path / "model.safetensors" if (path / "model.safetensors").is_file() else path / "pytorch_lora_weights.safetensors"
    return load_file(file)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):  # 8 pairs here (conftest's default is 4)
    return write_shape_pairs(tmp_path_factory.mktemp("pairs"), 8)


def lora_and_base_params(out_dir, cache):
    from diffpo.models import load_components
    from diffpo.config import ModelConfig

    return load_components(ModelConfig(pretrained="tiny:sd"), cache_dir=cache)


@pytest.mark.parametrize("loss", ["sft", "diffusion_dpo", "mapo", "dmpo"])
def test_each_objective_trains_with_lora_and_round_trips(loss, tmp_path, pair_dir, model_cache):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / loss
    result = train(make_cfg(out, pair_dir, loss={"name": loss}), cache_dir=model_cache)
    assert result.steps == 2 and result.skipped_steps == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "lr", "err_w", "err_l", "margin", "implicit_accuracy"} <= set(m)
        assert torch.isfinite(torch.tensor(m["loss"]))
        assert ("ref_w" in m) == losses_module.LOSSES[loss].needs_reference
    if loss == "diffusion_dpo":
        assert metrics[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # model == reference at step 1
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()

    # The LoRA loads into the diffusers pipeline and changes its output.
    base_dir = model_cache / "sd"
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out / "final")
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-4


def test_lora_changes_only_adapters(tmp_path, pair_dir, model_cache):
    from safetensors.torch import load_file
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    train(make_cfg(out, pair_dir, loss={"name": "diffusion_dpo"}), cache_dir=model_cache)
    base = UNet2DConditionModel.from_pretrained(model_cache / "sd", subfolder="unet")
    state = load_file(out / "checkpoint-2" / "model.safetensors")
    lora_keys = [k for k in state if "lora" in k]
    base_keys = [k for k in state if "lora" not in k]
    assert lora_keys and base_keys
    base_state = base.state_dict()
    for key in base_keys:  # frozen base weights are bit-identical after training
        name = key.replace(".base_layer", "")
        torch.testing.assert_close(state[key], base_state[name], rtol=0, atol=0)


def test_full_finetune_changes_network_not_reference_or_frozen_parts(tmp_path, pair_dir, model_cache, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffpo import models

    seen = {}
    original = models.Reference.__init__

    def spy(self, network, use_lora):
        original(self, network, use_lora)
        seen["ref"] = self

    monkeypatch.setattr(models.Reference, "__init__", spy)
    out = tmp_path / "full"
    cfg = make_cfg(out, pair_dir, loss={"name": "diffusion_dpo"}, model={"lora": {"enabled": False}}, train={"learning_rate": 1e-3})
    train(cfg, cache_dir=model_cache)
    base_unet = UNet2DConditionModel.from_pretrained(model_cache / "sd", subfolder="unet")
    tuned = StableDiffusionPipeline.from_pretrained(out / "final", safety_checker=None, requires_safety_checker=False)
    base = StableDiffusionPipeline.from_pretrained(model_cache / "sd", safety_checker=None, requires_safety_checker=False)
    changed = [n for n, p in tuned.unet.named_parameters() if not torch.equal(p, base_unet.state_dict()[n])]
    assert len(changed) > 0.5 * len(list(base_unet.parameters()))
    # the frozen reference copy still equals the base network
    for n, p in seen["ref"].frozen.named_parameters():
        torch.testing.assert_close(p.float(), base_unet.state_dict()[n], rtol=0, atol=0)
    # text encoder and VAE untouched
    for a, b in zip(tuned.text_encoder.parameters(), base.text_encoder.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(tuned.vae.parameters(), base.vae.parameters()):
        assert torch.equal(a, b)


def test_resume_repeats_the_uninterrupted_run(tmp_path, pair_dir, model_cache):
    common = dict(loss={"name": "dmpo"}, train={"max_steps": 5, "checkpoint_every": 2, "gradient_accumulation_steps": 2, "lr_warmup_steps": 2})
    full = tmp_path / "full"
    train(make_cfg(full, pair_dir, **common), cache_dir=model_cache)

    part = tmp_path / "part"
    first = make_cfg(part, pair_dir, **{**common, "train": {**common["train"], "max_steps": 3}})
    train(first, cache_dir=model_cache)  # checkpoints at 2 and 3
    # Throw away the step-3 checkpoint so the resume starts mid-epoch, from step 2.
    import shutil

    shutil.rmtree(part / "checkpoint-3")
    resumed = make_cfg(part, pair_dir, **{**common, "train": {**common["train"], "resume": "latest"}})
    train(resumed, cache_dir=model_cache)
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for ma, mb in zip(a, b):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6, abs=1e-9), (ma, mb)
        assert ma["lr"] == pytest.approx(mb["lr"])
    # not only the losses: the weights (and the optimizer state inside the checkpoint) are equal
    assert_same_weights(weights(part / "final"), weights(full / "final"))
    assert_same_weights(weights(part / "checkpoint-5"), weights(full / "checkpoint-5"))
    assert (part / "checkpoint-5" / "optimizer.bin").read_bytes() == (full / "checkpoint-5" / "optimizer.bin").read_bytes()


def test_nonfinite_losses_skip_then_stop_with_checkpoint_intact(tmp_path, pair_dir, model_cache, monkeypatch):
    out = tmp_path / "nan"
    train(make_cfg(out, pair_dir, train={"max_steps": 2, "checkpoint_every": 2}), cache_dir=model_cache)
    ckpt = out / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    spec = losses_module.LOSSES["mapo"]
    nan_spec = type(spec)(spec.name, lambda err_w, err_l, **hp: err_w * float("nan"), spec.needs_reference, spec.hparams)
    monkeypatch.setitem(losses_module.LOSSES, "mapo", nan_spec)
    cfg = make_cfg(out, pair_dir, train={"max_steps": 10, "checkpoint_every": 2, "resume": "latest", "max_nonfinite_in_row": 2})
    with pytest.raises(TrainingError, match="2 optimizer steps in a row had a non-finite loss or gradients.*the last complete \\(finite\\) checkpoint is .*checkpoint-2"):
        train(cfg, cache_dir=model_cache)
    metrics = read_metrics(out)
    assert [m["skipped"] for m in metrics] == [False, False, True, True]
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # the checkpoint is intact: every byte
    assert all(torch.isfinite(t).all() for t in weights(ckpt).values())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


def test_failed_save_leaves_previous_checkpoint(tmp_path, pair_dir, model_cache, monkeypatch):
    import accelerate

    out = tmp_path / "crash"
    train(make_cfg(out, pair_dir, train={"max_steps": 2, "checkpoint_every": 1, "checkpoints_total_limit": 5}), cache_dir=model_cache)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]

    def boom(self, output_dir=None, **kw):
        Path(output_dir, "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", boom)
    cfg = make_cfg(out, pair_dir, train={"max_steps": 3, "checkpoint_every": 1, "resume": "latest", "checkpoints_total_limit": 5})
    with pytest.raises(CheckpointError, match="could not write checkpoint-3 .*: disk full; the last complete \\(finite\\) checkpoint is .*checkpoint-2"):
        train(cfg, cache_dir=model_cache)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "checkpoint-3").exists() and not (out / ".checkpoint-3.tmp").exists()  # the partial save's space is given back


def test_too_few_pairs_is_a_clear_error(tmp_path, pair_dir, model_cache):
    with pytest.raises(TrainingError, match="fewer than one global batch"):
        train(make_cfg(tmp_path / "x", pair_dir, train={"batch_size": 64}), cache_dir=model_cache)


def test_saved_lora_keeps_alpha_when_loaded_by_diffusers(tmp_path, pair_dir, model_cache):
    """alpha != rank: the pipeline must apply the adapter at the trained scale (alpha / rank = 2)."""
    from diffusers import StableDiffusionPipeline
    from diffpo.evaluate.run import load_tuned

    out = tmp_path / "alpha"
    train(make_cfg(out, pair_dir, model={"lora": {"enabled": True, "rank": 4, "alpha": 8.0}}, train={"learning_rate": 5e-2}), cache_dir=model_cache)
    _, from_checkpoint = load_tuned("tiny:sd", checkpoint=str(out / "checkpoint-2"), cache_dir=model_cache)
    pipe = StableDiffusionPipeline.from_pretrained(model_cache / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(out / "final")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = from_checkpoint.network(x, t, encoder_hidden_states=context).sample
        got = pipe.unet(x, t, encoder_hidden_states=context).sample
        base = StableDiffusionPipeline.from_pretrained(model_cache / "sd").unet(x, t, encoder_hidden_states=context).sample
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_validation_samples_every_n_steps(tmp_path, pair_dir, model_cache):
    out = tmp_path / "val"
    cfg = make_cfg(
        out, pair_dir, train={"max_steps": 3},
        logging={"report_to": "tensorboard", "validation_prompts": ["a red circle on a gray background", "a blue square on a gray background"],
                 "validation_every": 2, "validation_images_per_prompt": 2, "validation_inference_steps": 2},
    )
    train(cfg, cache_dir=model_cache)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2.png", "step-3.png"]
    from PIL import Image

    grid = Image.open(out / "samples" / "step-2.png")
    assert grid.size[0] > 2 * 32 and grid.size[1] > 2 * 32  # two rows, two columns of 32px (upscaled)
    events = list((out / "logs").rglob("events.out.tfevents*"))
    assert events and max(e.stat().st_size for e in events) > 2000  # the image went to tensorboard


def test_resume_with_another_global_batch_is_refused(tmp_path, pair_dir, model_cache):
    out = tmp_path / "gb"
    train(make_cfg(out, pair_dir, train={"max_steps": 1, "checkpoint_every": 1}), cache_dir=model_cache)
    with pytest.raises(RunFolderError, match="train.global_batch was 2 there, 4 in this run"):
        train(make_cfg(out, pair_dir, train={"max_steps": 2, "batch_size": 4, "resume": "latest"}), cache_dir=model_cache)


def test_gc_every_collects_between_steps_only_and_restores_the_collector(tmp_path, pair_dir, monkeypatch):
    """train.gc_every=2: Python's automatic collection is off while the loop runs, the young generations
    are collected at the start and after steps 2 and 4 (never inside a step), all generations at step
    20 (10 x gc_every), and the collector is on again after the run, also after one that failed; the
    losses are those of a run with automatic collection."""
    import gc

    from diffpo import train as train_module

    calls, enabled_in_steps = [], []
    real_collect, real_record = gc.collect, train_module.step_record
    monkeypatch.setattr(train_module.gc, "collect", lambda generation=2: calls.append(generation) or real_collect(generation))

    def record(step, *args, **kwargs):
        enabled_in_steps.append((step, gc.isenabled(), list(calls)))
        return real_record(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "step_record", record)
    assert gc.isenabled()
    train(make_cfg(tmp_path / "run", pair_dir, train={"max_steps": 4, "checkpoint_every": 4, "gc_every": 2}))
    assert gc.isenabled()
    assert calls == [1, 1, 1]  # start, after step 2, after step 4
    monkeypatch.setattr(train_module, "step_record", real_record)
    train(make_cfg(tmp_path / "automatic", pair_dir, train={"max_steps": 4, "checkpoint_every": 4}))
    assert [m["loss"] for m in read_metrics(tmp_path / "run")] == [m["loss"] for m in read_metrics(tmp_path / "automatic")]  # results do not depend on it
    assert [(step, on, len(done)) for step, on, done in enabled_in_steps] == [(1, False, 1), (2, False, 1), (3, False, 2), (4, False, 2)]
    collector = train_module.GarbageCollection(2)
    calls.clear()
    for step in range(1, 21):
        collector.step(step)
    collector.close()
    assert calls == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2] and gc.isenabled()

    def failing(step, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_module, "step_record", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(make_cfg(tmp_path / "failed", pair_dir, train={"gc_every": 2}))
    assert gc.isenabled()


def test_gc_every_must_not_be_negative(tmp_path):
    from diffpo.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="train.gc_every"):
        config_from_dict({"output_dir": str(tmp_path), "model": {"pretrained": "tiny:sd"}, "data": {"source": "x"}, "train": {"gc_every": -1}})
