"""The ``diffpo view`` app: an evaluation folder of ``diffpo eval``, browsable.

It reads what the evaluation wrote (``diffpo.evaluate.run``) and computes nothing new:

* ``results.json``: per scorer the means, spreads, win rate and its bootstrap interval, and the
  setup (models, prompts, seeds, sampler);
* ``scores.jsonl``: one row per (prompt, seed) with every scorer's value for base and tuned;
* ``images/index.jsonl``: the image files of each (prompt, seed), under ``images/``.

    GET /               the page (static/view.html)
    GET /api/eval       summary, setup and one item per (prompt, seed) with scores and image URLs
    GET /images/{path}  an image, only from the evaluation's images folder
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from diffpo.web.files import image_response

STATIC = Path(__file__).parent / "static"
MODELS = ("base", "tuned")


class EvalFolderError(ValueError):
    """The folder is not (or not entirely) an evaluation written by ``diffpo eval``."""


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvalFolderError(f"{path}, line {n}: not valid JSON ({err.msg})") from None
    return rows


def images_folder(eval_dir: Path, results: dict) -> Path | None:
    """``EVAL_DIR/images``, or the folder ``results.json`` names (an absolute path, or one
    relative to where ``diffpo eval`` ran); None when the evaluation kept no images."""
    for candidate in (eval_dir / "images", Path(results["images_dir"]) if results.get("images_dir") else None):
        if candidate is not None and (candidate / "index.jsonl").is_file():
            return candidate.resolve()
    return None


def load_eval(eval_dir: str | Path) -> dict:
    """Everything the page shows, read from the evaluation's files."""
    eval_dir = Path(eval_dir)
    results_path = eval_dir / "results.json"
    if not results_path.is_file():
        raise EvalFolderError(f"{eval_dir}: no results.json (expected the --out folder of diffpo eval)")
    results = json.loads(results_path.read_text())
    scores_path = eval_dir / "scores.jsonl"
    if not scores_path.is_file():
        raise EvalFolderError(f"{eval_dir}: no scores.jsonl (per-image scores of diffpo eval)")
    images = images_folder(eval_dir, results)
    files = {}
    if images is not None:
        files = {(row["prompt_index"], row["seed"]): row for row in _jsonl(images / "index.jsonl")}
    items = []
    for row in _jsonl(scores_path):
        item = {key: row[key] for key in ("prompt_index", "prompt", "seed", *MODELS)}
        found = files.get((row["prompt_index"], row["seed"]))
        for model in MODELS:
            item[f"{model}_image"] = f"/images/{quote(found[model])}" if found else None
        items.append(item)
    setup = {key: results.get(key) for key in ("models", "num_prompts", "images_per_prompt", "seed", "sampler", "prompt_set", "device")}
    return {"eval_dir": str(eval_dir.resolve()), "scorers": results["scorers"], "setup": setup, "items": items, "images_dir": str(images) if images else None}


def create_app(eval_dir: str | Path) -> Starlette:
    data = load_eval(eval_dir)  # read once: the page is a snapshot of a finished evaluation
    images = Path(data["images_dir"]) if data["images_dir"] else None

    async def page(request: Request):
        return FileResponse(STATIC / "view.html", headers={"Cache-Control": "no-store"})

    async def evaluation(request: Request):
        return JSONResponse(data)

    async def image(request: Request):
        if images is None:
            return JSONResponse({"error": "this evaluation kept no images"}, status_code=404)
        return image_response(images, request.path_params["path"])

    return Starlette(routes=[Route("/", page), Route("/api/eval", evaluation), Route("/images/{path:path}", image)])
