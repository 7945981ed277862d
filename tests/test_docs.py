"""Every command the docs quote runs as written, so a doc can no longer drift from the CLI.

Commands are extracted from README.md, BENCHMARKS.md, CONTRIBUTING.md, benchmarks/*.md (```bash blocks and inline
`diffpo ...` spans), the shipped configs' comments (configs/*.yaml) and module docstrings
(diffpo/, benchmarks/, studies/), then checked by the cheapest check that still catches drift:

- ``run``: a full ``diffpo`` command (hub ids mapped to tiny models, ``--device cuda`` to cpu,
  optional ``[...]`` parts kept) runs in-process with ``--dry-run``: the real argument parser,
  config loading (keys, types, ranges, cross-field checks) and the subcommand's validator;
  ``diffpo losses`` runs for real. Nothing is trained and no weights load.
- ``flags``: a synopsis (placeholders such as FILE, DIR, N, ``a|b`` choices, ``...``) or an inline
  fragment: the subcommand exists and it takes every ``--flag`` quoted.
- ``python -m MODULE`` / ``accelerate launch -m MODULE`` (not diffpo): every flag appears in
  ``python -m MODULE --help``; ``bash FILE``: the script exists and parses (``bash -n``);
  ``hf``/``huggingface-cli``/``pip``/``accelerate`` (without ``-m``): the program is installed
  and ``<command> --help`` works; ``python FILE.py``: the script exists and compiles.

Anything else must be in ``ALLOWED`` with the reason it cannot run here. A failure names the
file, the line and the command.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Hub ids in the docs -> the tiny in-process model of the same family (diffpo/tiny.py).
TINY = {
    "runwayml/stable-diffusion-v1-5": "tiny:sd",
    "stabilityai/stable-diffusion-2-1": "tiny:sd2v",
    "stabilityai/stable-diffusion-xl-base-1.0": "tiny:sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "tiny:sd3",
    "black-forest-labs/FLUX.1-dev": "tiny:flux",
}
# Files the docs name as "your own" -> a shipped one of the same kind.
PLACEHOLDER_FILES = {"configs/my.yaml": "configs/tiny.yaml"}
# Programs the docs use only to write example inputs; nothing to check.
SHELL_BUILTINS = {"echo", "cd", "mkdir", "export", "cat", "ls"}
# Commands (by their first words) that cannot be checked here, each with the reason.
ALLOWED: dict[str, str] = {}

DOC_FILES = ["README.md", "BENCHMARKS.md", "CONTRIBUTING.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("*.md"))]
COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:diffpo|accelerate launch|python3? -m|bash|hf|huggingface-cli)(?=\s|$)")
INLINE = re.compile(r"(?<!`)``?((?:diffpo|hf|huggingface-cli) [^`]+)``?(?!`)")


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    text: str
    inline: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


# ------------------------------------------------------------------------------------ extraction


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, text) with ``\\`` continuations joined onto the first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + text.strip())
        else:
            pending = (number, text.strip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        out.append(pending)
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def from_markdown(path: str) -> list[Command]:
    commands, block, fence = [], None, None
    for number, line in enumerate((REPO / path).read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if block is None:
                fence, block = stripped[3:].strip().lower(), []
            else:
                if fence in ("bash", "sh", "shell", "console"):
                    joined = _join_continuations([(n, t.strip().removeprefix("$ ")) for n, t in block])
                    commands += [Command(path, n, t) for n, t in joined if t and not t.startswith("#")]
                block = None
            continue
        if block is not None:
            block.append((number, line))
        else:
            commands += [Command(path, number, m.group(1).strip(), inline=True) for m in INLINE.finditer(line)]
    return commands


def from_config_comments(path: Path) -> list[Command]:
    lines = [(n, l.lstrip()[1:]) for n, l in enumerate(path.read_text().splitlines(), 1) if l.lstrip().startswith("#")]
    commands, current = [], []
    for number, text in lines:  # a command starts with a command word; continuation lines follow a "\"
        if current and current[-1][1].rstrip().endswith("\\"):
            current.append((number, text))
            continue
        if current:
            commands += [Command(str(path.relative_to(REPO)), n, t) for n, t in _join_continuations(current)]
            current = []
        if COMMAND_START.match(text.strip()):
            current = [(number, text)]
    if current:
        commands += [Command(str(path.relative_to(REPO)), n, t) for n, t in _join_continuations(current)]
    return commands


def from_docstrings(path: Path) -> list[Command]:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False)
    if not doc:
        return []
    first = tree.body[0].lineno
    rel = str(path.relative_to(REPO))
    lines = [(first + i, text) for i, text in enumerate(doc.splitlines())]
    commands, current = [], []
    for number, text in lines:  # indented example lines (a code block in the docstring)
        if current and current[-1][1].rstrip().endswith("\\"):
            current.append((number, text))
            continue
        if current:
            commands += [Command(rel, n, t) for n, t in _join_continuations(current)]
            current = []
        if text.startswith("    ") and COMMAND_START.match(text.strip()):
            current = [(number, text)]
        else:
            commands += [Command(rel, number, m.group(1).strip(), inline=True) for m in INLINE.finditer(text)]
    if current:
        commands += [Command(rel, n, t) for n, t in _join_continuations(current)]
    return commands


def all_commands() -> list[Command]:
    commands = [c for path in DOC_FILES for c in from_markdown(path)]
    commands += [c for path in sorted((REPO / "configs").glob("*.yaml")) for c in from_config_comments(path)]
    for package in ("diffpo", "benchmarks", "studies"):
        commands += [c for path in sorted((REPO / package).rglob("*.py")) for c in from_docstrings(path)]
    return commands


# ------------------------------------------------------------------------------------ checking


def split_commands(text: str) -> list[list[str]]:
    """Shell words of each simple command (``;``, ``&&``, ``|`` separate; redirections dropped)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
            continue
        if token in (";", "&&", "||", "|", "&"):
            out.append(current)
            current = []
        elif token in (">", ">>", "<", "2>"):
            skip_next = True
        else:
            current.append(token)
    out.append(current)
    return [c for c in out if c]


