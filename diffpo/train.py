"""The training loop on accelerate: errors -> loss -> backward -> step -> log -> checkpoint.

Read it top to bottom: ``pair_errors`` is the one place where the model runs; the ``setup_*``
steps (accelerator, data, run folder, model, optimizer), ``prepare`` and ``restore`` each do one
thing; ``train`` calls them in order, then runs one flat loop, then ``save_final``. Any registered objective trains without changes here: the loss spec
says whether the reference model is needed, and its ``metrics`` are logged as they come.

Reproducibility: noise, timesteps and VAE posterior samples come from CPU generators seeded by
(seed, optimizer step, the pair's place among the step's pairs), crops/flips by (seed, epoch, index), and data order by (seed, epoch); with
the optimizer/scheduler/RNG state restored by accelerate, a resumed run repeats an uninterrupted
one exactly.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from diffpo.data.cache import CachedPairDataset, check_meta, collate_cached
from diffpo.checkpoint import last_checkpoint_note, list_checkpoints, publish_dir, read_state, resolve_resume, save_checkpoint
from diffpo.config import Config, save_config
from diffpo.data import PairDataset, collate_pairs, load_pair_records
from diffpo.fastpath import MasterWeightAdamW, compile_network, find_master_optimizer, set_gradient_checkpointing, use_compile_cache, weights_finite_flag
from diffpo.geglu import allow_cached_autograd_functions, fuse_geglu
from diffpo.losses import LossSpec, get_loss
from diffpo.models import Components, Reference, add_lora, load_components, resolve_family, trainable_parameters
from diffpo.objectives import noise_pairs, per_sample_error, sample_latents, split_pairs
from diffpo.runs import check_resume_identity, data_fingerprint, prepare_output_dir, probe_writable, run_identity
from diffpo.validation import run_validation

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, too little data, ...)."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    skipped_steps: int
    seconds: float


class EpochSampler(Sampler[tuple[int, int]]):
    """A permutation that depends only on (seed, epoch): data order survives a resume.

    Yields ``(epoch, index)``: the datasets key their random crop and flip on it, so the epoch
    reaches DataLoader workers that persist across epochs (``persistent_workers``: a worker's copy
    of the dataset would never see an epoch set on it in the training process)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch, self.skip = size, seed, shuffle, 0, 0

    def begin_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch to yield next; its first ``skip`` indices (already trained on before a resume)
        are left out."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            order = list(range(self.size))
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        return ((self.epoch, index) for index in order[self.skip :])

    def __len__(self) -> int:
        return self.size  # a whole epoch's: the step arithmetic (micro_batches) counts in epochs


def pair_generators(seed: int, step: int, first_pair: int, count: int) -> list[torch.Generator]:
    """One CPU generator per pair, seeded by (seed, optimizer step, the pair's place among the
    step's pairs). A pair's noise, timestep and VAE sample then do not depend on how the step's
    pairs are split over processes and accumulation micro-steps."""
    states = [np.random.SeedSequence([seed, step, first_pair + i]).generate_state(1, dtype=np.uint64)[0] for i in range(count)]
    return [torch.Generator().manual_seed(int(state)) for state in states]


def pair_errors(
    components: Components,
    network: torch.nn.Module,
    batch: dict,
    generators: list[torch.Generator],
    reference: Reference | None,
    sample_vae: bool,
    autocast,
    loser_prompt: str = "pair",
) -> dict[str, torch.Tensor]:
    """Per-sample errors of the trained network (and of the reference when given) on one batch.

    One forward pass over the 2B inputs [winners; losers] with shared noise and timestep per pair.
    A batch from a latent cache (``diffpo.data.cache``) brings its latents and conditioning along.
    ``loser_prompt="rejected"`` conditions the losers on the batch's ``rejected_prompts``
    (DreamBooth's class prompts) instead of the pair's prompts.
    """
    family = components.family
    with torch.no_grad():
        if "cond" in batch:  # from the latent cache
            cond = batch["cond"]
            moments = {side: (batch[f"latents_{side}"], batch.get(f"std_{side}")) for side in "wl"}
        else:
            prompts = batch["prompts"] + (batch["rejected_prompts"] if loser_prompt == "rejected" else [])
            cond = family.encode_prompts(components, prompts)
            moments = {side: family.encode_image_moments(components, batch[f"pixels_{side}"]) for side in "wl"}
        draw = generators if sample_vae else None  # posterior sample, or its mode
        latents_w = sample_latents(*moments["w"], draw)
        latents_l = sample_latents(*moments["l"], draw)
    noised = noise_pairs(components.scheduler, latents_w, latents_l, generators)
    if loser_prompt != "rejected":  # one prompt per pair conditions both halves
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    prediction = family.predict(components, network, noised.noisy, noised.timesteps, cond)
    err_w, err_l = split_pairs(per_sample_error(prediction, noised.target))
    out = {"err_w": err_w, "err_l": err_l}
    if reference is not None:
        with torch.no_grad(), autocast(), reference.network(_unwrap(network)) as ref_net:
            ref_prediction = family.predict(components, ref_net, noised.noisy, noised.timesteps, cond)
        out["ref_w"], out["ref_l"] = split_pairs(per_sample_error(ref_prediction, noised.target))
    return out


