"""What makes a training run one run: its identity, and which output folder it owns.

A run's *identity* is the resolved configuration that must stay the same for a resumed run to be
the continuation of the saved one: the objective and its hparams, the seed, the data (source and a
cheap fingerprint), the model and its LoRA shape, the global batch and the optimizer/learning-rate
schedule. It is saved with every checkpoint (``trainer_state.json``); a resume with a different
value is refused, naming the key and both values, unless the key is listed in
``train.resume_allow_changes``. Keys outside the identity (max_steps of a constant schedule,
checkpointing, logging, compile, memory options, processes x batch at equal global batch) may
change freely.

An output folder that already holds a run (checkpoints, metrics.jsonl, final/, config.yaml) is
only written into by a resume of that run; ``overwrite_output_dir=true`` moves it aside to
``OUTPUT_DIR.old-<time>`` (never deletes it).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from diffpo.checkpoint import CHECKPOINT_NAME

if TYPE_CHECKING:
    from diffpo.config import Config
    from diffpo.data import PairRecord

# The keys of a run's identity (``loss.<hparam>`` keys are added per objective). A key may be
# listed in train.resume_allow_changes to resume anyway.
IDENTITY_KEYS = (
    "loss.name", "seed",
    "data.source", "data.fingerprint", "data.format", "data.split", "data.columns", "data.ties", "data.resolution",
    "data.center_crop", "data.random_flip", "data.max_pairs", "data.cache",
    "model.pretrained", "model.family", "model.revision", "model.variant", "model.latent_sampling",
    "model.lora.enabled", "model.lora.rank", "model.lora.alpha", "model.lora.dropout", "model.lora.target_modules",
    "train.global_batch", "train.gradient_accumulation_steps", "train.learning_rate", "train.lr_scheduler", "train.lr_warmup_steps",
    "train.max_steps", "train.adam_beta1", "train.adam_beta2", "train.adam_weight_decay", "train.adam_epsilon",
    "train.use_8bit_adam", "train.adam_8bit_min_size", "train.max_grad_norm", "train.weight_dtype",
)  # fmt: skip

# Schedules whose learning rate depends on max_steps (for the others, max_steps may grow freely).
_DECAYING_SCHEDULES = ("linear", "cosine")

# What a run writes into its output folder; any of them means the folder holds a run.
_RUN_FILES = ("metrics.jsonl", "config.yaml", "final")


class RunFolderError(RuntimeError):
    """The output folder cannot be used for this run (holds another run, not writable, ...)."""


def is_identity_key(key: str) -> bool:
    return key in IDENTITY_KEYS or (key.startswith("loss.") and len(key) > len("loss."))


def data_fingerprint(records: Iterable[PairRecord]) -> str:
    """A cheap fingerprint of the pairs: their count, order, prompts and image references (paths,
    or the length of encoded bytes). Image contents are not read: a changed file behind the same
    path is not detected."""
    digest, count = hashlib.sha256(), 0
    for record in records:
        refs = [r if isinstance(r, str) else f"<{len(r)} bytes>" for r in (record.chosen, record.rejected)]
        digest.update("\x1f".join([record.prompt, *refs, record.rejected_prompt or ""]).encode() + b"\x1e")
        count += 1
    return f"{count} pairs, sha256 {digest.hexdigest()[:16]}"


def _source_identity(source: str) -> str:
    """Local data by absolute path (a resume from another working folder is the same data)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def run_identity(cfg: Config, num_processes: int, fingerprint: str) -> dict[str, Any]:
    """The identity of ``cfg`` run on ``num_processes`` processes over data with ``fingerprint``."""
    from diffpo.losses import get_loss

    model, lora, data, tc = cfg.model, cfg.model.lora, cfg.data, cfg.train
    use_lora = lora.enabled
    identity: dict[str, Any] = {
        "loss.name": cfg.loss.name,
        "seed": cfg.seed,
        "data.source": _source_identity(data.source),
        "data.fingerprint": fingerprint,
        "data.format": data.format,
        "data.split": data.split,
        "data.columns": dict(sorted(data.columns.items())),
        "data.ties": data.ties,
        "data.resolution": data.resolution,
        "data.center_crop": data.center_crop,
        "data.random_flip": data.random_flip,
        "data.max_pairs": data.max_pairs,
        "data.cache": _source_identity(data.cache) if data.cache else None,
        "model.pretrained": model.pretrained,
        "model.family": model.family,
        "model.revision": model.revision,
        "model.variant": model.variant,
        "model.latent_sampling": model.latent_sampling,
        "model.lora.enabled": use_lora,
        # The adapter's shape only matters when there is an adapter.
        "model.lora.rank": lora.rank if use_lora else None,
        "model.lora.alpha": lora.alpha if use_lora else None,
        "model.lora.dropout": lora.dropout if use_lora else None,
        "model.lora.target_modules": list(lora.target_modules) if use_lora else None,
        # processes x batch may be traded at equal global batch (pair-keyed noise, train.py)
        "train.global_batch": tc.batch_size * num_processes,
        "train.gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "train.learning_rate": tc.learning_rate,
        "train.lr_scheduler": tc.lr_scheduler,
        "train.lr_warmup_steps": tc.lr_warmup_steps,
        "train.max_steps": tc.max_steps if tc.lr_scheduler in _DECAYING_SCHEDULES else None,
        "train.adam_beta1": tc.adam_beta1,
        "train.adam_beta2": tc.adam_beta2,
        "train.adam_weight_decay": tc.adam_weight_decay,
        "train.adam_epsilon": tc.adam_epsilon,
        "train.use_8bit_adam": tc.use_8bit_adam,
        # which tensors have 8-bit moments (the optimizer state's layout); null at bitsandbytes'
        # default, so that the identity of a checkpoint written before this key matches (its
        # optimizer state still has to fit: bf16 masters moved to flat buckets on 2026-12-02)
        "train.adam_8bit_min_size": tc.adam_8bit_min_size if tc.use_8bit_adam and tc.adam_8bit_min_size != type(tc).adam_8bit_min_size else None,
        "train.max_grad_norm": tc.max_grad_norm,
        "train.weight_dtype": tc.weight_dtype,
    }
    for name, value in get_loss(cfg.loss.name).resolve_hparams(cfg.loss.hparams).items():
        identity[f"loss.{name}"] = value
    return identity


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs between a checkpoint's identity and this run's, in IDENTITY_KEYS
    order (loss.name first), then the objective's hparams."""
    keys = [k for k in IDENTITY_KEYS if k in saved or k in current]
    keys += sorted(k for k in {*saved, *current} if k not in IDENTITY_KEYS)
    changed = [k for k in keys if _normalize(saved.get(k)) != _normalize(current.get(k))]
    if "model.lora.enabled" in changed:  # LoRA <-> full: the adapter's shape keys change with it
        changed = [k for k in changed if not k.startswith("model.lora.") or k == "model.lora.enabled"]
    if "loss.name" in changed:  # another objective: its hparams are another set
        changed = [k for k in changed if not k.startswith("loss.") or k == "loss.name"]
    return changed


