"""Shared test helpers: a small on-disk pair manifest of drawn shapes."""

import json
from pathlib import Path

from PIL import Image, ImageDraw


def write_shape_pairs(root: Path, n: int) -> Path:
    """n pairs in ``root/pairs.jsonl``: chosen = a bright disc, rejected = a dark square, on grey."""
    lines = []
    for i in range(n):
        w = Image.new("RGB", (32, 32), (128, 128, 128))
        ImageDraw.Draw(w).ellipse((6 + i % 3, 6, 24 + i % 3, 24), fill=(250, 200 - 10 * i, 40))
        l = Image.new("RGB", (32, 32), (128, 128, 128))
        ImageDraw.Draw(l).rectangle((8, 8 + i % 2, 22, 22 + i % 2), fill=(20, 30, 60 + 10 * i))
        w.save(root / f"w{i}.png")
        l.save(root / f"l{i}.png")
        prompt = "a red circle on a gray background" if i % 2 else "a blue square on a gray background"
        lines.append(json.dumps({"prompt": prompt, "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root
