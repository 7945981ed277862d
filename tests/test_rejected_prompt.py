"""Pairs whose rejected image belongs to another prompt (DreamBooth's class prompt): read from the
manifest, carried to the batch, and used to condition the loser half only by objectives that ask."""

import json

import pytest
import torch
from conftest import tiny_run_config as make_cfg, write_shape_pairs

from diffpo.config import ConfigError, DataConfig, config_from_dict
from diffpo.data import DataError, PairDataset, collate_pairs, load_pair_records
from diffpo.train import TrainingError, pair_errors, train


def with_class_prompts(root, n):
    """``write_shape_pairs`` with a ``rejected_prompt`` on every row."""
    write_shape_pairs(root, n)
    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        row["prompt"] = row["prompt"].replace("a red ", "a red sks ").replace("a blue ", "a blue sks ")
        row["rejected_prompt"] = "a green triangle on a white background"
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_manifest_rejected_prompt_reaches_the_batch(tmp_path):
    root = with_class_prompts(tmp_path, 4)
    records, _ = load_pair_records(DataConfig(source=str(root)))
    assert [r.rejected_prompt for r in records] == ["a green triangle on a white background"] * 4
    assert "sks" in records[0].prompt
    batch = collate_pairs([PairDataset(records, 32)[i] for i in range(2)])
    assert batch["rejected_prompts"] == ["a green triangle on a white background"] * 2
    # without the key, the loser's prompt is the pair's prompt
    (tmp_path / "plain").mkdir()
    plain = write_shape_pairs(tmp_path / "plain", 2)
    records, _ = load_pair_records(DataConfig(source=str(plain)))
    assert records[0].rejected_prompt is None and PairDataset(records, 32)[0]["rejected_prompt"] == records[0].prompt


def test_bad_rejected_prompt_names_the_row(tmp_path):
    root = with_class_prompts(tmp_path, 3)
    lines = (root / "pairs.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["rejected_prompt"] = 7
    lines[1] = json.dumps(row)
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 1: rejected_prompt 7 is not a non-empty string"):
        load_pair_records(DataConfig(source=str(root), strict=True))


@pytest.fixture(scope="module")
def tiny_components(model_cache):
    from diffpo.config import ModelConfig
    from diffpo.models import load_components

    return load_components(ModelConfig(pretrained="tiny:sd"), cache_dir=model_cache)


def test_loser_prompt_conditions_only_the_loser(tmp_path, tiny_components):
    root = with_class_prompts(tmp_path, 2)
    records, _ = load_pair_records(DataConfig(source=str(root)))
    batch = collate_pairs([PairDataset(records, 32, random_flip=False)[i] for i in range(2)])
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    run = lambda b, how: pair_errors(tiny_components, tiny_components.network, b, gens(), None, False, torch.autocast, how)
    pair = run(batch, "pair")
    rejected = run(batch, "rejected")
    torch.testing.assert_close(rejected["err_w"], pair["err_w"])  # the winner keeps the pair's prompt
    assert (rejected["err_l"] - pair["err_l"]).abs().min() > 0  # the loser's conditioning changed
    # ... to exactly what the loser gets when its rejected prompt *is* the pair prompt
    swapped = {**batch, "prompts": batch["rejected_prompts"]}
    torch.testing.assert_close(rejected["err_l"], run(swapped, "pair")["err_l"])


def test_dreambooth_needs_rejected_prompts_and_no_cache(tmp_path, model_cache):
    plain = write_shape_pairs(tmp_path, 4)
    with pytest.raises(TrainingError, match=r"row 0: loss 'dreambooth' conditions the rejected image on the pair's rejected_prompt"):
        train(make_cfg(tmp_path / "run", plain, loss={"name": "dreambooth"}), cache_dir=model_cache)
    with pytest.raises(ConfigError, match="data.cache: loss 'dreambooth' conditions the rejected image on its own prompt"):
        config_from_dict({"data": {"source": str(plain), "cache": "somewhere"}, "loss": {"name": "dreambooth"}})


def test_dreambooth_trains_on_class_prompt_pairs(tmp_path, model_cache):
    from conftest import read_metrics

    (tmp_path / "pairs").mkdir()
    root = with_class_prompts(tmp_path / "pairs", 4)
    result = train(make_cfg(tmp_path / "run", root, loss={"name": "dreambooth", "prior_weight": 0.5}), cache_dir=model_cache)
    metrics = read_metrics(tmp_path / "run")
    assert result.steps == 2
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["err_w"] + 0.5 * metrics[0]["err_l"], rel=1e-5)
