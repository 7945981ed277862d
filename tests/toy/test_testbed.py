"""The shapes-world testbed: committed base model, tasks, scorers, demo and eval agreement."""

import json

import numpy as np
import pytest

from diffpo.config import DataConfig, ModelConfig
from diffpo.data import load_pair_records
from diffpo.models import load_components, resolve_pretrained
from diffpo.sampling import generate
from diffpo.toy.base import ASSET_DIR
from diffpo.toy.grammar import ShapePrompt, all_prompts
from diffpo.toy.render import render
from diffpo.toy.scorers import diversity, thinness
from diffpo.toy.tasks import Sampler, build_reward_pairs, build_style_pairs, label_agreement, prompt_split

FAST = Sampler(num_inference_steps=4, guidance_scale=3.0, batch_size=64)


@pytest.fixture(scope="module")
def base():
    return load_components(ModelConfig(pretrained="toy:base"))


def test_committed_base_model_and_its_record():
    assert resolve_pretrained("toy:base") == str(ASSET_DIR)
    info = json.loads((ASSET_DIR / "pretrain.json").read_text())
    assert info["seed"] == 0 and "diffpo toy pretrain" in info["command"]
    # the measured accuracy the issue asks for (>= 80% color and shape)
    assert info["faithfulness"]["color"] >= 0.8 and info["faithfulness"]["shape"] >= 0.8
    size = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert size < 10 * 2**20


def test_base_samples_are_recognisable(base):
    from diffpo.sampling import generate
    from diffpo.toy.checker import faithfulness

    prompts = all_prompts()[::4]  # 14 prompts, every color and shape
    images = generate(base, [p.text for p in prompts], list(range(len(prompts))), num_inference_steps=10, progress=False)
    acc = faithfulness(images, prompts)
    assert acc["color"] >= 0.7 and acc["shape"] >= 0.7, acc


def test_thinness_separates_styles():
    prompts = all_prompts()[:12]
    solid = np.mean([thinness(render(p, seed=i)) for i, p in enumerate(prompts)])
    outline = np.mean([thinness(render(p, style="outline", severity=1.0, seed=i)) for i, p in enumerate(prompts)])
    striped = np.mean([thinness(render(p, style="striped", severity=1.0, seed=i)) for i, p in enumerate(prompts)])
    assert solid < 0.35 and outline > 0.9 and striped > 0.75


def test_diversity():
    a = render(ShapePrompt("red", "circle", "black"), seed=0)
    assert diversity([a, a, a], [0, 0, 0]) == 0.0
    b = render(ShapePrompt("red", "square", "white"), seed=1)
    assert diversity([a, b], [0, 0]) > 0.2
    assert diversity([a, b], [0, 1]) == 0.0  # only within a prompt


def test_prompt_split_holds_out_new_combinations():
    train, heldout = prompt_split()
    assert heldout and not set(train) & set(heldout)
    assert {p.color for p in heldout} <= {p.color for p in train}


def test_style_pairs_in_manifest_format(base, tmp_path):
    prompts = prompt_split()[0][:3]
    path = build_style_pairs(base, tmp_path, prompts, per_prompt=2, style="outline", severity=1.0, sampler=FAST, progress=False)
    records, report = load_pair_records(DataConfig(source=str(path)))
    assert report.kept == 6 and [r.prompt for r in records[:2]] == [prompts[0].text] * 2
    chosen, rejected = records[0].open("chosen"), records[0].open("rejected")
    assert chosen.size == rejected.size == (32, 32)
    assert thinness(chosen) > 0.9  # the new style
    # Built through from-images: a folder of renders with caption files, as a user would supply ...
    assert (tmp_path / "chosen" / "00003.txt").read_text().strip() == prompts[1].text
    # ... and the same pairs the task always made: render k and rejected sample k use seed k (seed 0).
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(range(6)) and "rejected_prompt" not in rows[0]
    assert np.array_equal(np.asarray(records[3].open("chosen")), np.asarray(render(prompts[1], style="outline", severity=1.0, seed=3)))
    direct = generate(base, [prompts[1].text], [3], progress=False, **FAST.as_dict())[0]
    gap = np.abs(np.asarray(records[3].open("rejected"), dtype=int) - np.asarray(direct, dtype=int))
    assert gap.max() <= 2  # batch-of-6 vs batch-of-1 float rounding only
    with pytest.raises(ValueError, match="needs a new style"):
        build_style_pairs(base, tmp_path, prompts, per_prompt=1, style="solid", sampler=FAST, progress=False)


