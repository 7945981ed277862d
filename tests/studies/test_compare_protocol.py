"""studies.compare: the knob is chosen on the training seeds alone and evaluated on separate seeds;
paired statistics and the verdict rule on hand-made numbers; resumable runs; one-line errors.

The protocol tests replace the experiment (training + evaluation) by a fake whose numbers depend
on the seed, so a selection that peeked at the evaluation seeds would pick another value."""

import json
import math

import numpy as np
import pytest

from studies import compare, protocol
from studies.paired import mean_sd, paired_difference, t_interval
from studies.report import claim_rows, verdict, verdict_lines

# ------------------------------------------------------------------------------------ statistics


def test_paired_difference_by_hand():
    a = {0: 0.8, 1: 0.6, 2: 0.9}
    b = {0: 0.5, 1: 0.7, 2: 0.4, 3: 0.1}  # seed 3 has no partner: listed, not paired
    d = paired_difference(a, b)
    # diffs 0.3, -0.1, 0.5: mean 0.7/3; sample sd (ddof = 1) sqrt(0.186667 / 2) = 0.305505
    assert d["diffs"] == pytest.approx([0.3, -0.1, 0.5]) and d["seeds"] == [0, 1, 2] and d["unpaired_seeds"] == [3]
    assert d["mean"] == pytest.approx(0.7 / 3) and d["sd"] == pytest.approx(0.305505, abs=1e-6)
    # t_{0.975, 2} = 4.302653: half width 4.302653 * 0.305505 / sqrt(3) = 0.758917
    assert d["ci"] == pytest.approx([0.7 / 3 - 0.758917, 0.7 / 3 + 0.758917], abs=1e-5)
    assert (d["a_better"], d["b_better"], d["ties"]) == (2, 1, 0)
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.0})["ties"] == 1


def test_sample_sd_is_ddof_1():
    s = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert s["sd"] == pytest.approx(math.sqrt(5 / 3)) and s["sd"] != pytest.approx(np.std([1, 2, 3, 4]))
    assert math.isnan(mean_sd([2.0])["sd"]) and all(math.isnan(v) for v in t_interval([2.0]))
    # five seeds, t_{0.975, 4} = 2.776445
    lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert hi - 3.0 == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), abs=1e-5) and lo == pytest.approx(6.0 - hi)


# ------------------------------------------------------------------------------------ verdicts


def test_verdict_rule():
    assert verdict([0.01, 0.2], +1) == "supported"
    assert verdict([-0.01, 0.2], +1) == "not supported"  # includes 0
    assert verdict([-0.3, -0.1], +1) == "not supported"  # the other direction
    assert verdict([-0.3, -0.1], -1) == "supported"
    assert verdict([float("nan"), float("nan")], +1) == "not tested here" and verdict(None, +1) == "not tested here"


def _results(objectives, per_objective):
    """Hand-made results: per_objective[objective] = (win rates by seed per setting, s/step)."""
    settings = ["style:outline:0.5", "style:outline:1.0", "reward:size"]
    runs = []
    for objective in objectives:
        wins, step = per_objective[objective]
        for k, setting in enumerate(settings):
            for seed, w in enumerate(wins[k]):
                runs.append({"stage": "final", "setting": setting, "seed": seed, "objective": objective, "knob": "beta", "value": 1.0, "win_rate": w,
                             "reward_gain": w, "faithfulness_delta": 0.0, "diversity_ratio": 1.0, "seconds_per_step": step + 0.001 * seed, "extras": {}, "margins": None})
    return {"plan": {"settings": settings, "objectives": objectives}, "runs": runs}


