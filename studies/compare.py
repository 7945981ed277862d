"""Method comparison in the shapes world under issue 17's protocol (``studies/protocol.py``).

    python -m studies.compare --out runs/compare --device cuda --workers 12
    python -m studies.compare --out runs/compare --report-only

The first command does the three stages: the knob sweep on the training seeds, the selection (written to
``OUT/selection.json`` before any evaluation-seed run starts, then frozen), and the final runs on
the separate evaluation seeds; then ``report``. Every run writes ``OUT/runs/<setting>/seed<S>/
<objective>/<knob>=<value>/report.json`` (plus the trainer's ``train/metrics.jsonl``; checkpoints,
weights and evaluation images are deleted after the report is written). A finished run (its
``report.json`` exists) is skipped, so the study can be split into calls: ``--stage sweep`` then
``--stage final``, or the same command again after ``--deadline-s`` stopped it (runs not started
by then are left for the next call; the ones in flight finish). ``report`` gathers the finished
runs into ``OUT/results.json`` and writes ``OUT/report.md`` and its plots (``studies/report.py``);
``--report-only`` does only that (add ``--from-results`` to re-render from ``results.json`` alone,
``--export DIR`` to copy what a committed results folder keeps: no per-step logs, weights or images).

Exit status: 0 when every planned run has a report; 1 when some are missing or failed (listed);
2 for an argument that cannot run (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from studies import protocol
from studies.protocol import ProtocolError, Run

DEFAULT_OBJECTIVES = "sft,diffusion_dpo,mapo,dmpo"
DEFAULT_SWEEP_SETTINGS = "style:outline:0.5,reward:size"
# The reference-mismatch curve: style:outline at severity 0.25 .. 1.0, and the reward task. Severity
# 0 is not run: its chosen images are solid renders like the base's own (render: "severity 0 is
# identical to solid"), so the task reward (thinness) has no direction to move in. Measured on the
# 43 training prompts x 2 (CPU, 2026-12-02): chosen thinness 0.259 at severity 0 vs 0.242 ± 0.114
# for base samples (a seventh of their spread), 0.283 at 0.1, 0.330 at 0.25, 0.436 at 0.5, 0.986 at
# 1.0; 0.25 is the smallest severity whose target differs clearly from what the base draws.
DEFAULT_SETTINGS = "style:outline:0.25,style:outline:0.5,style:outline:0.75,style:outline:1.0,reward:size"
DEFAULT_TRAIN_SEEDS = "1000,1100"
# Evaluation seeds 100 apart: image j of a prompt is sampled with seed 10000 + seed + j, so seeds
# closer than the images per prompt would share most of their evaluation noise.
DEFAULT_EVAL_SEEDS = "0,100,200,300,400"
HEAVY_OUTPUTS = ("train/final", "train/checkpoint-*", "eval/images")


# ---------------------------------------------------------------------------------------- running


def _pairs_dir(out: Path, setting: str, seed: int) -> Path:
    return out / "runs" / setting.replace(":", "_") / f"seed{seed}" / "pairs"


def _pairs_file(folder: Path) -> Path | None:
    """The finished pair set in ``folder`` (``DONE`` is written after it is complete), or None."""
    if not (folder / "DONE").is_file():
        return None
    return folder / (folder / "DONE").read_text().strip()  # the file's name: the folder may have moved


def _build_pairs(job: tuple) -> str:
    out, setting, seed, settings, base = job
    from diffpo.toy.base import ASSET_DIR, load_toy_model
    from diffpo.toy.demo import build_pairs

    folder = _pairs_dir(Path(out), setting, seed)
    if _pairs_file(folder) is None:
        run_settings = replace(protocol.parse_setting(setting, settings), seed=seed)
        try:
            path = build_pairs(run_settings, load_toy_model(base or str(ASSET_DIR), settings.device), folder, progress=False)
        except Exception as err:  # its runs report "no pair set"; the other cells go on
            print(f"[pairs {setting} seed {seed}] FAILED: {type(err).__name__}: {err}", flush=True)
            return f"pairs {setting} seed {seed}: failed"
        (folder / "DONE").write_text(Path(path).name)
    return f"pairs {setting} seed {seed}"


def _run_one(job: tuple) -> dict:
    """One run, unless finished (skipped) or past the deadline (left for the next call)."""
    out, run, settings, eval_per_prompt, base, deadline = job
    run_dir = Path(out) / "runs" / run.key
    if (run_dir / "report.json").is_file():
        return {"key": run.key, "status": "done"}
    if time.time() > deadline:
        return {"key": run.key, "status": "deadline"}
    from diffpo.toy.demo import run_experiment

    pairs = _pairs_file(_pairs_dir(Path(out), run.setting, run.seed))
    if pairs is None:
        return {"key": run.key, "status": "failed", "error": "no pair set for this (setting, seed)"}
    run_settings = protocol.run_settings(replace(protocol.parse_setting(run.setting, settings), seed=run.seed, eval_per_prompt=eval_per_prompt), run.objective, run.value)
    try:
        run_experiment(run_settings, run_dir, base=base, pairs=pairs, progress=False)
    except Exception as err:  # one failed run must not lose the others; it is listed and re-run next call
        print(f"[{run.key}] FAILED: {type(err).__name__}: {err}", flush=True)
        return {"key": run.key, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    for pattern in HEAVY_OUTPUTS:  # weights, checkpoints and images: 23 MB a run, not needed after the report
        for path in run_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
    report = json.loads((run_dir / "report.json").read_text())
    print(f"[{run.key}] win rate {report['win_rate']:.3f}, faithfulness {report['faithfulness_base']:.3f} -> {report['faithfulness_tuned']:.3f}", flush=True)
    return {"key": run.key, "status": "ran"}


def _share_cpus(workers: int) -> None:
    """Each worker's torch threads get an equal share of the cores (16 cores, 12 workers: 1 each),
    so the processes do not oversubscribe the CPU that launches their kernels."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _map(fn, jobs: list, workers: int) -> list:
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_share_cpus, initargs=(workers,)) as pool:
            return list(pool.imap_unordered(fn, jobs))
    return [fn(job) for job in jobs]


