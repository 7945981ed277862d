"""Paired statistics for comparing a tuned model with its base model.

Every evaluation image of the tuned model has a twin from the base model made with the
same prompt and the same seed, so the two score arrays are *paired*: element ``i`` of
``tuned`` and element ``i`` of ``base`` differ only by the fine-tuning. Pairing removes the
prompt/seed difficulty from the comparison, which is why the headline number is a win rate
over pairs rather than a difference of two independent means.

Confidence intervals use the percentile bootstrap. Images generated from one prompt are
correlated (an easy prompt makes every seed look good), so when prompt ids are given the
bootstrap resamples whole prompts (a cluster bootstrap) instead of pretending every image is
an independent draw, which would make the interval too narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

StatFn = Callable[[NDArray[np.float64], NDArray[np.float64]], float]
StatName = Literal["win_rate", "mean_diff"]

# Bootstrap resamples are drawn in blocks so memory stays bounded for large evaluations;
# the block size is fixed so that a seed always gives the same interval.
_BLOCK = 512


def _paired(tuned: ArrayLike, base: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Validate two paired score arrays and return them as 1-D float arrays.

    Raises ValueError naming the problem, because a silently broadcast or NaN-polluted
    comparison would produce a plausible-looking but meaningless win rate.
    """
    t = np.asarray(tuned, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    if t.ndim != 1 or b.ndim != 1:
        raise ValueError(f"scores must be 1-D arrays, got shapes {t.shape} and {b.shape}")
    if t.shape != b.shape:
        raise ValueError(f"length mismatch: {t.size} tuned scores vs {b.size} base scores")
    if t.size == 0:
        raise ValueError("scores are empty: need at least one (tuned, base) pair")
    for label, arr in (("tuned", t), ("base", b)):
        if not np.all(np.isfinite(arr)):
            bad = np.flatnonzero(~np.isfinite(arr))
            raise ValueError(f"{label} scores contain NaN or infinite values at indices {bad[:10].tolist()}")
    return t, b


def _win_values(t: NDArray[np.float64], b: NDArray[np.float64], tie: float) -> NDArray[np.float64]:
    """Per-pair outcome: 1 for a win of the tuned model, ``tie`` for a tie, 0 for a loss."""
    return np.where(t > b, 1.0, np.where(t == b, tie, 0.0))


def win_rate(tuned: ArrayLike, base: ArrayLike, tie: float = 0.5) -> float:
    """Fraction of (prompt, seed) pairs where the tuned model's image scores higher.

    A tie counts ``tie`` (0.5 by default, so 0.5 means "no difference" whatever the tie
    rate). Exact ties are common with discrete or saturated scorers, hence the knob.
    """
    t, b = _paired(tuned, base)
    return float(_win_values(t, b, tie).mean())


# Both built-in statistics are means of a per-pair value, which lets the bootstrap compute
# every resample at once as a weighted mean instead of calling a function per resample.
_PER_PAIR: dict[str, Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]]] = {
    "win_rate": lambda t, b: _win_values(t, b, 0.5),
    "mean_diff": lambda t, b: t - b,
}


def _unit_ids(groups: ArrayLike | None, n: int) -> NDArray[np.intp]:
    """Resampling unit of every pair: the pair itself, or its group (e.g. its prompt)."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have one id per pair: got shape {g.shape} for {n} pairs")
    return np.unique(g, return_inverse=True)[1].reshape(n)


def _draw_counts(rng: np.random.Generator, n_units: int, n_resamples: int) -> NDArray[np.int64]:
    """How often each unit is drawn in each resample, shape (n_resamples, n_units).

    Drawing n_units units with replacement is a multinomial with equal probabilities; the
    counts form a weight matrix that turns every resampled mean into one matrix product.
    """
    blocks = []
    for start in range(0, n_resamples, _BLOCK):
        size = min(_BLOCK, n_resamples - start)
        blocks.append(rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=size))
    return np.concatenate(blocks)


def _resampled_stats(
    t: NDArray[np.float64],
    b: NDArray[np.float64],
    stat: StatFn | StatName,
    unit_ids: NDArray[np.intp],
    counts: NDArray[np.int64],
) -> NDArray[np.float64]:
    """The statistic on every bootstrap resample described by ``counts``.

    A pair appears in a resample as often as its unit was drawn, so a resampled mean is
    sum(count * unit_sum) / sum(count * unit_size).
    """
    n_units = counts.shape[1]
    if isinstance(stat, str):
        unit_sums = np.bincount(unit_ids, weights=_PER_PAIR[stat](t, b), minlength=n_units)
        unit_sizes = np.bincount(unit_ids, minlength=n_units).astype(np.float64)
        return (counts @ unit_sums) / (counts @ unit_sizes)
    pairs = np.arange(t.size)
    out = np.empty(len(counts))
    for r, row in enumerate(counts):
        idx = np.repeat(pairs, row[unit_ids])
        out[r] = stat(t[idx], b[idx])
    return out


def bootstrap_ci(
    tuned: ArrayLike,
    base: ArrayLike,
    *,
    stat: StatFn | StatName = "win_rate",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a paired statistic.

    ``stat`` is ``"win_rate"`` (ties count 0.5), ``"mean_diff"`` (mean of tuned - base), or
    any callable ``stat(tuned, base) -> float`` applied to each resample. Pairs are resampled
    with replacement; with ``groups`` (e.g. prompt ids, one per pair) whole groups are
    resampled, because images of one prompt share its difficulty and are not independent.
    Deterministic for a given ``seed``.
    """
    t, b = _paired(tuned, base)
    if isinstance(stat, str) and stat not in _PER_PAIR:
        raise ValueError(f"unknown stat {stat!r}; use one of {sorted(_PER_PAIR)} or a callable")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    unit_ids = _unit_ids(groups, t.size)
    counts = _draw_counts(np.random.default_rng(seed), int(unit_ids.max()) + 1, n_resamples)
    stats = _resampled_stats(t, b, stat, unit_ids, counts)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def summarize(
    tuned: ArrayLike,
    base: ArrayLike,
    groups: Sequence[Any] | NDArray[Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The numbers a report needs for one scorer: means, spreads, win rate and its 95% CI.

    Standard deviations are of the observed scores (ddof=0), describing the spread of image
    quality rather than the uncertainty of the mean; the CI carries the uncertainty.
    """
    t, b = _paired(tuned, base)
    low, high = bootstrap_ci(t, b, stat="win_rate", seed=seed, groups=groups)
    return {
        "mean_base": float(b.mean()),
        "std_base": float(b.std()),
        "mean_tuned": float(t.mean()),
        "std_tuned": float(t.std()),
        "win_rate": win_rate(t, b),
        "win_rate_ci": [low, high],
        "n": int(t.size),
    }
