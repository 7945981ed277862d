"""The comparison's results and write-up: finished runs -> ``results.json`` -> ``report.md`` + plots.

``collect`` reads the run folders (``report.json`` and the trainer's ``metrics.jsonl``) into one
``results.json``: the plan, the frozen selection, one row per run, the missing runs and what ran
(machine, versions, commit, the exact command lines). ``write_report`` needs only that file, so the
committed ``results.json`` regenerates the markdown and the plots anywhere.

The verdict on each paper claim is decided by ``verdict`` from a paired 95% t interval over the
evaluation seeds: *supported* when the interval of the difference excludes 0 in the claimed
direction, *not supported* when it does not (it includes 0, or lies on the other side), *not tested
here* when the study has no runs for it or the claim is not an empirical one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studies import protocol
from studies.paired import mean_sd, paired_difference

BASELINE = "diffusion_dpo"
"""The method the papers compare against; every other objective's paired differences are to it."""

SDXL_DPO_MAPO_STEP_RATIO = {"ratio": 1.31, "dpo_ms": 649, "mapo_ms": 494, "where": "BENCHMARKS.md, H200, SDXL 1024 px, 4 pairs, diffpo+compile"}
"""The SDXL per-step ratio measured on the GPU (BENCHMARKS.md, "Side-by-side ratios")."""

KNOWN_SCORES = ("reward", "faithfulness", "diversity")
MARGIN_POINTS = 50
"""Logged margins kept per run in results.json (evenly spaced over training)."""


# ------------------------------------------------------------------------------------ collecting


def _extras(report: dict) -> dict[str, dict[str, float]]:
    """Every other score the run reports for base and tuned (e.g. an image-quality measure added
    to the shapes world later), so the comparison shows it unasked. Three shapes are read:
    ``<name>_base`` / ``<name>_tuned`` numbers, ``<name>: {"base": x, "tuned": y}``, and
    ``scorers: {<name>: {"mean_base": x, "mean_tuned": y}}`` beyond the task reward and the
    faithfulness scorers (``shapes_color``, ``shapes_shape``)."""
    number = (int, float)
    out = {}
    for key, value in report.items():
        name = key[: -len("_base")] if key.endswith("_base") else None
        if name and name not in KNOWN_SCORES and isinstance(value, number) and isinstance(report.get(f"{name}_tuned"), number):
            out[name] = {"base": float(value), "tuned": float(report[f"{name}_tuned"])}
        elif key not in KNOWN_SCORES and isinstance(value, dict) and isinstance(value.get("base"), number) and isinstance(value.get("tuned"), number):
            out[key] = {"base": float(value["base"]), "tuned": float(value["tuned"])}
    skip = {report.get("task_reward"), "shapes_color", "shapes_shape"}
    for name, summary in (report.get("scorers") or {}).items():
        if name not in skip and name not in out and isinstance(summary, dict) and isinstance(summary.get("mean_base"), number) and isinstance(summary.get("mean_tuned"), number):
            out[name] = {"base": float(summary["mean_base"]), "tuned": float(summary["mean_tuned"])}
    return out


def _margins(metrics_path: Path) -> dict | None:
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "margin" in r]
    if not rows:
        return None
    keep = np.unique(np.linspace(0, len(rows) - 1, min(MARGIN_POINTS, len(rows))).round().astype(int))
    return {key: [rows[i].get(key) for i in keep] for key in ("step", "margin", "implicit_accuracy")}


def run_row(run: protocol.Run, report: dict, run_dir: Path) -> dict:
    return {
        "stage": run.stage, "setting": run.setting, "seed": run.seed, "objective": run.objective,
        "knob": protocol.knob_for(run.objective).name, "value": run.value,
        "win_rate": report["win_rate"], "win_rate_ci": report["win_rate_ci"],
        "reward_base": report["reward_base"], "reward_tuned": report["reward_tuned"], "reward_gain": report["reward_tuned"] - report["reward_base"],
        "faithfulness_base": report["faithfulness_base"], "faithfulness_tuned": report["faithfulness_tuned"],
        "faithfulness_delta": report["faithfulness_tuned"] - report["faithfulness_base"],
        "diversity_ratio": report["diversity_tuned"] / max(report["diversity_base"], 1e-9),
        "seconds_per_step": report["seconds_per_step"], "n_eval_images": report.get("n_eval_images"),
        "extras": _extras(report),
        "margins": _margins(run_dir / "train" / "metrics.jsonl"),
    }


