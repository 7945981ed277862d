"""The labelling manifest: ``OUT/pairs.jsonl``, appended one answer at a time.

The manifest is the only state, so a killed server loses nothing and a restart resumes at the
first prompt without an answer. It is the format ``pairs from-images`` writes and ``diffpo
train`` reads (``diffpo.data.pairs``): ``prompt``, ``chosen``, ``rejected`` (paths relative to
``OUT``, pointing at the candidate images where they are: they are not copied), plus

* ``task``: the candidate set the row answers (resume and undo find answers by it);
* ``tie: true`` on rows the labeller called a tie. The manifest reader turns such a row into
  label 0.5, so ``data.ties`` decides: dropped by default, ordered at random with ``random``.

One answer is a single ``write`` of all its rows to a file opened with ``O_APPEND``, then
``fsync``: a process kill cannot split it (a power cut at worst leaves a partial last line, which
the next start drops). Undo rewrites the file without the last answer through a temporary file
and ``rename``, so the manifest is always either the old or the new one.

Rows per answer: picking image ``b`` of ``N`` writes ``N - 1`` pairs, ``b`` over each other
image (left/right is the case ``N = 2``); a tie writes the ``N - 1`` pairs of image 0 with each
other image, marked ``tie``. Skips are not written: a skipped prompt comes back after the others,
and again after a restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from diffpo.web.candidates import Task

logger = logging.getLogger(__name__)

TIE = "tie"


def answer_rows(task: Task, choice: int | str, out_dir: Path) -> list[dict]:
    """The manifest rows of one answer: ``choice`` is the preferred image's index, or ``"tie"``."""
    out_dir = out_dir.resolve()
    rel = [os.path.relpath(p, out_dir) for p in task.images]
    if choice == TIE:
        return [{"prompt": task.prompt, "chosen": rel[0], "rejected": r, "task": task.id, "tie": True} for r in rel[1:]]
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(rel):
        raise ValueError(f"choice must be an image index 0..{len(rel) - 1} or 'tie', got {choice!r}")
    return [{"prompt": task.prompt, "chosen": rel[choice], "rejected": r, "task": task.id} for k, r in enumerate(rel) if k != choice]


class Manifest:
    """``OUT/pairs.jsonl`` with the ids of the tasks it answers. Thread-safe."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "pairs.jsonl"
        self._lock = threading.Lock()
        self._repair()
        self.answered: set[str] = {task for task in map(_task_of, self._lines()) if task is not None}

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines(keepends=True) if self.path.is_file() else []

    def _repair(self) -> None:
        """Drop a partial last line (an interrupted write; see the module docstring)."""
        lines = self._lines()
        if lines and not lines[-1].endswith("\n"):
            logger.warning("%s: dropping an incomplete last line (an interrupted write): %r", self.path, lines[-1][:80])
            self._rewrite(lines[:-1])

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)

    def append(self, task: Task, choice: int | str) -> list[dict]:
        rows = answer_rows(task, choice, self.out_dir)
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with self._lock:
            if task.id in self.answered:
                raise ValueError(f"task '{task.id}' is already answered")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                if written != len(data):  # regular files write whole; make a short write loud
                    raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
                os.fsync(fd)
            finally:
                os.close(fd)
            self.answered.add(task.id)
        return rows

    def undo_last(self) -> str | None:
        """Remove the last answer (its trailing rows); return its task id, None if there is none."""
        with self._lock:
            lines = self._lines()
            last = _task_of(lines[-1]) if lines else None
            if last is None:  # empty, or ends with a row diffpo label did not write
                return None
            while lines and _task_of(lines[-1]) == last:
                lines.pop()
            self._rewrite(lines)
            self.answered.discard(last)
            return last


def _task_of(line: str) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    task = row.get("task") if isinstance(row, dict) else None
    return str(task) if task is not None else None
