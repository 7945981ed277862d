"""Paired win rate and bootstrap intervals, checked against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from diffpo.evaluate.stats import bootstrap_ci, summarize, win_rate


def test_all_wins_give_one_and_a_degenerate_interval() -> None:
    tuned, base = [2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0]
    assert win_rate(tuned, base) == 1.0
    assert bootstrap_ci(tuned, base) == (1.0, 1.0)


def test_all_ties_give_one_half_whatever_the_scores() -> None:
    scores = [0.3, -1.0, 7.5]
    assert win_rate(scores, scores) == 0.5
    assert bootstrap_ci(scores, scores) == (0.5, 0.5)


def test_three_pairs_by_hand() -> None:
    # pair 1: 2 > 1 win (1), pair 2: 2 == 2 tie, pair 3: 5 > 4 win (1)
    tuned, base = [2.0, 2.0, 5.0], [1.0, 2.0, 4.0]
    assert win_rate(tuned, base) == pytest.approx((1 + 0.5 + 1) / 3)
    assert win_rate(tuned, base, tie=0.0) == pytest.approx(2 / 3)
    assert win_rate(base, tuned) == pytest.approx((0 + 0.5 + 0) / 3)


def test_two_pair_interval_by_hand() -> None:
    # Per-pair values are 1 (win) and 0 (loss). A resample of two pairs has mean 0, 0.5 or 1
    # with probabilities 1/4, 1/2, 1/4, so both 2.5% tails sit on the extremes: CI = [0, 1].
    assert bootstrap_ci([1.0, 0.0], [0.0, 1.0]) == (0.0, 1.0)


def test_mean_diff_and_callable_stats() -> None:
    tuned, base = np.array([3.0, 3.0, 3.0]), np.array([1.0, 1.0, 1.0])
    assert bootstrap_ci(tuned, base, stat="mean_diff") == (2.0, 2.0)
    assert bootstrap_ci(tuned, base, stat=lambda t, b: float(np.median(t - b))) == (2.0, 2.0)


def test_callable_stat_matches_the_vectorised_win_rate() -> None:
    rng = np.random.default_rng(3)
    tuned, base = rng.normal(size=60), rng.normal(size=60)
    groups = np.repeat(np.arange(12), 5)
    for g in (None, groups):
        fast = bootstrap_ci(tuned, base, stat="win_rate", n_resamples=300, groups=g)
        slow = bootstrap_ci(tuned, base, stat=lambda t, b: win_rate(t, b), n_resamples=300, groups=g)
        assert fast == pytest.approx(slow)


def test_interval_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    tuned, base = rng.normal(0.2, 1.0, 200), rng.normal(0.0, 1.0, 200)
    low, high = bootstrap_ci(tuned, base, seed=7)
    assert low <= win_rate(tuned, base) <= high
    assert bootstrap_ci(tuned, base, seed=7) == (low, high)
    assert bootstrap_ci(tuned, base, seed=8) != (low, high)


def test_interval_shrinks_with_more_pairs() -> None:
    rng = np.random.default_rng(1)

    def width(n: int) -> float:
        low, high = bootstrap_ci(rng.normal(0.1, 1, n), rng.normal(0, 1, n))
        return high - low

    assert width(2000) < width(50) / 3  # width ~ 1/sqrt(n): expect ~6x narrower


def test_group_bootstrap_is_wider_when_groups_are_perfectly_correlated() -> None:
    # 20 prompts x 10 seeds; every seed of a prompt has the same outcome, so there are only
    # 20 independent observations, not 200.
    outcome = np.random.default_rng(2).random(20) < 0.6
    tuned = np.repeat(np.where(outcome, 1.0, 0.0), 10)
    base = np.full_like(tuned, 0.5)
    groups = np.repeat(np.arange(20), 10)
    pair_low, pair_high = bootstrap_ci(tuned, base)
    group_low, group_high = bootstrap_ci(tuned, base, groups=groups)
    assert group_high - group_low > 2 * (pair_high - pair_low)  # ~sqrt(10) ~ 3.2x


def test_string_group_ids_are_accepted() -> None:
    low, high = bootstrap_ci([1.0, 0.0, 1.0], [0.0, 1.0, 0.0], groups=["a", "b", "a"])
    assert 0.0 <= low <= high <= 1.0


def test_summarize_reports_everything() -> None:
    tuned, base = np.array([2.0, 2.0, 5.0]), np.array([1.0, 2.0, 4.0])
    summary = summarize(tuned, base)
    assert summary == {
        "mean_base": pytest.approx(7 / 3),
        "std_base": pytest.approx(np.std([1.0, 2.0, 4.0])),
        "mean_tuned": pytest.approx(3.0),
        "std_tuned": pytest.approx(np.std([2.0, 2.0, 5.0])),
        "win_rate": pytest.approx(2.5 / 3),
        "win_rate_ci": pytest.approx(list(bootstrap_ci(tuned, base, stat="win_rate", seed=0))),
        "n": 3,
    }
    low, high = summary["win_rate_ci"]
    assert low <= summary["win_rate"] <= high


@pytest.mark.parametrize(
    ("tuned", "base", "kwargs", "message"),
    [
        ([1.0, 2.0], [1.0], {}, "length mismatch"),
        ([], [], {}, "empty"),
        ([1.0, float("nan")], [1.0, 2.0], {}, "NaN"),
        ([1.0, 2.0], [float("inf"), 2.0], {}, "NaN or infinite"),
        ([[1.0, 2.0]], [[1.0, 2.0]], {}, "1-D"),
        ([1.0, 2.0], [0.0, 1.0], {"groups": [0]}, "one id per pair"),
        ([1.0, 2.0], [0.0, 1.0], {"stat": "median"}, "unknown stat"),
        ([1.0, 2.0], [0.0, 1.0], {"confidence": 1.5}, "confidence"),
        ([1.0, 2.0], [0.0, 1.0], {"n_resamples": 0}, "n_resamples"),
    ],
)
def test_invalid_input_names_the_problem(tuned: list, base: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(tuned, base, **kwargs)


def test_win_rate_and_summarize_validate_too() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        summarize([float("nan")], [1.0])