def collect(out: Path) -> dict:
    """``OUT/results.json`` from the plan, the selection and every finished run (also returned)."""
    from studies import meta

    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    selection_path = out / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else None
    expected = protocol.sweep_runs(plan["objectives"], plan["sweep_settings"], plan["train_seeds"])
    runs, missing = [], []
    by_family = (selection or {}).get("by_family", {})
    chosen_for = [o for o in plan["objectives"] if all(o in by_family.get(protocol.family(s), {}) for s in plan["settings"])]
    chosen = {fam: {o: e["value"] for o, e in entries.items()} for fam, entries in by_family.items()}
    expected += protocol.final_runs(chosen_for, plan["settings"], plan["eval_seeds"], chosen)
    missing += [{"stage": "final", "setting": s, "seed": seed, "objective": o, "value": float("nan")}  # no knob chosen yet
                for o in plan["objectives"] if o not in chosen_for for s in plan["settings"] for seed in plan["eval_seeds"]]
    for run in expected:
        run_dir = out / "runs" / run.key
        if (run_dir / "report.json").is_file():
            runs.append(run_row(run, json.loads((run_dir / "report.json").read_text()), run_dir))
        else:
            missing.append({"stage": run.stage, "setting": run.setting, "seed": run.seed, "objective": run.objective, "value": run.value})
    invocations_path = out / "invocations.jsonl"
    invocations = [json.loads(line) for line in invocations_path.read_text().splitlines()] if invocations_path.is_file() else []
    results = {
        "meta": {
            "collected": meta.now_utc(),
            "commands": [i["command"] for i in invocations],
            "invocations": invocations,
            "machine": invocations[-1]["machine"] if invocations else None,
            "commit": invocations[-1].get("commit") if invocations else meta.git_commit()["commit"],
        },
        "plan": plan,
        "selection": selection,
        "runs": runs,
        "missing": missing,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------------------ analysis


def per_seed(results: dict, setting: str, objective: str, metric: str, stage: str = "final") -> dict[int, float]:
    """seed -> the metric of that objective's run (extras: ``quality`` -> tuned - base)."""
    out = {}
    for r in results["runs"]:
        if r["stage"] == stage and r["setting"] == setting and r["objective"] == objective:
            out[r["seed"]] = r[metric] if metric in r else r["extras"][metric]["tuned"] - r["extras"][metric]["base"]
    return out


def extra_names(results: dict) -> list[str]:
    return sorted({name for r in results["runs"] for name in r["extras"]})


def verdict(ci: list[float] | None, direction: int) -> str:
    """The rule: supported when the paired 95% interval of (claimed better - other) excludes 0 on
    the claimed side (``direction`` +1: the difference is claimed positive, -1: negative)."""
    if ci is None or any(v is None or math.isnan(v) for v in ci):
        return "not tested here"
    low, high = ci
    if (direction > 0 and low > 0) or (direction < 0 and high < 0):
        return "supported"
    return "not supported"


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str
    kind: str  # "paired": a paired difference; "structural": a property of the objective; "untestable"
    a: str = "mapo"
    b: str = BASELINE
    metric: str = "win_rate"
    where: str = "all"  # "all": every final setting + the mean over settings; "max_mismatch": the strongest style severity; "pooled": every (setting, seed)
    why: str = ""


CLAIMS = (
    Claim("MaPO", "better than Diffusion-DPO under reference mismatch (win rate vs base, strongest style mismatch)", "paired", where="max_mismatch"),
    Claim("MaPO", "cheaper per training step than Diffusion-DPO (no reference forward)", "paired", a=BASELINE, b="mapo", metric="seconds_per_step", where="pooled"),
    Claim("MaPO", "needs no reference model", "structural", why="LossSpec.needs_reference is False: the trainer never builds or runs a reference network for it"),
    Claim("DMPO", "preference alignment as divergence minimisation (the divergence view)", "untestable",
          why="a derivation, not a measurement; diffpo's DMPO is its own reading (reverse KL between Bernoulli preference probabilities; no public code or formula)"),
    Claim("DMPO", "better than Diffusion-DPO (win rate vs base)", "paired", a="dmpo"),
    Claim("MaPO", "beats Diffusion-DPO overall (win rate vs base)", "paired"),
)


def _style_severity(setting: str) -> float | None:
    parts = setting.split(":")
    return float(parts[2]) if parts[0] == "style" and len(parts) == 3 else None


def _mean_over_settings(results: dict, settings: list[str], objective: str, metric: str) -> dict[int, float]:
    """seed -> the metric averaged over ``settings`` (seeds with every setting only)."""
    tables = [per_seed(results, s, objective, metric) for s in settings]
    seeds = set.intersection(*(set(t) for t in tables)) if tables else set()
    return {seed: float(np.mean([t[seed] for t in tables])) for seed in seeds}


def claim_rows(results: dict) -> list[dict]:
    """One verdict row per (claim, setting) plus a summary row where the claim spans settings."""
    from diffpo.losses import LOSSES

    settings = results["plan"]["settings"]
    objectives = results["plan"]["objectives"]
    rows = []
    for claim in CLAIMS:
        base = {"paper": claim.paper, "claim": claim.text}
        if claim.kind == "structural":
            ok = "mapo" in LOSSES and not LOSSES["mapo"].needs_reference
            rows.append({**base, "where": "the objective", "verdict": "supported" if ok else "not supported", "evidence": claim.why})
            continue
        if claim.kind == "untestable":
            rows.append({**base, "where": "-", "verdict": "not tested here", "evidence": claim.why})
            continue
        if claim.a not in objectives or claim.b not in objectives:
            rows.append({**base, "where": "-", "verdict": "not tested here", "evidence": f"{claim.a} or {claim.b} not in this run's objectives"})
            continue
        if claim.where == "max_mismatch":
            styles = [s for s in settings if _style_severity(s) is not None]
            targets = [max(styles, key=_style_severity)] if styles else []
        elif claim.where == "pooled":
            targets = []
        else:
            targets = list(settings)
        for setting in targets:
            d = paired_difference(per_seed(results, setting, claim.a, claim.metric), per_seed(results, setting, claim.b, claim.metric))
            rows.append({**base, "where": setting, "verdict": verdict(d["ci"] if d["n"] > 1 else None, +1), "difference": d, "metric": claim.metric})
        if claim.where == "all" and len(settings) > 1:
            d = paired_difference(_mean_over_settings(results, settings, claim.a, claim.metric), _mean_over_settings(results, settings, claim.b, claim.metric))
            rows.append({**base, "where": "mean over settings, per seed", "verdict": verdict(d["ci"] if d["n"] > 1 else None, +1), "difference": d, "metric": claim.metric})
        if claim.where == "pooled":
            a, b = {}, {}
            for i, setting in enumerate(settings):  # each (setting, seed) is one matched pair of runs
                a.update({(i, s): v for s, v in per_seed(results, setting, claim.a, claim.metric).items()})
                b.update({(i, s): v for s, v in per_seed(results, setting, claim.b, claim.metric).items()})
            keys = sorted(set(a) & set(b))
            index = {k: n for n, k in enumerate(keys)}
            d = paired_difference({index[k]: a[k] for k in keys}, {index[k]: b[k] for k in keys})
            ratios = [a[k] / b[k] for k in keys if b[k] > 0]
            d["ratio"] = mean_sd(ratios) if ratios else None
            rows.append({**base, "where": "every (setting, seed)", "verdict": verdict(d["ci"] if d["n"] > 1 else None, +1), "difference": d, "metric": claim.metric})
    return rows


# ------------------------------------------------------------------------------------ writing


def _fmt_sd(s: dict, digits: int = 3) -> str:
    if s["n"] < 2:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def _fmt_diff(d: dict, digits: int = 3) -> str:
    if d["n"] == 0:
        return "-"
    lo, hi = d["ci"]
    interval = "" if math.isnan(lo) else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return f"{d['mean']:+.{digits}f}{interval}"


def _signs(d: dict) -> str:
    return f"{d['a_better']} / {d['b_better']} / {d['ties']}"


METRICS = (("win_rate", "win rate vs base"), ("reward_gain", "task reward gain"), ("faithfulness_delta", "faithfulness Δ"),
           ("diversity_ratio", "diversity ratio"), ("seconds_per_step", "s / step"))


def final_table(results: dict) -> list[str]:
    extras = extra_names(results)
    head = [label for _, label in METRICS] + [f"{name} Δ" for name in extras]
    lines = ["| setting | objective | knob | " + " | ".join(head) + " | seeds |", "| --- " * (len(head) + 4) + "|"]
    for setting in results["plan"]["settings"]:
        for objective in results["plan"]["objectives"]:
            runs = [r for r in results["runs"] if r["stage"] == "final" and r["setting"] == setting and r["objective"] == objective]
            if not runs:
                continue
            cells = [_fmt_sd(mean_sd([r[m] for r in runs]), 4 if m == "seconds_per_step" else 3) for m, _ in METRICS]
            cells += [_fmt_sd(mean_sd([r["extras"][x]["tuned"] - r["extras"][x]["base"] for r in runs if x in r["extras"]])) if any(x in r["extras"] for r in runs) else "-" for x in extras]
            lines.append(f"| {setting} | {objective} | {runs[0]['knob']}={runs[0]['value']:g} | " + " | ".join(cells) + f" | {len(runs)} |")
    return lines


def paired_table(results: dict) -> list[str]:
    objectives = results["plan"]["objectives"]
    if BASELINE not in objectives:
        return [f"({BASELINE} is not among the objectives: no paired differences to it)"]
    metrics = ("win_rate", "reward_gain", "faithfulness_delta", *extra_names(results))
    lines = ["| setting | objective − " + BASELINE + " | " + " | ".join(f"{m}: mean [95% t] (+ / − / =)" for m in metrics) + " |",
             "| --- " * (len(metrics) + 2) + "|"]
    for setting in results["plan"]["settings"]:
        for objective in objectives:
            if objective == BASELINE:
                continue
            cells = []
            for metric in metrics:
                d = paired_difference(per_seed(results, setting, objective, metric), per_seed(results, setting, BASELINE, metric))
                cells.append(f"{_fmt_diff(d)} ({_signs(d)})" if d["n"] else "-")
            lines.append(f"| {setting} | {objective} | " + " | ".join(cells) + " |")
    return lines


def selection_lines(results: dict) -> list[str]:
    selection = results["selection"]
    if selection is None:
        return ["The sweep has not finished: no knob is chosen yet."]
    lines = [f"Rule (fixed in `studies/protocol.py` before any evaluation-seed run): {selection['rule']}. Training seeds {selection['train_seeds']}.", "",
             "| task family | objective | knob | value: reward gain / faithfulness Δ (mean over training seeds) | chosen | why |", "| --- | --- | --- | --- | --- | --- |"]
    for fam, entries in selection["by_family"].items():
        for objective, e in entries.items():
            table = "; ".join(f"{row['value']:g}: {row['reward_gain']:+.3f} / {row['faithfulness_delta']:+.3f}" for row in e["table"])
            lines.append(f"| {fam} | {objective} | {e['knob']} | {table} | **{e['value']:g}** | {e['why']} |")
    return lines


def verdict_lines(rows: list[dict]) -> list[str]:
    lines = ["| paper | claim | where | verdict | evidence: paired difference, mean [95% t interval] (seeds + / − / =) |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if "difference" in row:
            d = row["difference"]
            evidence = f"{row['metric']}: {_fmt_diff(d, 4 if row['metric'] == 'seconds_per_step' else 3)} ({_signs(d)}, n = {d['n']})"
            if row["verdict"] == "not supported":
                evidence += "; the interval lies on the other side of 0" if d["ci"][1] < 0 else "; the interval includes 0"
            if d.get("ratio"):
                evidence += f"; ratio {_fmt_sd(d['ratio'], 2)} (toy) vs {SDXL_DPO_MAPO_STEP_RATIO['ratio']} on SDXL ({SDXL_DPO_MAPO_STEP_RATIO['where']})"
        else:
            evidence = row["evidence"]
        lines.append(f"| {row['paper']} | {row['claim']} | {row['where']} | **{row['verdict']}** | {evidence} |")
    return lines


def step_cost_lines(results: dict) -> list[str]:
    """Diffusion-DPO / MaPO median step time per (setting, seed), next to SDXL's ratio."""
    objectives = results["plan"]["objectives"]
    if not {"mapo", BASELINE} <= set(objectives):
        return ["Not measured here: the run has no mapo and diffusion_dpo pair."]
    lines = ["| setting | Diffusion-DPO / MaPO step time, per seed: mean ± sd (n) |", "| --- | --- |"]
    pooled = []
    for setting in results["plan"]["settings"]:
        dpo, mapo = per_seed(results, setting, BASELINE, "seconds_per_step"), per_seed(results, setting, "mapo", "seconds_per_step")
        ratios = [dpo[s] / mapo[s] for s in sorted(set(dpo) & set(mapo)) if mapo[s] > 0]
        pooled += ratios
        if ratios:
            lines.append(f"| {setting} | {_fmt_sd(mean_sd(ratios), 2)} ({len(ratios)}) |")
    if pooled:
        lines.append(f"| every (setting, seed) | {_fmt_sd(mean_sd(pooled), 2)} ({len(pooled)}) |")
    sdxl = SDXL_DPO_MAPO_STEP_RATIO
    workers = {i.get("workers") for i in results["meta"].get("invocations", [])}
    lines += ["", f"SDXL for comparison: {sdxl['ratio']} ({sdxl['dpo_ms']} / {sdxl['mapo_ms']} ms; {sdxl['where']}). "
              f"The toy times are median optimizer steps of runs that shared the device with other workers (workers per call: {', '.join(str(w) for w in sorted(workers, key=str))}"
              "), so they include contention; the ratio pairs runs of the same (setting, seed), not runs measured side by side."]
    return lines


def margin_summary(results: dict) -> list[dict]:
    """DMPO vs Diffusion-DPO at equal beta (sweep runs share the beta values): logged margins."""
    alpha = math.log(999.0)
    rows = []
    for objective in ("diffusion_dpo", "dmpo"):
        by_beta: dict[float, list[float]] = {}
        for r in results["runs"]:
            if r["objective"] == objective and r["stage"] == "sweep" and r["margins"]:
                half = r["margins"]["margin"][len(r["margins"]["margin"]) // 2:]
                by_beta.setdefault(r["value"], []).extend(v for v in half if v is not None)
        for beta, values in sorted(by_beta.items()):
            v = np.asarray(values)
            rows.append({"objective": objective, "beta": beta, "n": int(v.size), "median": float(np.median(v)), "p90": float(np.quantile(v, 0.9)),
                         "max": float(v.max()), "above_alpha": float(np.mean(v > alpha))})
    return rows


DMPO_BEHAVIOUR = (
    "DMPO as diffpo reads it (reverse KL between Bernoulli preference probabilities, `diffpo/losses.py`, tested in "
    "tests/test_losses.py) with h the DPO margin at the same beta: at h = 0 its gradient is -alpha/4 "
    "(about -1.73 at alpha = ln 999), 3.5 times Diffusion-DPO's -1/2, so it pushes harder at the start; its loss is zero "
    "at h = alpha and past alpha it pulls back only weakly (like h·exp(-h), about 1e-8 at h = 3·alpha), so nothing "
    "holds a margin that overshoots alpha. Diffusion-DPO's push fades like exp(-h) and never reverses. At large "
    "margins both losses are flat."
)


def write_report(results: dict, out: Path) -> Path:
    """``OUT/report.md`` with its plots (``OUT/*.png``) from ``results`` alone."""
    from studies import plots

    out = Path(out)
    plan, m = results["plan"], results["meta"]
    claims = claim_rows(results)
    margins = margin_summary(results)
    figures = plots.write_all(results, out)
    machine = m.get("machine") or {}
    lines = [
        "# Method comparison in the shapes world (issue 17's protocol)",
        "",
        "Generated by `python -m studies.compare --out DIR --report-only` from `results.json`; do not edit by hand.",
        "",
        "## What ran",
        "",
        f"- Objectives: {', '.join(plan['objectives'])}; knobs: " + "; ".join(f"{o} {k['name']} ∈ {{{', '.join(f'{v:g}' for v in k['values'])}}}" for o, k in plan["knobs"].items())
        + f"; lr {plan['shared_learning_rate']:g} for objectives whose knob is not the lr.",
        f"- Sweep on training seeds {plan['train_seeds']} in {', '.join(plan['sweep_settings'])} ({plan['sweep_eval_per_prompt']} evaluation images per held-out prompt); "
        f"final runs on evaluation seeds {plan['eval_seeds']} in {', '.join(plan['settings'])} ({plan['eval_per_prompt']} per prompt, 11 held-out prompts).",
        f"- Each run: full fine-tuning of the committed toy base, {plan['steps']} steps, {plan['batch_size']} pairs per step, {plan['pairs_per_prompt']} pairs per training prompt, "
        f"{plan['inference_steps']} DDIM steps for pairs and evaluation. Methods share the pairs of a (setting, seed).",
        f"- Machine: {machine.get('device_name', machine.get('device', '?'))}, {machine.get('cpu_count', '?')} CPUs, {machine.get('platform', '?')}; "
        f"Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}, diffusers {machine.get('diffusers', '?')}; commit {m.get('commit')}; collected {m.get('collected')}.",
        f"- {len(results['runs'])} runs finished, {len(results['missing'])} missing.",
        "",
        "Commands (in order):",
        "",
        *[f"    {c}" for c in m.get("commands", [])],
        "",
        "## Verdicts on the papers' claims",
        "",
        "Rule (`studies/report.py`, `verdict`): **supported** when the paired 95% t interval over evaluation seeds (ddof = 1) of "
        "(claimed better − other) excludes 0 in the claimed direction; **not supported** otherwise; **not tested here** when the "
        "study has no runs for it or the claim is not a measurement.",
        "",
        *verdict_lines(claims),
        "",
        "## Knob selection (training seeds)",
        "",
        *selection_lines(results),
        "",
        "## Final runs (evaluation seeds): mean ± sample sd (ddof = 1) over seeds",
        "",
        *final_table(results),
        "",
        f"## Paired differences to {BASELINE} (same pairs and seeds): mean [95% t interval], seeds where the objective is better / worse / equal",
        "",
        *paired_table(results),
        "",
        "## Per-step cost",
        "",
        *step_cost_lines(results),
        "",
        "## Plots",
        "",
        *[f"![{title}]({name})" for name, title in figures],
        "",
        "## DMPO vs Diffusion-DPO: margins at equal beta (sweep runs, second half of training)",
        "",
        DMPO_BEHAVIOUR,
        "",
        "| objective | beta | logged margins | median | 90th percentile | max | fraction above alpha = ln 999 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {r['objective']} | {r['beta']:g} | {r['n']} | {r['median']:.2f} | {r['p90']:.2f} | {r['max']:.2f} | {r['above_alpha']:.2f} |" for r in margins],
        "",
    ]
    if results["missing"]:
        lines += ["## Missing runs", "", *[f"- {x['stage']} {x['setting']} seed {x['seed']} {x['objective']} ({x['value']:g})" for x in results["missing"]], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "verdicts.json").write_text(json.dumps(claims, indent=2))
    return path
