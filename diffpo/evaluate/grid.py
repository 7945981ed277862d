"""Labelled image grids, and the base-versus-tuned comparison grid of an evaluation.

A win rate says *whether* the tuned model is preferred; the grid shows *what* changed. Base and
tuned rows of one prompt share their seeds column by column, so each column pair started from the
same noise and differs only by the fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128
"""Automatic scaling enlarges cells to at least this many pixels, so 32px images stay visible."""
PAD = 4
LABEL_CHARS = 48


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int | None = None,
) -> Image.Image:
    """Paste ``rows`` of images into one picture, with optional labels left of rows and above columns.

    Images are enlarged ``scale`` times with nearest-neighbour resampling (no blur, so pixel
    artefacts of tiny models stay visible); ``None`` picks the smallest factor that makes cells
    at least ``MIN_CELL`` pixels. Cells are as large as the largest image; smaller ones sit top-left.
    """
    cells = [image for row in rows for image in row]
    if not cells:
        raise ValueError("image_grid: no images")
    n_cols = max(len(row) for row in rows)
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"image_grid: {len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"image_grid: {len(col_labels)} column labels for {n_cols} columns")
    largest = max(max(image.size) for image in cells)
    scale = scale or max(1, math.ceil(MIN_CELL / largest))
    cell_w = max(image.width for image in cells) * scale + PAD
    cell_h = max(image.height for image in cells) * scale + PAD

    font = ImageFont.load_default()
    text_h = font.getbbox("Ag")[3]
    left = max((font.getbbox(label)[2] for label in row_labels), default=0) + 2 * PAD if row_labels else PAD
    top = text_h + 2 * PAD if col_labels else PAD
    grid = Image.new("RGB", (left + n_cols * cell_w, top + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * cell_w, PAD), label, fill="black", font=font)
    for r, row in enumerate(rows):
        y = top + r * cell_h
        if row_labels:
            draw.text((PAD, y + (cell_h - text_h) // 2), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            grid.paste(big, (left + c * cell_w, y))
    return grid


def save_comparison_grid(
    base_images: Sequence[Sequence[Image.Image]],
    tuned_images: Sequence[Sequence[Image.Image]],
    prompts: Sequence[str],
    path: str | Path,
    max_prompts: int = 8,
    per_prompt: int = 4,
    seeds: Sequence[int] | None = None,
) -> Image.Image:
    """Save base row above tuned row for the first ``max_prompts`` prompts; return the grid.

    ``base_images[i][j]`` and ``tuned_images[i][j]`` are image ``j`` of prompt ``i`` from the two
    models, made with the same seed (``seeds[j]``, printed above its column when given).
    """
    if not len(base_images) == len(tuned_images) == len(prompts):
        raise ValueError(f"{len(base_images)} base and {len(tuned_images)} tuned image lists for {len(prompts)} prompts")
    rows: list[Sequence[Image.Image]] = []
    labels: list[str] = []
    for i in range(min(len(prompts), max_prompts)):
        rows += [base_images[i][:per_prompt], tuned_images[i][:per_prompt]]
        labels += [f"base: {_shorten(prompts[i])}", "tuned"]
    n_cols = max(len(row) for row in rows)
    col_labels = [f"seed {seed}" for seed in seeds[:n_cols]] if seeds is not None else None
    grid = image_grid(rows, row_labels=labels, col_labels=col_labels)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def _shorten(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."