_PLACEHOLDER = re.compile(r"(?:^|[^A-Za-z])[A-Z][A-Z_]*(?:[^A-Za-z]|$)")


def is_synopsis(words: list[str], raw: str) -> bool:
    """Placeholders (FILE, DIR, N), alternatives (a|b) or ellipses: a form, not a command."""
    if "..." in raw or re.search(r"\w\|\w", raw):
        return True
    return any(_PLACEHOLDER.search(w.split("=", 1)[-1]) for w in words if not w.startswith("-"))


@functools.lru_cache(maxsize=None)
def diffpo_parser():
    from diffpo.cli import _load_extra_commands, build_parser

    _load_extra_commands()
    return build_parser()


def check_flags(words: list[str]) -> None:
    """The subcommand path exists and its parser takes every ``--flag`` quoted."""
    import argparse

    parser = diffpo_parser()
    rest = list(words)
    while True:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or not rest or rest[0].startswith("-"):
            break
        name = rest.pop(0)
        assert name in subparsers[0].choices, f"no subcommand '{name}' (have: {', '.join(subparsers[0].choices)})"
        parser = subparsers[0].choices[name]
    for word in rest:
        flag = word.strip("[]").split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in parser._option_string_actions, f"'{parser.prog}' has no option {flag}"


def substitute(words: list[str]) -> list[str]:
    out = []
    for word in words:
        word = word.strip("[]") if word not in ("[", "]") else ""
        if not word:
            continue
        key, sep, value = word.rpartition("=")
        if sep and value in TINY:
            word = key + "=" + TINY[value]
        out.append(PLACEHOLDER_FILES.get(TINY.get(word, word), TINY.get(word, word)))
    return ["cpu" if out[i - 1] == "--device" and out[i].startswith("cuda") else w for i, w in enumerate(out)]


def run_diffpo(argv: list[str], capsys) -> None:
    from diffpo.cli import main

    if argv[:1] != ["losses"]:
        argv = [*argv, "--dry-run"]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: unknown flag, bad choice, missing required argument
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 0, f"exit code {code}: {captured.err.strip() or captured.out.strip()}"


