"""``diffpo label`` and ``diffpo view``: local web pages (see ``diffpo.web``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffpo.config import ConfigError, flattened
from diffpo.options import add_command

DEFAULT_HOST = "127.0.0.1"


def _need_web(command: str) -> bool:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as err:
        print(f"diffpo {command}: error: needs the web extra ({err.name} is missing): pip install 'diffpo[web]'", file=sys.stderr)
        return False
    return True


@dataclass
class ServerOptions:
    port: int = 8000
    """Port (0 picks a free one)."""
    host: str = DEFAULT_HOST
    """Address to listen on (127.0.0.1: this machine only)."""


@dataclass
class LabelOptions:
    out: Path
    """Pair dataset folder: answers go to OUT/pairs.jsonl."""
    images: Path | None = None
    """DIR/<prompt-folder>/ with prompt.txt (or a caption .txt per image) and 2+ images each."""
    candidates: Path | None = None
    """A JSONL of {id, prompt, images}, e.g. from diffpo pairs candidates."""
    server: ServerOptions = flattened(ServerOptions)

    def __post_init__(self):
        if (self.images is None) == (self.candidates is None):
            raise ConfigError("images / candidates: give exactly one source of candidates (--images or --candidates)")


@dataclass
class ViewOptions:
    eval_dir: Path = field(metadata={"positional": True})
    """The --out folder of diffpo eval."""
    server: ServerOptions = flattened(ServerOptions)


def cmd_label(o: LabelOptions) -> int:
    if not _need_web("label"):
        return 2
    from diffpo.web import candidates
    from diffpo.web.label_app import LabelSession, create_app

    source = candidates.from_folder(o.images) if o.images else candidates.from_jsonl(o.candidates)
    session = LabelSession(source, o.out)
    state = session.state()
    print(f"{len(source.tasks)} prompts from {source.root}; {state['answered']} already answered in {session.manifest.path}", flush=True)
    return _serve(create_app(session), o.server, "label")


def cmd_view(o: ViewOptions) -> int:
    if not _need_web("view"):
        return 2
    from diffpo.web.view_app import EvalFolderError, create_app

    try:
        app = create_app(o.eval_dir)
    except EvalFolderError as err:
        print(f"diffpo view: error: {err}", file=sys.stderr)
        return 2
    return _serve(app, o.server, "view")


def _serve(app, server: ServerOptions, command: str) -> int:
    from diffpo.web.server import serve

    try:
        return serve(app, server.host, server.port, command)
    except OSError as err:  # the port is taken, or the address is not this machine's
        print(f"diffpo {command}: error: {err}", file=sys.stderr)
        return 2


def register_cli(sub) -> None:
    add_command(
        sub, "label", LabelOptions, cmd_label,
        help="label preference pairs by hand in a local web page",
        description="Serve a page that shows a prompt with its candidate images; every answer (left/right, the best of N, or a tie) "
        "is appended to OUT/pairs.jsonl, the manifest diffpo train reads. A restart resumes where it stopped.",
    )
    add_command(sub, "view", ViewOptions, cmd_view, help="browse an evaluation (diffpo eval --out folder) in a local web page")
