"""`python -m studies.personalize`: the subject and its prompts, the shipped configs it trains, the
statistics of the report, and the command end to end at tiny step counts."""

import json
from pathlib import Path

import numpy as np
import pytest

from diffpo.config import config_from_dict, load_config
from diffpo.toy.grammar import COLORS, ShapePrompt
from studies.personalize import (
    TRAIN_LOOKS, PersonalizeSettings, class_prompt, heldout_looks, identifier_prompt, main, summarize_runs, train_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_subject_prompts_and_heldout_looks():
    assert identifier_prompt("red", "white").text == "a red sks star on a white background"
    assert class_prompt("red", "white").text == "a red star on a white background"
    assert ShapePrompt.parse("a purple sks star on a gray background") == identifier_prompt("purple", "gray")
    looks = heldout_looks()
    assert len(looks) == 10 and not set(looks) & set(TRAIN_LOOKS) and len(set(looks) | set(TRAIN_LOOKS)) == 18
    unseen = set(COLORS) - {c for c, _ in TRAIN_LOOKS}
    assert unseen == {"purple", "orange"} and sum(c in unseen for c, _ in looks) == 6


@pytest.mark.parametrize("method", ["dreambooth", "mapo"])
def test_shipped_toy_config_is_what_the_command_trains(method):
    shipped = load_config(REPO / "configs" / f"toy_personalize_{method}.yaml").to_dict()

    ours = config_from_dict(train_config(method, PersonalizeSettings(), Path("pairs/star"), Path("x"), "toy:base", 0)).to_dict()
    for cfg in (shipped, ours):
        cfg.pop("output_dir")
        cfg["logging"].pop("progress")
    assert shipped == ours


def test_summary_statistics_by_hand():
    groups = {"subject": np.array([0, 0, 1, 1]), "class": np.array([0, 1]), "base": np.array([0, 1])}
    base = {"subject_fidelity": np.array([0.0, 0.0, 0.0, 1.0]), "base_prompt_faithfulness": np.array([1.0, 0.5])}
    runs = {
        "dreambooth": {0: {"subject_fidelity": np.array([1.0, 0.0, 1.0, 1.0]), "base_prompt_faithfulness": np.array([1.0, 1.0])},
                       1: {"subject_fidelity": np.array([1.0, 1.0, 1.0, 1.0]), "base_prompt_faithfulness": np.array([0.5, 0.5])}},
        "mapo": {0: {"subject_fidelity": np.array([0.0, 0.0, 1.0, 0.0]), "base_prompt_faithfulness": np.array([1.0, 0.5])},
                 1: {"subject_fidelity": np.array([1.0, 0.0, 0.0, 0.0]), "base_prompt_faithfulness": np.array([1.0, 0.0])}},
    }
    out = summarize_runs(base, runs, groups)
    db, mapo = out["methods"]["dreambooth"]["subject_fidelity"], out["methods"]["mapo"]["subject_fidelity"]
    assert db["mean"] == pytest.approx(7 / 8) and db["per_seed"] == [0.75, 1.0]
    assert db["minus_base"] == pytest.approx(7 / 8 - 1 / 4)
    assert mapo["mean"] == pytest.approx(2 / 8)
    assert out["mapo_minus_dreambooth"]["subject_fidelity"]["mean"] == pytest.approx(2 / 8 - 7 / 8)
    assert out["methods"]["mapo"]["base_prompt_faithfulness"]["minus_base"] == pytest.approx(0.625 - 0.75)
    for entry in (db, mapo, out["base"]["subject_fidelity"]):
        lo, hi = entry["ci"]
        assert lo <= entry["mean"] <= hi
    lo, hi = db["minus_base_ci"]
    assert 0 < lo <= hi  # every (seed, prompt) unit of dreambooth beats or ties the base here


def test_command_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "p"
    code = main(["--out", str(out), "--seeds", "0", "--steps", "2", "--batch-size", "4", "--class-images", "1",
                 "--eval-per-prompt", "1", "--drift-per-prompt", "1", "--inference-steps", "2", "--max-prompts", "2"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert {"command", "date", "commit", "machine", "seeds", "settings", "results", "seconds"} <= set(report)
    metrics = {"subject_fidelity", "subject_fidelity_clean", "subject_fidelity_seen_looks", "color", "background", "prompt_faithfulness", "class_prompt_star_rate", "base_prompt_faithfulness", "base_prompt_pixel_change"}
    for method in ("dreambooth", "mapo"):
        entries = report["results"]["methods"][method]
        assert set(entries) == metrics
        assert all(0.0 <= e["mean"] <= 1.0 and e["ci"][0] <= e["mean"] <= e["ci"][1] for e in entries.values())
    assert set(report["results"]["mapo_minus_dreambooth"]) == metrics
    # The pairs: 8 subject images, prompted with the identifier; the rejected image is a class sample.
    rows = [json.loads(line) for line in (out / "seed0" / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(" sks star " in r["prompt"] and r["rejected_prompt"] == r["prompt"].replace(" sks", "") for r in rows)
    text = (out / "report.md").read_text()
    assert "subject fidelity" in text and "mapo - dreambooth" in text and (out / "grid.png").is_file()
    assert "dreambooth: subject fidelity" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--seeds", "0,x"]) == 2
    assert "--seeds '0,x': use comma-separated integers" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--class-images", "1", "--batch-size", "9"]) == 2
    assert "batch-size 9 exceeds the 8 pairs per seed" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--device", "gpu0"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
