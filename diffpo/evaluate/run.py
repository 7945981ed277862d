"""Compare a fine-tuned model with its base model on the same prompts and the same seeds.

Image ``j`` of every prompt is sampled with seed ``seed + j`` by both models, so each tuned image
has a base twin that started from the same noise; the paired statistics of
``diffpo.evaluate.stats`` then measure the fine-tuning and not the luck of the draw.

    base, tuned = load_tuned("runwayml/stable-diffusion-v1-5", lora="runs/mapo/final")
    results = evaluate_models(base, tuned, prompts, images_per_prompt=4, seed=0,
                              scorers={"pickscore": load_scorer("pickscore")}, sampler={}, out_dir=out)
    write_report(results, out)

Images are saved under ``out_dir/images`` with a ``generation.json`` describing what made them
(models and their weight files, prompts, seeds, sampler settings); a later call with the same
description reuses them, so scorers can be added or re-run without sampling again.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from diffpo.config import ModelConfig
from diffpo.evaluate.grid import save_comparison_grid
from diffpo.evaluate.scorers import Scorer
from diffpo.evaluate.stats import summarize
from diffpo.models import Components, Family, load_components
from diffpo.image_cache import ImageCache
from diffpo.sampling import SamplerSettings, SamplingError, generate, iter_generate, resolve_settings

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """An evaluation input is wrong (prompts, weights, scorer, settings); the message names it."""


SAMPLER_DEFAULTS: dict[str, Any] = {**SamplerSettings().as_dict(), "batch_size": 64}
"""What an evaluation's ``sampler`` may set: ``diffpo.sampling.SamplerSettings`` (None = the
family's default, resolved before sampling and recorded) and the batch size."""
NOT_IN_KEY = ("batch_size", "cpu_offload", "vae_slicing")
"""Settings that do not change the images (each has its own seed; offload and slicing only move
or split work), so changing them still reuses saved images."""

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CHECKPOINT_WEIGHTS = "model.safetensors"
ADAPTER = "tuned"
FINGERPRINT = "weights_fingerprint"
"""``Components.extras`` key: sizes and mtimes of the weight files, so reused images match them."""
SCORE_CHUNK = 256
"""Images scored per call; bounds memory when images are read back from disk."""
GRID_PROMPTS, GRID_PER_PROMPT = 8, 4
"""Size of ``grid.png``: the first prompts, and the first images (seeds) of each."""


# ----------------------------------------------------------------------------------- loading


