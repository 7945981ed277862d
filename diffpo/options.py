"""Command-line options generated from typed dataclasses: one config system for every subcommand.

A subcommand's options are a dataclass whose fields document themselves (the string under each
field, as in ``diffpo.config``). ``add_command`` turns it into an ``argparse`` sub-parser, the way
simple-parsing and tyro do, in a page of code instead of a dependency:

- every field is a flag named after its dotted key: ``max_prompts`` -> ``--max-prompts``, a nested
  section's ``train.max_steps`` -> ``--train.max-steps`` (a ``flattened`` section adds no prefix);
  ``metadata={"flag": "--steps"}`` keeps an established name, ``{"positional": True}`` makes it
  positional;
- its help is the field's docstring and default (``(required)`` when it has none); ``Literal``
  types show their choices, ``bool`` gives ``--x/--no-x``, lists are comma-separated (``--scorers
  a,b``), dicts take repeatable ``KEY=VALUE``;
- beside the flags every subcommand takes ``--config FILE.yaml`` and dotted ``KEY=VALUE``
  overrides, read as ``diffpo train`` reads its config; precedence: defaults < YAML < overrides <
  flags (``diffpo.config.load_options``);
- the options are built and validated (types, ``__post_init__`` checks, ``device``) before the
  command runs, and by ``--dry-run``; a bad key or value is a ``ConfigError`` naming the key (and
  the flag it came from): one line, exit status 2.

A plugin's subcommands use the same ``add_command`` inside the function it gives
``diffpo.cli.register_command``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import yaml

from diffpo.config import ConfigError, _set_dotted, load_options, read_yaml, takes_text

DEST = "option:"
"""Prefix of the argparse destinations of generated flags (apart from -v, --dry-run, --config)."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` and its bases: the string literal right under
    each field, read from the source with ``ast`` (Python keeps no such docstrings at run time)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (defined in an interactive session)
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclass(frozen=True)
class Option:
    """One leaf field of an options dataclass, as the command line sees it."""

    key: str
    """Dotted key in YAML and overrides, e.g. ``train.max_steps``."""
    path: tuple[str, ...]
    """Attribute path from the options object (a flattened section's name is in it, not in ``key``)."""
    flag: str
    """``--max-prompts``; a positional option's metavar (``EVAL_DIR``)."""
    annotation: Any
    default: Any
    """``MISSING`` for a required option."""
    doc: str
    positional: bool = False


