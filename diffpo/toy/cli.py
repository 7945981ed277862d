"""``diffpo toy ...`` and ``diffpo demo``: the shapes-world testbed from the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from diffpo.config import ConfigError, flattened
from diffpo.options import add_command
from diffpo.toy.demo import DemoSettings


@dataclass
class PretrainOptions:
    out: Path
    """Folder for the base model (a diffusers folder with pretrain.json)."""
    steps: int = 6000
    """Optimizer steps."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 1e-3
    """Learning rate."""
    seed: int = 0
    """Seed of the data and the initial weights."""
    device: str = "cpu"
    """Torch device."""


def cmd_pretrain(o: PretrainOptions) -> int:
    from diffpo.toy.base import measure_faithfulness, pretrain

    out = pretrain(o.out, steps=o.steps, batch_size=o.batch_size, lr=o.lr, seed=o.seed, device=o.device)
    info = json.loads((out / "pretrain.json").read_text())
    info["faithfulness"] = measure_faithfulness(out, device=o.device)
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


@dataclass
class DemoOptions:
    """``diffpo demo``: one experiment's ``DemoSettings`` (its keys at the top level) and where it goes."""

    out: Path = Path("demo_out")
    """Folder for pairs/, train/, eval/, report.md, report.json and curves.png."""
    base: str | None = None
    """Base model folder; null: the committed toy base."""
    settings: DemoSettings = flattened(DemoSettings)

    def __post_init__(self):
        """The objective and its hparams (names and ranges), before any pair is built."""
        from diffpo.losses import get_loss

        try:
            get_loss(self.settings.loss).resolve_hparams(self.settings.loss_hparams)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def cmd_demo(o: DemoOptions) -> int:
    from diffpo.toy.demo import run_experiment

    report = run_experiment(o.settings, o.out, base=o.base)
    lo, hi = report["win_rate_ci"]
    print(
        f"{report['method']} on {report['task']}: win rate {report['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]; "
        f"faithfulness {report['faithfulness_base']:.3f} -> {report['faithfulness_tuned']:.3f}; {report['seconds']:.0f}s. "
        f"Report: {o.out / 'report.md'}"
    )
    return 0


def register_cli(sub) -> None:
    toy = sub.add_parser("toy", help="the offline shapes world: base model, preference tasks, comparisons")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    add_command(toy_sub, "pretrain", PretrainOptions, cmd_pretrain, help="train the toy base model from scratch")
    add_command(sub, "demo", DemoOptions, cmd_demo, help="the main job: build shapes-world pairs, train (MaPO), evaluate, report")

    p = toy_sub.add_parser("compare", help="every objective on every task setting over several seeds; a results table")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--losses", default="sft,diffusion_dpo,mapo,dmpo")
    p.add_argument("--settings", default="style:outline:0.5,style:outline:1.0,reward:size")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, one per seed")
    p.add_argument("--collect-only", action="store_true", help="only aggregate the runs already finished (exit 1 if any expected run has no report)")
    p.add_argument("--allow-partial", action="store_true", help="exit 0 even when some expected runs failed or are missing (they are listed)")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_compare, validate=validate_compare)

    from diffpo.toy.personalize import PersonalizeSettings

    d = PersonalizeSettings()
    p = toy_sub.add_parser("personalize", help="DreamBooth vs MaPO teaching the base a new subject (a star named 'sks'); a report with 95%% CIs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2", help="one pair set and one run per method for each seed")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--class-images", type=int, default=d.class_images, help="class-prior images per subject image")
    p.add_argument("--prior-weight", type=float, default=d.prior_weight, help="DreamBooth's lambda")
    p.add_argument("--mapo-beta", type=float, default=d.mapo_beta)
    p.add_argument("--eval-per-prompt", type=int, default=d.eval_per_prompt)
    p.add_argument("--drift-per-prompt", type=int, default=d.drift_per_prompt)
    p.add_argument("--inference-steps", type=int, default=d.num_inference_steps, help="DDIM steps for class images and evaluation")
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first K prompts of each set (smoke runs)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--base", default=None, help="base model folder (default: the committed toy base)")
    p.set_defaults(func=cmd_personalize)


