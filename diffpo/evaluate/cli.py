"""``diffpo eval``: compare a tuned model with its base on the same prompts and seeds.

    diffpo eval --model runwayml/stable-diffusion-v1-5 --lora runs/mapo/final \\
        --prompts parti.jsonl --scorers pickscore,hpsv21 --images-per-prompt 4 --seed 0 --out evals/mapo

writes ``OUT/report.md`` (table and setup), ``OUT/results.json``, ``OUT/scores.jsonl`` (per image),
``OUT/grid.png`` and ``OUT/images/``. Re-running with the same models, prompts, seeds and sampler
settings reuses the saved images and only scores again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffpo.evaluate.prompts import load_prompts, prompt_set_names
from diffpo.evaluate.run import EvalError, evaluate_models, format_table, load_tuned, write_report
from diffpo.evaluate.scorers import Scorer, load_scorer, scorer_names
from diffpo.sampling import SamplerSettings, add_sampler_arguments, sampler_options


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _scorer_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    valid = scorer_names()
    if not names:
        raise EvalError(f"--scorers: no scorer names in '{text}' (valid: {', '.join(valid)})")
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise EvalError(f"unknown scorer(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def _load_scorer(name: str, device: str) -> Scorer:
    """Build a scorer, turning load failures (offline, missing package) into one error line."""
    try:
        return load_scorer(name, device=device)
    except (OSError, ImportError, RuntimeError, ValueError) as err:
        raise EvalError(f"cannot load scorer '{name}': {err}") from err


def validate_eval(args: argparse.Namespace) -> None:
    """``--dry-run``: scorer names and (for a built-in set) the prompt set; no weights loaded."""
    _scorer_names(args.scorers)
    if args.prompts in prompt_set_names():
        load_prompts(args.prompts)


def cmd_eval(args: argparse.Namespace) -> int:
    """Load prompts and scorers first (cheap, fail fast), then the models, then sample and score."""
    names = _scorer_names(args.scorers)
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    scorers = {name: _load_scorer(name, args.device) for name in names}
    sampler = {**sampler_options(args), "batch_size": args.batch_size}
    SamplerSettings.from_any({k: v for k, v in sampler.items() if k != "batch_size"})  # bad flags fail before loading
    base, tuned = load_tuned(args.model, lora=args.lora, checkpoint=args.checkpoint, tuned_model=args.tuned_model)
    results = evaluate_models(
        base,
        tuned,
        prompts,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        scorers=scorers,
        sampler=sampler,
        out_dir=args.out,
        device=args.device,
    )
    results["prompt_set"] = args.prompts
    write_report(results, args.out)
    print(format_table(results))
    print(f"report: {args.out / 'report.md'}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare a tuned model with its base on the same prompts and seeds",
        description="Compare a tuned model with its base on the same prompts and seeds. Writes OUT/report.md, "
        "results.json, scores.jsonl (per image), grid.png and images/; a re-run with the same settings reuses the images.",
    )
    p.add_argument("--model", required=True, help="base model: hub id, local diffusers folder, or tiny:sd")
    tuned = p.add_mutually_exclusive_group(required=True)
    tuned.add_argument("--lora", help="LoRA: a training run (or its final/ folder), or a .safetensors file")
    tuned.add_argument("--checkpoint", help="a checkpoint-N folder written by diffpo train")
    tuned.add_argument("--tuned-model", help="a full fine-tuned pipeline: local folder or hub id")
    p.add_argument("--prompts", required=True, help=f"a .txt/.jsonl file or a built-in set ({', '.join(prompt_set_names())})")
    p.add_argument("--scorers", required=True, help=f"comma-separated reward models: {', '.join(scorer_names())}")
    p.add_argument("--images-per-prompt", type=_positive_int, default=4, help="images per prompt and model (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed SEED+j for both models")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_sampler_arguments(p)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per sampling batch (default 64)")
    p.add_argument("--device", default="cpu", help="torch device for sampling and scoring (default cpu)")
    p.add_argument("--max-prompts", type=_positive_int, default=None, help="evaluate only the first K prompts")
    p.set_defaults(func=cmd_eval, validate=validate_eval)
