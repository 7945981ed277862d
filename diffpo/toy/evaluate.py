"""The testbed's evaluation: ``diffpo.evaluate.run.evaluate_models`` with the shapes scorers, plus
prompt faithfulness (checker accuracies), image quality (``diffpo.toy.quality``) and diversity. Because it is the same code as
``diffpo eval``, both report the same numbers for the same models, prompts and seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffpo.evaluate.run import evaluate_models, write_report
from diffpo.evaluate.scorers import load_scorer
from diffpo.toy.grammar import ShapePrompt
from diffpo.toy.quality import laplacian_energy
from diffpo.toy.scorers import diversity
from diffpo.toy.tasks import Sampler

TASK_SCORERS = {"style": "shapes_style"}


def task_scorer(task: str, reward: str = "size") -> str:
    return TASK_SCORERS.get(task, f"shapes_{reward}")


def evaluate_toy(
    base, tuned, prompts: Sequence[ShapePrompt], *, task_reward: str, per_prompt: int, seed: int, sampler: Sampler,
    out_dir: Path, device: str = "cpu", progress: bool = True, base_cache=None,
) -> dict:
    """Evaluate tuned vs base on ``prompts`` (same seeds); writes ``out_dir`` report files too."""
    names = [task_reward, "shapes_color", "shapes_shape", "shapes_quality"]
    scorers = {name: load_scorer(name) for name in names}
    results = evaluate_models(
        base, tuned, [p.text for p in prompts], images_per_prompt=per_prompt, seed=seed, scorers=scorers,
        sampler=sampler.as_dict(), out_dir=out_dir, progress=progress, device=device, base_cache=base_cache,
    )
    index = [json.loads(line) for line in (Path(out_dir) / "images" / "index.jsonl").read_text().splitlines()]
    groups = [row["prompt_index"] for row in index]
    images = {label: [Image.open(Path(out_dir) / "images" / row[label]).convert("RGB") for row in index] for label in ("base", "tuned")}
    results["diversity"] = {label: diversity(images[label], groups) for label in images}
    s = results["scorers"]
    results["quality"] = {label: s["shapes_quality"][f"mean_{label}"] for label in images}
    # issue 17's whole-image measure (edges included), for comparison with its numbers
    results["laplacian"] = {label: float(np.mean([laplacian_energy(im) for im in images[label]])) for label in images}
    results["faithfulness"] = {
        label: {
            "color": s["shapes_color"][f"mean_{label}"],
            "shape": s["shapes_shape"][f"mean_{label}"],
            "overall": (s["shapes_color"][f"mean_{label}"] + s["shapes_shape"][f"mean_{label}"]) / 2,
        }
        for label in ("base", "tuned")
    }
    results["task_reward"] = task_reward
    write_report(results, Path(out_dir))
    return results
