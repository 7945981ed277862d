"""Pairs from a folder of target images: chosen = the user's images, rejected = base generations.

MaPO's style, personalization and safety domains are built this way (its Pick-Style and
Pick-Safety sets: chosen = target images, rejected = what SDXL makes for the same prompts). One
command takes a user from a folder of images to a pair dataset the trainer reads.

Resumable: rejected image k is ``rejected/<k>_<stem>.png`` with seed ``seed + k``; a rerun keeps the
images already written (each saved through a temporary file, so a kill never leaves half an image)
and generates only the missing ones. The manifest is written last, atomically, with each chosen
image exactly once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm.auto import tqdm

from diffpo.data.pairs import DataError, write_manifest

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--chosen: no such folder: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"--chosen: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    for path in images:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as err:
            raise DataError(f"--chosen: cannot read image {path}: {type(err).__name__}") from None
    return images


def read_prompts(spec: str, images: Sequence[Path], option: str = "--prompts") -> list[str]:
    """``captions`` -> a sidecar ``<stem>.txt`` per image; a ``.jsonl`` with ``file`` and ``prompt``;
    otherwise a text file with one prompt per image (same order as the sorted file names), or one
    prompt for all images. ``option`` names the flag in error messages."""
    if spec == "captions":
        prompts = []
        for path in images:
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                raise DataError(f"{option} captions: no caption file {caption} for {path.name}")
            prompts.append(caption.read_text().strip())
    else:
        source = Path(spec)
        if not source.is_file():
            raise DataError(f"{option}: no such file: {spec}")
        if source.suffix == ".jsonl":
            by_file = {}
            for n, line in enumerate(source.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    by_file[row["file"]] = row["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{source}, line {n}: expected a JSON object with 'file' and 'prompt'") from None
            missing = [p.name for p in images if p.name not in by_file]
            if missing:
                raise DataError(f"{source}: no prompt for {len(missing)} image(s), e.g. {missing[0]}")
            prompts = [by_file[p.name] for p in images]
        else:
            lines = [line.strip() for line in source.read_text().splitlines() if line.strip() and not line.startswith("#")]
            if len(lines) == 1:
                lines = lines * len(images)
            if len(lines) != len(images):
                raise DataError(f"{source}: {len(lines)} prompts for {len(images)} images (need one per image, in file-name order, or exactly one)")
            prompts = lines
    empty = [images[i].name for i, p in enumerate(prompts) if not p]
    if empty:
        raise DataError(f"{option}: empty prompt for {empty[0]}")
    return prompts


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    image.save(tmp)
    tmp.replace(path)


def build_pairs_from_images(
    components, chosen: Sequence[Path], prompts: Sequence[str], out_dir: str | Path, *, seed: int = 0,
    rejected_prompts: Sequence[str] | None = None, per_image: int = 1, sampler: dict | None = None, batch_size: int = 64,
    device: str = "cpu", progress: bool = True, cache=None,
) -> Path:
    """Generate the missing rejected images and write ``out_dir/pairs.jsonl``.

    ``cache`` (a ``diffpo.image_cache.ImageCache``) reuses rejected images the same model made
    before with the same prompt, seed and sampler settings.

    ``rejected_prompts`` (default: ``prompts``) lets the rejected image come from another prompt,
    e.g. the class prompt "a dog" while the pair's prompt is "a sks dog" (personalization); such
    rows record it as ``rejected_prompt``. ``per_image`` pairs each chosen image with that many
    rejected generations (DreamBooth's ~200 class images for 3-5 subject images); pair
    ``k = i * per_image + j`` uses seed ``seed + k``, so ``per_image=1`` is one pair per image.
    """
    from diffpo import sampling

    if len(chosen) != len(prompts):
        raise DataError(f"{len(prompts)} prompts for {len(chosen)} chosen images")
    if rejected_prompts is not None and len(rejected_prompts) != len(chosen):
        raise DataError(f"{len(rejected_prompts)} rejected prompts for {len(chosen)} chosen images")
    if per_image < 1:
        raise DataError(f"--per-image must be >= 1, got {per_image}")
    rejected_prompts = list(rejected_prompts or prompts)
    out_dir = Path(out_dir)
    (out_dir / "rejected").mkdir(parents=True, exist_ok=True)
    # (chosen index, rejected file) for every pair; the file name carries its seed offset k.
    items = [(i, out_dir / "rejected" / f"{i * per_image + j:05d}_{path.stem}.png") for i, path in enumerate(chosen) for j in range(per_image)]
    todo = [k for k, (_, target) in enumerate(items) if not target.is_file()]
    if len(todo) < len(items):
        logger.info("resuming: %d of %d rejected images already generated", len(items) - len(todo), len(items))
    with tqdm(total=len(items), initial=len(items) - len(todo), desc="generate rejected", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):  # each batch saved before the next: a kill loses one at most
            batch = todo[start : start + batch_size]
            images = sampling.generate(components, [rejected_prompts[items[k][0]] for k in batch], [seed + k for k in batch], settings=sampler, device=device, progress=False, batch_size=batch_size, cache=cache)
            for k, image in zip(batch, images, strict=True):
                _save_atomic(image, items[k][1])
            bar.update(len(batch))
    rows = []
    for k, (i, target) in enumerate(items):
        row = {"prompt": prompts[i], "chosen": os.path.relpath(Path(chosen[i]).resolve(), out_dir.resolve()), "rejected": f"rejected/{target.name}", "seed": seed + k}
        if rejected_prompts[i] != prompts[i]:
            row["rejected_prompt"] = rejected_prompts[i]
        rows.append(row)
    return write_manifest(out_dir, rows)
