"""Atomic, verifiable checkpoints: write into a temporary folder, mark complete, rename; keep the newest K.

A checkpoint is complete when its marker ``complete.json``, written last, lists every file of the
checkpoint with its size, and the files on disk match. Only complete checkpoints are listed,
resumed by ``resume=latest`` or pruned; one asked for by path that is not complete is refused
with the reason.

What a SIGKILL at any point leaves (tests/test_faults.py kills at random file operations):
- during a save: a ``.checkpoint-N.tmp`` folder (ignored, removed by the next save); the previous
  checkpoints are untouched.
- during pruning: an old checkpoint is first renamed to ``.checkpoint-N.trash`` (one atomic
  rename) and only then deleted, so a half-deleted folder never carries a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
MARKER_FILE = "complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^\.checkpoint-\d+\.(tmp|trash|old)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written (incomplete, unwritable, ...)."""


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """None if ``checkpoint`` is complete, else why it is not."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "no such folder"
    marker = checkpoint / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} (its save or its deletion was interrupted, or an older diffpo wrote it)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MARKER_FILE} ({err})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MARKER_FILE} says {size}"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    found = [(step, path) for step, path in _named_checkpoints(output_dir) if checkpoint_problem(path) is None]
    return [path for _, path in sorted(found)]


def incomplete_checkpoints(output_dir: str | Path) -> list[tuple[Path, str]]:
    """``checkpoint-N`` folders that are not complete, with the reason, oldest first."""
    found = [(step, path, checkpoint_problem(path)) for step, path in _named_checkpoints(output_dir)]
    return [(path, problem) for _, path, problem in sorted(found) if problem is not None]


def _named_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [(int(m.group(1)), child) for child in output_dir.iterdir() if (m := CHECKPOINT_NAME.match(child.name)) and child.is_dir()]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint (None if there is none); a path -> itself, if complete."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"train.resume: {resume} is not a complete checkpoint: {problem}")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def last_checkpoint_note(output_dir: str | Path) -> str:
    """'the last complete checkpoint is X' (complete checkpoints only hold finite weights: the
    trainer checks them before every save), or that there is none."""
    checkpoints = list_checkpoints(output_dir)
    return f"the last complete (finite) checkpoint is {checkpoints[-1]}" if checkpoints else "no complete checkpoint was written"


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Save accelerate's full state plus ``state`` as ``output_dir/checkpoint-<step>``."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        with _explained(output_dir, step, tmp):
            _remove_leftovers(output_dir)
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _explained(output_dir, step, tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _explained(output_dir, step, tmp):
            _write_json_atomic(tmp / STATE_FILE, state)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_json_atomic(tmp / MARKER_FILE, {"step": step, "files": files})  # last: the checkpoint is now complete
            publish_dir(tmp, final)
        if keep is not None:
            for stale in list_checkpoints(output_dir)[:-keep]:
                prune_checkpoint(stale)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint kill-safely: rename it out of the checkpoint names first."""
    trash = checkpoint.with_name(f".{checkpoint.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    checkpoint.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(output_dir: Path) -> None:
    """Temporary and trash folders of interrupted saves and prunes (never a complete checkpoint)."""
    for child in output_dir.iterdir():
        if _LEFTOVER.match(child.name):
            shutil.rmtree(child, ignore_errors=True)


class _explained:
    """OSError while saving (full disk, read-only folder) -> one CheckpointError line naming the
    last complete checkpoint; the partial temporary folder is removed to give the space back."""

    def __init__(self, output_dir: Path, step: int, tmp: Path):
        self.output_dir, self.step, self.tmp = output_dir, step, tmp

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None or not issubclass(kind, OSError):
            return False
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint-{self.step} in {self.output_dir}: {err.strerror or err}; {last_checkpoint_note(self.output_dir)}"
        ) from None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` so readers see either the old or the new folder, whole."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