def load_tuned(
    base_model: str,
    *,
    lora: str | Path | None = None,
    checkpoint: str | Path | None = None,
    tuned_model: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[Components, Components]:
    """Load the base model and the tuned model; exactly one of the three sources must be given.

    ``lora``: a diffusers LoRA (a training run's ``final/`` folder, the run folder itself, or the
    ``.safetensors`` file). ``checkpoint``: a ``checkpoint-N`` folder of ``diffpo train`` (the
    whole network, with peft LoRA keys when LoRA was trained). ``tuned_model``: a full pipeline
    (local folder or hub id), e.g. the ``final/`` of a full fine-tune. LoRA and checkpoints are
    applied to a copy of the base network; the text encoders and VAE are shared.
    """
    given = [name for name, value in (("lora", lora), ("checkpoint", checkpoint), ("tuned_model", tuned_model)) if value is not None]
    if len(given) != 1:
        raise EvalError(f"give exactly one of lora, checkpoint, tuned_model (got {', '.join(given) or 'none'})")
    base = load_components(ModelConfig(pretrained=base_model), cache_dir=cache_dir)
    base.extras[FINGERPRINT] = _fingerprint(Path(base.source))
    if tuned_model is not None:
        tuned = load_components(ModelConfig(pretrained=tuned_model), cache_dir=cache_dir)
        if tuned.family.name != base.family.name:
            raise EvalError(f"tuned model '{tuned_model}' is family '{tuned.family.name}', base '{base_model}' is '{base.family.name}'")
        tuned.extras[FINGERPRINT] = _fingerprint(Path(tuned.source))
        return base, tuned
    network = copy.deepcopy(base.network)
    if lora is not None:
        weights = _apply_lora(network, base.family, Path(lora))
        source = f"{base.source} + LoRA {weights}"
    else:
        weights = _apply_checkpoint(network, Path(checkpoint))
        source = f"{base.source} + checkpoint {weights}"
    tuned = replace(base, network=network, source=source, extras={**base.extras, FINGERPRINT: _fingerprint(weights)})
    return base, tuned


def _fingerprint(path: Path) -> list[list[Any]] | None:
    """(relative path, size, mtime) of every file under ``path``; None for a hub id.

    Cheap, unlike hashing gigabytes of weights, and enough to notice retrained weights.
    """
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _lora_file(path: Path) -> Path:
    """The LoRA weights file meant by ``path``: the file, ``final/`` of a run, or a folder's default file."""
    if not path.exists():
        raise EvalError(f"LoRA not found: {path}")
    if (path / "final").is_dir():
        path = path / "final"
    if path.is_file():
        return path
    if (path / "model_index.json").is_file():
        raise EvalError(f"{path} is a full pipeline folder, not a LoRA; pass it as the tuned model (--tuned-model)")
    if not (path / LORA_WEIGHTS).is_file():
        raise EvalError(f"{path}: no {LORA_WEIGHTS} (expected a training run's final/ folder or a LoRA .safetensors file)")
    return path / LORA_WEIGHTS


def _run_lora_config(run_dir: Path) -> dict[str, Any] | None:
    """peft LoraConfig arguments from ``run_dir/config.yaml`` of ``diffpo train``, if there is one.

    The diffusers LoRA format stores no alpha unless adapter metadata was saved, and loaders
    then assume alpha = rank; a run trained with another alpha would be evaluated at the wrong
    strength. The run's config records the alpha it trained with.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    lora = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("lora")
    if not lora or not lora.get("enabled", True):
        return None
    return {"r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]), "target_modules": list(lora["target_modules"])}


def _apply_lora(network: torch.nn.Module, family: Family, path: Path) -> Path:
    """Load a diffusers-format LoRA into ``network`` as adapter ``ADAPTER``; return the weights file."""
    from safetensors.torch import load_file

    weights = _lora_file(path)
    prefix = family.lora_prefix_argument.removesuffix("_lora_layers")  # unet_lora_layers -> keys "unet.*"
    in_run = weights.parent.name == "final"  # OUTPUT_DIR/final/ of diffpo train, config.yaml in OUTPUT_DIR
    config = _run_lora_config(weights.parent.parent) if in_run else None
    try:
        if config is None:  # diffusers reads the file's adapter metadata, if any
            network.load_lora_adapter(str(weights.parent), weight_name=weights.name, prefix=prefix, adapter_name=ADAPTER)
        else:  # metadata is only honoured with a state dict (a file's own metadata would replace it)
            metadata = {f"{prefix}.{key}": value for key, value in config.items()}
            network.load_lora_adapter(load_file(weights), prefix=prefix, adapter_name=ADAPTER, metadata=metadata)
    except (OSError, RuntimeError, ValueError) as err:
        raise EvalError(f"cannot load LoRA {weights}: {_first_line(err)}") from err
    if ADAPTER not in getattr(network, "peft_config", {}):
        raise EvalError(f"{weights} holds no LoRA weights for this model (no keys start with '{prefix}.')")
    return weights


def _apply_checkpoint(network: torch.nn.Module, checkpoint: Path) -> Path:
    """Load a training checkpoint's network state, adding the LoRA adapter it holds first."""
    from safetensors.torch import load_file

    weights = checkpoint / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise EvalError(f"checkpoint {checkpoint}: no {CHECKPOINT_WEIGHTS} (expected a checkpoint-N folder of diffpo train)")
    state = load_file(weights)
    lora_a = {key: value for key, value in state.items() if ".lora_A." in key}
    if lora_a:
        _add_adapter_like(network, lora_a, _run_lora_config(checkpoint.parent), weights)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EvalError(f"{weights} does not fit the base model's network: {_first_line(err)}") from err
    return weights


def _add_adapter_like(network: torch.nn.Module, lora_a: Mapping[str, torch.Tensor], run_config: dict[str, Any] | None, weights: Path) -> None:
    """Add the peft adapter whose ``lora_A`` weights are given: same modules, name and rank."""
    from peft import LoraConfig

    modules = sorted({key.split(".lora_A.")[0] for key in lora_a})
    names = {key.split(".lora_A.")[1].split(".")[0] for key in lora_a}
    ranks = {value.shape[0] for value in lora_a.values()}
    if len(names) != 1 or len(ranks) != 1:
        raise EvalError(f"{weights}: expected one LoRA adapter of one rank, found adapters {sorted(names)} with ranks {sorted(ranks)}")
    rank = ranks.pop()
    if run_config is None:
        logger.warning("%s: no run config.yaml next to the checkpoint; assuming LoRA alpha = rank = %d", weights, rank)
        alpha = float(rank)
    elif run_config["r"] != rank:
        raise EvalError(f"{weights}: LoRA rank {rank}, but {weights.parent.parent / 'config.yaml'} says {run_config['r']}")
    else:
        alpha = run_config["lora_alpha"]
    network.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules), adapter_name=names.pop())


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# -------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Plan:
    """Which image is which: image ``k`` is image ``j`` of prompt ``i``, sampled with ``seed + j``."""

    prompts: list[str]
    images_per_prompt: int
    seed: int

    @property
    def slots(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(len(self.prompts)) for j in range(self.images_per_prompt)]

    @property
    def groups(self) -> list[int]:
        return [i for i, _ in self.slots]

    @property
    def flat_prompts(self) -> list[str]:
        return [self.prompts[i] for i, _ in self.slots]

    @property
    def seeds(self) -> list[int]:
        return [self.seed + j for _, j in self.slots]

    @property
    def names(self) -> list[str]:
        return [f"{i:04d}_{j:02d}.png" for i, j in self.slots]


