"""``pickapic``: a datasets-library table in the Pick-a-Pic schema.

A hub id, parquet/arrow/CSV files, a ``save_to_disk`` folder or a JSON/JSONL table with the columns
``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes) and ``label_0`` in {1, 0, 0.5} (1: image 0
preferred, 0: image 1 preferred, 0.5: tie). ``data.columns`` maps other column names onto these
four, so other preference tables with one caption, two images and a label read as this format.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image

from diffpo.data.format import DataError, DataFormat, RawPair, register_format

if TYPE_CHECKING:
    from diffpo.config import DataConfig

PICKAPIC_COLUMNS = {"caption": "caption", "image_0": "jpg_0", "image_1": "jpg_1", "label_0": "label_0"}

_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".csv"}


def looks_local(source: str) -> bool:
    """A path rather than a hub id: a file suffix, or an explicit relative/absolute/home path."""
    return Path(source).suffix in _LOCAL_SUFFIXES or source.startswith(("/", ".", "~")) or source.count("/") > 1


def _image_ref(value: Any) -> str | bytes | None:
    """Normalise what a datasets column can hold: bytes, {'bytes','path'}, a PIL image, a path."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return value


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


def open_table(source: str, split: str):
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


def table_rows(table, columns: dict[str, str], source: str) -> Iterator[RawPair]:
    import datasets

    missing = [c for c in columns.values() if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)}); map them with data.columns")
    for key in ("image_0", "image_1"):  # keep encoded bytes; decoding happens per batch
        if isinstance(table.features.get(columns[key]), datasets.Image):
            table = table.cast_column(columns[key], datasets.Image(decode=False))
    for i, item in enumerate(table):
        yield RawPair(i, item[columns["caption"]], _image_ref(item[columns["image_0"]]), _image_ref(item[columns["image_1"]]), item[columns["label_0"]])


def read(cfg: "DataConfig") -> Iterator[RawPair]:
    unknown = set(cfg.columns) - set(PICKAPIC_COLUMNS)
    if unknown:
        raise DataError(f"data.columns: unknown key(s) {', '.join(sorted(unknown))} (valid: {', '.join(PICKAPIC_COLUMNS)})")
    return table_rows(open_table(cfg.source, cfg.split), {**PICKAPIC_COLUMNS, **cfg.columns}, cfg.source)


# No ``detect``: this is what ``data.format: auto`` falls back to (``diffpo.data.format.FALLBACK``).
FORMAT = register_format(
    DataFormat("pickapic", read, description="a datasets-library table (hub id, parquet, arrow, json, csv) with caption, jpg_0, jpg_1, label_0; data.columns maps others")
)
