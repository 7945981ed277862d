"""``unpaired`` and ``unpaired_table``: single images with a thumbs-up / thumbs-down label.

The feedback Diffusion-KTO learns from (``loss.name: kto``): no pairs, one image and whether it is
desirable. Two schemas:

- ``unpaired``: a JSONL file (or a folder holding ``examples.jsonl``), one image a line,
  ``{"prompt": "...", "image": "img/0.png", "desirable": true}``; paths relative to the file.
- ``unpaired_table``: a datasets-library table (hub id, parquet, arrow, json, csv) with the
  columns ``caption``, ``image`` (encoded bytes or a path) and ``label`` (1/true desirable,
  0/false not); ``data.columns`` maps other names onto these three.

A preference-pair source becomes unpaired examples with ``data.unpaired: true`` instead (the chosen
image desirable, the rejected one not; ``diffpo.data.pairs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from diffpo.data.format import DataError, DataFormat, RawExample, register_format
from diffpo.data.formats.manifest import json_objects, read_lines
from diffpo.data.formats.pickapic import _image_ref, open_table

if TYPE_CHECKING:
    from diffpo.config import DataConfig

MANIFEST_NAME = "examples.jsonl"
TABLE_COLUMNS = {"caption": "caption", "image": "image", "label": "label"}


def manifest_examples(path: Path) -> Iterator[RawExample]:
    for i, item, problem in json_objects(path, "example manifest"):
        if problem:
            yield RawExample(i, None, None, None, problem=problem)
            continue
        image = item.get("image")
        image = str(path.parent / image) if isinstance(image, str) else image
        yield RawExample(i, item.get("prompt"), image, item.get("desirable"))


def read_manifest(cfg: "DataConfig") -> Iterator[RawExample]:
    path = Path(cfg.source)
    path = path / MANIFEST_NAME if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"example manifest not found: {path}")
    return manifest_examples(path)


def detect_manifest(source: str) -> bool:
    """A folder holding ``examples.jsonl``, or a ``.jsonl`` file whose first row has ``image`` and
    ``desirable`` (checked before the pair manifest's detection, which claims other JSONL files)."""
    path = Path(source)
    if path.is_dir():
        return (path / MANIFEST_NAME).is_file()
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    first = next((line for line in read_lines(path) if line.strip()), None)
    try:
        return first is not None and {"image", "desirable"} <= set(json.loads(first))
    except (json.JSONDecodeError, TypeError):
        return False


def read_table(cfg: "DataConfig") -> Iterator[RawExample]:
    unknown = set(cfg.columns) - set(TABLE_COLUMNS)
    if unknown:
        raise DataError(f"data.columns: unknown key(s) {', '.join(sorted(unknown))} (valid for unpaired_table: {', '.join(TABLE_COLUMNS)})")
    columns = {**TABLE_COLUMNS, **cfg.columns}
    table = open_table(cfg.source, cfg.split)
    missing = [c for c in columns.values() if c not in table.column_names]
    if missing:
        raise DataError(f"{cfg.source}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)}); map them with data.columns")
    import datasets

    if isinstance(table.features.get(columns["image"]), datasets.Image):  # keep bytes; decode per batch
        table = table.cast_column(columns["image"], datasets.Image(decode=False))
    for i, item in enumerate(table):
        yield RawExample(i, item[columns["caption"]], _image_ref(item[columns["image"]]), item[columns["label"]])


MANIFEST = register_format(
    DataFormat("unpaired", read_manifest, rows="unpaired", detect=detect_manifest, description="JSONL rows {prompt, image, desirable} (unpaired feedback, Diffusion-KTO)")
)
TABLE = register_format(
    DataFormat("unpaired_table", read_table, rows="unpaired", description="a datasets-library table with caption, image, label (1 desirable, 0 not); data.columns maps others")
)
