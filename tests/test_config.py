"""Typed config: YAML + dotted overrides, clear errors naming the key, every shipped config loads."""

from pathlib import Path

import pytest

from diffpo.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nloss:\n  name: mapo\n  beta: 0.2\ntrain:\n  max_steps: 7\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["train.max_steps=3", "loss.snr_value=0.25", "model.lora.rank=4", "data.columns.caption=text"])
    assert cfg.train.max_steps == 3 and cfg.train.learning_rate == 1e-4
    assert cfg.loss.name == "mapo" and cfg.loss.hparams == {"beta": 0.2, "snr_value": 0.25}
    assert cfg.model.lora.rank == 4 and cfg.data.columns == {"caption": "text"}
    assert cfg.to_dict()["loss"] == {"name": "mapo", "beta": 0.2, "snr_value": 0.25}


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.max_stepz=3"], r"train.max_stepz: unknown key \(valid keys here: .*max_steps"),
        (["train.max_steps=abc"], r"train.max_steps: must be an integer, got 'abc'"),
        (["train.max_steps=0"], r"train.max_steps: must be positive, got 0"),
        (["train.mixed_precision=fp8"], r"train.mixed_precision: must be one of 'no', 'fp16', 'bf16'"),
        (["loss.name=ppo"], r"unknown loss 'ppo'"),
        (["loss.name=sft", "loss.beta=1"], r"loss 'sft' has no hparam 'beta'"),
        (["loss.name=mapo", "loss.beta=big"], r"loss.beta: must be a number"),
        (["model.lora.enabled=maybe"], r"model.lora.enabled: must be true or false"),
        (["nonsense"], r"must look like key.sub=value"),
        (["train=3"], r"train: must be a mapping"),
    ],
)
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_parse_overrides_types():
    tree = parse_overrides(["a.b=1", "a.c=true", "a.d=null", "a.e=x=y", "f=[1, 2]"])
    assert tree == {"a": {"b": 1, "c": True, "d": None, "e": "x=y"}, "f": [1, 2]}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.max_steps > 0
