"""Reading preference pairs into validated ``PairRecord``s, whatever the source's format.

A format (``diffpo.data.format``; the built-ins are ``diffpo.data.formats.manifest``, diffpo's own
JSONL pairs, and ``diffpo.data.formats.pickapic``, datasets-library tables) turns ``data.source``
into raw rows; ``data.format: auto`` picks it from the source. This module checks every row before
training: an undecodable image, a missing caption or a label outside {0, 0.5, 1} is counted and
skipped with a warning naming the row, or stops the run under ``data.strict``. Ties are dropped by
default (the papers' scripts do) or ordered at random.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from diffpo.config import DataConfig
from diffpo.data.format import DataError, RawPair, resolve_format

logger = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _row_problem(raw: RawPair) -> str | None:
    if raw.problem is not None:  # the format could not parse the row
        return raw.problem
    prompt, image_0, image_1, label, rejected_prompt = raw.prompt, raw.image_0, raw.image_1, raw.label_0, raw.rejected_prompt
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
    fmt = resolve_format(cfg)
    if fmt.rows != "pairs":
        raise DataError(f"data.format: '{fmt.name}' yields {fmt.rows} rows, and this reads preference pairs")
    for raw in fmt.read(cfg):
        report.rows += 1
        row = raw.row
        problem = _row_problem(raw)
        if problem:
            message = f"{cfg.source}, row {row}: {problem}"
            if cfg.strict:
                raise DataError(message + " (data.strict is set; fix or remove the row)")
            report.skipped[problem.split(" (")[0].split(":")[0]] += 1
            if len(report.examples) < 5:
                logger.warning("skipping bad row: %s", message)
            report.examples.append(message)
            continue
        label = float(raw.label_0)
        if label == 0.5:
            if cfg.ties == "drop":
                report.ties_dropped += 1
                continue
            label = float(tie_rng.random() < 0.5)
        chosen, rejected = (raw.image_0, raw.image_1) if label == 1.0 else (raw.image_1, raw.image_0)
        rejected_prompt = raw.rejected_prompt.strip() if raw.rejected_prompt is not None else None
        records.append(PairRecord(prompt=raw.prompt.strip(), chosen=chosen, rejected=rejected, row=row, rejected_prompt=rejected_prompt))
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
