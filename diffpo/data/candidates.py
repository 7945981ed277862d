"""Candidates to label by hand: N samples of a model per prompt (``diffpo pairs candidates``).

Writes ``out_dir/images/<i>_<j>.png`` (prompt ``i``, sample ``j``, seed ``seed + i * N + j``, so no
two images share their noise) and ``out_dir/candidates.jsonl``, one prompt a line:
``{"id": "00003", "prompt": "...", "images": ["images/00003_00.png", ...], "seeds": [...]}``,
which ``diffpo label --candidates`` shows side by side. Resumable as ``pairs from-images`` is:
images already on disk are kept, only missing ones are generated, the JSONL is written last.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from diffpo.data.from_images import _save_atomic
from diffpo.data.pairs import DataError

logger = logging.getLogger(__name__)


def write_candidates(
    components, prompts: Sequence[str], out_dir: str | Path, *, per_prompt: int, seed: int = 0, sampler: dict | None = None,
    batch_size: int = 64, device: str = "cpu", progress: bool = True,
) -> Path:
    """Generate the missing samples and write ``out_dir/candidates.jsonl``; return its path."""
    from diffpo.sampling import generate

    if per_prompt < 2:
        raise DataError(f"--per-prompt must be >= 2 (candidates are compared), got {per_prompt}")
    if not prompts:
        raise DataError("no prompts")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    items = [(i, j, f"images/{i:05d}_{j:02d}.png") for i in range(len(prompts)) for j in range(per_prompt)]
    todo = [k for k, (_, _, name) in enumerate(items) if not (out_dir / name).is_file()]
    if len(todo) < len(items):
        logger.info("resuming: %d of %d candidate images already generated", len(items) - len(todo), len(items))
    with tqdm(total=len(items), initial=len(items) - len(todo), desc="generate candidates", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = generate(components, [prompts[items[k][0]] for k in batch], [seed + k for k in batch], device=device,
                              progress=False, batch_size=batch_size, **(sampler or {}))
            for k, image in zip(batch, images, strict=True):
                _save_atomic(image, out_dir / items[k][2])
            bar.update(len(batch))
    lines = []
    for i, prompt in enumerate(prompts):
        ks = range(i * per_prompt, (i + 1) * per_prompt)
        lines.append(json.dumps({"id": f"{i:05d}", "prompt": prompt, "images": [items[k][2] for k in ks], "seeds": [seed + k for k in ks]}) + "\n")
    path = out_dir / "candidates.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)
    return path