def test_claim_verdicts_on_hand_made_results():
    dpo = [[0.70, 0.72, 0.68, 0.71, 0.69], [0.60, 0.62, 0.58, 0.61, 0.59], [0.70, 0.70, 0.70, 0.70, 0.70]]
    mapo = [[0.80, 0.60, 0.90, 0.55, 0.75], [0.70, 0.73, 0.69, 0.70, 0.71], [0.75, 0.74, 0.76, 0.75, 0.75]]  # style 0.5: noisy
    dmpo = [[0.60, 0.62, 0.58, 0.61, 0.59], [0.50, 0.70, 0.60, 0.55, 0.65], [0.71, 0.69, 0.72, 0.68, 0.70]]
    rows = claim_rows(_results(["diffusion_dpo", "mapo", "dmpo"], {"diffusion_dpo": (dpo, 0.07), "mapo": (mapo, 0.06), "dmpo": (dmpo, 0.075)}))
    got = {(r["claim"].split(" (")[0], r["where"]): r["verdict"] for r in rows}
    assert got[("better than Diffusion-DPO under reference mismatch", "style:outline:1.0")] == "supported"  # every seed +0.1
    assert got[("cheaper per training step than Diffusion-DPO", "every (setting, seed)")] == "supported"
    assert got[("needs no reference model", "the objective")] == "supported"
    assert got[("preference alignment as divergence minimisation", "-")] == "not tested here"
    assert got[("beats Diffusion-DPO overall", "style:outline:0.5")] == "not supported"  # interval includes 0
    assert got[("beats Diffusion-DPO overall", "reward:size")] == "supported"
    # per-seed means over settings: +0.083, +0.010, +0.130, -0.007, +0.077; t interval [-0.011, +0.128]
    assert got[("beats Diffusion-DPO overall", "mean over settings, per seed")] == "not supported"
    assert got[("better than Diffusion-DPO", "style:outline:0.5")] == "not supported"  # DMPO lower on every seed
    lines = "\n".join(verdict_lines(rows))
    assert "| DMPO | better than Diffusion-DPO (win rate vs base) | style:outline:0.5 | **not supported** | win_rate: -0.100 [-0.100, -0.100] (0 / 5 / 0, n = 5); the interval lies on the other side of 0 |" in lines
    ratio = next(r for r in rows if r["where"] == "every (setting, seed)")["difference"]
    assert ratio["n"] == 15 and ratio["ratio"]["mean"] == pytest.approx(np.mean([(0.07 + 0.001 * s) / (0.06 + 0.001 * s) for s in range(5)]))
    # an objective the run did not include: its claims are not tested
    rows = claim_rows(_results(["diffusion_dpo", "mapo"], {"diffusion_dpo": (dpo, 0.07), "mapo": (mapo, 0.06)}))
    assert {r["verdict"] for r in rows if r["claim"].startswith("better than Diffusion-DPO (")} == {"not tested here"}


# ------------------------------------------------------------------------------------ the protocol


def test_select_knob_rule():
    reports = [{"value": 0.1, "seed": 1, "reward_gain": 0.5, "faithfulness_delta": -0.2}, {"value": 0.3, "seed": 1, "reward_gain": 0.2, "faithfulness_delta": -0.01},
               {"value": 0.03, "seed": 1, "reward_gain": 0.1, "faithfulness_delta": 0.0}]
    assert protocol.select_knob(reports, "mapo")["value"] == 0.3  # 0.1 gains more but drops 20 points
    none_fit = [dict(r, faithfulness_delta=r["faithfulness_delta"] - 0.5) for r in reports]
    pick = protocol.select_knob(none_fit, "mapo")
    assert pick["value"] == 0.03 and pick["why"].startswith("no value within")


TRAIN, EVAL = [1000, 1100], [0, 100]


@pytest.fixture
def fake_experiment(monkeypatch, tmp_path):
    """run_experiment -> a report whose reward gain peaks at beta 0.3 on the training seeds and at
    0.03 on the evaluation seeds; every call is recorded with whether selection.json existed."""
    calls = []
    out = tmp_path / "cmp"

    def fake_pairs(settings, model, folder, progress=False):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pairs.jsonl").write_text("")
        return folder / "pairs.jsonl"

    def fake_run(settings, run_dir, base=None, pairs=None, progress=True):
        value = settings.loss_hparams.get("beta", settings.learning_rate)
        calls.append({"seed": settings.seed, "value": value, "loss": settings.loss, "selected": (out / "selection.json").is_file(),
                      "eval_per_prompt": settings.eval_per_prompt, "pairs": str(pairs)})
        best = 0.3 if settings.seed in TRAIN else 0.03
        gain = 1.0 - abs(math.log(value / best)) if settings.loss == "mapo" else 0.1
        run_dir.mkdir(parents=True, exist_ok=True)
        report = {"method": settings.loss, "win_rate": 0.5 + gain / 4, "win_rate_ci": [0.4, 0.9], "reward_base": 0.2, "reward_tuned": 0.2 + gain,
                  "faithfulness_base": 0.9, "faithfulness_tuned": 0.88, "diversity_base": 1.0, "diversity_tuned": 0.8, "seconds_per_step": 0.05,
                  "quality_base": 0.5, "quality_tuned": 0.45, "n_eval_images": 11 * settings.eval_per_prompt}
        (run_dir / "report.json").write_text(json.dumps(report))
        (run_dir / "train").mkdir()
        (run_dir / "train" / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "margin": 0.5 * k, "implicit_accuracy": 0.5}) + "\n" for k in range(1, 121)))

    monkeypatch.setattr("diffpo.toy.demo.build_pairs", fake_pairs)
    monkeypatch.setattr("diffpo.toy.demo.run_experiment", fake_run)
    monkeypatch.setattr("diffpo.toy.base.load_toy_model", lambda base, device: None)
    return out, calls


