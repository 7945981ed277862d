"""``diffpo cache``: VAE latents and text embeddings computed once, memory-mapped at training time.

    diffpo cache --config FILE data.center_crop=true [key=value ...] --out DIR [--shard-size N] [--flip-copies]
    diffpo train --config FILE data.cache=DIR

(the run takes the cache's centre crop from ``meta.json``; ``data.center_crop`` need not be repeated)

``DIR/meta.json`` records what the cache was made with (model, family, resolution, crop, latent
sampling, dtype, the pairs' count and a hash of their prompts and image references) and its shard
list; ``DIR/shard-00000.safetensors`` ... each hold a contiguous range of pair indices:

- ``latents_w``, ``latents_l``: the scaled VAE latent mode of the chosen / rejected image,
  centre-cropped at ``data.resolution`` (what ``PairDataset`` gives with ``data.center_crop``);
- ``std_w``, ``std_l`` when ``model.latent_sampling=sample``: the posterior's scaled standard
  deviation, so training still draws a fresh sample ``mode + std * randn`` every step;
- ``latents_w_flip`` ... (and ``std_*_flip``) with ``--flip-copies``: the same for the mirrored
  images, which ``data.random_flip`` then picks per (seed, epoch, index) as ``PairDataset`` does;
- ``cond.<key>``: every tensor of the family's ``encode_prompts`` (all encoders, pooled ones too).

Each shard is written to a temporary file and renamed, so an interrupted build leaves only
finished shards; running the same command again computes the missing ones only. Training checks
``meta.json`` against its config and refuses a cache made differently, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffpo.config import Config, ConfigError, flattened
from diffpo.data import DataError, PairDataset, PairRecord, collate_pairs, load_pair_records
from diffpo.options import add_command

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(DataError):
    """A cache that cannot be built or used with this config; the message names the field."""


def pairs_hash(records: list[PairRecord]) -> str:
    """sha256 over each pair's prompt and image references (paths, or a digest of image bytes)."""
    digest = hashlib.sha256()
    for record in records:
        refs = [ref if isinstance(ref, str) else "sha256:" + hashlib.sha256(ref).hexdigest() for ref in (record.chosen, record.rejected)]
        digest.update(json.dumps([record.prompt, *refs]).encode() + b"\n")
    return digest.hexdigest()


def expected_meta(cfg: Config, family: str, records: list[PairRecord]) -> dict:
    """What a cache for this config and these pairs must record (see ``check_meta``)."""
    return {
        "model.pretrained": cfg.model.pretrained,
        "model.family": family,
        "model.revision": cfg.model.revision,
        "model.variant": cfg.model.variant,
        "model.latent_sampling": cfg.model.latent_sampling,
        "data.resolution": cfg.data.resolution,
        "data.center_crop": cfg.data.center_crop,
        "num_pairs": len(records),
        "pairs_hash": pairs_hash(records),
    }


def shard_ranges(num_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_pairs)) for start in range(0, num_pairs, shard_size)]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, start: int, stop: int) -> None:
    """Atomically: a reader (or a resumed build) never sees half a shard."""
    from safetensors.torch import save_file

    tmp = path.with_name("." + path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"start": str(start), "stop": str(stop)})
    os.replace(tmp, path)


def _encode_batch(components, batch: dict, *, sample: bool, flip_copies: bool, device) -> dict[str, torch.Tensor]:
    family = components.family
    out = {f"cond.{key}": value for key, value in family.encode_prompts(components, batch["prompts"]).items()}
    for side in ("w", "l"):
        pixels = batch[f"pixels_{side}"].to(device)
        views = {"": pixels, "_flip": pixels.flip(-1)} if flip_copies else {"": pixels}
        for suffix, view in views.items():
            mode, std = family.encode_image_moments(components, view)
            out[f"latents_{side}{suffix}"] = mode
            if sample and std is not None:
                out[f"std_{side}{suffix}"] = std
    return out