def example_labels(batch: dict) -> dict[str, torch.Tensor]:
    """``desirable_w`` / ``desirable_l`` (bool, (B,)) of a batch of unpaired examples, two per row;
    empty for preference pairs. Losses with ``examples="unpaired"`` need them (``LossSpec``)."""
    return {key: batch[key] for key in ("desirable_w", "desirable_l") if key in batch}


def _mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Average logged metrics over processes (equal batch sizes: the global-batch means)."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), reduction="mean")
    return dict(zip(keys, values.tolist()))


def _unwrap(network):
    return getattr(network, "module", network)


def _all_processes(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every process (every rank must take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([flag], device=accelerator.device)).all())


def _weights_finite(params: list[torch.Tensor]) -> bool:
    """``weights_finite_flag`` read on the host (a single sync)."""
    return bool(weights_finite_flag(params))


def _gradient_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients, on the device (``clip_grad_norm_``'s norm,
    without its rescaling pass)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: what clip_grad_norm_ computes
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)  # its body, one device and dtype


def _host_rows(accelerator, values: list[torch.Tensor]) -> list[list[float]]:
    """Scalars of every process, read with one host sync (and one gather): one row per process."""
    local = torch.stack([v.detach().float().reshape(()).to(accelerator.device) for v in values]).unsqueeze(0)
    if accelerator.num_processes > 1:
        local = accelerator.gather(local)  # (processes, len(values))
    return local.tolist()


def _apply_optimizer_config(optimizer, lr_scheduler, tc) -> None:
    """After loading a checkpoint: the config's optimizer hparams and base learning rate, not the
    checkpoint's (equal unless allowed to change by train.resume_allow_changes; without this a
    changed learning rate would silently stay the old one)."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    scheduler.base_lrs = [tc.learning_rate for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=tc.learning_rate, lr=tc.learning_rate * factor(scheduler.last_epoch), betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon, weight_decay=tc.adam_weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = " ".join(part.strip() for part in text[:3]) if text else type(err).__name__
    return line[:limit] + ("..." if len(line) > limit else "")


def build_optimizer(params, cfg: Config, device: torch.device | str = "cpu"):
    """AdamW (fused kernel on CUDA: same math, one launch) or 8-bit AdamW (``train.use_8bit_adam``),
    over float32 masters of bf16 weights when ``train.weight_dtype=bf16``."""
    tc = cfg.train
    kwargs = dict(lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
    if tc.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401  (here, for a clear error when it is missing)
        except ImportError:
            raise TrainingError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        # built on first use (they subclass bitsandbytes' AdamW8bit, without its per-parameter waits)
        from diffpo.fastpath import AdamW8bit, MasterWeightAdamW8bit

        if tc.weight_dtype != "bf16":
            return AdamW8bit(params, min_8bit_size=tc.adam_8bit_min_size, **kwargs)
        if tc.adam_8bit_kernel == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise TrainingError(f"train.adam_8bit_kernel=triton runs on CUDA GPUs (device here: {device}); use train.adam_8bit_kernel=bitsandbytes")
        try:
            return MasterWeightAdamW8bit(params, min_8bit_size=tc.adam_8bit_min_size, kernel=tc.adam_8bit_kernel, **kwargs)
        except ImportError as err:
            raise TrainingError(str(err)) from None
    if tc.weight_dtype == "bf16":
        return MasterWeightAdamW(params, **kwargs)
    return torch.optim.AdamW(params, fused=torch.device(device).type == "cuda", **kwargs)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _append_metrics(path: Path, record: dict, output_dir: Path) -> None:
    try:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as err:
        raise TrainingError(f"could not append to {path}: {err.strerror or err}; {last_checkpoint_note(output_dir)}") from None


def _flat_config(cfg: Config) -> dict:
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(name, value)
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", cfg.to_dict())
    return flat


# ----------------------------------------------------------------------------------------------
# Setup: one named step each, in the order train() runs them. The benchmark harness
# (benchmarks/train_step.py) builds its trained network with make_trainable and setup_optimizer.
# ----------------------------------------------------------------------------------------------


@dataclass
class Data:
    records: list
    dataset: PairDataset | CachedPairDataset
    sampler: EpochSampler
    dataloader: DataLoader
    cache_meta: dict | None
    global_batch: int


@dataclass
class Run:
    identity: dict
    resume_from: Path | None


@dataclass
class Model:
    components: Components
    network: torch.nn.Module
    reference: Reference | None
    use_lora: bool


@dataclass
class Optim:
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object


def setup_accelerator(cfg: Config):
    """The Accelerator, seeded, after the checks that depend on its distributed type."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, GradientAccumulationPlugin, ProjectConfiguration, set_seed

    tc, output_dir = cfg.train, Path(cfg.output_dir)
    # Still needed: accelerate keeps one AcceleratorState per process, and a second Accelerator
    # with another mixed_precision raises "AcceleratorState has already been initialized and
    # cannot be changed" (checked with accelerate 1.x). Runs share a process in the test suite, a
    # notebook and the toy comparison. The distributed part (PartialState: ranks, process group) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Windows may span epochs: the step count must not depend on where an epoch ends.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=tc.gradient_accumulation_steps, sync_with_dataloader=False),
        mixed_precision=tc.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # batches go to the GPU without a host wait (from pinned memory, setup_data): the loop fetches
        # the next batch while the device still runs the current step
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # DDP (nothing else reads it): at each synchronizing backward the gradients become views of its
        # all-reduce buckets instead of being copied back out of them (PyTorch's DistributedDataParallel
        # docs): with one micro-step per step no second copy of the gradients (4.8 GiB of bf16 for
        # SDXL). Accumulation micro-steps before the last (no_sync) still build fresh gradients beside
        # the buckets: the optimizer drops the gradients after every step.
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    set_seed(cfg.seed)
    torch.backends.cudnn.benchmark = tc.cudnn_benchmark  # process-wide: set for every run, also back to off
    if accelerator.distributed_type == DistributedType.FSDP and cfg.model.lora.enabled:
        raise TrainingError("LoRA under FSDP is not supported (adapters are small: train LoRA with DDP, configs/accelerate/ddp.yaml)")
    if tc.weight_dtype == "bf16" and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise TrainingError(
            "train.weight_dtype=bf16 is for single-GPU and DDP runs: FSDP and DeepSpeed keep their own float32 "
            "master shards; use mixed_precision bf16 in their accelerate config instead"
        )
    return accelerator


