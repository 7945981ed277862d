"""Unpaired feedback (issue 18): the ``unpaired`` / ``unpaired_table`` formats, ``data.unpaired``
(pairs split into labelled examples), packing two examples per row, and Diffusion-KTO training
through ``diffpo train`` unchanged."""

import json
from collections import Counter

import pytest
import torch
from conftest import read_metrics, tiny_run_config as make_cfg, write_shape_pairs
from PIL import Image

from diffpo.config import DataConfig, load_config
from diffpo.data import DataError, load_pair_records
from diffpo.data.dataset import PairDataset, collate_pairs
from diffpo.losses import LOSSES, LossSpec, register, unregister
from diffpo.train import TrainingError, train


def write_examples(root, labels, *, bad_rows=()):
    """``examples.jsonl`` with one image per label (True: desirable), plus ``bad_rows`` as given."""
    lines = []
    for i, good in enumerate(labels):
        Image.new("RGB", (32, 32), (200, 40 + 10 * i, 40) if good else (20, 20, 60 + 10 * i)).save(root / f"x{i}.png")
        lines.append(json.dumps({"prompt": f"shape {i}", "image": f"x{i}.png", "desirable": good}))
    lines += [json.dumps(row) if isinstance(row, dict) else row for row in bad_rows]
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_manifest_is_detected_validated_and_packed_two_per_row(tmp_path, caplog):
    write_examples(tmp_path, [True, False, True, True, False], bad_rows=[
        {"prompt": "x", "image": "x0.png", "desirable": "maybe"},
        {"prompt": "", "image": "x0.png", "desirable": True},
        {"prompt": "y", "image": "missing.png", "desirable": 0},
        "{not json",
    ])
    records, report = load_pair_records(DataConfig(source=str(tmp_path)), seed=0)
    # 5 good examples -> 2 rows of two, one left over; 4 bad rows skipped with their reasons
    assert len(records) == 2 and report.examples_kept == 4 and report.odd_dropped == 1
    assert report.rows == 9 and sum(report.skipped.values()) == 4
    assert any("row 5: desirable 'maybe' is not true/false" in m for m in report.examples)
    assert any("row 7: image: image file not found" in m for m in report.examples)
    assert "unpaired examples" in report.summary() and "in 2 rows of two" in report.summary()
    for r in records:  # each half keeps its own prompt and label
        assert r.labels is not None and r.rejected_prompt is not None
        assert r.labels == (json.loads((tmp_path / "examples.jsonl").read_text().splitlines()[int(r.prompt.split()[1])])["desirable"], r.labels[1])
    # the same seed packs the same rows; another seed shuffles differently
    assert load_pair_records(DataConfig(source=str(tmp_path)), seed=0)[0] == records
    with pytest.raises(DataError, match=r"row 5: desirable 'maybe'.*data.strict"):
        load_pair_records(DataConfig(source=str(tmp_path), strict=True))


def test_table_schema_with_column_mapping(tmp_path):
    import datasets

    images = []
    for i in range(4):
        path = tmp_path / f"t{i}.png"
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(path)
        images.append(path.read_bytes())
    table = datasets.Dataset.from_dict({"text": [f"p{i}" for i in range(4)], "img": images, "thumbs_up": [1, 0, 0, 1]})
    table.to_parquet(str(tmp_path / "fb.parquet"))
    cfg = DataConfig(source=str(tmp_path / "fb.parquet"), format="unpaired_table", columns={"caption": "text", "image": "img", "label": "thumbs_up"})
    records, report = load_pair_records(cfg)
    assert len(records) == 2 and report.desirable == 2
    assert sorted(label for r in records for label in r.labels) == [False, False, True, True]
    with pytest.raises(DataError, match="missing column"):
        load_pair_records(DataConfig(source=str(tmp_path / "fb.parquet"), format="unpaired_table"))