def evaluate_models(
    base: Components,
    tuned: Components,
    prompts: Sequence[str],
    *,
    images_per_prompt: int,
    seed: int,
    scorers: Mapping[str, Scorer],
    sampler: Mapping[str, Any],
    out_dir: Path | None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    base_cache: ImageCache | None = None,
) -> dict[str, Any]:
    """Sample both models on every (prompt, seed), score every image, and summarise per scorer.

    ``sampler`` overrides ``SAMPLER_DEFAULTS``. With ``out_dir`` images are written to (or reused
    from) ``out_dir/images``; without it they stay in memory. ``base_cache`` (``diffpo.image_cache``)
    reads the base model's images from an earlier run with the same weights, prompts, seeds and
    settings (they do not depend on the fine-tuning) and stores the ones it makes. The result holds, per scorer,
    ``summarize(tuned, base, groups=prompt index)`` and the scorer's ``describe()``, plus the
    per-image scores under ``per_image`` (which ``write_report`` writes to ``scores.jsonl``).
    """
    if not prompts:
        raise EvalError("no prompts to evaluate")
    if images_per_prompt < 1:
        raise EvalError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    plan = _Plan(list(prompts), images_per_prompt, seed)
    settings = _sampler_settings(base, sampler)
    images_dir = Path(out_dir) / "images" if out_dir is not None else None
    images, reused = _images({"base": base, "tuned": tuned}, plan, settings, images_dir, device, progress, {"base": base_cache})

    flat_prompts, groups = plan.flat_prompts, plan.groups
    scores = {name: {label: _score(scorer, images[label], flat_prompts, name) for label in images} for name, scorer in scorers.items()}
    return {
        "models": {"base": base.source, "tuned": tuned.source},
        "num_prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "sampler": settings,
        "device": str(device),
        "images_dir": str(images_dir) if images_dir is not None else None,
        "reused_images": reused,
        "scorers": {
            name: {**summarize(s["tuned"], s["base"], groups=groups), "scorer": scorers[name].describe()} for name, s in scores.items()
        },
        "per_image": [
            {
                "prompt_index": group,
                "prompt": prompt,
                "seed": image_seed,
                "base": {name: s["base"][k] for name, s in scores.items()},
                "tuned": {name: s["tuned"][k] for name, s in scores.items()},
            }
            for k, (group, prompt, image_seed) in enumerate(zip(groups, flat_prompts, plan.seeds, strict=True))
        ],
    }


def _sampler_settings(base: Components, sampler: Mapping[str, Any]) -> dict[str, Any]:
    """``SAMPLER_DEFAULTS`` updated by ``sampler``, with the family's defaults filled in."""
    unknown = set(sampler) - set(SAMPLER_DEFAULTS)
    if unknown:
        raise EvalError(f"unknown sampler settings {sorted(unknown)}; valid: {', '.join(SAMPLER_DEFAULTS)}")
    settings = {**SAMPLER_DEFAULTS, **sampler}
    batch_size = settings.pop("batch_size")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    try:
        resolved = resolve_settings(base, settings)
    except SamplingError as err:
        raise EvalError(str(err)) from None
    return {**resolved.as_dict(), "batch_size": batch_size}


