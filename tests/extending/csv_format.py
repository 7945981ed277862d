"""A data format in one file: a CSV of ``prompt,chosen,rejected`` (image paths relative to the file).

It only parses; ``diffpo.data.load_pair_records`` validates the rows (missing images, empty
prompts) and names the bad ones. Registered by ``register_format(CSV_FORMAT)``, or by ``register``
as a plugin's entry point (``[project.entry-points."diffpo.plugins"] csv = "csv_format:register"``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from diffpo.data import DataError, DataFormat, RawPair, register_format

COLUMNS = ("prompt", "chosen", "rejected")


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def read_csv_pairs(cfg):
    path = Path(cfg.source)
    if not path.is_file():
        raise DataError(f"data.source: no such CSV file: {path}")
    missing = [c for c in COLUMNS if c not in _header(path)]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (a header line {','.join(COLUMNS)} is needed)")
    with path.open(newline="", encoding="utf-8") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            chosen, rejected = (str(path.parent / row[c]) if row[c] else None for c in ("chosen", "rejected"))
            yield RawPair(row=i, prompt=row["prompt"], image_0=chosen, image_1=rejected, label_0=1.0)


def looks_like_pair_csv(source: str) -> bool:
    """``data.format: auto``: a .csv file whose header names the three columns."""
    path = Path(source)
    return path.suffix == ".csv" and path.is_file() and set(COLUMNS) <= set(_header(path))


CSV_FORMAT = DataFormat("test_csv", read_csv_pairs, detect=looks_like_pair_csv, description="CSV rows prompt,chosen,rejected")


def register() -> None:
    register_format(CSV_FORMAT, overwrite=True)