def _argv(out, *extra):
    return ["--out", str(out), "--objectives", "sft,mapo", "--sweep-settings", "style:outline:0.5", "--settings", "style:outline:0.5,style:outline:1.0",
            "--train-seeds", ",".join(map(str, TRAIN)), "--eval-seeds", ",".join(map(str, EVAL)), "--min-eval-seeds", "2",
            "--eval-per-prompt", "4", "--sweep-eval-per-prompt", "2", *extra]


def test_chooses_on_training_seeds_and_evaluates_on_separate_ones(fake_experiment, capsys):
    out, calls = fake_experiment
    assert compare.main(_argv(out)) == 0
    sweep, final = [c for c in calls if not c["selected"]], [c for c in calls if c["selected"]]
    # every sweep run (both knob values x training seeds) ran before the selection existed
    assert {c["seed"] for c in sweep} == set(TRAIN) and len(sweep) == 2 * (3 + 3)
    assert all(c["eval_per_prompt"] == 2 for c in sweep) and all(c["eval_per_prompt"] == 4 for c in final)
    # the selection read the training seeds (best 0.3), not the evaluation seeds (best 0.03)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["by_family"]["style:outline"]["mapo"]["value"] == 0.3
    assert {row["seeds"] == TRAIN for row in selection["by_family"]["style:outline"]["mapo"]["table"]} == {True}
    # final runs: evaluation seeds only, the chosen value only, both settings, methods sharing pairs
    assert {c["seed"] for c in final} == set(EVAL) and len(final) == 2 * 2 * 2
    assert {c["value"] for c in final if c["loss"] == "mapo"} == {0.3}
    assert len({c["pairs"] for c in final}) == 4  # one pair set per (setting, seed), shared by sft and mapo
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == [] and len(results["runs"]) == 20
    margins = results["runs"][0]["margins"]  # the per-step log, thinned to 50 evenly spaced steps
    assert len(margins["step"]) == 50 and margins["step"][0] == 1 and margins["step"][-1] == 120 and margins["margin"][-1] == 60.0
    assert results["meta"]["commands"] and "--train-seeds 1000,1100" in results["meta"]["commands"][0]
    assert {"python", "torch", "diffusers", "platform", "device"} <= set(results["meta"]["machine"]) and "commit" in results["meta"]
    report = (out / "report.md").read_text()
    assert "| quality Δ | seeds |" in report  # an extra scorer in the run reports shows up unasked
    assert "## Verdicts on the papers' claims" in report and (out / "tradeoff.png").is_file() and (out / "mismatch.png").is_file()

    # resumable: nothing runs again; the report re-renders from results.json alone
    calls.clear()
    assert compare.main(_argv(out)) == 0 and calls == []
    (out / "report.md").unlink()
    assert compare.main(["--out", str(out), "--report-only", "--from-results"]) == 0 and "Verdicts" in (out / "report.md").read_text()
    # the export keeps the write-up and each run's report, not the per-step logs or images
    dest = out.parent / "committed"
    assert compare.main(["--out", str(out), "--report-only", "--export", str(dest)]) == 0
    kept = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert {"results.json", "report.md", "verdicts.json", "selection.json", "tradeoff.png"} <= kept
    assert sum(k.endswith("/report.json") for k in kept) == 20 and not any(k.endswith(("metrics.jsonl", "pairs.jsonl")) for k in kept)


def test_deadline_leaves_runs_for_the_next_call(fake_experiment, capsys):
    out, calls = fake_experiment
    assert compare.main(_argv(out, "--deadline-s", "0")) == 1
    assert calls == [] and "run the same command again" in capsys.readouterr().err
    assert compare.main(_argv(out, "--stage", "sweep")) == 0 and len(calls) == 12 and not (out / "selection.json").exists()
    assert compare.main(_argv(out, "--stage", "final")) == 0 and len(calls) == 20


