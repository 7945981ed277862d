"""Pair sources, validation of bad rows, tie policy, paired transforms and collation."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffpo.config import DataConfig
from diffpo.data import DataError, PairDataset, collate_pairs, load_pair_records


def png_bytes(color, size=(40, 36)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pickapic_parquet(path, rows):
    import datasets

    table = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    table.to_parquet(str(path))
    return path


@pytest.fixture
def pickapic(tmp_path):
    red, blue, bad = png_bytes((255, 0, 0)), png_bytes((0, 0, 255)), b"not an image"
    rows = [
        {"caption": "a", "jpg_0": red, "jpg_1": blue, "label_0": 1.0},
        {"caption": "b", "jpg_0": red, "jpg_1": blue, "label_0": 0.0},
        {"caption": "c", "jpg_0": red, "jpg_1": blue, "label_0": 0.5},  # tie
        {"caption": "", "jpg_0": red, "jpg_1": blue, "label_0": 1.0},  # missing caption
        {"caption": "e", "jpg_0": bad, "jpg_1": blue, "label_0": 1.0},  # undecodable
        {"caption": "f", "jpg_0": red, "jpg_1": blue, "label_0": 0.7},  # bad label
    ]
    return write_pickapic_parquet(tmp_path / "pairs.parquet", rows)


def test_pickapic_schema_orders_pairs_and_drops_ties_and_bad_rows(pickapic, caplog):
    records, report = load_pair_records(DataConfig(source=str(pickapic)))
    assert [r.prompt for r in records] == ["a", "b"]
    # label_0 = 1 -> image 0 chosen (red); label_0 = 0 -> image 1 chosen (blue)
    assert records[0].open("chosen").getpixel((0, 0)) == (255, 0, 0)
    assert records[1].open("chosen").getpixel((0, 0)) == (0, 0, 255)
    assert report.rows == 6 and report.kept == 2 and report.ties_dropped == 1
    assert sum(report.skipped.values()) == 3
    assert any("row 4" in e and "undecodable" in e for e in report.examples)
    assert any("row 5" in e and "0.7" in e for e in report.examples)
    assert any("row 3" in e and "missing caption" in e for e in report.examples)
    assert "skipping bad row" in caplog.text


def test_random_tie_policy_keeps_ties(pickapic):
    records, report = load_pair_records(DataConfig(source=str(pickapic), ties="random"))
    assert [r.prompt for r in records] == ["a", "b", "c"] and report.ties_dropped == 0


def test_strict_stops_before_training_naming_the_row(pickapic):
    with pytest.raises(DataError, match=r"pairs.parquet, row 3: missing caption.*strict"):
        load_pair_records(DataConfig(source=str(pickapic), strict=True))


def test_column_mapping(tmp_path):
    rows = [{"text": "x", "a": png_bytes((1, 2, 3)), "b": png_bytes((4, 5, 6)), "pref": 0.0}]
    path = write_pickapic_parquet(tmp_path / "other.parquet", rows)
    with pytest.raises(DataError, match="missing column.*caption.*data.columns"):
        load_pair_records(DataConfig(source=str(path)))
    cfg = DataConfig(source=str(path), columns={"caption": "text", "image_0": "a", "image_1": "b", "label_0": "pref"})
    records, _ = load_pair_records(cfg)
    assert records[0].open("chosen").getpixel((0, 0)) == (4, 5, 6)


def make_manifest(tmp_path, n=3, broken_line=False, missing_file=False):
    lines = []
    for i in range(n):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(tmp_path / f"w{i}.png")
        Image.new("RGB", (32, 32), (0, 10 * i, 0)).save(tmp_path / f"l{i}.png")
        lines.append(json.dumps({"prompt": f"p{i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    if broken_line:
        lines.append("{not json")
    if missing_file:
        lines.append(json.dumps({"prompt": "gone", "chosen": "nope.png", "rejected": "l0.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_manifest_folder_and_file(tmp_path):
    folder = make_manifest(tmp_path, n=3, broken_line=True, missing_file=True)
    for source in (folder, folder / "pairs.jsonl"):
        records, report = load_pair_records(DataConfig(source=str(source)))
        assert [r.prompt for r in records] == ["p0", "p1", "p2"]
        assert report.rows == 5 and sum(report.skipped.values()) == 2
        assert any("row 3" in e and "not valid JSON" in e for e in report.examples)
        assert any("row 4" in e and "not found" in e for e in report.examples)


def test_no_usable_pairs_is_an_error(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "b.png"}) + "\n")
    with pytest.raises(DataError, match="no usable pairs"):
        load_pair_records(DataConfig(source=str(tmp_path)))
    with pytest.raises(DataError, match="manifest not found"):
        load_pair_records(DataConfig(source=str(tmp_path / "missing.jsonl"), format="manifest"))


def test_same_crop_and_flip_for_both_images(tmp_path):
    # A gradient image: any crop offset or flip shows in the pixel values.
    ramp = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (40, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "w.png")
    Image.fromarray(255 - ramp).save(tmp_path / "l.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "w.png", "rejected": "l.png"}) + "\n")
    records, _ = load_pair_records(DataConfig(source=str(tmp_path)))
    seen = set()
    for epoch in range(8):
        ds = PairDataset(records, resolution=32, seed=0)
        item = ds[(epoch, 0)]
        w, l = item["pixels_w"], item["pixels_l"]
        assert w.shape == (3, 32, 32) and w.min() >= -1 and w.max() <= 1
        # loser = 255 - winner pixelwise, so in [-1, 1] space l = -w when crops/flips agree
        torch.testing.assert_close(l, -w, atol=0.01, rtol=0)  # one grey level of resize rounding
        seen.add(round(float(w[0, 0, 0]), 3))
        # deterministic in (seed, epoch, index)
        torch.testing.assert_close(ds[(epoch, 0)]["pixels_w"], w)
    assert len(seen) > 1  # crops/flips vary across epochs


def test_collate_order(tmp_path):
    folder = make_manifest(tmp_path, n=3)
    records, _ = load_pair_records(DataConfig(source=str(folder)))
    ds = PairDataset(records, resolution=32, random_flip=False, center_crop=True)
    batch = collate_pairs([ds[2], ds[0]])
    assert batch["prompts"] == ["p2", "p0"] and batch["indices"].tolist() == [2, 0]
    assert batch["pixels_w"].shape == (2, 3, 32, 32)
    # winner of pair 2 is red 20 -> channel 0 value 20/127.5 - 1
    assert batch["pixels_w"][0, 0, 0, 0].item() == pytest.approx(20 / 127.5 - 1)
    assert batch["pixels_l"][0, 1, 0, 0].item() == pytest.approx(20 / 127.5 - 1)


def test_trainer_batches_follow_the_epoch_in_persistent_workers(tmp_path, pair_dir):
    # The trainer's loader keeps its workers across epochs (re-spawning them stalled each epoch's
    # first step); a worker's copy of the dataset never sees the training process's epoch, so the
    # sampler must carry it: every batch equals the dataset's items keyed by (epoch, index).
    from conftest import tiny_run_config

    from diffpo.losses import get_loss
    from diffpo.train import micro_batches, setup_accelerator, setup_data

    cfg = tiny_run_config(tmp_path / "out", pair_dir)
    cfg.data.num_workers, cfg.data.random_flip = 1, True
    accelerator = setup_accelerator(cfg)
    data = setup_data(cfg, accelerator, get_loss("mapo"))
    data.dataloader = accelerator.prepare(data.dataloader)
    assert data.dataloader.persistent_workers
    batches = micro_batches(accelerator, data, 0)
    per_epoch = len(data.dataloader)
    flips = {}
    for epoch in range(3):
        for _ in range(per_epoch):
            batch = next(batches)
            for row, index in enumerate(batch["indices"].tolist()):
                expected = data.dataset[(epoch, index)]
                torch.testing.assert_close(batch["pixels_w"][row], expected["pixels_w"], atol=0, rtol=0)
                flips.setdefault(index, set()).add(float(batch["pixels_w"][row].sum()))
    assert any(len(seen) > 1 for seen in flips.values())  # crops/flips do change between epochs


def test_resumed_batches_are_the_epochs_rest_through_the_prepared_loader(tmp_path, pair_dir, monkeypatch):
    """A resume mid-epoch starts at the epoch's next batch (the uninterrupted run's batches from
    there on), through the prepared loader itself: accelerate's skip_first_batches built a second
    loader without the non-blocking batch copies for the rest of that epoch."""
    import accelerate.data_loader
    from conftest import tiny_run_config

    from diffpo.losses import get_loss
    from diffpo.train import micro_batches, setup_accelerator, setup_data

    cfg = tiny_run_config(tmp_path / "out", pair_dir, train={"batch_size": 1})
    accelerator = setup_accelerator(cfg)
    data = setup_data(cfg, accelerator, get_loss("mapo"))
    data.dataloader = accelerator.prepare(data.dataloader)
    per_epoch = len(data.dataloader)
    assert per_epoch >= 3
    flags = []
    send = accelerate.data_loader.send_to_device
    monkeypatch.setattr(accelerate.data_loader, "send_to_device", lambda batch, device, non_blocking=False, **kw: flags.append(non_blocking) or send(batch, device, non_blocking=non_blocking, **kw))
    whole = micro_batches(accelerator, data, 0)
    uninterrupted = [next(whole)["indices"].tolist() for _ in range(per_epoch + 2)]
    resumed = micro_batches(accelerator, data, 2)  # two micro-steps into the first epoch
    assert [next(resumed)["indices"].tolist() for _ in range(per_epoch)] == uninterrupted[2:]
    assert flags and all(flags)  # every batch copied without a host wait


def test_a_new_pass_over_the_trainers_loader_leaves_the_global_rng_alone(tmp_path, pair_dir):
    # Checkpoints save the global RNG state; the loop may start the next epoch's pass before a save
    # (it takes the next batch early). A pass that drew from the global RNG would make the resumed
    # run draw once more than the uninterrupted one.
    from conftest import tiny_run_config

    from diffpo.losses import get_loss
    from diffpo.train import setup_accelerator, setup_data

    cfg = tiny_run_config(tmp_path / "out", pair_dir)
    accelerator = setup_accelerator(cfg)
    data = setup_data(cfg, accelerator, get_loss("mapo"))
    state = torch.get_rng_state()
    next(iter(data.dataloader))
    assert torch.equal(torch.get_rng_state(), state)
