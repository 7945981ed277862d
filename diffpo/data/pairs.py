"""Reading preference pairs from disk or the hub into validated ``PairRecord``s.

Two on-disk formats:

* **manifest**: a JSONL file (or a folder holding ``pairs.jsonl``), one pair a line:
  ``{"prompt": "...", "chosen": "img/a.png", "rejected": "img/b.png"}``; image paths are relative
  to the manifest's folder. Every diffpo tool that writes pairs writes this format. An optional
  ``rejected_prompt`` says what the rejected image was generated from when that differs from the
  pair's prompt (personalization: the class prompt); only objectives that condition the loser on
  it (DreamBooth's prior preservation) use it. A row with ``"tie": true`` (``diffpo label`` writes them)
  says the two images are equally good: it is read as label 0.5, which ``data.ties`` handles.
* **pickapic**: a datasets-library table (hub id, parquet/arrow files, a ``save_to_disk`` folder or
  a JSON/JSONL table) in the Pick-a-Pic schema: ``caption``, ``jpg_0``, ``jpg_1`` (encoded image
  bytes) and ``label_0`` in {1, 0, 0.5} (1: image 0 preferred, 0: image 1 preferred, 0.5: tie).
  ``data.columns`` maps other column names onto these four.

Every row is validated before training: an undecodable image, a missing caption or a label outside
{0, 0.5, 1} is counted and skipped with a warning naming the row, or stops the run under
``data.strict``. Ties are dropped by default (the papers' scripts do) or ordered at random.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from diffpo.config import DataConfig

logger = logging.getLogger(__name__)

PICKAPIC_COLUMNS = {"caption": "caption", "image_0": "jpg_0", "image_1": "jpg_1", "label_0": "label_0"}


class DataError(ValueError):
    """Bad preference data; the message names the file/source, the row and the problem."""


@dataclass(frozen=True)
class PairRecord:
    """One preference pair. Images are a path or encoded bytes, decoded lazily."""

    prompt: str
    chosen: str | bytes
    rejected: str | bytes
    row: int
    rejected_prompt: str | None = None
    """The prompt the rejected image belongs to, when it is not ``prompt`` (manifest key
    ``rejected_prompt``); None otherwise."""

    def open(self, which: str) -> Image.Image:
        return open_image(getattr(self, which))


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    ties_dropped: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        bad = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        return f"{self.source}: {self.kept} pairs kept of {self.rows} rows; ties dropped {self.ties_dropped}; bad rows skipped: {bad}"


def open_image(ref: str | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)
    return image.convert("RGB")


def _check_image(ref: Any) -> str | None:
    """None if ``ref`` decodes as an image, else the reason."""
    if ref is None:
        return "missing image"
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref) as image:
            image.load()
    except FileNotFoundError:
        return f"image file not found: {ref}"
    except Exception as err:  # PIL raises many types for corrupt data
        return f"undecodable image ({type(err).__name__})"
    return None


def _image_ref(value: Any) -> str | bytes | None:
    """Normalise what a datasets column can hold: bytes, {'bytes','path'}, a PIL image, a path."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return value


# ----------------------------------------------------------------------------------------------
# Raw rows from each source kind: (row index, prompt, image_0, image_1, label_0, rejected_prompt)
# ----------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """The file's lines, or a DataError naming it (unreadable, not UTF-8 text)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (a JSONL manifest is one JSON object a line)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _manifest_rows(path: Path) -> Iterator[tuple[int, Any, Any, Any, Any, Any]]:
    base = path.parent
    lines = _read_lines(path)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: empty pair manifest (no rows)")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            yield i, None, None, None, f"not valid JSON ({err.msg})", None
            continue
        if not isinstance(item, dict):
            yield i, None, None, None, "not a JSON object", None
            continue
        chosen, rejected = item.get("chosen"), item.get("rejected")
        chosen = str(base / chosen) if isinstance(chosen, str) else chosen
        rejected = str(base / rejected) if isinstance(rejected, str) else rejected
        # A row marked "tie" (diffpo label) is label 0.5, so data.ties drops or orders it.
        label = 0.5 if item.get("tie") is True else 1.0
        yield i, item.get("prompt"), chosen, rejected, label, item.get("rejected_prompt")


_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".csv"}


