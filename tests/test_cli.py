"""The command line: `diffpo losses`, `diffpo train` on configs/tiny.yaml, clear one-line errors."""

import json
from pathlib import Path

import pytest

from diffpo.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_losses_lists_every_objective_with_hparams(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for line_start, hparams in [("sft", "-"), ("diffusion_dpo", "beta=5000"), ("mapo", "beta=0.1, snr_value=0.5, num_train_timesteps=1000"), ("dmpo", "beta=5000, alpha=6.90")]:
        line = next(l for l in out.splitlines() if l.startswith(line_start + " "))
        assert hparams in line


def test_train_tiny_config_via_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    code = main(["train", "--config", "configs/tiny.yaml", f"output_dir={out}", "loss.name=dmpo", "train.max_steps=3", "logging.progress=false"])
    assert code == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and all("loss" in l for l in lines)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "done: 3 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.max_stepz=3"], "train.max_stepz: unknown key"),
        (["data.source=nope.jsonl"], "data.source: no such file or folder: nope.jsonl"),
        (["model.pretrained=/nonexistent/model"], "model folder not found: /nonexistent/model"),
        (["loss.name=dpo"], "unknown loss 'dpo'"),
    ],
)
def test_errors_are_one_clear_line(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(["train", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
