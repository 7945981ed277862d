"""The comparison's figures, from ``results.json`` alone (matplotlib, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from studies.paired import mean_sd, paired_difference, t_interval


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def tradeoff(results: dict, path: Path) -> bool:
    """Task reward gain against faithfulness change (and diversity, and any extra score) per
    objective across its knob: sweep means over the training seeds, the chosen value ringed, and
    the final runs (evaluation seeds, mean ± sd) in the same setting as a cross."""
    plan, runs = results["plan"], results["runs"]
    extras = sorted({x for r in runs for x in r["extras"]})
    xs = [("faithfulness_delta", "faithfulness change"), ("diversity_ratio", "diversity tuned / base"), *[(x, f"{x} change") for x in extras]]
    settings = plan["sweep_settings"]
    if not any(r["stage"] == "sweep" for r in runs):
        return False

    def value(r, key):
        return r[key] if key in r else r["extras"][key]["tuned"] - r["extras"][key]["base"] if key in r["extras"] else float("nan")

    plt = _plt()
    fig, axes = plt.subplots(len(xs), len(settings), figsize=(5.5 * len(settings), 4 * len(xs)), squeeze=False)
    chosen = results["selection"]["by_family"] if results["selection"] else {}
    for j, setting in enumerate(settings):
        fam = ":".join(setting.split(":")[:2])
        for i, (key, label) in enumerate(xs):
            ax = axes[i][j]
            for k, objective in enumerate(plan["objectives"]):
                color = f"C{k}"
                values = plan["knobs"][objective]["values"]
                pts = [[r for r in runs if r["stage"] == "sweep" and r["setting"] == setting and r["objective"] == objective and r["value"] == v] for v in values]
                x = [_mean([value(r, key) for r in p]) for p in pts]
                y = [_mean([r["reward_gain"] for r in p]) for p in pts]
                ax.plot(x, y, "o-", color=color, label=f"{objective} ({plan['knobs'][objective]['name']})")
                for v, xi, yi in zip(values, x, y):
                    if not math.isnan(xi):
                        ax.annotate(f"{v:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
                pick = chosen.get(fam, {}).get(objective)
                if pick and pick["value"] in values:
                    n = values.index(pick["value"])
                    ax.plot([x[n]], [y[n]], "o", ms=13, mfc="none", mec=color)
                final = [r for r in runs if r["stage"] == "final" and r["setting"] == setting and r["objective"] == objective]
                if final:
                    fx, fy = mean_sd([value(r, key) for r in final]), mean_sd([r["reward_gain"] for r in final])
                    ax.errorbar([fx["mean"]], [fy["mean"]], xerr=[0 if math.isnan(fx["sd"]) else fx["sd"]], yerr=[0 if math.isnan(fy["sd"]) else fy["sd"]], fmt="x", color=color, capsize=3)
            ax.set_xlabel(label)
            ax.set_ylabel("task reward gain (tuned - base)")
            ax.set_title(f"{setting}: o sweep (training seeds), x final (evaluation seeds)", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def mismatch(results: dict, path: Path) -> bool:
    """The reference-mismatch curve: each metric against style severity (final runs, mean and 95%
    t interval over evaluation seeds), and MaPO - Diffusion-DPO paired per seed."""
    plan, runs = results["plan"], results["runs"]
    styles = sorted((float(s.split(":")[2]), s) for s in plan["settings"] if s.startswith("style:") and len(s.split(":")) == 3)
    if len(styles) < 2 or not any(r["stage"] == "final" for r in runs):
        return False
    plt = _plt()
    metrics = [("win_rate", "win rate vs base"), ("faithfulness_delta", "faithfulness change"), ("reward_gain", "task reward gain")]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.6 * (len(metrics) + 1), 3.8))
    for ax, (metric, label) in zip(axes, metrics):
        for k, objective in enumerate(plan["objectives"]):
            xs, means, lows, highs = [], [], [], []
            for severity, setting in styles:
                v = [r[metric] for r in runs if r["stage"] == "final" and r["setting"] == setting and r["objective"] == objective]
                if v:
                    lo, hi = t_interval(v)
                    xs.append(severity), means.append(np.mean(v)), lows.append(lo), highs.append(hi)
            if xs:
                ax.plot(xs, means, "o-", color=f"C{k}", label=objective)
                ax.fill_between(xs, lows, highs, color=f"C{k}", alpha=0.12)
        ax.set_xlabel("style:outline severity")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    if {"mapo", "diffusion_dpo"} <= set(plan["objectives"]):
        xs, means, lows, highs = [], [], [], []
        for severity, setting in styles:
            per = {o: {r["seed"]: r["win_rate"] for r in runs if r["stage"] == "final" and r["setting"] == setting and r["objective"] == o} for o in ("mapo", "diffusion_dpo")}
            d = paired_difference(per["mapo"], per["diffusion_dpo"])
            if d["n"] > 1:
                xs.append(severity), means.append(d["mean"]), lows.append(d["ci"][0]), highs.append(d["ci"][1])
        ax.errorbar(xs, means, yerr=[np.subtract(means, lows), np.subtract(highs, means)], fmt="o-", capsize=3)
        ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("style:outline severity")
    ax.set_title("win rate: MaPO - Diffusion-DPO, paired (95% t)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def margins(results: dict, path: Path) -> bool:
    """Logged margin against step, Diffusion-DPO and DMPO at each shared beta (sweep runs, one
    line per (setting, seed)), with DMPO's target alpha = ln 999."""
    runs = [r for r in results["runs"] if r["stage"] == "sweep" and r["objective"] in ("diffusion_dpo", "dmpo") and r["margins"]]
    betas = sorted({r["value"] for r in runs if r["objective"] == "dmpo"} & {r["value"] for r in runs if r["objective"] == "diffusion_dpo"})
    if not betas:
        return False
    plt = _plt()
    alpha = math.log(999.0)
    colors = {"diffusion_dpo": "tab:blue", "dmpo": "tab:red"}
    fig, axes = plt.subplots(2, len(betas), figsize=(4.6 * len(betas), 7), squeeze=False)
    for top, bottom, beta in zip(axes[0], axes[1], betas):
        for objective, color in colors.items():
            chosen = [r for r in runs if r["objective"] == objective and r["value"] == beta]
            for n, r in enumerate(chosen):
                top.plot(r["margins"]["step"], r["margins"]["margin"], color=color, alpha=0.6, lw=1, label=objective if n == 0 else None)
            late = [v for r in chosen for v in r["margins"]["margin"][len(r["margins"]["margin"]) // 2:] if v is not None]
            if late:
                bottom.hist(late, bins=20, color=color, alpha=0.5, label=objective)
        for ax in (top, bottom):
            ax.axvline(alpha, color="gray", ls="--", lw=0.8) if ax is bottom else ax.axhline(alpha, color="gray", ls="--", lw=0.8, label="alpha = ln 999")
            ax.grid(alpha=0.3)
        top.set_title(f"beta = {beta:g}: margin over training", fontsize=9)
        top.set_xlabel("step")
        top.set_ylabel("margin h (batch mean)")
        bottom.set_title(f"beta = {beta:g}: margins logged in the second half", fontsize=9)
        bottom.set_xlabel("margin h (dashed: alpha)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_all(results: dict, out: Path) -> list[tuple[str, str]]:
    """Every figure the results allow: ``(file name, title)`` of those written."""
    figures = [
        ("tradeoff.png", "task reward vs faithfulness, diversity (and extra scores) across each objective's knob", tradeoff),
        ("mismatch.png", "reference mismatch: metrics against style severity", mismatch),
        ("margins.png", "DMPO vs Diffusion-DPO margins at equal beta", margins),
    ]
    return [(name, title) for name, title, draw in figures if draw(results, Path(out) / name)]
