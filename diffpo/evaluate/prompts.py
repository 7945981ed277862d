"""Evaluation prompt sets: plain text files, JSONL files, or a built-in name.

``load_prompts(spec)`` takes

* the name of a registered set (``register_prompt_set``; plugins are loaded when the name is not
  registered): the shapes-world plugin adds ``shapes-heldout`` -- the shapes-world prompts held out
  from training, which test composition rather than memorisation -- and ``shapes-all``;
* a ``.jsonl`` file -- one JSON object a line with a ``prompt`` (or ``caption``) string;
* any other file -- one prompt a line; blank lines and lines starting with ``#`` are skipped.

The standard sets of the preference-tuning papers are not shipped (they need the network); write
them once to a JSONL file with the datasets library or huggingface_hub:

* Pick-a-Pic v2 test captions (hub dataset ``yuvalkirstain/pickapic_v2``, split ``test_unique``,
  column ``caption``)::

      import json
      from datasets import load_dataset
      rows = load_dataset("yuvalkirstain/pickapic_v2", split="test_unique", streaming=True)
      with open("pickapic_test.jsonl", "w") as f:
          f.writelines(json.dumps({"caption": r["caption"]}) + "\\n" for r in rows)

* PartiPrompts (hub dataset ``nateraw/parti-prompts``, split ``train``, column ``Prompt``)::

      rows = load_dataset("nateraw/parti-prompts", split="train")
      with open("parti.jsonl", "w") as f:
          f.writelines(json.dumps({"prompt": p}) + "\\n" for p in rows["Prompt"])

* HPS v2 benchmark prompts: the JSON lists the ``hpsv2`` package downloads
  (``hpsv2.benchmark_prompts``), ``benchmark/{anime,concept-art,paintings,photo}.json`` of the
  hub dataset ``zhwang/HPDv2``; fetching them directly avoids installing ``hpsv2`` and its
  open_clip dependency::

      from huggingface_hub import hf_hub_download
      with open("hps_photo.jsonl", "w") as f:
          path = hf_hub_download("zhwang/HPDv2", "photo.json", subfolder="benchmark", repo_type="dataset")
          f.writelines(json.dumps({"prompt": p}) + "\\n" for p in json.load(open(path)))
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from diffpo.evaluate.run import EvalError

JSONL_KEYS = ("prompt", "caption")
"""Keys a JSONL row may hold its prompt under, in order of preference (Pick-a-Pic uses caption)."""

PROMPT_SETS: dict[str, Callable[[], list[str]]] = {}
"""Registered prompt sets: name -> a function returning the prompts (``register_prompt_set``)."""


def register_prompt_set(name: str, prompts: Callable[[], list[str]], *, overwrite: bool = False) -> None:
    """Make ``load_prompts(name)`` (and ``diffpo eval --prompts name``) return ``prompts()``."""
    if name in PROMPT_SETS and not overwrite:
        raise ValueError(f"prompt set {name!r} is already registered; pass overwrite=True to replace it")
    PROMPT_SETS[name] = prompts


def prompt_set_names() -> list[str]:
    """Names of the registered sets, after loading the plugins that register them."""
    from diffpo.plugins import load_plugins

    load_plugins()
    return list(PROMPT_SETS)


def load_prompts(spec: str) -> list[str]:
    """The prompts of a registered set or a file, in file order (duplicates kept).

    Set names win over a file of the same name (pass ``./shapes-all`` for the file), so a
    name means the same set whatever the working directory holds.
    """
    if spec not in PROMPT_SETS:
        prompt_set_names()  # the name may be a plugin's
    if spec in PROMPT_SETS:
        prompts = PROMPT_SETS[spec]()
    else:
        path = Path(spec)
        if not path.is_file():
            raise EvalError(f"prompt set '{spec}': no such file, and not a built-in set (built-in: {', '.join(PROMPT_SETS) or 'none'})")
        text = _read_text(path)
        prompts = _parse_jsonl(text, path) if path.suffix == ".jsonl" else _parse_lines(text)
    if not prompts:
        raise EvalError(f"prompt set '{spec}' holds no prompts")
    return prompts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _parse_lines(text: str) -> list[str]:
    """One prompt a line; blank lines and ``#`` comment lines are skipped."""
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def _parse_jsonl(text: str, path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompts.append(_row_prompt(line, f"{path}:{number}"))
    return prompts


def _row_prompt(line: str, where: str) -> str:
    """The prompt of one JSONL row; ``where`` (file:line) goes into every error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise EvalError(f"{where}: expected a JSON object with a 'prompt' or 'caption' key")
    key = next((k for k in JSONL_KEYS if k in row), None)
    if key is None:
        raise EvalError(f"{where}: no 'prompt' or 'caption' key (keys: {', '.join(row) or 'none'})")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise EvalError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()