def looks_local(source: str) -> bool:
    """A path rather than a hub id: a file suffix, or an explicit relative/absolute/home path."""
    return Path(source).suffix in _LOCAL_SUFFIXES or source.startswith(("/", ".", "~")) or source.count("/") > 1


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own read errors before raising; we raise one DataError line instead."""
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        ds_logger.setLevel(level)


def _open_table(source: str, split: str):
    import datasets

    path = Path(source)
    if looks_local(source) and not path.exists():
        raise DataError(f"data.source: no such file or folder: {source}")
    if path.is_dir() and (path / "state.json").is_file():
        table = datasets.load_from_disk(str(path))
        return table[split] if isinstance(table, datasets.DatasetDict) else table
    if path.is_file():
        kind = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise DataError(f"{source}: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or .arrow)")
        try:
            with _quiet_datasets():
                return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for an empty, truncated or unreadable file
            raise DataError(f"{source}: cannot read it as a {kind} table ({type(err).__name__}: {err})".replace("\n", " ")) from None
    if path.is_dir():
        try:
            return datasets.load_dataset(str(path), split=split)
        except Exception as err:
            raise DataError(f"{source}: cannot load this folder as a dataset (split '{split}'; {type(err).__name__}: {err})".replace("\n", " ")) from None
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:
        raise DataError(f"cannot load dataset '{source}' (split '{split}'): {err}") from None


def _table_rows(table, columns: dict[str, str], source: str) -> Iterator[tuple[int, Any, Any, Any, Any, None]]:
    import datasets

    missing = [c for c in columns.values() if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)}); map them with data.columns")
    for key in ("image_0", "image_1"):  # keep encoded bytes; decoding happens per batch
        if isinstance(table.features.get(columns[key]), datasets.Image):
            table = table.cast_column(columns[key], datasets.Image(decode=False))
    for i, item in enumerate(table):
        yield i, item[columns["caption"]], _image_ref(item[columns["image_0"]]), _image_ref(item[columns["image_1"]]), item[columns["label_0"]], None


def _detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "manifest" if (path / "pairs.jsonl").is_file() else "pickapic"
    if path.suffix in (".jsonl", ".json") and path.is_file():
        # An empty file would reach the datasets loader, which fails with a bare StopIteration.
        first = next((line for line in _read_lines(path) if line.strip()), None)
        if first is None:
            raise DataError(f"{path}: empty file (no pairs)")
        if path.suffix == ".json":
            return "pickapic"
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            return "manifest"  # let the manifest reader name the bad row
        return "manifest" if {"chosen", "rejected"} & keys else "pickapic"
    return "pickapic"


def _raw_rows(cfg: DataConfig) -> Iterable[tuple[int, Any, Any, Any, Any, Any]]:
    fmt = _detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt == "manifest":
        path = Path(cfg.source)
        path = path / "pairs.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"pair manifest not found: {path}")
        return _manifest_rows(path)
    unknown = set(cfg.columns) - set(PICKAPIC_COLUMNS)
    if unknown:
        raise DataError(f"data.columns: unknown key(s) {', '.join(sorted(unknown))} (valid: {', '.join(PICKAPIC_COLUMNS)})")
    return _table_rows(_open_table(cfg.source, cfg.split), {**PICKAPIC_COLUMNS, **cfg.columns}, cfg.source)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _row_problem(prompt: Any, image_0: Any, image_1: Any, label: Any, rejected_prompt: Any = None) -> str | None:
    if isinstance(label, str) and label.startswith("not "):  # a parse error passed through
        return label
    if not isinstance(prompt, str) or not prompt.strip():
        return "missing caption"
    if rejected_prompt is not None and (not isinstance(rejected_prompt, str) or not rejected_prompt.strip()):
        return f"rejected_prompt {rejected_prompt!r} is not a non-empty string"
    try:
        label = float(label)
    except (TypeError, ValueError):
        return f"label_0 {label!r} is not a number"
    if label not in (0.0, 0.5, 1.0):
        return f"label_0 {label!r} is outside {{0, 0.5, 1}}"
    for name, ref in (("image 0", image_0), ("image 1", image_1)):
        problem = _check_image(ref)
        if problem:
            return f"{name}: {problem}"
    return None


def load_pair_records(cfg: DataConfig, seed: int = 0) -> tuple[list[PairRecord], LoadReport]:
    """Read, validate and order every pair; bad rows are skipped (or raise under ``strict``)."""
    report = LoadReport(source=cfg.source)
    tie_rng = random.Random(seed)
    records: list[PairRecord] = []
    for row, prompt, image_0, image_1, label, rejected_prompt in _raw_rows(cfg):
        report.rows += 1
        problem = _row_problem(prompt, image_0, image_1, label, rejected_prompt)
        if problem:
            message = f"{cfg.source}, row {row}: {problem}"
            if cfg.strict:
                raise DataError(message + " (data.strict is set; fix or remove the row)")
            report.skipped[problem.split(" (")[0].split(":")[0]] += 1
            if len(report.examples) < 5:
                logger.warning("skipping bad row: %s", message)
            report.examples.append(message)
            continue
        label = float(label)
        if label == 0.5:
            if cfg.ties == "drop":
                report.ties_dropped += 1
                continue
            label = float(tie_rng.random() < 0.5)
        chosen, rejected = (image_0, image_1) if label == 1.0 else (image_1, image_0)
        rejected_prompt = rejected_prompt.strip() if rejected_prompt is not None else None
        records.append(PairRecord(prompt=prompt.strip(), chosen=chosen, rejected=rejected, row=row, rejected_prompt=rejected_prompt))
        if cfg.max_pairs is not None and len(records) >= cfg.max_pairs:
            break
    report.kept = len(records)
    if report.skipped:
        logger.warning("%s", report.summary())
    if not records:
        raise DataError(f"{cfg.source}: no usable pairs ({report.summary()})")
    return records, report


def write_manifest(out_dir: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``pairs.jsonl`` (prompt, chosen, rejected relative paths) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pairs.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")} | {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}) + "\n")
    tmp.replace(path)
    return path
