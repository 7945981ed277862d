"""A user who makes mistakes (issue 14): every bad input is one error line naming the key or the
file, exit code 2, no traceback unless ``-v``; values the README gives are accepted as written."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffpo.cli import main
from diffpo.config import ConfigError, load_config
from diffpo.losses import LOSSES, format_range

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- loss hparam ranges ------------------------------------------------------------------------


def _outside(bounds) -> float:
    low, high, kind = bounds
    return (low - 1.0) if low is not None else (high + 1.0)


@pytest.mark.parametrize("name, key", [(s.name, k) for s in LOSSES.values() for k in s.hparams])
def test_every_loss_hparam_has_a_range_that_config_validation_enforces(name, key):
    from diffpo.losses import Choice

    spec = LOSSES[name]
    bounds = spec.ranges[key]
    if isinstance(bounds, Choice):  # a string hparam (fdpo's divergence): a name outside the choice, or a number
        with pytest.raises(ConfigError, match=rf"^loss\.{key}=nope: outside the range of '{name}' {key}, \{{"):
            load_config(None, [f"loss.name={name}", f"loss.{key}=nope"])
        with pytest.raises(ConfigError, match=rf"^loss\.{key}: must be one of \{{"):
            load_config(None, [f"loss.name={name}", f"loss.{key}=3"])
        load_config(None, [f"loss.name={name}", f"loss.{key}={spec.hparams[key]}"])
        return
    bad = _outside(bounds)
    with pytest.raises(ConfigError, match=rf"^loss\.{key}={bad:g}: outside the range of '{name}' {key}"):
        load_config(None, [f"loss.name={name}", f"loss.{key}={bad}"])
    with pytest.raises(ConfigError, match=rf"loss\.{key}=nan"):
        load_config(None, [f"loss.name={name}", f"loss.{key}=.nan"])
    if bounds[2] == "exclusive" and bounds[0] is not None:  # the open end itself is refused
        with pytest.raises(ConfigError):
            load_config(None, [f"loss.name={name}", f"loss.{key}={bounds[0]}"])
    load_config(None, [f"loss.name={name}", f"loss.{key}={spec.hparams[key]}"])  # the default is fine


def test_negative_beta_is_refused_by_the_cli_and_ranges_are_listed(capsys, tmp_path):
    code, _, err = run_cli(["train", "--config", str(REPO / "configs/tiny.yaml"), f"output_dir={tmp_path}", "loss.beta=-1"], capsys)
    assert code == 2
    assert_one_line_error(err, "loss.beta=-1", "[0, inf)")
    assert not any(tmp_path.iterdir())
    code, out, _ = run_cli(["losses"], capsys)
    line = next(l for l in out.splitlines() if l.startswith("dmpo "))
    assert "beta in (0, inf)" in line and "alpha in (0, inf)" in line
    assert format_range((0, None, "inclusive")) == "[0, inf)" and format_range((0, 1, "exclusive")) == "(0, 1)"


def test_empty_output_dir_is_refused(capsys):
    code, _, err = run_cli(["train", "--config", str(REPO / "configs/tiny.yaml"), "output_dir="], capsys)
    assert code == 2
    assert_one_line_error(err, "output_dir: must not be empty")


# ---- YAML 1.1 booleans -------------------------------------------------------------------------


def test_no_stays_a_string_in_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\ndata:\n  random_flip: off\n  center_crop: yes\nmodel:\n  variant: on\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.data.random_flip is False and cfg.data.center_crop is True
    assert cfg.model.variant == "on"  # a string field keeps the word as written
    cfg = load_config(path, ["train.mixed_precision=no", "data.random_flip=yes", "model.variant=no"])
    assert cfg.train.mixed_precision == "no" and cfg.data.random_flip is True and cfg.model.variant == "no"


# ---- data files --------------------------------------------------------------------------------


def _train_on(source, tmp_path, capsys):
    argv = ["train", "--config", str(REPO / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}", f"data.source={source}"]
    return run_cli(argv, capsys)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "pairs.jsonl").write_text("") and None or d / "pairs.jsonl", "pairs.jsonl: empty file"),
        (lambda d: (d / "pairs.jsonl").write_text("\n\n") and None or d, "pairs.jsonl: empty pair manifest"),
        (lambda d: (d / "bad.jsonl").write_bytes(b"\xff\xfe\x00\x81") and None or d / "bad.jsonl", "bad.jsonl: not a UTF-8 text file"),
        (lambda d: d / "missing.jsonl", "no such file or folder"),
        (lambda d: (d / "t.parquet").write_bytes(b"not parquet") and None or d / "t.parquet", "t.parquet: cannot read it as a parquet table"),
    ],
    ids=["empty-file", "empty-folder", "not-text", "missing", "corrupt-parquet"],
)
def test_bad_data_files_are_one_line_naming_the_file(make, message, tmp_path, capsys):
    source = make(tmp_path)
    code, _, err = _train_on(source, tmp_path, capsys)
    assert code == 2
    assert_one_line_error(err, message)


def test_unreadable_manifest_is_one_line(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"prompt": "a", "chosen": "w.png", "rejected": "l.png"}\n')
    real = Path.read_text

    def denied(self, *args, **kwargs):  # as root, chmod 000 does not stop reads: simulate it
        if self == manifest:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = _train_on(manifest, tmp_path, capsys)
    assert code == 2
    assert_one_line_error(err, str(manifest), "cannot read (Permission denied)")


# ---- --device ----------------------------------------------------------------------------------


DEVICE_COMMANDS = {
    "cache": ["cache", "--config", "configs/tiny.yaml", "data.center_crop=true", "--out", "{tmp}/cache"],
    "toy pretrain": ["toy", "pretrain", "--out", "{tmp}/base", "--steps", "1"],
    "pairs from-images": ["pairs", "from-images", "--chosen", "{tmp}", "--prompts", "captions", "--base", "tiny:sd", "--out", "{tmp}/p"],
    "eval": ["eval", "--model", "tiny:sd", "--lora", "{tmp}/run", "--prompts", "shapes-heldout", "--scorers", "shapes_color", "--out", "{tmp}/e"],
    "demo": ["demo", "--out", "{tmp}/demo"],
}


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_cuda_without_cuda_is_one_line_in_every_command(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.format(tmp=tmp_path) for a in DEVICE_COMMANDS[command]]
    code, _, err = run_cli([*argv, "--device", "cuda"], capsys)
    assert code == 2
    assert_one_line_error(err, f"diffpo {command}: error: --device cuda", "no usable cuda device")
    assert not any(tmp_path.iterdir())  # refused before anything was written
    code, _, err = run_cli([*argv, "--device", "gpu0"], capsys)
    assert code == 2 and "not a torch device" in err


# ---- CLI-wide: one line, -v for the traceback, --dry-run ----------------------------------------


def test_verbose_shows_the_traceback_and_still_exits_2(tmp_path, capsys):
    argv = ["train", "--config", str(REPO / "configs/tiny.yaml"), f"output_dir={tmp_path}", "loss.beta=-1"]
    for verbose in (["-v", *argv], [*argv, "-v"]):
        code, _, err = run_cli(verbose, capsys)
        assert code == 2 and "Traceback" in err and err.rstrip().endswith("diffpo train: error: loss.beta=-1: outside the range of 'mapo' beta, [0, inf)")


def test_dry_run_validates_without_running(tmp_path, capsys):
    argv = ["train", "--config", str(REPO / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}"]
    code, out, _ = run_cli([*argv, "--dry-run"], capsys)
    assert code == 0 and "dry run" in out and not (tmp_path / "run").exists()
    code, _, err = run_cli([*argv, "train.mixed_precision=fp32", "--dry-run"], capsys)
    assert code == 2 and "train.mixed_precision: must be one of" in err
    code, _, err = run_cli(["cache", "--config", str(REPO / "configs/tiny.yaml"), "--out", str(tmp_path / "c"), "--dry-run"], capsys)
    assert code == 2 and "data.center_crop: must be true" in err
    code, _, err = run_cli(["eval", "--model", "tiny:sd", "--lora", "x", "--prompts", "shapes-heldout", "--scorers", "nope", "--out", "o", "--dry-run"], capsys)
    assert code == 2 and "unknown scorer(s) nope" in err


def test_demo_hparam_out_of_range_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("pairs were built before the hparams were checked")

    monkeypatch.setattr("diffpo.toy.demo.build_pairs", no_work)
    code, _, err = run_cli(["demo", "--out", str(tmp_path / "d"), "--hparam", "beta=-1"], capsys)
    assert code == 2
    assert_one_line_error(err, "diffpo demo: error: loss.beta=-1")


def test_a_library_message_over_several_lines_is_printed_as_one(tmp_path, capsys, monkeypatch):
    from diffpo.models import ModelLoadError

    def fails(cfg):
        raise ModelLoadError("cannot load 'x':\nWe couldn't connect to the hub.\n\nCheck your connection.")

    monkeypatch.setattr("diffpo.train.train", fails)
    code, _, err = run_cli(["train", "--config", str(REPO / "configs/tiny.yaml"), f"output_dir={tmp_path}"], capsys)
    assert code == 2
    assert_one_line_error(err, "cannot load 'x': We couldn't connect to the hub. Check your connection.")


def test_registering_a_loss_needs_a_range_for_every_hparam():
    from diffpo.losses import LossSpec, register

    spec = LossSpec("no_ranges_loss", lambda err_w, err_l, gamma=1.0: err_w, needs_reference=False, hparams={"gamma": 1.0})
    with pytest.raises(ValueError, match="declare a range for every hparam \\(gamma missing\\)"):
        register(spec)
    assert "no_ranges_loss" not in LOSSES
    with pytest.raises(ValueError, match="default gamma=1.0 is outside its range"):
        LossSpec("bad", spec.fn, needs_reference=False, hparams={"gamma": 1.0}, ranges={"gamma": (2, None, "inclusive")})