def cmd_personalize(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from diffpo.toy.personalize import PersonalizeSettings, format_summary, run_personalization

    seeds = _seeds(args.seeds)
    settings = PersonalizeSettings(
        class_images=args.class_images, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, prior_weight=args.prior_weight,
        mapo_beta=args.mapo_beta, eval_per_prompt=args.eval_per_prompt, drift_per_prompt=args.drift_per_prompt,
        num_inference_steps=args.inference_steps, max_prompts=args.max_prompts, device=args.device,
    )
    command = "diffpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if Path(sys.argv[0]).name in ("diffpo", "__main__.py") else ""
    report = run_personalization(args.out, seeds, settings, base=args.base, command=command)
    print(format_summary(report))
    print(f"Report: {args.out / 'report.md'}")
    return 0


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    from diffpo.toy.demo import DemoSettings

    d = DemoSettings()
    p.add_argument("--task", default=d.task, choices=["style", "reward"])
    p.add_argument("--style", default=d.style, choices=["outline", "striped"])
    p.add_argument("--severity", type=float, default=d.severity)
    p.add_argument("--reward", default=d.reward)
    p.add_argument("--label-noise", type=float, default=d.label_noise)
    p.add_argument("--tie-margin", type=float, default=d.tie_margin)
    p.add_argument("--pairs-per-prompt", type=int, default=d.pairs_per_prompt)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0: full fine-tuning")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE", help="objective hparam, e.g. --hparam beta=0.05 (repeatable)")
    p.add_argument("--eval-per-prompt", type=int, default=d.eval_per_prompt)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--base", default=None, help="base model folder (default: the committed toy base)")


def _hparams(items: list[str]) -> dict[str, float]:
    from diffpo.config import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value) if sep else None
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--hparam {item!r}: use KEY=NUMBER, e.g. beta=0.05")
    return out


def _settings(args: argparse.Namespace, loss: str):
    from diffpo.toy.demo import DemoSettings

    return DemoSettings(
        task=args.task, style=args.style, severity=args.severity, reward=args.reward, label_noise=args.label_noise,
        tie_margin=args.tie_margin, loss=loss, pairs_per_prompt=args.pairs_per_prompt, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.lr, lora_rank=args.lora_rank, loss_hparams=_hparams(args.hparam), eval_per_prompt=args.eval_per_prompt, seed=args.seed, device=args.device,
    )


def _seeds(text: str) -> list[int]:
    from diffpo.config import ConfigError

    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: use comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def validate_compare(args: argparse.Namespace) -> None:
    """Settings, objectives, seeds and hparams, checked before any run starts (and by --dry-run)."""
    from diffpo.config import ConfigError
    from diffpo.losses import get_loss
    from diffpo.toy.compare import parse_setting

    base_settings = _settings(args, "mapo")
    _seeds(args.seeds)
    for text in args.settings.split(","):
        try:
            parse_setting(text, base_settings)
        except ValueError as err:
            raise ConfigError(f"--settings: {err}") from None
    for loss in args.losses.split(","):
        try:
            get_loss(loss)
        except ValueError as err:
            raise ConfigError(f"--losses: {err}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 1 when an expected (setting, objective, seed) run failed or, with --collect-only, has
    no report, unless --allow-partial: a table over fewer runs than asked must not pass silently."""
    import sys

    from diffpo.toy.compare import compare, format_missing, format_table

    validate_compare(args)
    settings, losses, base_settings = args.settings.split(","), args.losses.split(","), _settings(args, "mapo")
    summary = compare(
        args.out, settings, losses, _seeds(args.seeds), base_settings, workers=args.workers, base=args.base, collect_only=args.collect_only,
    )
    print(format_table(summary))
    if summary["missing"]:
        print(f"diffpo toy compare: {format_missing(summary)}", file=sys.stderr, end="")
        if not args.allow_partial:
            return 1
    return 0