def execute(out: Path, runs: list[Run], settings, *, eval_per_prompt: int, workers: int, base: str | None, deadline: float) -> list[dict]:
    """Pairs for every (setting, seed) the runs need, then the runs; returns each run's status."""
    cells = sorted({(r.setting, r.seed) for r in runs if not (out / "runs" / r.key / "report.json").is_file()})
    if cells and time.time() < deadline:
        _map(_build_pairs, [(str(out), setting, seed, settings, base) for setting, seed in cells], workers)
    jobs = [(str(out), run, settings, eval_per_prompt, base, deadline) for run in runs]
    return _map(_run_one, jobs, workers)


def sweep_reports(out: Path, runs: list[Run]) -> list[dict]:
    """The finished sweep runs with what the selection rule reads."""
    rows = []
    for run in runs:
        path = out / "runs" / run.key / "report.json"
        if path.is_file():
            r = json.loads(path.read_text())
            rows.append({**asdict(run), "reward_gain": r["reward_tuned"] - r["reward_base"], "faithfulness_delta": r["faithfulness_tuned"] - r["faithfulness_base"]})
    return rows


def choose(out: Path, plan: dict) -> dict | None:
    """``selection.json``: each objective's knob value, chosen from its sweep runs (training seeds)
    the first time the final stage needs it and frozen from then on, so evaluation-seed runs can
    never influence it. An objective added to a finished study gets its own entry; the others'
    stay as they were. None while a needed sweep run is missing."""
    path = out / "selection.json"
    selection = json.loads(path.read_text()) if path.is_file() else {"rule": protocol.SELECTION_RULE, "train_seeds": plan["train_seeds"], "by_family": {}}
    new = [o for o in plan["objectives"] if any(o not in selection["by_family"].get(protocol.family(s), {}) for s in plan["sweep_settings"])]
    if not new:
        return selection
    runs = protocol.sweep_runs(new, plan["sweep_settings"], plan["train_seeds"])
    reports = sweep_reports(out, runs)
    if len(reports) < len(runs):
        return None
    for setting in plan["sweep_settings"]:
        entries = selection["by_family"].setdefault(protocol.family(setting), {})
        for objective in new:
            entries[objective] = protocol.select_knob([r for r in reports if r["setting"] == setting and r["objective"] == objective], objective)
    path.write_text(json.dumps(selection, indent=2))
    return selection


def chosen_values(selection: dict) -> dict[str, dict[str, float]]:
    return {fam: {obj: entry["value"] for obj, entry in objectives.items()} for fam, objectives in selection["by_family"].items()}


# ---------------------------------------------------------------------------------------- the CLI


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ProtocolError(f"{flag} {text!r}: use comma-separated integers, e.g. 0,100,200") from None