ImageRef = Image.Image | Path
"""An image in memory, or the file it was saved to (read back when scored)."""


def _images(
    models: Mapping[str, Components],
    plan: _Plan,
    settings: dict[str, Any],
    images_dir: Path | None,
    device: str | torch.device,
    progress: bool,
    caches: Mapping[str, ImageCache | None] | None = None,
) -> tuple[dict[str, list[ImageRef]], bool]:
    """Each model's images, generated or reused from ``images_dir``; and whether they were reused."""
    key = _generation_key(models, plan, settings)
    if images_dir is not None and _reusable(images_dir, key, list(models), plan.names):
        logger.info("reusing the images in %s (same models, prompts, seeds and sampler settings)", images_dir)
        return {label: [images_dir / label / name for name in plan.names] for label in models}, True

    if images_dir is not None:
        (images_dir / "generation.json").unlink(missing_ok=True)  # incomplete until rewritten below
    images = {}
    for label, components in models.items():
        paths = [images_dir / label / name for name in plan.names] if images_dir is not None else None
        images[label] = _generate(components, plan, settings, device, paths, f"generate {label}", progress, (caches or {}).get(label))
    if images_dir is not None:
        _write_index(images_dir, plan, list(models))
        _write_json(images_dir / "generation.json", key)
    return images, False


def _generation_key(models: Mapping[str, Components], plan: _Plan, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the images. Batch size is left out: each image has its own seed."""
    key = {
        "models": {label: {"source": c.source, "weights": c.extras.get(FINGERPRINT)} for label, c in models.items()},
        "prompts": plan.prompts,
        "images_per_prompt": plan.images_per_prompt,
        "seed": plan.seed,
        "sampler": {k: v for k, v in settings.items() if k not in NOT_IN_KEY},
    }
    return json.loads(json.dumps(key))  # tuples -> lists, as a reread file has them


def _reusable(images_dir: Path, key: dict[str, Any], labels: list[str], names: list[str]) -> bool:
    record = images_dir / "generation.json"
    if not record.is_file() or json.loads(record.read_text()) != key or not (images_dir / "index.jsonl").is_file():
        return False
    return all((images_dir / label / name).is_file() for label in labels for name in names)


def _generate(
    components: Components,
    plan: _Plan,
    settings: dict[str, Any],
    device: str | torch.device,
    paths: list[Path] | None,
    desc: str,
    progress: bool,
    cache: ImageCache | None = None,
) -> list[ImageRef]:
    """Sample in batches; with ``paths`` each batch is saved and dropped, bounding memory."""
    sample = {k: v for k, v in settings.items() if k != "batch_size"}
    if cache is not None:  # one batch of batches: the cache samples only what it lacks
        step = settings["batch_size"]
        batches = (
            generate(components, plan.flat_prompts[i : i + step], plan.seeds[i : i + step], settings=sample, batch_size=step, device=device, progress=False, cache=cache)
            for i in range(0, len(plan.seeds), step)
        )
    else:
        batches = iter_generate(components, plan.flat_prompts, plan.seeds, settings=sample, batch_size=settings["batch_size"], device=device, progress=False)
    out: list[ImageRef] = []
    with tqdm(total=len(plan.seeds), desc=desc, unit="img", disable=not progress) as bar:
        for images in batches:
            if paths is None:
                out.extend(images)
            else:
                for image, path in zip(images, paths[len(out) : len(out) + len(images)], strict=True):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    out.append(path)
            bar.update(len(images))
    return out


def _write_index(images_dir: Path, plan: _Plan, labels: list[str]) -> None:
    """``index.jsonl``: prompt, seed and each model's image path (relative to ``images_dir``)."""
    rows = (
        {"prompt_index": g, "prompt": p, "seed": s, **{label: f"{label}/{n}" for label in labels}}
        for p, s, g, n in zip(plan.flat_prompts, plan.seeds, plan.groups, plan.names, strict=True)
    )
    (images_dir / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_json(path: Path, data: Any) -> None:
    """Write through a temporary file, so a crash never leaves a half-written record."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------ scoring


def _open(ref: ImageRef) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    with Image.open(ref) as image:
        return image.convert("RGB")


def _score(scorer: Scorer, images: list[ImageRef], prompts: list[str], name: str) -> list[float]:
    """Scores in chunks of ``SCORE_CHUNK`` images, read from disk only as needed."""
    scores: list[float] = []
    for start in range(0, len(images), SCORE_CHUNK):
        chunk = [_open(ref) for ref in images[start : start + SCORE_CHUNK]]
        scores.extend(float(s) for s in scorer.score(chunk, prompts[start : start + SCORE_CHUNK]))
    if len(scores) != len(images):
        raise EvalError(f"scorer '{name}' returned {len(scores)} scores for {len(images)} images")
    return scores


# ------------------------------------------------------------------------------------- report


def write_report(results: Mapping[str, Any], out_dir: Path) -> None:
    """Write ``results.json`` (summary), ``scores.jsonl`` (per image), ``report.md`` and ``grid.png``.

    The grid is drawn from the saved images; results computed without an ``out_dir`` have none.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "results.json", {k: v for k, v in results.items() if k != "per_image"})
    (out_dir / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in results["per_image"]))
    (out_dir / "report.md").write_text(format_report(results))
    if results["images_dir"] is None:
        logger.info("no saved images, so no grid.png")
        return
    _write_grid(Path(results["images_dir"]), out_dir / "grid.png")