@pytest.mark.parametrize("extra, needle", [
    (["--eval-seeds", "1000,0"], "--eval-seeds: seeds [1000] are also training seeds"),
    (["--objectives", "sft,dpo"], "--objectives: unknown loss 'dpo'"),
    (["--objectives", "sft,dreambooth"], "'dreambooth' has no knob in studies/protocol.py KNOBS"),
    (["--min-eval-seeds", "5"], "--eval-seeds: 2 seeds, the protocol needs >= 5"),
    (["--eval-seeds", "0,3"], "would share evaluation noise"),
    (["--settings", "style:outline"], "--settings: bad setting 'style:outline'"),
    (["--settings", "reward:size"], "no sweep setting chooses the knob of ['reward:size']"),
    (["--train-seeds", "1000,x"], "--train-seeds '1000,x'"),
])
def test_bad_arguments_are_one_line(extra, needle, tmp_path, capsys):
    code = compare.main(_argv(tmp_path / "c", *extra))
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("objective", sorted(protocol.KNOBS))
def test_every_knob_value_makes_a_valid_training_config(objective, tmp_path):
    """Each row of KNOBS names an hparam the objective has, with values inside its range: the
    trainer's config (the same one run_experiment trains) accepts every one of them."""
    from pathlib import Path

    from diffpo.config import config_from_dict
    from diffpo.toy.demo import DemoSettings, train_config

    knob = protocol.knob_for(objective)
    assert len(knob.values) >= 2
    for value in knob.values:
        settings = protocol.run_settings(DemoSettings(), objective, value)
        cfg = config_from_dict(train_config(settings, Path("pairs.jsonl"), tmp_path, "toy:base"))
        swept = cfg.train.learning_rate if knob.is_learning_rate else cfg.to_dict()["loss"][knob.name]
        assert swept == value and cfg.loss.name == objective
        assert cfg.train.learning_rate == (value if knob.is_learning_rate else protocol.SHARED_LEARNING_RATE)


def test_extra_scores_are_found_in_each_report_shape():
    """A scorer added later (17B's image quality, say) reaches the comparison without code here."""
    from studies.report import _extras

    report = {"reward_base": 0.2, "reward_tuned": 0.3, "faithfulness_base": 0.9, "faithfulness_tuned": 0.8, "diversity_base": 1.0, "diversity_tuned": 0.9,
              "quality_base": 0.5, "quality_tuned": 0.4, "noise": {"base": 0.06, "tuned": 0.18}, "faithfulness": {"base": {"color": 1.0}, "tuned": {"color": 1.0}},
              "task_reward": "shapes_style", "scorers": {"shapes_style": {"mean_base": 0.2, "mean_tuned": 0.3}, "shapes_color": {"mean_base": 1, "mean_tuned": 1},
                                                         "shapes_quality": {"mean_base": 0.7, "mean_tuned": 0.6}}}
    assert _extras(report) == {"quality": {"base": 0.5, "tuned": 0.4}, "noise": {"base": 0.06, "tuned": 0.18}, "shapes_quality": {"base": 0.7, "tuned": 0.6}}


def test_a_family_member_runs_under_its_own_label(monkeypatch, tmp_path):
    """A KNOBS row with ``loss`` and ``fixed`` (how f-DPO members join): the run trains the
    registered loss with the fixed hparams plus the swept one, under the row's label."""
    monkeypatch.setitem(protocol.KNOBS, "mapo_snr1", protocol.Knob("beta", (0.05, 0.2), loss="mapo", fixed={"snr_value": 1.0}))
    settings = protocol.run_settings(__import__("diffpo.toy.demo", fromlist=["DemoSettings"]).DemoSettings(), "mapo_snr1", 0.2)
    assert settings.loss == "mapo" and settings.loss_hparams == {"snr_value": 1.0, "beta": 0.2}
    assert protocol.Run("final", "reward:size", 0, "mapo_snr1", 0.2).key == "reward_size/seed0/mapo_snr1/beta=0.2"
    monkeypatch.setitem(protocol.KNOBS, "mapo_bad", protocol.Knob("beta", (0.1,), loss="mapo", fixed={"snr": 1.0}))
    assert compare.main(_argv(tmp_path / "c", "--objectives", "sft,mapo_bad")) == 2


def test_an_objective_added_later_keeps_the_others_frozen(fake_experiment, capsys):
    """Issue 18's objectives join a finished study by one more name in --objectives: only their
    runs run, their knob is chosen from their own sweep, the earlier choices stay as written."""
    out, calls = fake_experiment
    assert compare.main(_argv(out)) == 0
    before = json.loads((out / "selection.json").read_text())["by_family"]["style:outline"]
    calls.clear()
    argv = _argv(out)
    argv[argv.index("sft,mapo")] = "sft,mapo,dmpo"
    assert compare.main(argv) == 0
    assert {c["loss"] for c in calls} == {"dmpo"} and len(calls) == 3 * 2 + 2 * 2
    after = json.loads((out / "selection.json").read_text())["by_family"]["style:outline"]
    assert {k: after[k] for k in before} == before and "dmpo" in after
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 30
    # any other change of plan is refused, naming the file
    assert compare.main(_argv(out, "--steps", "10")) == 2
    assert "holds a study with another plan" in capsys.readouterr().err