def test_reward_pairs_in_pickapic_format_with_ties_and_noise(base, tmp_path):
    prompts = prompt_split()[0][:4]
    path = build_reward_pairs(base, tmp_path / "clean", prompts, per_prompt=3, reward="size", sampler=FAST, progress=False)
    assert path.name == "pairs.parquet" and label_agreement(path) == 1.0
    records, report = load_pair_records(DataConfig(source=str(path)))
    assert report.rows == 12
    noisy = build_reward_pairs(base, tmp_path / "noisy", prompts, per_prompt=3, reward="size", label_noise=0.5, tie_margin=0.02, seed=1, sampler=FAST, progress=False)
    _, noisy_report = load_pair_records(DataConfig(source=str(noisy)))
    assert label_agreement(noisy) < 1.0 or noisy_report.ties_dropped > 0


def test_demo_smoke_writes_the_report(tmp_path, image_cache_dir):
    """The main job end to end at a toy size (the full-size run is the README command)."""
    from diffpo.toy.demo import DemoSettings, run_experiment

    settings = DemoSettings(steps=3, pairs_per_prompt=1, eval_per_prompt=2, batch_size=4, num_inference_steps=3)
    report = run_experiment(settings, tmp_path, progress=False)
    for key in ("method", "task", "win_rate", "win_rate_ci", "faithfulness_base", "faithfulness_tuned", "quality_base", "quality_tuned", "seconds", "checks", "passed"):
        assert key in report
    assert 0 <= report["quality_tuned"] <= 1 and 0 <= report["quality_base"] <= 1
    assert "| quality (1 - background grain" in (tmp_path / "report.md").read_text()
    # the base model's samples went to the image cache (the session's, tests/conftest.py)
    assert len(list(image_cache_dir.rglob("*.png"))) >= 2 * len(prompt_split()[1])
    assert report["method"] == "mapo" and 0 <= report["win_rate"] <= 1
    low, high = report["win_rate_ci"]
    assert low <= report["win_rate"] <= high
    for name in ("report.json", "report.md", "curves.png", "eval/grid.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "report.json").read_text())["train_steps"] == 3

    # diffpo eval on the same models, prompts and seeds gives the testbed's numbers
    from diffpo.cli import main

    eval_dir = tmp_path / "cli_eval"
    prompts_file = tmp_path / "heldout.txt"
    prompts_file.write_text("\n".join(p.text for p in prompt_split()[1]) + "\n")
    code = main([
        "eval", "--model", str(ASSET_DIR), "--tuned-model", str(tmp_path / "train" / "final"), "--prompts", str(prompts_file),
        "--scorers", "shapes_style,shapes_color,shapes_shape", "--images-per-prompt", "2", "--seed", str(10_000 + settings.seed),
        "--steps", "3", "--guidance", "3.0", "--out", str(eval_dir),
    ])
    assert code == 0
    cli = json.loads((eval_dir / "results.json").read_text())["scorers"]
    assert cli["shapes_style"]["win_rate"] == pytest.approx(report["win_rate"])
    assert cli["shapes_style"]["win_rate_ci"] == pytest.approx(report["win_rate_ci"])
    assert (cli["shapes_color"]["mean_tuned"] + cli["shapes_shape"]["mean_tuned"]) / 2 == pytest.approx(report["faithfulness_tuned"])


def test_demo_pass_criteria():
    """Win rate up (CI low end > 0.5), faithfulness and quality kept within their tolerances."""
    from diffpo.toy.demo import FAITHFULNESS_TOLERANCE, QUALITY_TOLERANCE, pass_checks, verdict

    good = {"win_rate_ci": [0.86, 0.95], "faithfulness_base": 0.92, "faithfulness_tuned": 0.92 - FAITHFULNESS_TOLERANCE, "quality_base": 0.97, "quality_tuned": 0.97 - QUALITY_TOLERANCE}
    assert pass_checks(good) == {"win_rate_up": True, "faithfulness_kept": True, "quality_kept": True}
    assert verdict({**good, "checks": pass_checks(good)}) == "PASS"
    grainy = {**good, "quality_tuned": 0.86}  # issue 17's demo: 0.970 -> 0.858
    assert pass_checks(grainy)["quality_kept"] is False
    assert verdict({**grainy, "checks": pass_checks(grainy)}) == "FAIL (quality not kept)"
    assert pass_checks({**good, "win_rate_ci": [0.5, 0.7]})["win_rate_up"] is False
    assert pass_checks({**good, "faithfulness_tuned": 0.86})["faithfulness_kept"] is False

