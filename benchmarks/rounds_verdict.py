"""Issue 16's target 1 from interleaved rounds: the public recipe and ``diffpo train`` measured in turn on one
machine (``benchmarks/device/call_16.sh``'s ``rounds`` stage: public_round1.json, e2e_train_round1.json,
public_round2.json, ...), so that the public recipe's own drift between measurements (its rounds' medians spread 19% on one H200,
BENCHMARKS.md, issue 16) is measured too, not folded into one ratio.

    python -m benchmarks.rounds_verdict DIR [DIR ...] [--exclude NAME=VALUE] [--bootstrap 10000]

For each trainer run: its median step (``train_e2e``'s, steps 6-20 without profiled ones), the public rounds just
before and after it, and the ratio to their mean. Pooled over every run given: the ratio of the medians of all
timed steps (public: every round's timed steps; trainer: every run's steps 6-20). Two 95% intervals, from
bootstraps over whole rounds (steps within one run are not independent):

- paired: the mean of the per-run ratios, the runs resampled (each keeps its own neighbouring public rounds: what
  the interleaving is for; neighbouring runs share a public round, so this interval is somewhat too narrow);
- unpaired: the ratio of the public rounds' median to the trainer runs' median, each side resampled on its own
  (ignores the pairing: wider, as if the rounds had not been interleaved).

``--exclude train.channels_last=true`` leaves out trainer runs whose overrides include ``train.channels_last=true``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from pathlib import Path

SKIP = 5
"""Steps ``benchmarks/train_e2e.py`` leaves out of its median by default (compilation, warm-up)."""


def _round_number(path: Path) -> int:
    return int(re.search(r"round(\d+)", path.stem).group(1))


def load_rounds(folder: Path, exclude: tuple[str, ...] = ()) -> dict:
    """One call's rounds: ``public`` [(round, median ms, [step ms])] and ``trainer`` [(round, median ms, [step ms])]."""
    public = []
    for path in sorted(folder.glob("public_round*.json"), key=_round_number):
        row = next(r for r in json.loads(path.read_text())["rows"] if r["case"].startswith("public/"))
        public.append((_round_number(path), 1000 * row["step_s"], [1000 * s for s in row["step_s_all"]]))
    trainer = []
    for path in sorted(folder.glob("e2e_train_round*.json"), key=_round_number):
        run = json.loads(path.read_text())
        if any(item in run.get("overrides", []) for item in exclude):
            continue
        profiled = {run["profile"]["steps"][0] + k for k in range(3)} if run.get("profile") else set()
        steps = [1000 * s for number, s in enumerate(run["step_seconds"], 1) if number > SKIP and number not in profiled]
        if not steps or abs(statistics.median(steps) - 1000 * run["median_step_s"]) > 1e-6:
            raise ValueError(f"{path}: its steps after the first {SKIP} (without profiled ones) do not give its median_step_s ({run.get('median_of_steps')}): run with train_e2e's default --skip {SKIP}")
        trainer.append((_round_number(path), 1000 * run["median_step_s"], steps))
    if not public or not trainer:
        raise ValueError(f"{folder}: no public_round*.json or no e2e_train_round*.json left to compare")
    return {"folder": str(folder), "public": public, "trainer": trainer}


def verdict(calls: list[dict], bootstrap: int = 10000, seed: int = 0) -> dict:
    """Per-run ratios against the neighbouring public rounds, the pooled ratio, and the paired and unpaired intervals."""
    per_run = []
    for call in calls:
        by_round = {number: median for number, median, _ in call["public"]}
        for number, median, _ in call["trainer"]:
            # the trainer's round i runs after public round i and before public round i + 1
            around = [by_round[n] for n in (number, number + 1) if n in by_round]
            if around:
                per_run.append({"call": call["folder"], "round": number, "trainer_ms": median, "public_ms": around, "ratio": statistics.mean(around) / median})
    public_steps = [s for call in calls for _, _, steps in call["public"] for s in steps]
    trainer_steps = [s for call in calls for _, _, steps in call["trainer"] for s in steps]
    public_medians = [m for call in calls for _, m, _ in call["public"]]
    trainer_medians = [m for call in calls for _, m, _ in call["trainer"]]
    rng = random.Random(seed)
    unpaired = sorted(
        statistics.median(rng.choices(public_medians, k=len(public_medians))) / statistics.median(rng.choices(trainer_medians, k=len(trainer_medians)))
        for _ in range(bootstrap)
    )
    run_ratios = [run["ratio"] for run in per_run]
    paired = sorted(statistics.mean(rng.choices(run_ratios, k=len(run_ratios))) for _ in range(bootstrap))
    interval = lambda draws: [draws[int(0.025 * bootstrap)], draws[int(0.975 * bootstrap) - 1]]
    return {
        "per_run": per_run,
        "public_median_ms": statistics.median(public_steps),
        "trainer_median_ms": statistics.median(trainer_steps),
        "pooled_ratio": statistics.median(public_steps) / statistics.median(trainer_steps),
        "ratio_of_round_medians": statistics.median(public_medians) / statistics.median(trainer_medians),
        "mean_run_ratio": statistics.mean(run_ratios),
        "runs_at_or_above_3": sum(r >= 3.0 for r in run_ratios),
        "paired_95": interval(paired),
        "unpaired_95": interval(unpaired),
        "public_rounds": len(public_medians),
        "trainer_runs": len(trainer_medians),
        "public_round_range_ms": [min(public_medians), max(public_medians)],
        "trainer_run_range_ms": [min(trainer_medians), max(trainer_medians)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--exclude", action="append", default=[], help="leave out trainer runs with this override (repeatable)")
    parser.add_argument("--bootstrap", type=int, default=10000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = verdict([load_rounds(folder, tuple(args.exclude)) for folder in args.folders], args.bootstrap)
    for run in result["per_run"]:
        print(f"{run['call']} round {run['round']}: trainer {run['trainer_ms']:.1f} ms, public around it {[round(p, 1) for p in run['public_ms']]} -> {run['ratio']:.2f}x")
    print(
        f"pooled: public {result['public_median_ms']:.1f} ms ({result['public_rounds']} rounds, {result['public_round_range_ms'][0]:.1f}-{result['public_round_range_ms'][1]:.1f}), "
        f"trainer {result['trainer_median_ms']:.1f} ms ({result['trainer_runs']} runs, {result['trainer_run_range_ms'][0]:.1f}-{result['trainer_run_range_ms'][1]:.1f}) -> "
        f"{result['pooled_ratio']:.3f}x"
    )
    print(
        f"per-run ratios: mean {result['mean_run_ratio']:.3f}x, {result['runs_at_or_above_3']} of {len(result['per_run'])} at or above 3.0x, "
        f"paired 95% [{result['paired_95'][0]:.3f}, {result['paired_95'][1]:.3f}]; "
        f"ratio of the rounds' medians {result['ratio_of_round_medians']:.3f}x, unpaired 95% [{result['unpaired_95'][0]:.3f}, {result['unpaired_95'][1]:.3f}]"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