def setup_data(cfg: Config, accelerator, spec: LossSpec, cache_dir: Path | None = None) -> Data:
    """The pairs (checked against what the loss needs), the latent cache's metadata, and the
    data loader. Runs before any model loads: bad data stops the run early. Nothing here draws
    from the global RNG (setup_model seeds it again anyway)."""
    tc = cfg.train
    records, report = load_pair_records(cfg.data, seed=cfg.seed)
    if accelerator.is_main_process:
        logger.info(report.summary())
    unpaired = records[0].labels is not None
    if spec.examples == "unpaired" and not unpaired:
        raise TrainingError(
            f"{cfg.data.source}: loss '{spec.name}' learns from unpaired examples (single images labelled desirable or not) and this "
            "source holds preference pairs; set data.unpaired=true to split each pair (chosen desirable, rejected not), or use a "
            "source in the unpaired format (README, Data formats)"
        )
    if spec.examples == "pairs" and unpaired:
        raise TrainingError(f"{cfg.data.source}: loss '{spec.name}' needs preference pairs, and this data is unpaired examples (data.format or data.unpaired); use loss.name=kto, or a pair source")
    if spec.loser_prompt == "rejected" and cfg.data.cache:
        raise TrainingError(f"data.cache: loss '{spec.name}' conditions the second image of a row on its own prompt, and the latent cache holds one prompt per row; train without data.cache")
    if spec.loser_prompt == "rejected" and (missing := [r.row for r in records if r.rejected_prompt is None]):
        raise TrainingError(f"{cfg.data.source}, row {missing[0]}: loss '{spec.name}' conditions the rejected image on the pair's rejected_prompt (the class prompt), and {len(missing)} pair(s) have none; build the pairs with `diffpo pairs from-images --rejected-prompts`")
    global_batch = tc.batch_size * accelerator.num_processes
    if len(records) < global_batch:
        raise TrainingError(f"{cfg.data.source}: {len(records)} usable pairs, fewer than one global batch ({global_batch})")
    cache_meta = check_meta(cfg.data.cache, cfg, resolve_family(cfg.model, cache_dir)[1], records) if cfg.data.cache else None
    if cache_meta is not None:
        dataset, collate = CachedPairDataset(cfg.data.cache, cache_meta, random_flip=cfg.data.random_flip, seed=cfg.seed), collate_cached
    else:
        dataset, collate = PairDataset(records, cfg.data.resolution, center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip, seed=cfg.seed), collate_pairs
    sampler = EpochSampler(len(dataset), cfg.seed)
    # persistent workers: re-spawning them at every epoch stalled the first step of each epoch
    # (0.3-0.5 s on SDXL, issue 16); the sampler hands them the epoch
    dataloader = DataLoader(
        dataset, batch_size=tc.batch_size, sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0, drop_last=True, pin_memory=accelerator.device.type == "cuda",
        # its own generator for the workers' base seed: a new pass over the data (each epoch without
        # workers) would otherwise draw from the global RNG, which checkpoints save and a resume
        # restores, so a resumed run would draw once more than the uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return Data(records, dataset, sampler, dataloader, cache_meta, global_batch)


def setup_run(cfg: Config, accelerator, records: list) -> Run:
    """Which checkpoint continues, whether it is this run (its identity), and whether the output
    folder is ours and writable: all settled before any model loads (diffpo.runs)."""
    tc, output_dir = cfg.train, Path(cfg.output_dir)
    identity = run_identity(cfg, accelerator.num_processes, data_fingerprint(records))
    resume_from = resolve_resume(tc.resume, output_dir)
    if resume_from is not None:
        changed = check_resume_identity(resume_from, read_state(resume_from).get("identity"), identity, tc.resume_allow_changes)
        for key in changed:
            logger.warning("resuming %s with %s changed (train.resume_allow_changes): the run no longer equals an uninterrupted one", resume_from, key)
    elif tc.resume == "latest":
        logger.info("train.resume=latest: no complete checkpoint in %s, starting fresh", output_dir)
    if accelerator.is_main_process:
        moved = prepare_output_dir(output_dir, resume_from, cfg.overwrite_output_dir, asked_latest=tc.resume == "latest")
        if moved is not None:
            logger.warning("overwrite_output_dir: moved the run that was in %s to %s", output_dir, moved)
        probe_writable(output_dir)
    accelerator.wait_for_everyone()
    return Run(identity, resume_from)


def setup_model(cfg: Config, accelerator, spec: LossSpec, cache_meta: dict | None, cache_dir: Path | None = None) -> Model:
    """Load the model, make it trainable, compile it. With a latent cache the VAE and text
    encoders are not loaded (validation sampling needs them)."""
    from accelerate.utils import set_seed

    components = load_components(cfg.model, cache_dir=cache_dir, with_encoders=cache_meta is None or cfg.logging.validation_every > 0)
    set_seed(cfg.seed)  # adapter init must not depend on what loading consumed from the RNG
    model = make_trainable(components, cfg, spec, accelerator.device)
    if cfg.train.compile != "none":
        use_compile_cache(cfg.train.compile_cache_dir)
    compile_model(model, cfg.train.compile, cfg.train.compile_options, cfg.train.compile_dynamic)
    return model


def make_trainable(components: Components, cfg: Config, spec: LossSpec, device: torch.device | str) -> Model:
    """LoRA adapters or every weight trained, the reference when the loss needs one, and the
    dtypes: frozen parts in the compute dtype, trained weights float32 (or bf16 with float32
    masters in the optimizer, ``train.weight_dtype=bf16``)."""
    tc, network, use_lora = cfg.train, components.network, cfg.model.lora.enabled
    if use_lora:
        add_lora(network, cfg.model.lora)
    else:
        network.requires_grad_(True)
    try:
        set_gradient_checkpointing(network, cfg.model.gradient_checkpointing)
    except ValueError as err:  # a module name that is not in this network
        raise TrainingError(str(err)) from None
    if tc.fused_geglu:
        fused = fuse_geglu(network)
        logger.info("train.fused_geglu: %d GEGLU activations with the one-pass backward", len(fused))
        if fused:
            allow_cached_autograd_functions()  # else every run re-traces the blocks (27.7 vs 14.1 s warm first step)
    network.train()
    reference = Reference(network, use_lora) if spec.needs_reference else None
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
    for module in components.frozen_modules():
        module.to(device, dtype=weight_dtype)
    if reference is not None and reference.frozen is not None:
        reference.frozen.to(device, dtype=weight_dtype)
    if tc.weight_dtype == "bf16":
        # The float32 masters are made from the weights where they will live (the device).
        network.to(device, dtype=torch.bfloat16)
    if tc.channels_last:
        network.to(memory_format=torch.channels_last)
    return Model(components, network, reference, use_lora)


def compile_model(model: Model, mode: str, options: dict | None = None, dynamic: bool | None = None) -> None:
    """torch.compile (``train.compile``, ``train.compile_options``, ``train.compile_dynamic``) of the trained network and a
    frozen reference copy; ``regional`` compiles the blocks the family declares (``Family.compile_blocks``)."""
    blocks = model.components.family.compile_blocks
    try:
        compile_network(_unwrap(model.network), mode, blocks, options, dynamic)
        if model.reference is not None and model.reference.frozen is not None:
            compile_network(model.reference.frozen, mode, blocks, options, dynamic)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def setup_optimizer(cfg: Config, network: torch.nn.Module, device: torch.device | str, num_processes: int = 1) -> Optim:
    """The optimizer over the trained parameters and its learning-rate schedule (stepped once per
    process and optimizer step by accelerate, hence the factor)."""
    from diffusers.optimization import get_scheduler

    tc = cfg.train
    params = trainable_parameters(network)
    optimizer = build_optimizer(params, cfg, device)
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer=optimizer, num_warmup_steps=tc.lr_warmup_steps * num_processes, num_training_steps=tc.max_steps * num_processes)
    return Optim(params, optimizer, lr_scheduler)