def test_data_unpaired_splits_pairs_into_labelled_examples(tmp_path):
    write_shape_pairs(tmp_path, 6)
    pairs, _ = load_pair_records(DataConfig(source=str(tmp_path)), seed=1)
    records, report = load_pair_records(DataConfig(source=str(tmp_path), unpaired=True), seed=1)
    assert len(records) == 6 and report.desirable == 6 and report.examples_kept == 12
    # every image appears once, chosen images labelled desirable and rejected ones not
    labelled = Counter()
    for r in records:
        labelled[(r.chosen, r.labels[0])] += 1
        labelled[(r.rejected, r.labels[1])] += 1
    assert labelled == Counter({**{(p.chosen, True): 1 for p in pairs}, **{(p.rejected, False): 1 for p in pairs}})
    # the dataset and collate carry the labels as bool tensors
    batch = collate_pairs([PairDataset(records, 32)[i] for i in range(3)])
    assert batch["desirable_w"].dtype == torch.bool and batch["desirable_w"].shape == (3,)
    assert [bool(v) for v in batch["desirable_w"]] == [r.labels[0] for r in records[:3]]
    assert "desirable_w" not in collate_pairs([PairDataset(pairs, 32)[0]])


def test_kto_trains_on_split_pairs_and_objectives_refuse_the_wrong_kind_of_data(tmp_path, model_cache):
    from safetensors.torch import load_file

    (tmp_path / "pairs").mkdir()
    data = write_shape_pairs(tmp_path / "pairs", 4)

    def split(cfg):  # data.unpaired=true (the helper's own ``data`` argument is the source)
        cfg.data.unpaired = True
        return cfg

    out = tmp_path / "kto"
    result = train(split(make_cfg(out, data, loss={"name": "kto"})), cache_dir=model_cache)
    assert result.steps == 2 and result.skipped_steps == 0
    for m in read_metrics(out):
        assert {"loss", "ref_w", "ref_l", "margin", "implicit_accuracy"} <= set(m)
        assert 0.0 < m["loss"] < 1.0  # lambda * (1 - sigmoid): bounded by lambda = 1
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert max(t.abs().sum().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k) > 0
    with pytest.raises(TrainingError, match="learns from unpaired examples.*data.unpaired=true"):
        train(make_cfg(tmp_path / "kto_pairs", data, loss={"name": "kto"}), cache_dir=model_cache)
    with pytest.raises(TrainingError, match="'mapo' needs preference pairs"):
        train(split(make_cfg(tmp_path / "mapo_unpaired", data)), cache_dir=model_cache)


def _sft_on_desirable(err_w, err_l, ref_w, ref_l, desirable_w, desirable_l):
    """The reference code's ``--loss sft`` on unpaired data: the error of desirable images only."""
    return (err_w * desirable_w + err_l * desirable_l) / 2


def test_kto_with_every_image_desirable_takes_sfts_first_step(tmp_path, model_cache):
    """Issue 18's limiting case end to end: all desirable, small beta -> KTO's gradient is SFT's times
    beta/4 (test_losses), and Adam's first step divides that scale out: the same update."""
    from safetensors.torch import load_file

    write_examples(tmp_path, [True] * 8)
    spec = register(LossSpec("test_sft_desirable", _sft_on_desirable, needs_reference=True, loser_prompt="rejected", examples="unpaired"))
    try:
        deltas = {}
        for name, hp in (("kto", {"beta": 0.1}), ("test_sft_desirable", {})):
            out = tmp_path / name
            cfg = make_cfg(out, tmp_path, loss={"name": name, **hp}, train={"max_steps": 1, "checkpoint_every": 1, "max_grad_norm": 1e9})
            train(cfg, cache_dir=model_cache)
            lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
            deltas[name] = torch.cat([t.flatten() for k, t in sorted(lora.items()) if "lora_B" in k or "lora.up" in k])  # B starts at 0: its value is the step
    finally:
        unregister(spec.name)
    kto, sft = deltas["kto"], deltas["test_sft_desirable"]
    assert kto.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(kto, sft, dim=0) > 0.999
