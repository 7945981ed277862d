"""Shared test helpers: a small on-disk pair manifest of drawn shapes."""

import json
from pathlib import Path

import pytest
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


def tiny_run_config(out: Path, data: Path, *, pretrained: str = "tiny:sd", **sections):
    """A 2-step LoRA MaPO run on a tiny model; ``sections`` update the defaults section by section."""
    from diffpo.config import config_from_dict

    base = {
        "output_dir": str(out),
        "seed": 3,
        "model": {"pretrained": pretrained, "lora": {"enabled": True, "rank": 4}},
        "data": {"source": str(data), "resolution": 32},
        "loss": {"name": "mapo"},
        "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "checkpoint_every": 2},
        "logging": {"report_to": "none", "progress": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    """4 shape pairs on disk (a test module may override it with its own size)."""
    return write_shape_pairs(tmp_path_factory.mktemp("pairs"), 4)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Where ``tiny:<name>`` models are built once per test session."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session", autouse=True)
def image_cache_dir(tmp_path_factory):
    """The image cache (``diffpo.image_cache``) of the whole session, away from ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("image-cache")
    previous = os.environ.get("DIFFPO_CACHE_DIR")
    os.environ["DIFFPO_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DIFFPO_CACHE_DIR", None)
    else:
        os.environ["DIFFPO_CACHE_DIR"] = previous