def plan_from_args(args: argparse.Namespace) -> dict:
    """The study's plan, checked before anything runs (every error names its argument)."""
    from diffpo.losses import get_loss
    from diffpo.toy.demo import DemoSettings

    plan = {
        "objectives": args.objectives.split(","),
        "sweep_settings": args.sweep_settings.split(","),
        "settings": args.settings.split(","),
        "train_seeds": _ints(args.train_seeds, "--train-seeds"),
        "eval_seeds": _ints(args.eval_seeds, "--eval-seeds"),
        "steps": args.steps, "batch_size": args.batch_size, "pairs_per_prompt": args.pairs_per_prompt,
        "eval_per_prompt": args.eval_per_prompt, "sweep_eval_per_prompt": args.sweep_eval_per_prompt,
        "inference_steps": args.inference_steps,
        "knobs": {},
        "selection_rule": protocol.SELECTION_RULE,
        "shared_learning_rate": protocol.SHARED_LEARNING_RATE,
    }
    for objective in plan["objectives"]:
        knob = protocol.KNOBS.get(objective)
        try:  # the registered loss; with a KNOBS row, its fixed and swept hparams (names and ranges)
            spec = get_loss(knob.loss or objective if knob else objective)
            for value in knob.values if knob else ():
                spec.resolve_hparams({**knob.fixed, **({} if knob.is_learning_rate else {knob.name: value})})
        except ValueError as err:
            raise ProtocolError(f"--objectives: {err}") from None
        knob = protocol.knob_for(objective)  # no row: the error names the table to add it to
        plan["knobs"][objective] = {"name": knob.name, "values": list(knob.values), "loss": knob.loss or objective, "fixed": dict(knob.fixed)}
    base = DemoSettings()
    for flag, texts in (("--sweep-settings", plan["sweep_settings"]), ("--settings", plan["settings"])):
        for text in texts:
            try:
                protocol.parse_setting(text, base)
            except ProtocolError as err:
                raise ProtocolError(f"{flag}: {err}") from None
    for key in ("steps", "batch_size", "pairs_per_prompt", "eval_per_prompt", "sweep_eval_per_prompt", "inference_steps"):
        if plan[key] < 1:
            raise ProtocolError(f"--{key.replace('_', '-')}: must be >= 1, got {plan[key]}")
    protocol.check_plan(plan["objectives"], plan["sweep_settings"], plan["settings"], plan["train_seeds"], plan["eval_seeds"], args.min_eval_seeds)
    seeds = sorted(plan["train_seeds"] + plan["eval_seeds"])
    spacing = max(plan["eval_per_prompt"], plan["sweep_eval_per_prompt"])
    close = [(a, b) for a, b in zip(seeds, seeds[1:]) if b - a < spacing]
    if close:
        raise ProtocolError(f"--train-seeds/--eval-seeds: seeds {close[0]} are closer than the {spacing} images per prompt and would share evaluation noise (space them >= {spacing} apart)")
    return plan


def check_extends(old: dict, new: dict, path: Path) -> None:
    """A study folder may only grow by objectives (issue 18's, say): every other part of its plan,
    and the knobs of the objectives it has, must stay, or its runs would mix two protocols."""
    same = {k: v for k, v in old.items() if k not in ("objectives", "knobs")} == {k: v for k, v in new.items() if k not in ("objectives", "knobs")}
    kept = all(o in new["objectives"] and new["knobs"][o] == old["knobs"][o] for o in old["objectives"])
    if not (same and kept):
        raise ProtocolError(f"{path}: this folder holds a study with another plan (only adding objectives is allowed); use a new --out")


def _settings(plan: dict, device: str):
    from diffpo.toy.demo import DemoSettings

    return DemoSettings(
        steps=plan["steps"], batch_size=plan["batch_size"], pairs_per_prompt=plan["pairs_per_prompt"],
        num_inference_steps=plan["inference_steps"], device=device,
    )


