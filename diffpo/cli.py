"""Command line: ``diffpo train | losses | eval | pairs | cache | label | view ...``.

Plugins add their own subcommands (the shapes world: ``diffpo demo``, ``diffpo toy ...``) with
``register_command``; ``main`` loads them (``diffpo.plugins``) before it builds the parser.
Each subcommand is a small function of a typed options dataclass whose flags and ``--help`` are
generated from its fields (``diffpo.options.add_command``), filled from a YAML file, ``key.sub=value``
overrides and flags. Errors we can explain (bad config, bad data, a model that will not load) print
one clear line and exit 2, never a deep stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from dataclasses import dataclass

from diffpo.config import Config, ConfigError, flattened, save_config
from diffpo.options import add_command


def _explainable_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what is wrong and what to do: one line, exit code 2 (``-v``: with
    the traceback). Anything else is a bug and keeps its traceback."""
    from diffpo.checkpoint import CheckpointError
    from diffpo.data import DataError
    from diffpo.evaluate.run import EvalError
    from diffpo.models import ModelLoadError
    from diffpo.runs import RunFolderError
    from diffpo.sampling import SamplingError
    from diffpo.train import TrainingError

    return (
        ConfigError, DataError, EvalError, ModelLoadError, SamplingError, TrainingError, CheckpointError, RunFolderError,
        FileNotFoundError, PermissionError,
    )


def cmd_losses(args: argparse.Namespace) -> int:
    """Print the objective registry: hparams with defaults and allowed ranges, reference need, description."""
    from diffpo.losses import LOSSES, format_range

    rows = []
    for spec in LOSSES.values():
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.hparams.items()) or "-"
        ranges = ", ".join(f"{k} in {format_range(r)}" for k, r in spec.ranges.items()) or "-"
        rows.append((spec.name, "yes" if spec.needs_reference else "no", hp, ranges, spec.description))
    header = ("name", "reference", "hparams (defaults)", "ranges", "description")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    return 0


@dataclass
class TrainOptions:
    """``diffpo train``: the run's ``Config`` (its keys at the top level) and how to launch it."""

    config: Config = flattened(Config)
    num_processes: int = 1
    """Data-parallel processes: runs the same config under ``accelerate launch``, one process per GPU
    (gloo on CPUs when there are fewer GPUs)."""

    def __post_init__(self):
        if self.num_processes < 1:
            raise ConfigError(f"num_processes: must be >= 1, got {self.num_processes}")


def cmd_train(options: TrainOptions) -> int:
    """Fine-tune with a preference objective: ``diffpo train --config FILE.yaml [key=value ...]``."""
    from diffpo.train import train

    if options.num_processes > 1:
        return _relaunch_with_accelerate(options)
    result = train(options.config)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per process
        print(f"done: {result.steps} steps ({result.skipped_steps} skipped) in {result.seconds:.1f}s; weights in {result.final_dir}")
    return 0


def _relaunch_with_accelerate(options: TrainOptions) -> int:
    """``--num-processes N``: the same run under ``accelerate launch`` (data parallel, one process
    per GPU; gloo on CPUs when there is no GPU). The processes read the config as resolved here
    (file, overrides and flags), saved to a temporary YAML file."""
    import subprocess
    import tempfile

    import torch

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(options.num_processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ)
    if torch.cuda.device_count() < options.num_processes:
        # accelerate's --cpu runs a single process unless under MPI; torchrun processes with
        # ACCELERATE_USE_CPU form a gloo process group instead.
        env["ACCELERATE_USE_CPU"] = "true"
    with tempfile.TemporaryDirectory(prefix="diffpo-launch-") as folder:
        resolved = os.path.join(folder, "config.yaml")
        save_config(options.config, resolved)
        return subprocess.call([*launch, "-m", "diffpo", "train", "--config", resolved], env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpo", description="Preference fine-tuning for text-to-image diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("losses", help="list the preference objectives and their hparams")
    p.set_defaults(func=cmd_losses)

    add_command(sub, "train", TrainOptions, cmd_train, help="fine-tune a model on preference pairs",
                description="Fine-tune a model on preference pairs: a config from configs/, dotted overrides (loss.name=dmpo "
                "train.max_steps=3) or the flags below, one per key of the config.")

    for register in list(_EXTRA_COMMANDS):
        register(sub)
    _add_common_flags(sub)
    return parser


def _add_common_flags(sub: argparse._SubParsersAction) -> None:
    """Every (sub-)subcommand takes ``-v`` after its name too (``diffpo train ... -v``) and
    ``--dry-run``: check the command line, config and device, then exit before any work."""
    for parser in {id(p): p for p in sub.choices.values()}.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_common_flags(nested[0])
            continue
        if "-v" not in parser._option_string_actions and "--verbose" not in parser._option_string_actions:
            parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging; tracebacks for errors")
        if "--dry-run" not in parser._option_string_actions:  # a subcommand may define its own
            parser.add_argument(
                "--dry-run", action="store_true",
                help="validate the arguments, the config and the device, then exit before reading data or loading weights",
            )


# Other modules add subcommands here (eval, pairs, ..., and plugins' commands), keeping this file small.
_EXTRA_COMMANDS: list = []
_CORE_COMMAND_MODULES = ("diffpo.evaluate.cli", "diffpo.data.cli", "diffpo.data.cache", "diffpo.web.cli")


def register_command(register_cli) -> None:
    """Add subcommands: ``register_cli(sub)`` gets the ``argparse`` sub-parsers and adds its own,
    each with ``diffpo.options.add_command(sub, name, OptionsDataclass, run, help=...)``."""
    if register_cli not in _EXTRA_COMMANDS:
        _EXTRA_COMMANDS.append(register_cli)


def _load_extra_commands() -> None:
    import importlib

    from diffpo.plugins import load_plugins

    for module in _CORE_COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        if hasattr(mod, "register_cli"):
            register_command(mod.register_cli)
    load_plugins()


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = " ".join(str(getattr(args, k)) for k in ("command", "toy_command", "pairs_command") if getattr(args, k, None))
    try:
        if getattr(args, "device", None) is not None:
            from diffpo.devices import resolve_device

            resolve_device(args.device)
        if getattr(args, "dry_run", False):
            validate = getattr(args, "validate", None)
            if validate is not None:
                validate(args)
            print(f"diffpo {command}: dry run: arguments{', config' if validate else ''} and device are valid; nothing was run")
            return 0
        return args.func(args)
    except _explainable_errors() as err:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # libraries' messages span lines
        print(f"diffpo {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
