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
    toy = sub.add_parser("toy", help="the offline shapes world: base model, preference tasks, comparisons")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)

    p = toy_sub.add_parser("pretrain", help="train the toy base model from scratch")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_pretrain)