def _log_invocation(out: Path, entry: dict) -> None:
    with (out / "invocations.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    from diffpo.devices import resolve_device
    from studies import meta
    from studies.report import collect, write_report

    resolve_device(args.device)
    plan = plan_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.is_file():
        check_extends(json.loads(plan_path.read_text()), plan, plan_path)
    plan_path.write_text(json.dumps(plan, indent=2))
    started = time.time()
    deadline = started + (float("inf") if args.deadline_s is None else args.deadline_s)
    settings = _settings(plan, args.device)
    statuses = []
    if args.stage in ("sweep", "all"):
        runs = protocol.sweep_runs(plan["objectives"], plan["sweep_settings"], plan["train_seeds"])
        print(f"sweep: {len(runs)} runs on training seeds {plan['train_seeds']}", flush=True)
        statuses += execute(out, runs, settings, eval_per_prompt=plan["sweep_eval_per_prompt"], workers=args.workers, base=args.base, deadline=deadline)
    selection = choose(out, plan) if args.stage in ("final", "all") and time.time() < deadline else None
    if args.stage in ("final", "all") and selection is None:
        print("studies.compare: the sweep is not finished (or the deadline passed): no final run started", file=sys.stderr)
    if selection is not None:
        for fam, entries in selection["by_family"].items():
            print(f"chosen on the training seeds ({fam}): " + ", ".join(f"{o} {e['knob']}={e['value']:g}" for o, e in entries.items()), flush=True)
        runs = protocol.final_runs(plan["objectives"], plan["settings"], plan["eval_seeds"], chosen_values(selection))
        print(f"final: {len(runs)} runs on evaluation seeds {plan['eval_seeds']}", flush=True)
        statuses += execute(out, runs, settings, eval_per_prompt=plan["eval_per_prompt"], workers=args.workers, base=args.base, deadline=deadline)
    _log_invocation(out, {"command": meta.command_line("studies.compare", args.argv), "date": meta.now_utc(), "stage": args.stage, "workers": args.workers,
                          "seconds": time.time() - started, "runs": {s: sum(x["status"] == s for x in statuses) for s in ("ran", "done", "failed", "deadline")},
                          "machine": meta.machine(args.device), **meta.git_commit()})
    results = collect(out)
    write_report(results, out)
    left = [s for s in statuses if s["status"] in ("failed", "deadline")]
    print(f"{sum(s['status'] == 'ran' for s in statuses)} runs ran, {sum(s['status'] == 'done' for s in statuses)} were done; report: {out / 'report.md'}")
    if left or (args.stage in ("final", "all") and selection is None):
        print(f"studies.compare: {len(left)} runs not finished ({sum(s['status'] == 'deadline' for s in left)} left at the deadline, "
              f"{sum(s['status'] == 'failed' for s in left)} failed): run the same command again to continue", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from studies.report import collect, write_report

    out = Path(args.out)
    results_path = out / "results.json"
    if args.from_results:
        if not results_path.is_file():
            raise ProtocolError(f"{results_path}: not found (run `python -m studies.compare --out {out} --report-only` where the runs are)")
        results = json.loads(results_path.read_text())
    else:
        if not (out / "plan.json").is_file():
            raise ProtocolError(f"{out / 'plan.json'}: not found; is --out a studies.compare folder?")
        results = collect(out)
    write_report(results, out)
    print(f"report: {out / 'report.md'} ({len(results['runs'])} runs, {len(results['missing'])} missing)")
    if args.export:
        print(f"exported {export(out, Path(args.export))} files to {args.export}")
    return 0


EXPORTED = ("results.json", "report.md", "verdicts.json", "plan.json", "selection.json", "invocations.jsonl", "*.png", "runs/**/report.json")
"""What a committed results folder keeps: the write-up, its data and plots, every run's report;
not the per-step logs (their margins are in results.json), checkpoints, pairs or images."""


def export(out: Path, dest: Path) -> int:
    """Copy ``EXPORTED`` from the study folder ``out`` to ``dest`` (relative paths kept)."""
    count = 0
    for pattern in EXPORTED:
        for path in sorted(out.glob(pattern)):
            target = dest / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            count += 1
    return count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--report-only", action="store_true", help="no runs: results.json, report.md and plots from the finished runs in --out")
    p.add_argument("--from-results", action="store_true", help="with --report-only: re-render from OUT/results.json alone (no run folders needed)")
    p.add_argument("--export", default=None, metavar="DIR", help="with --report-only: copy what a committed results folder keeps (report, results.json, plots, each run's report.json) to DIR")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES, help="comma-separated objectives; each needs a row in studies/protocol.py KNOBS")
    p.add_argument("--sweep-settings", default=DEFAULT_SWEEP_SETTINGS, help="where the knob sweep runs: one setting per task family")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="final settings (the reference-mismatch curve and the reward task)")
    p.add_argument("--train-seeds", default=DEFAULT_TRAIN_SEEDS, help="seeds of the sweep (selection) runs")
    p.add_argument("--eval-seeds", default=DEFAULT_EVAL_SEEDS, help="seeds of the final runs, separate from the training seeds")
    p.add_argument("--min-eval-seeds", type=int, default=5, help="refuse fewer evaluation seeds than this (lower it only for smoke runs)")
    p.add_argument("--stage", choices=["sweep", "final", "all"], default="all")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pairs-per-prompt", type=int, default=4)
    p.add_argument("--eval-per-prompt", type=int, default=16, help="evaluation images per held-out prompt in final runs (11 prompts)")
    p.add_argument("--sweep-eval-per-prompt", type=int, default=8, help="the same for sweep runs")
    p.add_argument("--inference-steps", type=int, default=10, help="DDIM steps for pairs and evaluation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (several share one GPU well: the toy UNet has 1.4M parameters)")
    p.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds; the next call continues")
    p.add_argument("--base", default=None, help="base model folder (default: the committed toy base)")
    return p


def main(argv: list[str] | None = None) -> int:
    from diffpo.config import ConfigError

    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return cmd_report(args) if args.report_only else cmd_run(args)
    except (ProtocolError, ConfigError) as err:
        print(f"python -m studies.compare: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
