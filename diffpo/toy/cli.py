"""``diffpo toy ...`` and ``diffpo demo``: the shapes-world testbed from the command line."""

from __future__ import annotations

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
    toy = sub.add_parser("toy", help="the offline shapes world: its base model (studies: python -m studies.compare, studies.personalize)")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    add_command(toy_sub, "pretrain", PretrainOptions, cmd_pretrain, help="train the toy base model from scratch")
    add_command(sub, "demo", DemoOptions, cmd_demo, help="the main job: build shapes-world pairs, train (MaPO), evaluate, report")