def prepare(accelerator, model: Model, optim: Optim, data: Data) -> None:
    """Wrap network, optimizer, loader and schedule for the distributed setup (in place)."""
    model.network, optim.optimizer, data.dataloader, optim.lr_scheduler = accelerator.prepare(model.network, optim.optimizer, data.dataloader, optim.lr_scheduler)
    # FSDP2 replaces the parameters by sharded DTensors: clip (and count) the prepared ones
    optim.params = trainable_parameters(model.network)


def restore(cfg: Config, accelerator, resume_from: Path | None, optim: Optim) -> tuple[int, int]:
    """Resume: model/optimizer/scheduler/RNG state from the checkpoint; returns (step, skipped steps)."""
    if resume_from is None:
        return 0, 0
    state = read_state(resume_from)
    try:
        accelerator.load_state(str(resume_from))
    except (RuntimeError, KeyError, ValueError) as err:  # another LoRA rank, LoRA vs full, another model
        raise TrainingError(f"cannot resume {resume_from}: its saved state does not fit this run's model or optimizer ({_first_line(err)})") from None
    _apply_optimizer_config(optim.optimizer, optim.lr_scheduler, cfg.train)
    if not _all_processes(accelerator, _weights_finite(optim.params)):
        raise TrainingError(f"cannot resume {resume_from}: it holds non-finite weights; resume an earlier checkpoint")
    logger.info("resumed from %s at step %d", resume_from, state["step"])
    return state["step"], state["skipped_steps"]


