"""The throughput harness runs on the CPU (a smoke run: it checks that the harness works, not speed)."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import train_step


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--help"], capture_output=True, text=True, check=True)
    assert "RECIPE/OBJECTIVE/MODE" in out.stdout


def test_smoke_run_measures_every_case(tmp_path):
    out = tmp_path / "bench.json"
    cases = "public/diffusion_dpo/full,diffpo/mapo/lora,diffpo/unet/full"
    result = train_step.main(["--arch", "tiny-sdxl", "--device", "cpu", "--pairs", "2", "--steps", "1", "--warmup", "0", "--cases", cases, "--out", str(out), "--stop-on-error"])
    saved = json.loads(out.read_text())
    assert [row["case"] for row in saved["rows"]] == cases.split(",")
    rows = {row["case"]: row for row in result["rows"]}
    for row in rows.values():
        assert row["step_s"] > 0 and row["pairs_per_s"] == pytest.approx(2 / row["step_s"])
    # the public recipe's step also encodes images and prompts and runs a reference UNet
    # (at least the reference forward: a third of forward + backward)
    assert rows["public/diffusion_dpo/full"]["flops_per_step"] > 1.3 * rows["diffpo/unet/full"]["flops_per_step"]
    # LoRA trains only the adapters
    assert rows["diffpo/mapo/lora"]["trainable_params"] < rows["diffpo/unet/full"]["trainable_params"] / 10
    assert saved["environment"]["torch"] == torch.__version__


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    calls = []

    def fake_step(self, step):
        calls.append(self.case.label)
        if self.case.objective == "mapo":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_step.Setup, "step", fake_step)
    monkeypatch.setattr(train_step.Setup, "count_flops", lambda self: 1.0)
    result = train_step.main(["--arch", "tiny-sd", "--device", "cpu", "--steps", "1", "--warmup", "0", "--cases", "diffpo/mapo/full,diffpo/sft/full"])
    first, second = result["rows"]
    assert first["error"] == "out of memory" and "step_s" not in first
    assert second["step_s"] > 0 and "error" not in second


def test_bad_case_is_a_clear_error():
    with pytest.raises(SystemExit, match="not RECIPE/OBJECTIVE/MODE"):
        train_step.parse_args(["--cases", "diffpo-mapo"])


def test_selective_checkpointing_cases_name_their_blocks():
    case = train_step.Case.parse("diffpo+compile+ckpt=down_blocks.1:up_blocks.2/mapo/full")
    assert case.compiled and case.checkpointing == ["down_blocks.1", "up_blocks.2"]
    assert train_step.Case.parse("diffpo+compile+ckpt/mapo/full").checkpointing is True
    assert train_step.Case.parse("diffpo+compile/mapo/full").checkpointing is False
    with pytest.raises(SystemExit, match="selective checkpointing"):  # the public recipe is fixed
        train_step.Case.parse("public+ckpt=down_blocks.1/mapo/full")


def test_c8bit_cases_step_with_diffpos_compiled_8bit_kernel():
    """``+c8bit``: 8-bit moments through ``train.adam_8bit_kernel=diffpo``; ``+8bit``: bitsandbytes'."""
    configs = {text: train_step._train_config(train_step.Case.parse(text)).train for text in ("diffpo+compile+8bit/mapo/full", "diffpo+compile+c8bit/mapo/full", "diffpo+compile/mapo/full")}
    assert [(c.use_8bit_adam, c.adam_8bit_kernel) for c in configs.values()] == [(True, "bitsandbytes"), (True, "diffpo"), (False, "bitsandbytes")]


def test_catk_and_static_cases_carry_their_compile_settings():
    """``+catk``: the inductor option in the case's config; ``+static``: train.compile_dynamic=false."""
    cases = ("diffpo+compile+c8bit+catk/mapo/full", "diffpo+compile+c8bit/mapo/full", "diffpo+compile+static/mapo/full")
    configs = [train_step._train_config(train_step.Case.parse(text)).train for text in cases]
    assert [(c.compile_options, c.compile_dynamic) for c in configs] == [({"max_pointwise_cat_inputs": 1}, None), ({}, None), ({}, False)]
    with pytest.raises(SystemExit, match="compile settings: add \\+compile"):
        train_step.Case.parse("diffpo+static/mapo/full")


def test_geglu_cases_set_train_fused_geglu():
    """``+geglu``: train.fused_geglu=true in the case's config (``make_trainable`` then swaps the
    activations: tests/test_geglu.py)."""
    configs = [train_step._train_config(train_step.Case.parse(text)).train for text in ("diffpo+compile+static+geglu/mapo/full", "diffpo+compile+static/mapo/full")]
    assert [c.fused_geglu for c in configs] == [True, False]


def test_cgraph_cases_replay_cuda_graphs_through_an_inductor_option():
    """``+cgraph``: inductor's ``triton.cudagraphs`` (what mode="reduce-overhead" sets), a compile setting."""
    config = train_step._train_config(train_step.Case.parse("diffpo+compile+catk+cgraph/mapo/full")).train
    assert config.compile_options == {"max_pointwise_cat_inputs": 1, "triton.cudagraphs": True}
    with pytest.raises(SystemExit, match="compile settings: add \\+compile"):
        train_step.Case.parse("diffpo+cgraph/mapo/full")


