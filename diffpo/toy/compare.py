"""Method comparison in the shapes world: every objective on every task setting, several seeds.

    diffpo toy compare --out DIR --losses sft,diffusion_dpo,mapo,dmpo \\
        --settings style:outline:0.5,style:outline:1.0,reward:size --seeds 0,1,2 --device cuda --workers 3

Pairs are built once per (setting, seed) and shared by the objectives, so the methods see the same
data. Each run writes ``DIR/<setting>/seed<S>/<loss>/report.json``; finished runs are skipped when
the command is run again. ``DIR/results.md``, ``results.json`` and ``results.png`` aggregate them
(mean and standard deviation over seeds).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from diffpo.toy.demo import DemoSettings, build_pairs, run_experiment


def parse_setting(text: str, base: DemoSettings) -> DemoSettings:
    """``style:outline:1.0`` or ``reward:size[:label_noise]`` -> settings."""
    parts = text.split(":")
    if parts[0] == "style" and len(parts) == 3:
        return replace(base, task="style", style=parts[1], severity=float(parts[2]))
    if parts[0] == "reward" and len(parts) in (2, 3):
        return replace(base, task="reward", reward=parts[1], label_noise=float(parts[2]) if len(parts) == 3 else 0.0)
    raise ValueError(f"bad setting {text!r}: use style:STYLE:SEVERITY or reward:NAME[:LABEL_NOISE]")


def _run_seed(job: tuple) -> list[dict]:
    """All settings x losses for one seed (one worker process)."""
    from diffpo.toy.base import ASSET_DIR

    out, settings_texts, losses, seed, base_settings, base, collect_only = job
    base = base or str(ASSET_DIR)
    reports = []
    for text in settings_texts:
        try:
            reports.extend(_run_setting(out, text, losses, seed, base_settings, base, collect_only))
        except Exception as err:  # one broken setting must not lose the others' results
            print(f"[seed {seed}] {text}: FAILED: {type(err).__name__}: {err}", flush=True)
            reports.extend({"setting": text, "seed": seed, "method": loss, "error": f"{type(err).__name__}: {err}"} for loss in losses)
    return reports


def _run_setting(out, text: str, losses: list[str], seed: int, base_settings: DemoSettings, base: str, collect_only: bool = False) -> list[dict]:
    from diffpo.toy.base import load_toy_model

    reports = []
    settings = replace(parse_setting(text, base_settings), seed=seed)
    setting_dir = Path(out) / text.replace(":", "_") / f"seed{seed}"
    pairs = setting_dir / "pairs" / ("pairs.jsonl" if settings.task == "style" else "pairs.parquet")
    if not pairs.is_file() and not collect_only:
        pairs = build_pairs(settings, load_toy_model(base, settings.device), setting_dir / "pairs", progress=False)
    for loss in losses:
        run_dir = setting_dir / loss
        done = run_dir / "report.json"
        if not done.is_file() and collect_only:
            continue
        if not done.is_file():
            try:
                run_experiment(replace(settings, loss=loss), run_dir, base=base, pairs=pairs, progress=False)
            except Exception as err:  # the other objectives of this setting still run
                print(f"[seed {seed}] {text} {loss}: FAILED: {type(err).__name__}: {err}", flush=True)
                reports.append({"setting": text, "seed": seed, "method": loss, "error": f"{type(err).__name__}: {err}"})
                continue
        report = json.loads(done.read_text())
        report.update(setting=text, seed=seed)
        reports.append(report)
        print(f"[seed {seed}] {text} {loss}: win rate {report['win_rate']:.3f}", flush=True)
    return reports


def compare(
    out: Path, settings: list[str], losses: list[str], seeds: list[int], base_settings: DemoSettings, *,
    workers: int = 1, base: str | None = None, collect_only: bool = False,
) -> dict:
    """Run (or with ``collect_only`` just gather) every run, then write the aggregate table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(str(out), settings, losses, seed, base_settings, base, collect_only) for seed in seeds]
    if workers > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            per_seed = pool.map(_run_seed, jobs)
    else:
        per_seed = [_run_seed(job) for job in jobs]
    reports = [r for batch in per_seed for r in batch]
    summary = aggregate([r for r in reports if "error" not in r], settings, losses)
    summary["errors"] = [r for r in reports if "error" in r]
    summary["missing"] = missing_runs(reports, settings, losses, seeds)
    summary["expected_runs"] = len(settings) * len(losses) * len(seeds)
    summary["meta"] = {
        "seconds": time.perf_counter() - started, "workers": workers, "seeds": seeds, "device": base_settings.device,
        "python": platform.python_version(), "settings": {k: v for k, v in vars(base_settings).items() if k not in ("task", "loss")},
    }
    try:
        import torch

        summary["meta"]["torch"] = torch.__version__
        if torch.cuda.is_available():
            summary["meta"]["card"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": reports}, indent=2))
    (out / "results.md").write_text(format_table(summary) + ("\n" + format_missing(summary) if summary["missing"] else ""))
    plot(summary, out / "results.png")
    return summary


def missing_runs(reports: list[dict], settings: list[str], losses: list[str], seeds: list[int]) -> list[dict]:
    """Every expected (setting, objective, seed) run without a finished report, with the reason
    (its error, or that no report was found): a table over fewer seeds than asked must say so."""
    done = {(r["setting"], r["method"], r["seed"]) for r in reports if "error" not in r}
    errors = {(r["setting"], r["method"], r["seed"]): r["error"] for r in reports if "error" in r}
    return [
        {"setting": text, "loss": loss, "seed": seed, "reason": errors.get((text, loss, seed), "no report.json (not run)")}
        for text in settings for loss in losses for seed in seeds if (text, loss, seed) not in done
    ]


def format_missing(summary: dict) -> str:
    """One line per missing run; empty when every expected run finished."""
    missing = summary.get("missing", [])
    if not missing:
        return ""
    lines = [f"{len(missing)} of {summary['expected_runs']} expected runs are missing (the table averages only the others):"]
    lines += [f"- {m['setting']} {m['loss']} seed {m['seed']}: {m['reason']}" for m in missing]
    return "\n".join(lines) + "\n"


def _stat(values: list[float]) -> dict:
    """Mean and the sample standard deviation (ddof=1: at n = 3 seeds ddof=0 understates it by 18%)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def aggregate(reports: list[dict], settings: list[str], losses: list[str]) -> dict:
    rows = []
    for text in settings:
        for loss in losses:
            runs = [r for r in reports if r["setting"] == text and r["method"] == loss]
            if not runs:
                continue
            rows.append(
                {
                    "setting": text,
                    "loss": loss,
                    "win_rate": _stat([r["win_rate"] for r in runs]),
                    "win_rate_ci_low": _stat([r["win_rate_ci"][0] for r in runs]),
                    "reward_tuned": _stat([r["reward_tuned"] for r in runs]),
                    "reward_base": _stat([r["reward_base"] for r in runs]),
                    "faithfulness_delta": _stat([r["faithfulness_tuned"] - r["faithfulness_base"] for r in runs]),
                    "diversity_ratio": _stat([r["diversity_tuned"] / max(r["diversity_base"], 1e-9) for r in runs]),
                    "seconds_per_step": _stat([r["seconds_per_step"] for r in runs]),
                }
            )
    return {"rows": rows}


def format_table(summary: dict) -> str:
    f = lambda s, d=3: f"{s['mean']:.{d}f} ± {s['std']:.{d}f}"
    lines = [
        "| setting | method | win rate vs base | CI low (mean) | task reward (base → tuned) | faithfulness Δ | diversity ratio | s / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['setting']} | {r['loss']} | {f(r['win_rate'])} | {r['win_rate_ci_low']['mean']:.3f} | "
            f"{r['reward_base']['mean']:.3f} → {f(r['reward_tuned'])} | {f(r['faithfulness_delta'])} | {f(r['diversity_ratio'])} | {f(r['seconds_per_step'], 4)} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in summary["rows"]))
    losses = list(dict.fromkeys(r["loss"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    width = 0.8 / max(1, len(losses))
    for k, (key, title) in enumerate([("win_rate", "win rate vs base (task reward)"), ("faithfulness_delta", "faithfulness change"), ("diversity_ratio", "diversity tuned / base")]):
        ax = axes[k]
        for i, loss in enumerate(losses):
            rows = [next((r for r in summary["rows"] if r["setting"] == s and r["loss"] == loss), None) for s in settings]
            means = [r[key]["mean"] if r else np.nan for r in rows]
            stds = [r[key]["std"] if r else 0 for r in rows]
            ax.bar(np.arange(len(settings)) + i * width, means, width, yerr=stds, label=loss, capsize=2)
        ax.set_xticks(np.arange(len(settings)) + width * (len(losses) - 1) / 2, settings, rotation=15, fontsize=8)
        ax.set_title(title)
        if key == "win_rate":
            ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
