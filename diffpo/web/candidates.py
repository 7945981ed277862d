"""What ``diffpo label`` shows: prompts, each with two or more candidate images.

Two sources:

* ``--images DIR``: one sub-folder per prompt, ``DIR/<name>/`` holding the candidate images and
  either ``prompt.txt`` or a caption ``<stem>.txt`` next to every image (the sidecar layout
  ``pairs from-images --prompts captions`` reads; all captions of one folder must agree). The
  folder name is the task id.
* ``--candidates FILE``: a JSONL file, one prompt a line:
  ``{"id": "0003", "prompt": "...", "images": ["images/0003_00.png", "images/0003_01.png"]}``
  with image paths relative to the file's folder (``id`` optional: the line's prompt number
  otherwise). ``diffpo pairs candidates`` writes this file: N base-model samples per prompt.

Images are served from the source folder (``DIR``, or the JSONL file's folder), so every
candidate must lie inside it; this is checked when the candidates are read, before serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from diffpo.data.from_images import IMAGE_SUFFIXES, read_prompts
from diffpo.data.pairs import DataError


@dataclass(frozen=True)
class Task:
    """One screen of the labelling page: a prompt and its candidates (real, absolute paths)."""

    id: str
    prompt: str
    images: tuple[Path, ...]


@dataclass(frozen=True)
class Candidates:
    root: Path
    """The folder images are served from (resolved)."""
    tasks: list[Task]

    def url_path(self, image: Path) -> str:
        return image.relative_to(self.root).as_posix()


def _check_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise DataError(f"{where}: no such image: {path}")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError(f"{where}: cannot read image {path}: {type(err).__name__}") from None
    return path


def from_folder(folder: str | Path) -> Candidates:
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DataError(f"--images: no such folder: {folder}")
    groups = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not groups:
        raise DataError(f"--images {folder}: no prompt folders; expected {folder}/<name>/ with prompt.txt (or captions) and 2+ images each")
    tasks = []
    for group in groups:
        images = sorted(p for p in group.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) < 2:
            raise DataError(f"--images: {group} holds {len(images)} image(s); a prompt needs 2 or more candidates")
        prompt_file = group / "prompt.txt"
        if prompt_file.is_file():
            prompt = prompt_file.read_text().strip()
        else:
            captions = set(read_prompts("captions", images, option=f"--images ({group.name} has no prompt.txt, so)"))
            if len(captions) != 1:
                raise DataError(f"--images: the images in {group} have {len(captions)} different captions; one folder is one prompt")
            prompt = captions.pop()
        if not prompt:
            raise DataError(f"--images: empty prompt in {group}")
        tasks.append(Task(group.name, prompt, tuple(_check_image(p.resolve(), f"--images {group.name}") for p in images)))
    return _checked(Candidates(root, tasks), "--images")


def from_jsonl(path: str | Path) -> Candidates:
    source = Path(path)
    if not source.is_file():
        raise DataError(f"--candidates: no such file: {path}")
    root = source.parent.resolve()
    tasks = []
    lines = [(n, line) for n, line in enumerate(source.read_text().splitlines(), 1) if line.strip()]
    for k, (n, line) in enumerate(lines):
        where = f"{source}, line {n}"
        try:
            row = json.loads(line)
            prompt, images = row["prompt"], row["images"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{where}: expected a JSON object with 'prompt' and 'images' (a list of image paths)") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: empty prompt")
        if not isinstance(images, list) or len(images) < 2 or not all(isinstance(i, str) for i in images):
            raise DataError(f"{where}: 'images' must list 2 or more image paths")
        resolved = tuple(_check_image((root / i).resolve(), where) for i in images)
        outside = [str(p) for p in resolved if not p.is_relative_to(root)]
        if outside:
            raise DataError(f"{where}: image {outside[0]} is outside {root}; candidates must lie in the file's folder, which is what the page serves")
        tasks.append(Task(str(row.get("id", f"{k:05d}")), prompt.strip(), resolved))
    if not tasks:
        raise DataError(f"--candidates {path}: no candidates")
    return _checked(Candidates(root, tasks), f"--candidates {path}")


def _checked(candidates: Candidates, where: str) -> Candidates:
    seen: set[str] = set()
    for task in candidates.tasks:
        if task.id in seen:
            raise DataError(f"{where}: task id '{task.id}' appears twice")
        seen.add(task.id)
    return candidates