def test_fullcompile_cases_compile_the_whole_network_regional_ones_its_blocks():
    from benchmarks.archs import ARCHS

    from diffpo.fastpath import compiled_regions

    modes = {text: train_step.Case.parse(text).compile_mode for text in ("diffpo/mapo/full", "diffpo+compile+8bit/mapo/full", "diffpo+fullcompile+8bit/mapo/full")}
    assert list(modes.values()) == ["none", "regional", "full"]
    regions = {}
    for text in ("diffpo+compile/mapo/full", "diffpo+fullcompile/mapo/full"):
        setup = train_step.Setup(ARCHS["tiny-sdxl"], train_step.Case.parse(text), 1, torch.device("cpu"))
        setup.compile()  # marks the modules; compilation itself happens at the first call
        regions[text] = compiled_regions(setup.unet)
    assert regions["diffpo+fullcompile/mapo/full"] == [""]  # the UNet itself, one graph
    assert len(regions["diffpo+compile/mapo/full"]) > 5 and "" not in regions["diffpo+compile/mapo/full"]


def test_activation_memory_splits_the_saved_tensors_and_flops_by_block():
    from benchmarks import activation_memory

    result = activation_memory.measure("tiny-sdxl", 2)
    blocks = {row["block"]: row for row in result["blocks"]}
    assert list(blocks) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert 0.8 < sum(row["saved_share"] for row in blocks.values()) <= 1.0  # the rest: conv_in/out, embeddings
    assert 0.8 < sum(row["forward_flops_share"] for row in blocks.values()) <= 1.0
    assert all(row["saved_gib"] > 0 for row in blocks.values())


def test_8bit_cases_build_the_8bit_master_optimizer_through_diffpos_setup():
    from benchmarks.archs import ARCHS
    from diffpo.fastpath import MasterWeightAdamW8bit

    case = train_step.Case.parse("diffpo+compile+8bit/mapo/full")
    assert case.adam_8bit and case.compiled and case.checkpointing is False
    assert not train_step.Case.parse("diffpo+compile/mapo/full").adam_8bit
    setup = train_step.Setup(ARCHS["tiny-sdxl"], train_step.Case.parse("diffpo+8bit/mapo/full"), 1, torch.device("cpu"))
    assert type(setup.optimizer) is MasterWeightAdamW8bit  # what train.use_8bit_adam builds with bf16 weights
    before = [p.detach().clone() for p in setup.unet.parameters()]
    setup.step(0)
    assert any(not torch.equal(a, b) for a, b in zip(before, setup.unet.parameters()))
    moments = [state["state1"].dtype for state in setup.optimizer.state.values()]
    assert torch.uint8 in moments  # the large tensors' moments are quantized


def test_optimizer_step_benchmark_times_the_optimizers_and_checks_the_8bit_layouts_agree(tmp_path):
    from benchmarks.optimizer_step import main

    result = main(["--arch", "tiny-sdxl", "--device", "cpu", "--steps", "1", "--warmup", "1", "--min-sizes", "20000", "--out", str(tmp_path / "o.json")])
    assert result["identical"] is True  # the flat buckets step bit for bit as bitsandbytes per tensor
    assert [row["optimizer"] for row in result["rows"]] == ["adamw", "8bit-per-tensor", "8bit-flat", "8bit-flat-min20000", "8bit-flat-diffpo", "8bit-flat-diffpo-copy"]
    errors = result["error_vs_adamw"]  # diffpo's kernel rounds to the nearest code: no farther from float32 AdamW
    assert errors["8bit-flat-diffpo"]["max_lr"] <= errors["8bit-flat"]["max_lr"] and errors["8bit-flat-diffpo"]["mean_lr"] <= errors["8bit-flat"]["mean_lr"]
    only = main(["--arch", "tiny-sdxl", "--device", "cpu", "--steps", "1", "--warmup", "0", "--only", "adamw", "--skip-error"])
    assert [row["optimizer"] for row in only["rows"]] == ["adamw"] and "error_vs_adamw" not in only
    assert 0 < result["rows"][3]["8bit_fraction"] < 1
    assert all(row["wall_ms"] >= row["host_ms"] > 0 for row in result["rows"])
    assert result["tensors"] > 100 and "benchmarks.optimizer_step" in result["environment"]["command"]


def test_optimizer_benchmark_measures_8bit_updates_against_float32_adamw():
    """``error_vs_adamw`` (the yardstick for an alternative 8-bit kernel, e.g. bitsandbytes' Triton
    one on the GPU): float32 AdamW is 0 from itself; bitsandbytes' 8-bit update lands within about
    one learning rate of it everywhere after two steps, and on average far closer."""
    from benchmarks.optimizer_step import _optimizers, error_vs_adamw

    torch.manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(shape)).to(torch.bfloat16)) for shape in [(64, 128), (300, 40), (5000,)]]
    grads = [(1e-3 * torch.randn(p.shape)).to(torch.bfloat16) for p in params]
    errors = error_vs_adamw(params, grads, {"adamw": _optimizers()["adamw"], "8bit-flat": _optimizers()["8bit-flat"]})
    assert errors["adamw"] == {"max_lr": 0.0, "mean_lr": 0.0}
    assert 0.05 < errors["8bit-flat"]["max_lr"] < 1.5 and 0 < errors["8bit-flat"]["mean_lr"] < 0.05
