"""``manifest``: diffpo's own pair format, a JSONL file (or a folder holding ``pairs.jsonl``).

One pair a line: ``{"prompt": "...", "chosen": "img/a.png", "rejected": "img/b.png"}``; image paths
are relative to the manifest's folder. Every diffpo tool that writes pairs writes this format
(``diffpo.data.pairs.write_manifest``). An optional ``rejected_prompt`` says what the rejected image
was generated from when that differs from the pair's prompt (personalization: the class prompt);
only objectives that condition the loser on it (DreamBooth's prior preservation) use it. A row
with ``"tie": true`` (``diffpo label`` writes them) says the two images are equally good: it is read
as label 0.5, which ``data.ties`` handles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from diffpo.data.format import DataError, DataFormat, RawPair, register_format

if TYPE_CHECKING:
    from diffpo.config import DataConfig


def read_lines(path: Path) -> list[str]:
    """The file's lines, or a DataError naming it (unreadable, not UTF-8 text)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (a JSONL manifest is one JSON object a line)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def json_objects(path: Path, what: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(row, object, None)`` for each non-empty line of a JSONL manifest, or ``(row, None, problem)``
    for a line that is not a JSON object; a file with no rows is a DataError naming ``what``."""
    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: empty {what} (no rows)")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            yield i, None, f"not valid JSON ({err.msg})"
            continue
        yield (i, item, None) if isinstance(item, dict) else (i, None, "not a JSON object")


def manifest_rows(path: Path) -> Iterator[RawPair]:
    base = path.parent
    for i, item, problem in json_objects(path, "pair manifest"):
        if problem:
            yield RawPair(i, None, None, None, problem=problem)
            continue
        chosen, rejected = item.get("chosen"), item.get("rejected")
        chosen = str(base / chosen) if isinstance(chosen, str) else chosen
        rejected = str(base / rejected) if isinstance(rejected, str) else rejected
        # A row marked "tie" (diffpo label) is label 0.5, so data.ties drops or orders it.
        label = 0.5 if item.get("tie") is True else 1.0
        yield RawPair(i, item.get("prompt"), chosen, rejected, label, item.get("rejected_prompt"))


def read(cfg: "DataConfig") -> Iterator[RawPair]:
    path = Path(cfg.source)
    path = path / "pairs.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"pair manifest not found: {path}")
    return manifest_rows(path)


def detect(source: str) -> bool:
    """A folder holding ``pairs.jsonl``, or a ``.jsonl`` file whose first row has ``chosen`` or
    ``rejected`` (or is not JSON: the reader then names the bad row). An empty ``.json``/``.jsonl``
    file is an error here: the datasets loader would fail on it with a bare StopIteration."""
    path = Path(source)
    if path.is_dir():
        return (path / "pairs.jsonl").is_file()
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    first = next((line for line in read_lines(path) if line.strip()), None)
    if first is None:
        raise DataError(f"{path}: empty file (no pairs)")
    if path.suffix == ".json":
        return False
    try:
        keys = set(json.loads(first))
    except (json.JSONDecodeError, TypeError):
        return True
    return bool({"chosen", "rejected"} & keys)


FORMAT = register_format(
    DataFormat("manifest", read, detect=detect, description="JSONL rows {prompt, chosen, rejected} (paths relative to the file); diffpo's own")
)
