"""Adding a loss, a data format or a model family touches one new file plus a registration.

The losses here live in this test module, are registered, train through ``diffpo.train.train``
unchanged, and are removed again. The spec declares what the trainer must provide (the reference
errors, the loser's prompt) and the margin it logs; a trainer or ``LossSpec.metrics`` branch on a
loss's name would make these fail.

The data format (``tests/extending/csv_format.py``) and the family (``tests/extending/my_family.py``)
are each one file; registered, ``diffpo train`` reads the CSV and trains the family's tiny model
end to end, and unregistered, both names are unknown again.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, tiny_run_config as make_cfg

from diffpo.losses import LOSSES, LossSpec, register, unregister
from diffpo.train import train


def hinge_loss(err_w, err_l, ref_w=None, ref_l=None, gap: float = 0.05):
    """err_w + relu(gap - (err_l - err_w)): fit the chosen image, and keep the rejected one's error
    at least ``gap`` above it."""
    return err_w + F.relu(gap - (err_l - err_w))


def hinge_margin(err_w, err_l, ref_w=None, ref_l=None, gap: float = 0.05, **hparams):
    return err_l - err_w - gap  # > 0 once the hinge is satisfied


def ref_hinge_loss(err_w, err_l, ref_w, ref_l, gap: float = 0.05):
    """The hinge on the reference-relative gap ((err_l - ref_l) - (err_w - ref_w))."""
    return F.relu(gap - ((err_l - ref_l) - (err_w - ref_w)))


def ref_hinge_margin(err_w, err_l, ref_w, ref_l, **hparams):
    return (err_l - ref_l) - (err_w - ref_w)


SPECS = {
    "test_hinge": LossSpec("test_hinge", hinge_loss, needs_reference=False, hparams={"gap": 0.05}, ranges={"gap": (0, None, "inclusive")}, margin=hinge_margin),
    "test_ref_hinge": LossSpec("test_ref_hinge", ref_hinge_loss, needs_reference=True, hparams={"gap": 0.05}, ranges={"gap": (0, None, "inclusive")}, margin=ref_hinge_margin),
}


@pytest.fixture(params=sorted(SPECS))
def registered(request):
    spec = register(SPECS[request.param])
    try:
        yield spec
    finally:
        unregister(spec.name)
    assert spec.name not in LOSSES


def test_a_loss_defined_in_a_test_trains_through_the_trainer(registered, tmp_path, pair_dir, model_cache):
    from safetensors.torch import load_file

    out = tmp_path / registered.name
    result = train(make_cfg(out, pair_dir, loss={"name": registered.name, "gap": 0.1}), cache_dir=model_cache)
    assert result.steps == 2 and result.skipped_steps == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "err_w", "err_l", "margin", "implicit_accuracy"} <= set(m)
        # the reference runs exactly when the spec asks for it
        assert ("ref_w" in m and "ref_l" in m) == registered.needs_reference
        # the logged margin is this spec's own (linear, so the mean of means works), with the
        # configured hparam (gap=0.1) passed through
        if registered.needs_reference:
            expected = (m["err_l"] - m["ref_l"]) - (m["err_w"] - m["ref_w"])
        else:
            expected = m["err_l"] - m["err_w"] - 0.1
        assert m["margin"] == pytest.approx(expected, abs=1e-5)
    # LoRA's B matrices start at zero: a non-zero one means the optimizer changed the weights
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    b_norms = [t.abs().sum().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k]
    assert b_norms and max(b_norms) > 0


def test_a_registered_name_is_refused_twice_and_unregister_frees_it():
    spec = register(SPECS["test_hinge"])
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(SPECS["test_hinge"])
    finally:
        unregister("test_hinge")
    assert "test_hinge" not in LOSSES


def test_metrics_use_the_declared_margin_not_the_name():
    """A copy of mapo under another name logs mapo's margin; mapo with the default margin would not."""
    import dataclasses

    mapo = LOSSES["mapo"]
    err_w, err_l = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.3])
    renamed = dataclasses.replace(mapo, name="mapo_copy")
    assert renamed.metrics(err_w, err_l) == mapo.metrics(err_w, err_l)
    gap_only = dataclasses.replace(mapo, margin=LOSSES["sft"].margin)
    assert gap_only.metrics(err_w, err_l)["margin"] == pytest.approx((err_l - err_w).mean().item())
    assert mapo.metrics(err_w, err_l)["margin"] != pytest.approx((err_l - err_w).mean().item())