def build_cache(
    cfg: Config,
    out_dir: str | Path,
    *,
    shard_size: int = 256,
    flip_copies: bool = False,
    progress: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path | None = None,
) -> Path:
    """Encode every pair of ``cfg.data`` with ``cfg.model`` into ``out_dir``; returns its meta.json.

    Finished shards of an earlier, interrupted run with the same settings are kept.
    ``cache_dir`` is where ``tiny:`` models are built (as in ``train``).
    """
    from tqdm.auto import tqdm

    from diffpo.models import load_components, resolve_family

    if not cfg.data.center_crop:
        raise CacheError("data.center_crop: must be true to build a cache (it stores one crop per image; random crops would be frozen at build time)")
    if dtype not in DTYPES:
        raise CacheError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size <= 0:
        raise CacheError(f"shard size must be positive, got {shard_size}")
    out_dir = Path(out_dir)
    records, report = load_pair_records(cfg.data, seed=cfg.seed)
    logger.info(report.summary())
    _, family = resolve_family(cfg.model, cache_dir)
    ranges = shard_ranges(len(records), shard_size)
    meta = {
        "version": CACHE_VERSION,
        **expected_meta(cfg, family, records),
        "data.source": cfg.data.source,
        "flip_copies": flip_copies,
        "dtype": dtype,
        "shard_size": shard_size,
        "shards": [{"file": shard_name(i), "start": a, "stop": b} for i, (a, b) in enumerate(ranges)],
    }
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():  # resuming: the finished shards must have been made the same way
        old = json.loads(meta_path.read_text())
        changed = sorted(k for k in set(old) | set(meta) if k not in ("complete", "shards") and old.get(k) != meta.get(k))
        if changed:
            raise CacheError(
                f"{out_dir} holds a cache made with other settings ({', '.join(f'{k}: {old.get(k)!r} there, {meta.get(k)!r} now' for k in changed)}); "
                "delete it or choose another --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(meta_path, {**meta, "complete": False})

    todo = [i for i in range(len(ranges)) if not (out_dir / shard_name(i)).is_file()]
    if todo:
        components = load_components(cfg.model, cache_dir=cache_dir)
        for module in components.frozen_modules():
            module.to(device)
        dataset = PairDataset(records, cfg.data.resolution, center_crop=True, random_flip=False, seed=cfg.seed)
        done = sum(b - a for i, (a, b) in enumerate(ranges) if i not in todo)
        bar = tqdm(total=len(records), initial=done, unit="pair", desc="cache", disable=not progress)
        sample = cfg.model.latent_sampling == "sample"
        for i in todo:
            start, stop = ranges[i]
            parts: dict[str, list[torch.Tensor]] = {}
            for first in range(start, stop, batch_size):
                batch = collate_pairs([dataset[j] for j in range(first, min(first + batch_size, stop))])
                with torch.no_grad():
                    encoded = _encode_batch(components, batch, sample=sample, flip_copies=flip_copies, device=device)
                for key, value in encoded.items():
                    parts.setdefault(key, []).append(value.to("cpu", DTYPES[dtype]))
                bar.update(len(batch["prompts"]))
            tensors = {key: torch.cat(values).contiguous() for key, values in parts.items()}
            _write_shard(tensors, out_dir / shard_name(i), start, stop)
        bar.close()
    _write_json(meta_path, {**meta, "complete": True})
    return meta_path


# ----------------------------------------------------------------------------------------------
# Training from a cache
# ----------------------------------------------------------------------------------------------


def check_meta(cache: str | Path, cfg: Config, family: str, records: list[PairRecord]) -> dict:
    """Read ``cache/meta.json`` and refuse it unless it was made for this config and these pairs.

    The cache's preprocessing that the config cannot change (its centre crop) is adopted into
    ``cfg.data``; everything else must match.
    """
    meta_path = Path(cache) / "meta.json"
    if not meta_path.is_file():
        raise CacheError(f"data.cache: {meta_path} not found (build the cache with `diffpo cache`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"data.cache: {cache} has cache version {meta.get('version')}, this diffpo reads {CACHE_VERSION}; rebuild it")
    if not meta.get("complete"):
        raise CacheError(f"data.cache: {cache} is incomplete (its build was interrupted); run the same `diffpo cache` command again to finish it")
    if meta.get("data.center_crop") and not cfg.data.center_crop:
        # The crop was fixed when the cache was built (always the centre: ``build_cache`` refuses
        # random crops), so a run from the cache uses it whatever the config says; the config need
        # not repeat data.center_crop=true, and the run's config.yaml records the crop it used.
        logger.info("data.cache: %s holds centre crops; training uses them (data.center_crop=true)", cache)
        cfg.data.center_crop = True
    for key, value in expected_meta(cfg, family, records).items():
        if meta.get(key) != value:
            what = "the pair list" if key in ("num_pairs", "pairs_hash") else "the config"
            raise CacheError(f"data.cache: {cache} was built with {key}={meta.get(key)!r}, but {what} has {key}={value!r}; rebuild the cache or change the config")
    if cfg.data.random_flip and not meta["flip_copies"]:
        raise CacheError(f"data.random_flip: {cache} has no flipped copies; set data.random_flip=false or rebuild with `diffpo cache --flip-copies`")
    return meta


class CachedPairDataset(Dataset):
    """Yields ``{"latents_w", "latents_l", ["std_w", "std_l"], "cond", "index"}`` from a cache.

    Shards are opened lazily with ``safe_open`` (memory-mapped; each worker opens its own) and
    only the requested pair is copied out. The flip decision is ``PairDataset``'s with a centre
    crop: the same (seed, epoch, index) picks the same flip in both.
    """

    def __init__(self, cache: str | Path, meta: dict, *, random_flip: bool, seed: int = 0):
        self.root = Path(cache)
        self.shards = meta["shards"]
        self.shard_size = meta["shard_size"]
        self.size = meta["num_pairs"]
        self.random_flip = random_flip
        self.seed = seed
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.size

    def __getstate__(self):  # open handles stay with their process
        return {**self.__dict__, "_handles": {}}

    def _shard(self, i: int):
        if i not in self._handles:
            from safetensors import safe_open

            self._handles[i] = safe_open(str(self.root / self.shards[i]["file"]), framework="pt")
        return self._handles[i]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)  # the trainer's sampler gives (epoch, index)
        i = index // self.shard_size
        shard, row = self._shard(i), index - self.shards[i]["start"]
        flip = self.random_flip and bool(np.random.default_rng([self.seed, epoch, index]).random() < 0.5)
        suffix = "_flip" if flip else ""
        item = {"cond": {}, "index": index}
        for key in shard.keys():
            if key.startswith("cond."):
                item["cond"][key[5:]] = shard.get_slice(key)[row : row + 1][0]
            elif key.endswith(("_w", "_l") if not flip else ("_w_flip", "_l_flip")):
                item[key.removesuffix(suffix)] = shard.get_slice(key)[row : row + 1][0]
        return item


def collate_cached(items: list[dict]) -> dict:
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0] if key not in ("cond", "index")}
    batch["cond"] = {key: torch.stack([it["cond"][key] for it in items]) for key in items[0]["cond"]}
    batch["indices"] = torch.tensor([it["index"] for it in items])
    return batch


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CacheOptions:
    """``diffpo cache``: the training ``Config`` (its model and data sections are used, its keys at
    the top level) and how to build the cache."""

    out: Path
    """Cache folder (an interrupted build there is resumed)."""
    config: Config = flattened(Config)
    shard_size: int = 256
    """Pairs per safetensors shard."""
    flip_copies: bool = False
    """Also store latents of the mirrored images (needed for data.random_flip)."""
    batch_size: int = 8
    """Pairs encoded at once."""
    device: str = field(default_factory=_default_device)
    """Torch device for the VAE and text encoders (cuda when there is one)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Stored tensor dtype (float16/bfloat16 halve the size)."""

    def __post_init__(self):
        if not self.config.data.center_crop:
            raise CacheError("data.center_crop: must be true to build a cache (it stores one crop per image; random crops would be frozen at build time)")
        for key in ("shard_size", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")


def cmd_cache(o: CacheOptions) -> int:
    meta_path = build_cache(
        o.config, o.out, shard_size=o.shard_size, flip_copies=o.flip_copies, batch_size=o.batch_size,
        device=o.device, dtype=o.dtype, progress=o.config.logging.progress,
    )
    meta = json.loads(meta_path.read_text())
    print(f"{meta['num_pairs']} pairs cached in {len(meta['shards'])} shard(s) under {o.out}; train with: diffpo train --config FILE data.cache={o.out}")
    return 0


def register_cli(sub) -> None:
    add_command(sub, "cache", CacheOptions, cmd_cache, help="precompute VAE latents and text embeddings for training",
                description="Precompute VAE latents and text embeddings for training: the training config's keys (a YAML "
                "file, overrides or the flags below) say which model and pairs; the other flags how to build the cache.")
