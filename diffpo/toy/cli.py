"""``diffpo toy ...`` and ``diffpo demo``: the shapes-world testbed from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_pretrain(args: argparse.Namespace) -> int:
    from diffpo.toy.base import measure_faithfulness, pretrain

    out = pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    info = json.loads((out / "pretrain.json").read_text())
    info["faithfulness"] = measure_faithfulness(out, device=args.device)
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


def register_cli(sub) -> None:
    toy = sub.add_parser("toy", help="the offline shapes world: its base model (the studies live in studies/)")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)

    p = toy_sub.add_parser("pretrain", help="train the toy base model from scratch")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the main job: build shapes-world pairs, train (MaPO), evaluate, report")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--loss", default="mapo")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_demo, validate=validate_demo)


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


def validate_demo(args: argparse.Namespace) -> None:
    """The objective and its --hparam values (names and ranges), before pairs are built."""
    from diffpo.config import ConfigError
    from diffpo.losses import get_loss

    try:
        get_loss(args.loss).resolve_hparams(_hparams(args.hparam))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from diffpo.toy.demo import run_experiment

    validate_demo(args)

    report = run_experiment(_settings(args, args.loss), args.out, base=args.base)
    lo, hi = report["win_rate_ci"]
    print(
        f"{report['method']} on {report['task']}: win rate {report['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]; "
        f"faithfulness {report['faithfulness_base']:.3f} -> {report['faithfulness_tuned']:.3f}; {report['seconds']:.0f}s. "
        f"Report: {args.out / 'report.md'}"
    )
    return 0