@functools.lru_cache(maxsize=None)
def module_help(module: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"python -m {module} --help failed: {done.stderr.strip()[-500:]}"
    return done.stdout


def check_module(module: str, args: list[str]) -> None:
    text = module_help(module)
    for word in args:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"python -m {module} has no option {flag}"


def check_program(words: list[str]) -> None:
    program = VENV_BIN / words[0]
    assert program.exists(), f"'{words[0]}' is not installed with diffpo ({program} missing)"
    sub = [w for w in words[1:] if not w.startswith("-")]
    done = subprocess.run([str(program), *sub, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join([words[0], *sub])} --help failed: {(done.stderr or done.stdout).strip()[-300:]}"


def _without_env(words: list[str]) -> list[str]:
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    return words


def _module_target(words: list[str]) -> tuple[str, list[str]]:
    """``accelerate launch ... -m M ARGS`` / ``python -m M ARGS`` -> (M, ARGS)."""
    assert "-m" in words, f"no rule for '{' '.join(words[:3])}' without -m (add it to ALLOWED with a reason)"
    at = words.index("-m")
    return words[at + 1], words[at + 2 :]


def check_form(command: Command) -> None:
    """A synopsis or an inline fragment: the subcommand exists and takes every flag quoted."""
    words = _without_env(shlex.split(command.text, comments=True))
    if words and words[0] in ("accelerate", "python", "python3"):
        module, args = _module_target(words)
        if module != "diffpo":
            check_module(module, args)
            return
        words = ["diffpo", *args]
    if words and words[0] == "diffpo":
        check_flags([w for w in words[1:] if w not in ("|", "...")])
    elif words and words[0] in ("hf", "huggingface-cli"):
        check_program(words)


def check(command: Command, capsys) -> None:
    if command.inline or is_synopsis(substitute(shlex.split(command.text, comments=True)), command.text):
        check_form(command)
        return
    for words in split_commands(command.text):
        words = _without_env(words)
        if not words or words[0] in SHELL_BUILTINS:
            continue
        allowed = next((reason for prefix, reason in ALLOWED.items() if " ".join(words).startswith(prefix)), None)
        if allowed:
            continue
        if words[0] in ("python", "python3") and "-m" not in words and words[1:2] and words[1].endswith(".py"):
            script = REPO / words[1]  # a script: it exists and compiles
            assert script.is_file(), f"{words[1]} not found"
            compile(script.read_text(), str(script), "exec")
            continue
        if words[0] in ("accelerate", "pip") and "-m" not in words:
            check_program(words)  # e.g. accelerate config, pip install X: the program and subcommand exist
            continue
        if words[0] in ("accelerate", "python", "python3"):
            module, args = _module_target(words)
            if module != "diffpo":
                check_module(module, args)
                continue
            words = ["diffpo", *args]
        if words[0] == "diffpo":
            run_diffpo(substitute(words[1:]), capsys)
        elif words[0] == "bash":
            script = REPO / words[1]
            assert script.is_file(), f"{words[1]} not found"
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{words[1]}: bash -n fails"
        elif words[0] in ("hf", "huggingface-cli"):
            check_program(words)
        else:
            raise AssertionError(f"no rule to check '{words[0]}' (add it to ALLOWED with the reason it cannot run here)")


COMMANDS = all_commands()


def test_the_docs_quote_commands():
    """The extractor still finds the commands it is meant to (a regression guard for itself)."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) > 40
    assert any(t.startswith("diffpo train --config configs/tiny.yaml") for t in texts)
    assert any(c.file.startswith("configs/") for c in COMMANDS) and any(c.file.startswith("diffpo/") for c in COMMANDS)
    assert any(c.inline for c in COMMANDS) and any(t.startswith("accelerate launch") for t in texts)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.file}:{c.line}" for c in COMMANDS])
def test_documented_command_runs(command, capsys, tmp_path, monkeypatch):
    sandbox = tmp_path / "cwd"  # relative outputs land here; the repo's folders are reachable
    sandbox.mkdir()
    for entry in ("configs", "data", "scripts", "benchmarks", "diffpo", "studies"):
        (sandbox / entry).symlink_to(REPO / entry)
    monkeypatch.chdir(sandbox)
    try:
        check(command, capsys)
    except AssertionError as err:
        pytest.fail(f"{command}\n  -> {err}", pytrace=False)


def _train_config(command: Command):
    """The resolved config of a full ``diffpo train`` command in the docs, or None."""
    from diffpo.config import load_config

    for words in split_commands(command.text):
        words = _without_env(words)
        if words[:1] in (["accelerate"], ["python"], ["python3"]) and "-m" in words:
            module, args = _module_target(words)
            words = ["diffpo", *args] if module == "diffpo" else []
        if words[:2] != ["diffpo", "train"] or command.inline or is_synopsis(words, command.text):
            continue
        argv = substitute(words[2:])
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        return load_config(str(REPO / config) if config else None, overrides)
    return None


def test_documented_resumes_continue_the_same_run():
    """A documented ``train.resume`` continues the run trained into that output_dir by an earlier
    command of the same file: every key but the resume itself and max_steps must agree (the
    README once dropped loss.name=dmpo here and continued a DMPO run as MaPO)."""
    runs: dict[tuple[str, str], tuple[Command, dict]] = {}
    for command in COMMANDS:
        cfg = _train_config(command)
        if cfg is None:
            continue
        flat = cfg.to_dict()
        key = (command.file, cfg.output_dir)
        if cfg.train.resume and key in runs:
            first, before = runs[key]
            now = {**flat, "train": {**flat["train"], "resume": None, "max_steps": None}}
            then = {**before, "train": {**before["train"], "resume": None, "max_steps": None}}
            assert now == then, f"{command} resumes {first} with other settings"
        elif not cfg.train.resume:
            runs[key] = (command, flat)