def _normalize(value: Any) -> Any:
    # JSON turns tuples into lists; ints and floats of equal value are equal
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def check_resume_identity(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    """Refuse to resume ``checkpoint`` when a key of the run's identity changed and is not in
    ``allowed``; returns the allowed changes (to log)."""
    if saved is None:
        raise RunFolderError(f"cannot resume {checkpoint}: it records no run identity (written by an older diffpo); start a new run")
    changes = identity_changes(saved, current)
    refused = [k for k in changes if k not in set(allowed)]
    if refused:
        key = refused[0]
        more = f" (also changed: {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise RunFolderError(
            f"cannot resume {checkpoint}: {key} was {saved.get(key)!r} there, {current.get(key)!r} in this run{more}; "
            f"resume with the same value, or list the key in train.resume_allow_changes to continue with the new one"
        )
    return changes


def run_contents(output_dir: Path) -> list[str]:
    """What of a run ``output_dir`` holds (checkpoints, their temporary folders, run files)."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in sorted(output_dir.iterdir()):
        name = child.name
        if name in _RUN_FILES or CHECKPOINT_NAME.match(name) or (name.startswith(".checkpoint-") and child.is_dir()):
            found.append(name + ("/" if child.is_dir() else ""))
    return found


def prepare_output_dir(output_dir: Path, resume_from: Path | None, overwrite: bool, asked_latest: bool = False) -> Path | None:
    """Make ``output_dir`` ready for this run (main process only); returns where an old run was
    moved, if one was.

    - Resuming a checkpoint of ``output_dir``: checkpoints *after* it (and final/, which is theirs)
      belong to an abandoned continuation: they move to ``OUTPUT_DIR/superseded-<time>/`` so that
      neither ``resume=latest`` nor pruning ever picks them.
    - ``resume=latest`` without a complete checkpoint, in a folder whose run saved nothing (no
      ``checkpoint-N/``, no ``final/``: it was killed before its first save completed): start over.
    - Otherwise the folder must not hold a run; ``overwrite`` renames it to ``OUTPUT_DIR.old-<time>``.
    """
    if resume_from is not None and output_dir.is_dir() and resume_from.resolve().parent == output_dir.resolve():
        _supersede_later(output_dir, _step_of(resume_from))
        return None
    contents = run_contents(output_dir)
    if asked_latest and not any(CHECKPOINT_NAME.match(c.rstrip("/")) or c == "final/" for c in contents):
        return None
    if contents:
        if not overwrite:
            shown = ", ".join(contents[:4]) + (f" and {len(contents) - 4} more" if len(contents) > 4 else "")
            hint = " and no complete checkpoint to resume" if asked_latest else ""
            raise RunFolderError(
                f"output_dir {output_dir} holds another run ({shown}){hint}; continue it with train.resume=latest, "
                f"choose another output_dir, or set overwrite_output_dir=true to move it to {output_dir}.old-<time>"
            )
        moved = output_dir.with_name(f"{output_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        suffix = 1
        while moved.exists():
            moved, suffix = moved.with_name(f"{output_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"), suffix + 1
        try:
            output_dir.rename(moved)
        except OSError as err:
            raise RunFolderError(f"overwrite_output_dir: cannot move {output_dir} to {moved}: {err.strerror or err}") from None
        output_dir.mkdir(parents=True)
        return moved
    return None


def _step_of(checkpoint: Path) -> int:
    match = CHECKPOINT_NAME.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def _supersede_later(output_dir: Path, step: int) -> None:
    later = [c for c in output_dir.iterdir() if _step_of(c) > step]
    if not later:
        return
    aside = output_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for path in later + ([output_dir / "final"] if (output_dir / "final").exists() else []):
        path.rename(aside / path.name)


def probe_writable(output_dir: Path) -> None:
    """Create ``output_dir`` and write, sync and remove a small file in it: a read-only or full
    folder stops the run here, before any model loads, with one line."""
    probe = output_dir / ".diffpo-write-probe"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"output_dir {output_dir} is not writable: {err.strerror or err}") from None