def start_logging(cfg: Config, accelerator, resume_from: Path | None, step: int) -> Path:
    """config.yaml, metrics.jsonl (cut back to the checkpoint's step on resume) and the trackers."""
    output_dir = Path(cfg.output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
        if resume_from is None:
            metrics_path.unlink(missing_ok=True)
        else:
            _truncate_metrics(metrics_path, step)
        accelerator.init_trackers("diffpo", config=_flat_config(cfg)) if cfg.logging.report_to != "none" else None
    return metrics_path


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------


def micro_batches(accelerator, data: Data, micro_step: int) -> Iterator[dict]:
    """The micro-batches from ``micro_step`` on, epoch after epoch, without end (the loop stops
    at max_steps). On resume the batches already seen in the epoch are skipped.

    The sampler skips them (each process's ``skip`` batches are the epoch's first ``skip`` global
    batches: accelerate shards whole batches, and drop_last keeps the shards even), so the prepared
    loader itself runs: accelerate's ``skip_first_batches`` would build another loader, without
    the non-blocking batch copies (``DataLoaderConfiguration(non_blocking=True)``) and with new
    worker processes, for the rest of the resumed epoch."""
    epoch, skip = divmod(micro_step, len(data.dataloader))
    while True:
        # not set_epoch: accelerate would reset it to its own counter on resume
        data.sampler.begin_epoch(epoch, skip * data.global_batch)
        yield from data.dataloader
        epoch, skip = epoch + 1, 0


@dataclass
class PendingCheck:
    """The weights-finite check of an optimizer step's update, computed on the device after the
    step and read at the next host sync: the next step's ``end_window``, or ``check_weights``
    before anything is saved."""

    step: int
    flag: torch.Tensor


def _nonfinite_weights_error(step: int, output_dir: Path) -> TrainingError:
    return TrainingError(
        f"step {step}: the updated weights are not finite (the gradients were); stopped before saving them. "
        f"Lower train.learning_rate; {last_checkpoint_note(output_dir)}"
    )


def check_weights(accelerator, pending: PendingCheck | None, output_dir: Path) -> None:
    """Read a pending weights-finite check now (before a save): raise if the update broke a weight."""
    if pending is not None and not _all_processes(accelerator, bool(pending.flag)):
        raise _nonfinite_weights_error(pending.step, output_dir)


def end_window(accelerator, optim: Optim, tc, spec: LossSpec, hparams: dict, step: int, output_dir: Path, window: list, pending: PendingCheck | None):
    """The end of an optimizer step's window: check, step, and gather the metrics, with one host
    sync per optimizer step (two under fp16 loss scaling).

    ``window`` holds each micro-batch's (loss, errors), still on the device. The sync reads, from
    every process at once: the micro-batches' losses, the gradient norm, and the previous step's
    weights-finite check (``PendingCheck``). Then, as before these checks were batched into one sync:

    - the previous update made a weight non-finite: stop (nothing was saved since; ``check_weights``
      also reads the check before every checkpoint and before the final save);
    - a non-finite loss in any micro-batch on any process: the window is skipped whole (its
      backward ran, so its gradients are discarded, never applied);
    - a finite loss can still have non-finite gradients (an overflow in the backward pass): the
      accumulated, all-reduced gradients' norm is checked before the step. clip_grad_norm_ unscales
      fp16 gradients and returns their total norm (max_norm=inf: measured, not clipped); DeepSpeed
      clips inside and gives None.

    With float32 masters (``MasterWeights``) the gradients are taken into the masters before the
    sync (``prepare_step``: host-bound work, overlapped with the backward), and with 8-bit AdamW the
    clipping coefficient is applied inside the update instead of by a pass of its own
    (``set_gradient_scale``). Issue 16's profile of an SDXL step on an H200 showed 14 ms of idle
    device and a 3.5 ms rescaling pass; the trainer went from +3.2% to +1.6% over the harness.

    Returns (gradient norm, why the step was skipped or None, the window's metrics, the new pending
    check). Before, each micro-step synced twice (loss finiteness, ``loss.item()``) and each
    optimizer step twice more (gradient norm, weights): each sync idles the GPU while the host
    launches the next kernels.
    """
    scaler = accelerator.scaler  # fp16 only: unscaling must wait until the losses are known finite
    master = find_master_optimizer(optim.optimizer) if scaler is None else None
    clip_in_update = master is not None and master.scales_gradients
    if clip_in_update:  # the norm now; the clipping happens inside the update (set_gradient_scale below)
        grad_norm = _gradient_norm(optim.params)
    else:
        grad_norm = None if scaler is not None else accelerator.clip_grad_norm_(optim.params, tc.max_grad_norm or math.inf)
    if master is not None:
        master.prepare_step()  # the update's host-bound part now, while the device runs the backward
    losses = [loss for loss, _ in window]
    extra = [torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float32, device=accelerator.device)]
    extra.append(pending.flag.float() if pending is not None else torch.ones((), device=accelerator.device))
    rows = _host_rows(accelerator, losses + extra)  # the sync
    if pending is not None and min(row[-1] for row in rows) < 1.0:
        raise _nonfinite_weights_error(pending.step, output_dir)
    losses_finite = [all(math.isfinite(row[i]) for row in rows) for i in range(len(window))]
    metrics = [{"loss": rows[accelerator.process_index][i], **spec.metrics(**errors, **hparams)} for i, (_, errors) in enumerate(window) if losses_finite[i]]
    metrics = [_mean_over_processes(accelerator, {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]})] if metrics else []
    if not all(losses_finite):
        return None, "loss", metrics, None
    if scaler is None:
        norm = None if grad_norm is None else rows[0][len(window)]
        grads_finite = norm is None or all(math.isfinite(row[len(window)]) for row in rows)
    else:
        grad_norm = accelerator.clip_grad_norm_(optim.params, tc.max_grad_norm or math.inf)
        norm = None if grad_norm is None else float(grad_norm)
        grads_finite = grad_norm is None or _all_processes(accelerator, bool(torch.isfinite(grad_norm)))
    if grads_finite or scaler is not None:
        if clip_in_update and tc.max_grad_norm:  # torch's clip_grad_norm_ coefficient
            master.set_gradient_scale(min(1.0, tc.max_grad_norm / (norm + 1e-6)))
        # An fp16 GradScaler must see the overflow itself: it skips the step and lowers its scale.
        optim.optimizer.step()
        optim.lr_scheduler.step()
    if not grads_finite or optim.optimizer.step_was_skipped:
        return norm, "gradients" if scaler is None or scaler.get_scale() < 1.0 else "fp16 overflow", metrics, None
    # Cheap backstop (read at the next sync): finite gradients, yet an update made a weight non-finite.
    # The optimizer state is then spent: the run stops before any save. Float32 masters answer it from
    # their buckets and the in-place kernel's flag; otherwise one fused norm per weight.
    flag = master.updated_weights_finite() if master is not None else None
    return norm, None, metrics, PendingCheck(step + 1, weights_finite_flag(optim.params) if flag is None else flag)


def step_record(step: int, optim: Optim, window: list[dict], grad_norm, skip_reason: str | None, skipped_total: int, seconds: float) -> dict:
    """One line of metrics.jsonl: the window's mean metrics, the step's lr and grad norm; a
    non-finite value is written as null (JSON has no nan)."""
    record = {"step": step, "lr": optim.lr_scheduler.get_last_lr()[0], "skipped": skip_reason is not None, "skipped_total": skipped_total, "step_seconds": seconds}
    if skip_reason is not None:
        record["skip_reason"] = skip_reason
    if window:
        record.update({key: float(np.mean([m[key] for m in window])) for key in window[0]})
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}


def log_record(accelerator, cfg: Config, metrics_path: Path, record: dict) -> None:
    _append_metrics(metrics_path, record, Path(cfg.output_dir))
    if cfg.logging.report_to != "none":
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=record["step"])


# ----------------------------------------------------------------------------------------------
# train(): the setup steps, then one loop
# ----------------------------------------------------------------------------------------------


class GarbageCollection:
    """``train.gc_every``: with N > 0, Python's automatic collections are off while the loop runs and
    the young generations (0 and 1) are collected every N optimizer steps, between steps, where the
    host would otherwise collect whenever its allocation count says, in the middle of a step's
    launches (as torchtitan's ``training.gc_freq``); every 10 N steps the collection is a full one, so
    that a cycle which outlived a young collection (promoted to the oldest generation) is freed too.
    ``close`` restores the collector as it was."""

    def __init__(self, every: int):
        self.every = every
        self.was_enabled = gc.isenabled()
        if every:
            gc.disable()
            gc.collect(1)

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect(2 if step % (10 * self.every) == 0 else 1)

    def close(self) -> None:
        if self.every and self.was_enabled:
            gc.enable()


def train(cfg: Config, *, cache_dir: Path | None = None) -> TrainResult:
    """Fine-tune as ``cfg`` says: the setup steps in order, one loop, then the final weights."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    tc, lc, output_dir = cfg.train, cfg.logging, Path(cfg.output_dir)
    accelerator = setup_accelerator(cfg)
    spec = get_loss(cfg.loss.name)  # what the loss needs (reference, loser prompt) is in its spec
    hparams = spec.resolve_hparams(cfg.loss.hparams)
    data = setup_data(cfg, accelerator, spec, cache_dir)
    run = setup_run(cfg, accelerator, data.records)
    model = setup_model(cfg, accelerator, spec, data.cache_meta, cache_dir)
    optim = setup_optimizer(cfg, model.network, accelerator.device, accelerator.num_processes)
    prepare(accelerator, model, optim, data)
    step, skipped_total = restore(cfg, accelerator, run.resume_from, optim)
    metrics_path = start_logging(cfg, accelerator, run.resume_from, step)

    sample_vae = cfg.model.latent_sampling == "sample"  # VAE posterior sample, or its mode
    micro_step = step * tc.gradient_accumulation_steps
    nonfinite_in_row, window = 0, []  # window: this step's micro-batches (loss, errors), on the device
    pending = None  # the last update's weights-finite check, read at the next host sync (end_window)
    progress = tqdm(total=tc.max_steps, initial=step, desc=f"train {cfg.loss.name}", disable=not (lc.progress and accelerator.is_local_main_process))
    step_started = time.perf_counter()
    batches = micro_batches(accelerator, data, micro_step) if step < tc.max_steps else iter(())
    fetched = time.perf_counter()
    batch = next(batches, None)
    data_seconds = time.perf_counter() - fetched  # host time this step spent getting its batches
    collector = GarbageCollection(tc.gc_every)
    try:
        while batch is not None:
            # A pair's draws are keyed by (optimizer step, its place among all pairs of the step), so
            # processes x batch x accumulation can be traded against each other at equal results.
            opt_step, window_index = divmod(micro_step, tc.gradient_accumulation_steps)
            first_pair = window_index * data.global_batch + accelerator.process_index * tc.batch_size
            generators = pair_generators(cfg.seed, opt_step, first_pair, tc.batch_size)
            micro_step += 1
            with accelerator.accumulate(model.network):
                errors = pair_errors(model.components, model.network, batch, generators, model.reference, sample_vae, accelerator.autocast, spec.loser_prompt)
                errors.update(example_labels(batch))  # unpaired examples' desirable/undesirable labels (Diffusion-KTO)
                loss = spec(**errors, **hparams).mean()
                # Backward without first asking whether the loss is finite (that question is a host
                # sync): end_window reads all of the window's losses at once, and a window with a
                # non-finite one is skipped whole, its gradients discarded. Every rank runs the same
                # backward, so DDP's all-reduce never waits for a rank that skipped.
                accelerator.backward(loss)
                window.append((loss.detach(), {k: v.detach() for k, v in errors.items()}))
                # The next batch now, while the device still runs this backward: after end_window's
                # host sync the device would idle while the host takes it from the loader's workers
                # and copies it over (7-12 ms median on SDXL, issue 16). One batch more than the run
                # uses is fetched at the end; nothing depends on it.
                fetched = time.perf_counter()
                batch = next(batches, None)
                data_seconds += time.perf_counter() - fetched
                if accelerator.sync_gradients:
                    grad_norm, skip_reason, metrics, pending = end_window(accelerator, optim, tc, spec, hparams, step, output_dir, window, pending)
                optim.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue  # mid-window: gradients accumulate

            # One optimizer step is done (or skipped: nothing applied, nothing saved at this step).
            step += 1
            if skip_reason is None:
                nonfinite_in_row = 0
            else:
                skipped_total += 1
                # fp16 overflows while the loss scale is >= 1 are the scaler's normal search for a scale.
                nonfinite_in_row += skip_reason != "fp16 overflow"
                logger.warning("step %d: non-finite %s, step skipped (%d in a row)", step, skip_reason, nonfinite_in_row)
            # step_seconds: host time from the end of the previous step; with one sync per step it is
            # the device's step time once the first steps (compilation) are past.
            record = step_record(step, optim, metrics, grad_norm, skip_reason, skipped_total, time.perf_counter() - step_started)
            record["data_seconds"] = data_seconds
            window = []
            if accelerator.is_main_process and step % lc.log_every == 0:
                log_record(accelerator, cfg, metrics_path, record)
            if nonfinite_in_row >= tc.max_nonfinite_in_row:  # after logging: metrics.jsonl shows every skipped step
                raise TrainingError(
                    f"{nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradients (train.max_nonfinite_in_row); "
                    f"stopped at step {step}, nothing of them applied. Lower train.learning_rate, or check the data; {last_checkpoint_note(output_dir)}"
                )
            progress.update(1)
            progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}")
            if lc.validation_every and accelerator.is_main_process and (step % lc.validation_every == 0 or step == tc.max_steps):
                run_validation(accelerator, model.components, accelerator.unwrap_model(model.network), lc, output_dir, step)
            # A skipped step writes no checkpoint: pruning must never trade good ones for it.
            if skip_reason is None and (step % tc.checkpoint_every == 0 or step == tc.max_steps):
                check_weights(accelerator, pending, output_dir)  # never save non-finite weights
                pending = None
                state = {"step": step, "skipped_steps": skipped_total, "num_processes": accelerator.num_processes, "batch_size": tc.batch_size, "loss": cfg.loss.name, "identity": run.identity}
                save_checkpoint(accelerator, output_dir, step, state, tc.checkpoints_total_limit)
            collector.step(step)  # between steps: the device still runs this step's update
            if step >= tc.max_steps:
                break
            step_started = time.perf_counter()
            data_seconds = 0.0
    finally:
        collector.close()
    progress.close()
    check_weights(accelerator, pending, output_dir)

    final_dir = save_final(cfg, accelerator, model, optim, cache_dir)
    accelerator.end_training()
    return TrainResult(output_dir, final_dir, step, skipped_total, time.perf_counter() - started)


def save_final(cfg: Config, accelerator, model: Model, optim: Optim, cache_dir: Path | None = None) -> Path:
    """The trained weights in diffusers' layout under output_dir/final (LoRA, or the whole
    pipeline), written to a temporary folder and renamed; never non-finite weights."""
    output_dir = Path(cfg.output_dir)
    final_dir = output_dir / "final"
    accelerator.wait_for_everyone()
    sharded = _gather_sharded(accelerator, model.network)  # a collective: every rank takes part
    if not accelerator.is_main_process:
        return final_dir
    tmp = output_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = sharded if sharded is not None else accelerator.unwrap_model(model.network)
    master = find_master_optimizer(optim.optimizer)
    if master is not None:  # save the float32 masters, not their bf16 rounding
        unwrapped.to(torch.float32)
        master.write_masters_into(unwrapped)
    if not _weights_finite([p for p in unwrapped.parameters() if p.requires_grad]):  # never ship non-finite weights
        raise TrainingError(f"the trained weights are not finite: final/ not written; {last_checkpoint_note(output_dir)}")
    components = model.components
    try:
        if model.use_lora:
            components.family.save_lora(unwrapped, tmp)
        else:
            if not components.text_encoders:  # trained from a cache: the saved pipeline needs them
                components = load_components(cfg.model, cache_dir=cache_dir)
            components.family.save_full(components, unwrapped.to(torch.float32), tmp)
        publish_dir(tmp, final_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write {final_dir}: {err.strerror or err}; {last_checkpoint_note(output_dir)}") from None
    return final_dir


def _gather_sharded(accelerator, network) -> torch.nn.Module | None:
    """Under FSDP, a whole float32 copy of the trained network on the main process (None elsewhere,
    and None without FSDP). The sharded parameters cannot be saved from one rank: the device run
    failed with "invalid python storage" on FSDP2's DTensors. All ranks must call this."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    state = accelerator.get_state_dict(network)  # full state dict, gathered to the main process
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(network)
    whole = type(unwrapped).from_config(unwrapped.config)
    whole.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return whole


__all__ = [
    "train", "TrainResult", "TrainingError", "pair_errors", "list_checkpoints",
    "setup_accelerator", "setup_data", "setup_run", "setup_model", "make_trainable", "compile_model", "setup_optimizer",
    "prepare", "restore", "start_logging", "save_final",
]
