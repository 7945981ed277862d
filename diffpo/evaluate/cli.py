"""``diffpo eval``: compare a tuned model with its base on the same prompts and seeds.

    diffpo eval --model runwayml/stable-diffusion-v1-5 --lora runs/mapo/final \\
        --prompts parti.jsonl --scorers pickscore,hpsv21 --images-per-prompt 4 --seed 0 --out evals/mapo

writes ``OUT/report.md`` (table and setup), ``OUT/results.json``, ``OUT/scores.jsonl`` (per image),
``OUT/grid.png`` and ``OUT/images/``. Re-running with the same models, prompts, seeds and sampler
settings reuses the saved images and only scores again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffpo.config import ConfigError
from diffpo.evaluate.prompts import load_prompts, prompt_set_names
from diffpo.evaluate.run import EvalError, evaluate_models, format_table, load_tuned, write_report
from diffpo.evaluate.scorers import Scorer, load_scorer, scorer_names
from diffpo.options import add_command
from diffpo.sampling import SamplerSettings


@dataclass
class EvalOptions:
    model: str
    """Base model: hub id, local diffusers folder, or tiny:sd."""
    prompts: str
    """A .txt/.jsonl file or a built-in set (``diffpo.evaluate.prompts``, e.g. shapes-heldout)."""
    scorers: list[str]
    """Comma-separated reward models (``diffpo.evaluate.scorers``, e.g. pickscore,hpsv21)."""
    out: Path
    """Output folder: report.md, results.json, scores.jsonl, grid.png, images/."""
    lora: str | None = None
    """The tuned model as a LoRA: a training run (or its final/ folder), or a .safetensors file."""
    checkpoint: str | None = None
    """The tuned model as a checkpoint-N folder written by diffpo train."""
    tuned_model: str | None = None
    """The tuned model as a full fine-tuned pipeline: local folder or hub id."""
    images_per_prompt: int = 4
    """Images per prompt and model."""
    seed: int = 0
    """Image j of each prompt uses seed SEED+j for both models."""
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    batch_size: int = 64
    """Images per sampling batch."""
    device: str = "cpu"
    """Torch device for sampling and scoring."""
    max_prompts: int | None = None
    """Evaluate only the first K prompts."""

    def __post_init__(self):
        tuned = [name for name in ("lora", "checkpoint", "tuned_model") if getattr(self, name) is not None]
        if len(tuned) != 1:
            raise ConfigError(f"lora / checkpoint / tuned_model: give exactly one tuned model (--lora, --checkpoint or --tuned-model), got {len(tuned) or 'none'}")
        for key in ("images_per_prompt", "batch_size", "max_prompts"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        valid = scorer_names()
        if not self.scorers:
            raise ConfigError(f"scorers: no scorer names (valid: {', '.join(valid)})")
        unknown = [name for name in self.scorers if name not in valid]
        if unknown:
            raise ConfigError(f"scorers: unknown scorer(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        if self.prompts in prompt_set_names():  # a built-in set loads now; a file is read when the command runs
            load_prompts(self.prompts)


def _load_scorer(name: str, device: str) -> Scorer:
    """Build a scorer, turning load failures (offline, missing package) into one error line."""
    try:
        return load_scorer(name, device=device)
    except (OSError, ImportError, RuntimeError, ValueError) as err:
        raise EvalError(f"cannot load scorer '{name}': {err}") from err


def cmd_eval(options: EvalOptions) -> int:
    """Load prompts and scorers first (cheap, fail fast), then the models, then sample and score."""
    o = options
    prompts = load_prompts(o.prompts)[: o.max_prompts]
    scorers = {name: _load_scorer(name, o.device) for name in o.scorers}
    base, tuned = load_tuned(o.model, lora=o.lora, checkpoint=o.checkpoint, tuned_model=o.tuned_model)
    results = evaluate_models(
        base,
        tuned,
        prompts,
        images_per_prompt=o.images_per_prompt,
        seed=o.seed,
        scorers=scorers,
        sampler={**o.sampler.as_dict(), "batch_size": o.batch_size},
        out_dir=o.out,
        device=o.device,
    )
    results["prompt_set"] = o.prompts
    write_report(results, o.out)
    print(format_table(results))
    print(f"report: {o.out / 'report.md'}")
    return 0


def register_cli(sub) -> None:
    add_command(
        sub, "eval", EvalOptions, cmd_eval,
        help="compare a tuned model with its base on the same prompts and seeds",
        description="Compare a tuned model with its base on the same prompts and seeds. Writes OUT/report.md, "
        "results.json, scores.jsonl (per image), grid.png and images/; a re-run with the same settings reuses the images.",
    )