def options_of(cls: type, prefix: str = "", path: tuple[str, ...] = (), instance: Any = None) -> list[Option]:
    """Every leaf field of ``cls``, nested dataclasses walked; defaults from ``instance`` when given
    (a section's defaults are its parent's default object, e.g. candidates' 25 sampling steps)."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if instance is not None:
            default = getattr(instance, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else MISSING
        if dataclasses.is_dataclass(hints[f.name]):
            inner = prefix if f.metadata.get("flatten") else f"{prefix}{f.name}."
            out += options_of(hints[f.name], inner, (*path, f.name), None if default is MISSING else default)
            continue
        key, positional = prefix + f.name, f.metadata.get("positional", False)
        flag = key.upper() if positional else f.metadata.get("flag") or "--" + key.replace("_", "-")
        out.append(Option(key, (*path, f.name), flag, hints[f.name], default, docs.get(f.name, ""), positional))
    return out


def add_command(sub: argparse._SubParsersAction, name: str, options: type, run: Callable[[Any], int], *, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """Sub-parser ``name`` with a flag per field of ``options``, ``--config FILE.yaml`` and
    ``KEY=VALUE`` overrides; ``run`` gets the validated ``options`` object and returns the exit status."""
    leaves = options_of(options)
    # Past a screenful of flags (train, cache: one per key of the run's config) the usage line
    # would be a page; --help lists them all below it.
    usage = "%(prog)s [-h] [--config FILE.yaml] [--FLAG VALUE ...] [KEY=VALUE ...]" if len(leaves) > 30 else None
    parser = sub.add_parser(name, help=help, description=description or help, usage=usage)
    parser.add_argument(
        "--config", metavar="FILE.yaml",
        help="a YAML file of these options (dotted keys as nested sections); KEY=VALUE overrides win over it, flags over both",
    )
    for option in leaves:
        _add_flag(parser, option)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of any option, values read as YAML, e.g. seed=3")
    load = functools.partial(parse_options, options, leaves)
    parser.set_defaults(func=lambda args: run(load(args)), validate=load, options=options)
    return parser


def parse_options(options: type, leaves: list[Option], args: argparse.Namespace) -> Any:
    """The ``options`` object from defaults < ``--config`` < overrides < flags, validated, with its
    ``device`` (if any) checked to be usable here."""
    flags, given = _flags(args, leaves)
    try:
        built = load_options(options, args.config, args.overrides, flags)
    except ConfigError as err:
        raise _naming_the_flag(err, leaves, given) from None
    device = next((functools.reduce(getattr, o.path, built) for o in leaves if o.key == "device"), None)
    if device is not None:
        from diffpo.devices import resolve_device

        resolve_device(device)
    return built


def _flags(args: argparse.Namespace, leaves: list[Option]) -> tuple[dict[str, Any], set[str]]:
    """The flags given on the command line as a nested dict of values, and their keys."""
    tree: dict[str, Any] = {}
    given = set()
    values = vars(args)
    for option in leaves:
        if DEST + option.key in values:
            _set_dotted(tree, option.key, _value(values[DEST + option.key], option))
            given.add(option.key)
    return tree, given


def _value(raw: Any, option: Option) -> Any:
    """A flag's text as its field's value: text as written for text fields and lists (split by
    ``_coerce``), YAML otherwise (numbers, null); booleans come from argparse."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):  # a repeatable KEY=VALUE flag of a dict field
        value_type = get_args(_without_none(option.annotation))[1]
        out = {}
        for item in raw:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"{option.key} ({option.flag} {item!r}): use KEY=VALUE, e.g. beta=0.05")
            out[key] = _value(text, dataclasses.replace(option, annotation=value_type))
        return out
    if takes_text(option.annotation) or get_origin(_without_none(option.annotation)) is list:
        return raw
    try:
        return read_yaml(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{option.key} ({option.flag}): not a value: {raw!r}") from None


def _naming_the_flag(err: ConfigError, leaves: list[Option], given: set[str]) -> ConfigError:
    """``key: message`` -> ``key (--flag): message`` when the value came from that flag, or when
    a required option is missing (the flag is how to give it)."""
    text = str(err)
    for option in leaves:
        if text.startswith(option.key + ":") and (option.key in given or option.default is MISSING):
            return ConfigError(f"{option.key} ({option.flag}){text[len(option.key):]}")
    return err


def _add_flag(parser: argparse.ArgumentParser, option: Option) -> None:
    kind = _without_none(option.annotation)
    common = {"default": argparse.SUPPRESS, "help": _help(option)}  # absent unless given: the layers below show through
    if option.positional:
        parser.add_argument(DEST + option.key, nargs="?", metavar=option.flag, **common)
    elif kind is bool:
        parser.add_argument(option.flag, dest=DEST + option.key, action=argparse.BooleanOptionalAction, **common)
    elif get_origin(kind) is dict:
        parser.add_argument(option.flag, dest=DEST + option.key, action="append", metavar="KEY=VALUE", **common)
    else:
        parser.add_argument(option.flag, dest=DEST + option.key, metavar=_metavar(kind), **common)


def _help(option: Option) -> str:
    text = " ".join(option.doc.split())
    text += " (required)" if option.default is MISSING else f" (default: {_show(option.default)})"
    return text.strip().replace("%", "%%")  # argparse formats help with %


def _show(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _metavar(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return "{" + ",".join(map(str, get_args(kind))) + "}"
    if get_origin(kind) is list:
        return _metavar(get_args(kind)[0]) + ",..."
    return {int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}.get(kind, "VALUE")


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation
