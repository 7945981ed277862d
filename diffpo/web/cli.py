"""``diffpo label`` and ``diffpo view``: local web pages (see ``diffpo.web``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"


def _need_web(command: str) -> bool:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as err:
        print(f"diffpo {command}: error: needs the web extra ({err.name} is missing): pip install 'diffpo[web]'", file=sys.stderr)
        return False
    return True


def cmd_label(args: argparse.Namespace) -> int:
    if not _need_web("label"):
        return 2
    from diffpo.web import candidates
    from diffpo.web.label_app import LabelSession, create_app

    source = candidates.from_folder(args.images) if args.images else candidates.from_jsonl(args.candidates)
    session = LabelSession(source, args.out)
    state = session.state()
    print(f"{len(source.tasks)} prompts from {source.root}; {state['answered']} already answered in {session.manifest.path}", flush=True)
    return _serve(create_app(session), args, "label")


def cmd_view(args: argparse.Namespace) -> int:
    if not _need_web("view"):
        return 2
    from diffpo.web.view_app import EvalFolderError, create_app

    try:
        app = create_app(args.eval_dir)
    except EvalFolderError as err:
        print(f"diffpo view: error: {err}", file=sys.stderr)
        return 2
    return _serve(app, args, "view")


def _serve(app, args: argparse.Namespace, command: str) -> int:
    from diffpo.web.server import serve

    try:
        return serve(app, args.host, args.port, command)
    except OSError as err:  # the port is taken, or the address is not this machine's
        print(f"diffpo {command}: error: {err}", file=sys.stderr)
        return 2


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")


def register_cli(sub) -> None:
    p = sub.add_parser(
        "label",
        help="label preference pairs by hand in a local web page",
        description="Serve a page that shows a prompt with its candidate images; every answer (left/right, the best of N, or a tie) "
        "is appended to OUT/pairs.jsonl, the manifest diffpo train reads. A restart resumes where it stopped.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="DIR/<prompt-folder>/ with prompt.txt (or a caption .txt per image) and 2+ images each")
    source.add_argument("--candidates", type=Path, help="a JSONL of {id, prompt, images}, e.g. from diffpo pairs candidates")
    p.add_argument("--out", required=True, type=Path, help="pair dataset folder: answers go to OUT/pairs.jsonl")
    _server_flags(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("view", help="browse an evaluation (diffpo eval --out folder) in a local web page")
    p.add_argument("eval_dir", type=Path, help="the --out folder of diffpo eval")
    _server_flags(p)
    p.set_defaults(func=cmd_view)
