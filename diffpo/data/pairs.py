"""Reading preference pairs into validated ``PairRecord``s, whatever the source's format.

A format (``diffpo.data.format``; the built-ins are ``diffpo.data.formats.manifest``, diffpo's own
JSONL pairs, and ``diffpo.data.formats.pickapic``, datasets-library tables) turns ``data.source``
into raw rows; ``data.format: auto`` picks it from the source. This module checks every row before
training: an undecodable image, a missing caption or a label outside {0, 0.5, 1} is counted and
skipped with a warning naming the row, or stops the run under ``data.strict``. Ties are dropped by
default (the papers' scripts do) or ordered at random.

Unpaired examples (single images labelled desirable or not: an unpaired format, or pairs split by
``data.unpaired``) become ``PairRecord``s too, two examples per record in a seeded shuffle, each with
its own prompt and label (``PairRecord.labels``): the trainer's batches stay rows of two images
(``diffpo.losses.LossSpec.examples``).
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
from diffpo.data.format import DataError, RawExample, RawPair, resolve_format

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairRecord:
    """One preference pair, or two unpaired examples (``labels`` set). Images are a path or encoded
    bytes, decoded lazily."""

    prompt: str
    chosen: str | bytes
    rejected: str | bytes
    row: int
    rejected_prompt: str | None = None
    """The prompt the rejected image belongs to, when it is not ``prompt`` (manifest key
    ``rejected_prompt``); None otherwise."""
    labels: tuple[bool, bool] | None = None
    """Two unpaired examples in one record: whether the first (``chosen``, on ``prompt``) and the
    second image (``rejected``, on ``rejected_prompt``) is desirable. None for a preference pair."""

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

    desirable: int | None = None
    """Unpaired data: how many kept examples are desirable (the rest are not)."""
    examples_kept: int = 0
    odd_dropped: int = 0

    def summary(self) -> str:
        bad = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        if self.desirable is not None:
            odd = f", {self.odd_dropped} left over (odd count)" if self.odd_dropped else ""
            return (f"{self.source}: {self.examples_kept} unpaired examples ({self.desirable} desirable, {self.examples_kept - self.desirable} not) "
                    f"in {self.kept} rows of two{odd}, from {self.rows} rows; ties dropped {self.ties_dropped}; bad rows skipped: {bad}")
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


_TRUE_WORDS, _FALSE_WORDS = {"true", "yes", "1"}, {"false", "no", "0"}


def _desirable(value: Any) -> bool | None:
    """An example's label as a bool: True/False, 1/0, or those words; None if it is none of these."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    return None


def _example_problem(raw: RawExample) -> str | None:
    if raw.problem is not None:
        return raw.problem
    if not isinstance(raw.prompt, str) or not raw.prompt.strip():
        return "missing caption"
    if _desirable(raw.desirable) is None:
        return f"desirable {raw.desirable!r} is not true/false (or 1/0)"
    problem = _check_image(raw.image)
    return f"image: {problem}" if problem else None


def _skip(cfg: DataConfig, report: LoadReport, row: int, problem: str) -> None:
    message = f"{cfg.source}, row {row}: {problem}"
    if cfg.strict:
        raise DataError(message + " (data.strict is set; fix or remove the row)")
    report.skipped[problem.split(" (")[0].split(":")[0]] += 1
    if len(report.examples) < 5:
        logger.warning("skipping bad row: %s", message)
    report.examples.append(message)


def pack_examples(examples: list[tuple[int, str, str | bytes, bool]], seed: int) -> tuple[list[PairRecord], int]:
    """Unpaired examples ``(row, prompt, image, desirable)`` -> records of two, in a shuffle seeded
    by ``seed`` (so a split pair's two images rarely share a record: nothing is paired). An odd
    example out is dropped; returns (records, how many were dropped)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    records = []
    for a, b in zip(order[0::2], order[1::2]):
        (row, prompt, image, good), (_, prompt_b, image_b, good_b) = examples[a], examples[b]
        records.append(PairRecord(prompt=prompt, chosen=image, rejected=image_b, row=row, rejected_prompt=prompt_b, labels=(good, good_b)))
    return records, len(examples) % 2


def _load_examples(cfg: DataConfig, fmt, report: LoadReport, seed: int) -> list[PairRecord]:
    """An unpaired format's rows, validated, packed two per record."""
    examples = []
    for raw in fmt.read(cfg):
        report.rows += 1
        problem = _example_problem(raw)
        if problem:
            _skip(cfg, report, raw.row, problem)
            continue
        examples.append((raw.row, raw.prompt.strip(), raw.image, _desirable(raw.desirable)))
        if cfg.max_pairs is not None and len(examples) >= 2 * cfg.max_pairs:
            break
    return _packed(examples, report, seed)


def _packed(examples: list, report: LoadReport, seed: int) -> list[PairRecord]:
    records, report.odd_dropped = pack_examples(examples, seed)
    report.examples_kept = 2 * len(records)
    report.desirable = sum(sum(r.labels) for r in records)
    return records


def split_pairs(records: list[PairRecord], report: LoadReport, seed: int) -> list[PairRecord]:
    """``data.unpaired``: each pair -> its chosen image (desirable) and its rejected image (not),
    each on its own prompt, packed two per record by ``pack_examples``."""
    examples = []
    for r in records:
        examples.append((r.row, r.prompt, r.chosen, True))
        examples.append((r.row, r.rejected_prompt or r.prompt, r.rejected, False))
    return _packed(examples, report, seed)


def load_pair_records(cfg: DataConfig, seed: int = 0) -> tuple[list[PairRecord], LoadReport]:
    """Read, validate and order every pair; bad rows are skipped (or raise under ``strict``).
    Unpaired data (an unpaired format, or ``data.unpaired``) comes back as records of two
    labelled examples (``PairRecord.labels``)."""
    report = LoadReport(source=cfg.source)
    tie_rng = random.Random(seed)
    records: list[PairRecord] = []
    fmt = resolve_format(cfg)
    if fmt.rows == "unpaired":
        return _finish(cfg, report, _load_examples(cfg, fmt, report, seed), "fewer than two usable examples")
    for raw in fmt.read(cfg):
        report.rows += 1
        row = raw.row
        problem = _row_problem(raw)
        if problem:
            _skip(cfg, report, row, problem)
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
    if cfg.unpaired and records:
        records = split_pairs(records, report, seed)
    return _finish(cfg, report, records, "no usable pairs")


def _finish(cfg: DataConfig, report: LoadReport, records: list[PairRecord], empty: str) -> tuple[list[PairRecord], LoadReport]:
    report.kept = len(records)
    if report.skipped:
        logger.warning("%s", report.summary())
    if not records:
        raise DataError(f"{cfg.source}: {empty} ({report.summary()})")
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