def _write_grid(images_dir: Path, path: Path) -> None:
    rows = [json.loads(line) for line in (images_dir / "index.jsonl").read_text().splitlines()]
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    groups = [group[:GRID_PER_PROMPT] for group in list(by_prompt.values())[:GRID_PROMPTS]]
    base = [[_open(images_dir / row["base"]) for row in group] for group in groups]
    tuned = [[_open(images_dir / row["tuned"]) for row in group] for group in groups]
    prompts = [group[0]["prompt"] for group in groups]
    save_comparison_grid(base, tuned, prompts, path, GRID_PROMPTS, GRID_PER_PROMPT, seeds=[row["seed"] for row in groups[0]])


def format_table(results: Mapping[str, Any]) -> str:
    """The markdown results table: one row per scorer."""
    lines = ["| scorer | base mean ± std | tuned mean ± std | win rate [95% CI] | n |", "| --- | --- | --- | --- | --- |"]
    for name, s in results["scorers"].items():
        low, high = s["win_rate_ci"]
        lines.append(
            f"| {name} | {s['mean_base']:.4g} ± {s['std_base']:.3g} | {s['mean_tuned']:.4g} ± {s['std_tuned']:.3g} "
            f"| {s['win_rate']:.3f} [{low:.3f}, {high:.3f}] | {s['n']} |"
        )
    return "\n".join(lines)


def format_report(results: Mapping[str, Any]) -> str:
    """``report.md``: the table, then what produced it (models, prompts, seeds, sampler, scorers)."""
    sampler = results["sampler"]
    resolution = sampler["resolution"] or "model default"
    options = [name for name in ("cpu_offload", "vae_tiling", "vae_slicing") if sampler.get(name)]
    prompt_set = f" from `{results['prompt_set']}`" if results.get("prompt_set") else ""
    lines = [
        "# diffpo eval: tuned vs base",
        "",
        format_table(results),
        "",
        "Win rate: fraction of (prompt, seed) pairs where the tuned model's image scores higher (ties count 0.5). "
        "The 95% CI is a percentile bootstrap that resamples whole prompts, since images of one prompt are correlated. "
        "Per-image scores: `scores.jsonl`.",
        "",
        "## Setup",
        "",
        f"- base model: `{results['models']['base']}`",
        f"- tuned model: `{results['models']['tuned']}`",
        f"- prompts: {results['num_prompts']}{prompt_set}, {results['images_per_prompt']} images each",
        f"- seeds: image j of every prompt uses seed {results['seed']} + j, for both models (identical initial noise)",
        f"- sampler: {sampler.get('scheduler') or 'ddim'}, {sampler['num_inference_steps']} steps, guidance {sampler['guidance_scale']}, "
        f"resolution {resolution}, batch size {sampler['batch_size']}, dtype {sampler.get('dtype') or 'as loaded'}, device {results['device']}"
        + (f", {', '.join(options)}" if options else ""),
        f"- images: `{results['images_dir']}`" + (" (reused from an earlier run)" if results["reused_images"] else ""),
        "",
        "## Scorers",
        "",
        *(f"- {name}: `{json.dumps(s['scorer'])}`" for name, s in results["scorers"].items()),
        "",
    ]
    if results["images_dir"] is not None:
        lines += ["## Samples (base row above tuned row, same seed per column)", "", "![base vs tuned](grid.png)", ""]
    return "\n".join(lines)