# ----------------------------------------------------------------------------------------------
# A data format and a model family, one file each (tests/extending/)
# ----------------------------------------------------------------------------------------------


def _train_argv(out, *overrides):
    return ["train", f"output_dir={out}", "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=2",
            "train.learning_rate=1e-3", "model.lora.rank=4", "logging.report_to=none", "logging.progress=false", "seed=3", *overrides]


def _csv_of(pair_dir, tmp_path):
    """The shape pairs of ``pair_dir`` as a CSV next to copies of their images (no pairs.jsonl)."""
    import csv
    import json
    import shutil

    rows = [json.loads(line) for line in (pair_dir / "pairs.jsonl").read_text().splitlines()]
    folder = tmp_path / "csv_pairs"
    (folder / "img").mkdir(parents=True)
    with (folder / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        for row in rows:
            for key in ("chosen", "rejected"):
                shutil.copy(pair_dir / row[key], folder / "img" / row[key])
            writer.writerow([row["prompt"], f"img/{row['chosen']}", f"img/{row['rejected']}"])
    return folder / "pairs.csv", rows


@pytest.fixture
def csv_format():
    from extending.csv_format import CSV_FORMAT

    from diffpo.data import register_format, unregister_format

    register_format(CSV_FORMAT)
    try:
        yield CSV_FORMAT
    finally:
        unregister_format(CSV_FORMAT.name)


def test_a_format_defined_in_one_file_trains_through_diffpo_train(csv_format, pair_dir, tmp_path, capsys):
    from diffpo.cli import main
    from diffpo.config import DataConfig
    from diffpo.data import load_pair_records

    source, rows = _csv_of(pair_dir, tmp_path)
    records, report = load_pair_records(DataConfig(source=str(source), format="test_csv"))
    assert [(r.prompt, Path(r.chosen).name, Path(r.rejected).name) for r in records] == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert report.rows == report.kept == 4
    # data.format: auto asks the format's detect, before the datasets-table fallback
    assert [r.chosen for r in load_pair_records(DataConfig(source=str(source)))[0]] == [r.chosen for r in records]

    out = tmp_path / "run"
    assert main(_train_argv(out, f"data.source={source}", "data.format=test_csv")) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert "done: 2 steps (0 skipped)" in capsys.readouterr().out


def test_a_format_row_it_cannot_use_is_named_and_an_unregistered_format_is_a_config_error(csv_format, tmp_path, capsys):
    from diffpo.cli import main
    from diffpo.config import ConfigError, DataConfig
    from diffpo.data import DataError, load_pair_records, unregister_format

    source = tmp_path / "bad.csv"
    source.write_text("prompt,chosen,rejected\na red circle,missing.png,also-missing.png\n")
    with pytest.raises(DataError, match=r"bad.csv, row 0: image 0: image file not found: .*missing.png \(data.strict"):
        load_pair_records(DataConfig(source=str(source), format="test_csv", strict=True))
    unregister_format("test_csv")
    with pytest.raises(ConfigError, match=r"^data.format: unknown format 'test_csv' \(known: auto, manifest, pickapic, unpaired, unpaired_table\)$"):
        DataConfig(source=str(source), format="test_csv")
    assert main(_train_argv(tmp_path / "run", f"data.source={source}", "data.format=test_csv")) == 2
    assert "diffpo train: error: data.format: unknown format 'test_csv' (known: auto, manifest, pickapic, unpaired, unpaired_table)" in capsys.readouterr().err


def test_a_plugin_registers_a_format_through_its_entry_point(monkeypatch, tmp_path, pair_dir):
    """``data.format: test_csv`` is unknown until the plugins load; the config check loads them."""
    from importlib.metadata import EntryPoint

    import diffpo.plugins as plugins
    from diffpo.config import DataConfig
    from diffpo.data import load_pair_records, unregister_format
    from diffpo.data.format import FORMATS

    monkeypatch.setattr(plugins, "_loaded", None)
    monkeypatch.setattr(plugins, "PLUGIN_ERRORS", {})
    entry = EntryPoint(name="csv", value="extending.csv_format:register", group=plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [entry] if group == plugins.GROUP else [])
    assert "test_csv" not in FORMATS
    DataConfig(format="auto"), DataConfig(format="manifest")
    assert plugins._loaded is None  # a known name loads no plugin
    try:
        source, _ = _csv_of(pair_dir, tmp_path)
        records, _ = load_pair_records(DataConfig(source=str(source), format="test_csv"))
        assert len(records) == 4 and plugins.PLUGIN_ERRORS == {}
    finally:
        unregister_format("test_csv")


def test_the_format_registry_keeps_names_unique_and_reads_unpaired_rows(tmp_path):
    from diffpo.config import DataConfig
    from diffpo.data import DataError, DataFormat, load_pair_records, register_format, unregister_format

    with pytest.raises(ValueError, match="'manifest' is already registered"):
        register_format(DataFormat("manifest", lambda cfg: []))
    with pytest.raises(ValueError, match="'auto' is not a format name"):
        register_format(DataFormat("auto", lambda cfg: []))
    # a format may yield single images with a desirable/undesirable label (Diffusion-KTO's feedback):
    # they come back packed two per record, each with its label (issue 18)
    from PIL import Image

    from diffpo.data.format import RawExample

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    examples = [RawExample(i, f"shape {i}", str(tmp_path / "x.png"), i % 2 == 0) for i in range(4)]
    register_format(DataFormat("test_unpaired", lambda cfg: iter(examples), rows="unpaired"))
    try:
        records, report = load_pair_records(DataConfig(source=str(tmp_path), format="test_unpaired"))
        assert len(records) == 2 and report.desirable == 2
        assert all(r.labels == (int(r.prompt.split()[1]) % 2 == 0, int(r.rejected_prompt.split()[1]) % 2 == 0) for r in records)
    finally:
        unregister_format("test_unpaired")


@pytest.fixture
def renamed_family():
    from extending.my_family import RenamedSDFamily

    from diffpo.family import FAMILIES, register_family, unregister_family

    register_family(RenamedSDFamily)
    try:
        yield RenamedSDFamily
    finally:
        unregister_family(RenamedSDFamily.name)
    assert RenamedSDFamily.name not in FAMILIES


def test_a_family_defined_in_one_file_trains_its_tiny_model_through_diffpo_train(renamed_family, pair_dir, tmp_path, monkeypatch, capsys):
    import json

    from safetensors.torch import load_file

    from diffpo.cli import main
    from diffpo.config import ModelConfig
    from diffpo.models import resolve_family

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # tiny:renamed_sd is built under ~/.cache/diffpo/tiny
    cache_dir = tmp_path / "home" / ".cache" / "diffpo" / "tiny"
    # model.family: auto finds the family from the pipeline class it declares
    folder, family = resolve_family(ModelConfig(pretrained="tiny:renamed_sd"), cache_dir)
    assert family == "renamed_sd"
    assert json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "RenamedSDPipeline"

    out = tmp_path / "run"
    renamed_family.predictions = 0
    assert main(_train_argv(out, f"data.source={pair_dir}", "model.pretrained=tiny:renamed_sd")) == 0
    assert renamed_family.predictions == 2  # one batched prediction per step (no reference: mapo)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert max(t.abs().sum().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k) > 0


def test_a_family_declaration_that_clashes_is_refused_and_unregistering_forgets_its_tiny_model(renamed_family, tmp_path):
    from diffpo.family import register_family
    from diffpo.families.sd import StableDiffusionFamily
    from diffpo.tiny import tiny_builder

    assert tiny_builder("renamed_sd").__name__ == "build_tiny_renamed_sd"

    class OtherRenamed(StableDiffusionFamily):
        name = "renamed_sd"

    with pytest.raises(ValueError, match="model family 'renamed_sd' is already registered"):
        register_family(OtherRenamed)

    class ClaimsSD(StableDiffusionFamily):
        name = "claims_sd"
        detect_pipeline_classes = ("StableDiffusionPipeline",)

    with pytest.raises(ValueError, match="detect_pipeline_classes 'StableDiffusionPipeline' is already declared by family 'sd'"):
        register_family(ClaimsSD)

    class SameTiny(StableDiffusionFamily):
        name = "same_tiny"
        tiny_models = {"renamed_sd": lambda: None}

    with pytest.raises(ValueError, match="tiny_models 'renamed_sd' is already declared by family 'renamed_sd'"):
        register_family(SameTiny)
    from diffpo.family import unregister_family

    unregister_family("renamed_sd")
    with pytest.raises(ValueError, match=r"unknown tiny model 'tiny:renamed_sd' \(valid: tiny:sd, tiny:sd2v, tiny:sdxl, tiny:sd3, tiny:flux\)"):
        tiny_builder("renamed_sd")
