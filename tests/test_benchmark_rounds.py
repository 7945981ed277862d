"""benchmarks/rounds_verdict.py: target 1's ratio from interleaved public and trainer rounds."""

import json

import pytest

from benchmarks.rounds_verdict import load_rounds, main, verdict


def _public(folder, number, steps):
    rows = [{"case": "public/mapo/full", "step_s": sorted(steps)[len(steps) // 2], "step_s_all": steps}]
    (folder / f"public_round{number}.json").write_text(json.dumps({"rows": rows}))


def _trainer(folder, number, median, steps, overrides=(), profile=None):
    run = {"median_step_s": median, "step_seconds": steps, "overrides": list(overrides)}
    if profile:
        run["profile"] = {"steps": [profile, profile + 1]}
    (folder / f"e2e_train_round{number}.json").write_text(json.dumps(run))


def test_rounds_pair_each_trainer_run_with_the_public_rounds_around_it(tmp_path, capsys):
    call = tmp_path / "call"
    call.mkdir()
    for number, step in [(1, 1.2), (2, 1.0), (3, 1.3)]:
        _public(call, number, [step] * 4)
    # 20 steps: the first 5 left out; the profiled steps 8-10 (5.0 s) too
    steps = [9.0] * 5 + [0.4] * 2 + [5.0] * 3 + [0.4] * 10
    _trainer(call, 1, 0.4, steps, profile=8)
    _trainer(call, 2, 0.5, [9.0] * 5 + [0.5] * 15)
    _trainer(call, 10, 0.1, [0.1] * 20, overrides=["train.channels_last=true"])  # excluded below
    rounds = load_rounds(call, exclude=("train.channels_last=true",))
    assert [number for number, _, _ in rounds["trainer"]] == [1, 2]
    assert rounds["trainer"][0][2] == [400.0] * 12  # steps 6-7 and 11-20
    result = verdict([rounds], bootstrap=4000)
    runs = result["per_run"]
    assert [r["public_ms"] for r in runs] == [[1200.0, 1000.0], [1000.0, 1300.0]]
    assert runs[0]["ratio"] == pytest.approx(1100 / 400) and runs[1]["ratio"] == pytest.approx(1150 / 500)
    # pooled: median of the 12 public steps (1200) over the median of 12 x 400 and 15 x 500 ms steps (500)
    assert result["public_median_ms"] == pytest.approx(1200.0) and result["trainer_median_ms"] == pytest.approx(500.0)
    assert result["pooled_ratio"] == pytest.approx(2.4)
    # paired: the mean of two resampled run ratios is 2.3, 2.525 or 2.75 (1/4, 1/2, 1/4): the 95% ends are the extremes
    assert result["paired_95"] == pytest.approx([1150 / 500, 1100 / 400])
    assert result["mean_run_ratio"] == pytest.approx((1100 / 400 + 1150 / 500) / 2) and result["runs_at_or_above_3"] == 0
    # unpaired: public round medians {1200, 1000, 1300} over trainer runs {400, 500}; the extremes 1000/500 and
    # 1300/400 each come up with probability 7/27 x 1/4 > 2.5%
    assert result["unpaired_95"] == pytest.approx([1000 / 500, 1300 / 400])
    main([str(call), "--exclude", "train.channels_last=true", "--bootstrap", "50", "--out", str(tmp_path / "v.json")])
    assert "-> 2.400x" in capsys.readouterr().out
    assert json.loads((tmp_path / "v.json").read_text())["trainer_runs"] == 2


def test_rounds_refuse_a_run_timed_with_another_skip_and_a_call_without_public_rounds(tmp_path):
    call = tmp_path / "call"
    call.mkdir()
    _trainer(call, 1, 0.45, [9.0] * 5 + [0.4] * 15)  # its median is not the one of steps 6-20
    _public(call, 1, [1.2] * 4)
    with pytest.raises(ValueError, match="e2e_train_round1.json: its steps after the first 5"):
        load_rounds(call)
    (call / "public_round1.json").unlink()
    _trainer(call, 1, 0.4, [9.0] * 5 + [0.4] * 15)
    with pytest.raises(ValueError, match="no public_round"):
        load_rounds(call)
