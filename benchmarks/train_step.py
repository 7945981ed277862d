"""Training-step throughput: diffpo's fast path and the public scripts' recipe, side by side.

    python -m benchmarks.train_step --arch sdxl --pairs 4 --out benchmarks/results/h100_sdxl.json
    python -m benchmarks.train_step --arch sd15 --pairs 16 --cases public/mapo/full,diffpo/mapo/full
    python -m benchmarks.train_step --arch tiny-sdxl --device cpu --steps 2 --warmup 1   # smoke run
    accelerate launch --num_processes 4 --multi_gpu -m benchmarks.train_step --arch sdxl --cases diffpo/mapo/full

A case is ``RECIPE/OBJECTIVE/MODE``:

- RECIPE ``public``: what the public MaPO / Diffusion-DPO training scripts do every step: VAE-encode
  both images (float32, as SDXL's VAE needs) and run the text encoders, float32 weights under bf16
  autocast with gradient checkpointing (the scripts' setting; without it float32 weights under
  autocast do not fit 4 SDXL pairs in 80 GB), a separate frozen bf16 reference UNet for DPO/DMPO,
  ``torch.optim.AdamW`` (foreach).
- RECIPE ``diffpo``: the fast path: latents and text embeddings from the cache (no VAE, no text
  encoders), bf16 weights with float32 masters (``diffpo.fastpath.MasterWeightAdamW``, fused),
  SDPA attention, one fused [winners; losers] batch, the reference as disabled adapters under LoRA.
  ``diffpo+compile`` adds regional torch.compile (``+fullcompile``: the whole network as one graph,
  ``train.compile=full``); ``diffpo+ckpt`` gradient checkpointing (memory);
  ``+cl`` the channels_last memory format; ``+ckpt=down_blocks.1:up_blocks.1`` checkpoints only
  those blocks (``model.gradient_checkpointing: [down_blocks.1, up_blocks.1]``); ``+8bit`` keeps
  AdamW's moments in 8 bits over the float32 masters (``train.use_8bit_adam``:
  ``diffpo.fastpath.MasterWeightAdamW8bit``, bitsandbytes; e.g. ``diffpo+compile+8bit/mapo/full``;
  ``+c8bit``: the same with diffpo's 8-bit kernel, ``train.adam_8bit_kernel=diffpo``); ``+catk``
  lowers concatenations in the compiled graphs to one buffer that each input writes its part of,
  instead of one masked kernel over the result (``train.compile_options:
  {max_pointwise_cat_inputs: 1}``; GEGLU's backward is such a concatenation); ``+static`` compiles a
  static graph per shape (``train.compile_dynamic: false``); ``+geglu`` GEGLU's one-pass backward
  (``train.fused_geglu: true``); ``+cgraph`` replays each compiled graph as a CUDA graph
  (``train.compile_options: {triton.cudagraphs: true}``, what torch.compile's mode="reduce-overhead" sets);
  ``diffpo-fp32`` keeps float32 weights under autocast (what FSDP shards: its own mixed precision
  computes in bf16 from float32 shards).
- OBJECTIVE: ``sft``, ``diffusion_dpo``, ``mapo``, ``dmpo``, or ``unet`` (the UNet's forward and
  backward alone: no loss terms, no optimizer; the MFU target's row).
- MODE: ``full`` (every UNet weight trained) or ``lora`` (rank 8 on the attention projections).

Every case runs the trainer's own step: ``diffpo.train.pair_errors`` (encoding when uncached, noise,
one forward over both images, the reference), the objective from ``diffpo.losses``, backward, and
the optimizer from ``diffpo.train.setup_optimizer`` / the public scripts' AdamW. A diffpo case's
network, reference and optimizer are set up by the trainer's own setup steps from the case's
config (``diffpo.train.make_trainable``, ``setup_optimizer``, ``compile_model``). Reported per case:
median step time, pairs/s, peak memory, and model FLOP utilisation = counted FLOPs / time / the
bf16 matmul peak measured in the same run (FLOPs counted with ``torch.utils.flop_counter`` on a
one-pair step with checkpointing off, so recomputation is not counted, and scaled by the pairs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.archs import ARCHS, Arch, build_encoders, build_unet

OBJECTIVES = ("sft", "diffusion_dpo", "mapo", "dmpo", "unet")
RECIPES = ("public", "diffpo", "diffpo+compile", "diffpo+ckpt", "diffpo+compile+ckpt", "diffpo+compile+cl", "diffpo+compile+8bit", "diffpo+compile+c8bit", "diffpo+fullcompile+8bit", "diffpo-fp32", "diffpo-fp32+ckpt")
RECIPE_BASES = ("public", "diffpo", "diffpo-fp32")
RECIPE_OPTIONS = ("compile", "fullcompile", "ckpt", "cl", "8bit", "c8bit", "catk", "static", "geglu", "cgraph")  # and ckpt=BLOCK:BLOCK...: selective checkpointing
DEFAULT_CASES = (
    "public/mapo/full", "public/diffusion_dpo/full",
    "diffpo/sft/full", "diffpo/mapo/full", "diffpo/diffusion_dpo/full", "diffpo/dmpo/full",
    "diffpo/unet/full", "diffpo+compile/unet/full", "diffpo+compile/mapo/full", "diffpo+compile/diffusion_dpo/full",
    "public/mapo/lora", "diffpo/sft/lora", "diffpo/mapo/lora", "diffpo/diffusion_dpo/lora", "diffpo/dmpo/lora",
)
LORA_RANK = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class Case:
    recipe: str
    objective: str
    mode: str

    @classmethod
    def parse(cls, text: str) -> "Case":
        try:
            recipe, objective, mode = text.split("/")
        except ValueError:
            raise SystemExit(f"--cases: {text!r} is not RECIPE/OBJECTIVE/MODE") from None
        base, *options = recipe.split("+")
        options_ok = base != "public" or not options
        options_ok &= all(o in RECIPE_OPTIONS or (o.startswith("ckpt=") and len(o) > 5) for o in options)
        if {"static", "catk", "cgraph"} & set(options) and not {"compile", "fullcompile"} & set(options):
            raise SystemExit(f"--cases: {text!r}: +static, +catk and +cgraph are compile settings: add +compile or +fullcompile")
        if base not in RECIPE_BASES or not options_ok or objective not in OBJECTIVES or mode not in ("full", "lora"):
            raise SystemExit(f"--cases: {text!r}: recipe in {RECIPES} (or +ckpt=BLOCK:BLOCK for selective checkpointing), objective in {OBJECTIVES}, mode full|lora")
        return cls(recipe, objective, mode)

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.objective}/{self.mode}"

    @property
    def public(self) -> bool:
        return self.recipe == "public"

    @property
    def options(self) -> list[str]:
        """The recipe's ``+`` options, e.g. ``["compile", "c8bit"]`` for ``diffpo+compile+c8bit``."""
        return self.recipe.split("+")[1:]

    @property
    def compiled(self) -> bool:
        return bool({"compile", "fullcompile"} & set(self.options))

    @property
    def compile_mode(self) -> str:
        """``train.compile`` of the case: none, regional (``+compile``) or full (``+fullcompile``)."""
        return "full" if "fullcompile" in self.options else "regional" if "compile" in self.options else "none"

    @property
    def bf16_weights(self) -> bool:
        return not self.public and not self.recipe.startswith("diffpo-fp32")

    @property
    def channels_last(self) -> bool:
        return "+cl" in self.recipe

    @property
    def adam_8bit(self) -> bool:
        return bool({"8bit", "c8bit"} & set(self.options))

    @property
    def adam_8bit_kernel(self) -> str:
        """``train.adam_8bit_kernel``: ``diffpo`` with ``+c8bit``, else bitsandbytes'."""
        return "diffpo" if "c8bit" in self.options else "bitsandbytes"

    @property
    def compile_options(self) -> dict:
        """``train.compile_options`` of the case (``+catk``, ``+cgraph``)."""
        return ({"max_pointwise_cat_inputs": 1} if "catk" in self.options else {}) | ({"triton.cudagraphs": True} if "cgraph" in self.options else {})

    @property
    def compile_dynamic(self) -> bool | None:
        """``train.compile_dynamic`` of the case: false with ``+static``, else PyTorch's default."""
        return False if "static" in self.options else None

    @property
    def fused_geglu(self) -> bool:
        """``train.fused_geglu`` of the case: true with ``+geglu``."""
        return "geglu" in self.options

    @property
    def checkpointing(self) -> bool | list[str]:
        """True (every block), False, or the blocks that checkpoint (``+ckpt=down_blocks.1:up_blocks.1``)."""
        for option in self.options:
            if option.startswith("ckpt="):
                return option[5:].split(":")
        return self.public or "ckpt" in self.options


# ------------------------------------------------------------------------------------------------
# Building one case
# ------------------------------------------------------------------------------------------------


def _train_config(case: Case):
    """The diffpo training config of a case: what a user would write to train this way."""
    from diffpo.config import config_from_dict

    train = {"learning_rate": 1e-5, "adam_weight_decay": 1e-2, "mixed_precision": "bf16", "channels_last": case.channels_last, "use_8bit_adam": case.adam_8bit}
    if case.bf16_weights:
        train["weight_dtype"] = "bf16"
    if case.adam_8bit_kernel != "bitsandbytes":
        train["adam_8bit_kernel"] = case.adam_8bit_kernel
    # (the harness compiles in Setup.compile, after the FLOP count, with these)
    train.update(compile_options=case.compile_options, compile_dynamic=case.compile_dynamic, fused_geglu=case.fused_geglu)
    lora = {"enabled": case.mode == "lora", "rank": LORA_RANK, "alpha": float(LORA_RANK), "target_modules": LORA_TARGETS}
    model = {"pretrained": "benchmark", "lora": lora, "gradient_checkpointing": case.checkpointing}
    return config_from_dict({"model": model, "data": {"source": "benchmark"}, "loss": {"name": "mapo" if case.objective == "unet" else case.objective}, "train": train})


class Setup:
    """The trained UNet, the reference, the optimizer and a fixed batch for one case.

    diffpo cases are set up by the trainer's own steps (``diffpo.train.make_trainable``,
    ``setup_optimizer``, ``compile_model``) from the case's config; public cases by their own code
    below, which imitates the public scripts."""

    def __init__(self, arch: Arch, case: Case, pairs: int, device: torch.device, encoders=None, accelerator=None):
        from diffusers import DDPMScheduler

        from diffpo.losses import get_loss
        from diffpo.models import FAMILIES, Components
        from diffpo.train import make_trainable, setup_optimizer

        self.arch, self.case, self.pairs, self.device = arch, case, pairs, device
        self.cfg = cfg = _train_config(case)
        self.spec = get_loss(cfg.loss.name)  # "unet" measures mapo's setup (no reference) without its loss
        self.hparams = self.spec.resolve_hparams({})
        unet = build_unet(arch, device)
        family = FAMILIES[arch.family]()
        vae, text_encoders, tokenizers = encoders if (case.public and encoders) else (None, [], [])
        extras = {"vae_scale_factor": 2 ** (len(arch.vae["block_out_channels"]) - 1)}
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        self.components = Components(family, unet, scheduler, text_encoders, tokenizers, vae=vae, extras=extras)
        if case.public:
            unet, self.reference, params = self._public_unet(unet, cfg)
            self.optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.adam_weight_decay)
        else:
            self.model = make_trainable(self.components, cfg, self.spec, device)
            self.reference = self.model.reference
            optim = setup_optimizer(cfg, unet, device)
            params, self.optimizer = optim.params, optim.optimizer
        self.trainable = sum(p.numel() for p in params)
        if accelerator is not None:
            unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        else:
            _autocast_forward(unet, device.type)  # what accelerate does to a prepared model's forward
        self.unet = unet
        if not case.public:
            self.model.network = unet
        self.batch = self._batch(pairs)

    def _public_unet(self, unet, cfg):
        """The public scripts' setup: float32 weights, a separate frozen bf16 reference UNet for
        DPO/DMPO (the Diffusion-DPO script's ref_unet), gradient checkpointing."""
        from diffpo.models import Reference, add_lora, trainable_parameters

        if self.case.mode == "lora":
            add_lora(unet, cfg.model.lora)
        else:
            unet.requires_grad_(True)
        unet.enable_gradient_checkpointing()
        unet.train()
        reference = Reference(unet, use_lora=False) if self.spec.needs_reference and self.case.objective != "unet" else None
        if reference is not None:
            reference.frozen.to(torch.bfloat16)
        return unet, reference, trainable_parameters(unet)

    def _batch(self, pairs: int) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        arch = self.arch
        if self.case.public:  # images and prompts: encoded inside the step, as the public scripts do
            pixels = lambda: (torch.rand(pairs, 3, arch.resolution, arch.resolution, generator=g) * 2 - 1).to(self.device)  # noqa: E731
            return {"prompts": ["a red circle on a white background"] * pairs, "pixels_w": pixels(), "pixels_l": pixels()}
        memory_format = torch.channels_last if self.case.channels_last else torch.contiguous_format
        latent = lambda: torch.randn(pairs, 4, arch.latent_size, arch.latent_size, generator=g).to(self.device, memory_format=memory_format)  # noqa: E731
        hidden = sum(cfg["hidden_size"] for cfg in arch.text_encoders)
        cond = {"encoder_hidden_states": torch.randn(pairs, arch.text_length, hidden, generator=g).to(self.device, torch.bfloat16)}
        pooled_key = self.components.family.pooled_text_key  # SDXL's text_embeds
        if pooled_key is not None:
            cond[pooled_key] = torch.randn(pairs, arch.text_encoders[-1]["projection_dim"], generator=g).to(self.device, torch.bfloat16)
        return {"cond": cond, "latents_w": latent(), "latents_l": latent()}

    def compile(self) -> None:
        """torch.compile of the trained UNet and of a frozen reference copy, regional or whole
        (``Case.compile_mode``; after the FLOP count, which runs eagerly)."""
        from diffpo.train import compile_model

        compile_model(self.model, self.case.compile_mode, self.cfg.train.compile_options, self.cfg.train.compile_dynamic)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


    def forward_backward(self, step: int, batch: dict | None = None) -> torch.Tensor:
        from diffpo.train import pair_errors, pair_generators

        batch = batch or self.batch
        pairs = (batch.get("latents_w") if "latents_w" in batch else batch["pixels_w"]).shape[0]
        generators = pair_generators(0, step, 0, pairs)
        # Autocast wraps the trained UNet's forward only (as accelerate does), so the VAE encodes in
        # float32 and the text encoders run in their bf16 weights, as in the public scripts.
        if self.case.objective == "unet":
            from diffpo.objectives import noise_pairs

            noised = noise_pairs(self.components.scheduler, batch["latents_w"], batch["latents_l"], generators)
            cond = {k: torch.cat([v, v]) for k, v in batch["cond"].items()}
            prediction = self.components.family.predict(self.components, self.unet, noised.noisy.to(self.device), noised.timesteps.to(self.device), cond)
            loss = prediction.float().square().mean()
        else:
            errors = pair_errors(self.components, self.unet, batch, generators, self.reference, sample_vae=self.case.public, autocast=self.autocast)
            loss = self.spec(**errors, **self.hparams).mean()
        loss.backward()
        return loss

    def step(self, step: int) -> None:
        self.forward_backward(step)
        if self.case.objective == "unet":
            for p in self.unet.parameters():
                p.grad = None
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self) -> float:
        """FLOPs of one step (forward + backward, encoders and reference included) for one pair,
        with gradient checkpointing off so that recomputation is not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        one = self._batch(1)
        # every block's own flag (selective checkpointing sets some only), restored afterwards
        flags = {m: m.gradient_checkpointing for m in self.unet.modules() if hasattr(m, "gradient_checkpointing")}
        for module in flags:
            module.gradient_checkpointing = False
        counter = FlopCounterMode(display=False)
        with counter:
            self.forward_backward(0, one)
        for p in self.unet.parameters():
            p.grad = None
        for module, flag in flags.items():
            module.gradient_checkpointing = flag
        return float(counter.get_total_flops())


def _autocast_forward(module: torch.nn.Module, device_type: str) -> None:
    forward = module.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    module.forward = autocast_forward


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, size: int = 8192, reps: int = 10) -> float | None:
    """bf16 matmul FLOP/s on this device (the MFU denominator), measured, not the datasheet's."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_case(arch: Arch, case: Case, args, device: torch.device, encoders, peak: float | None, flops_cache: dict, accelerator=None) -> dict:
    row: dict = {"case": case.label, "recipe": case.recipe, "objective": case.objective, "mode": case.mode, "pairs": args.pairs}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    setup = None
    try:
        started = time.perf_counter()
        setup = Setup(arch, case, args.pairs, device, encoders, accelerator)
        row["trainable_params"] = setup.trainable
        row["network_class"] = type(setup.unet).__name__  # DistributedDataParallel, FSDP..., or the UNet itself
        # FLOPs do not depend on compilation or checkpointing: count once per (objective, mode, encoders)
        key = (case.objective, case.mode, case.public)
        if key not in flops_cache and accelerator is None:
            flops_cache[key] = setup.count_flops()
        if case.compiled:
            setup.compile()
        times = []
        for i in range(args.warmup + args.steps):
            synchronize(device)
            t0 = time.perf_counter()
            setup.step(i)
            synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        world = accelerator.num_processes if accelerator is not None else 1
        row.update(step_s=step_s, step_s_all=times, pairs_per_s=args.pairs * world / step_s, world_size=world, setup_s=time.perf_counter() - started - sum(times))
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        flops = flops_cache.get(key)
        if flops is not None:
            row["flops_per_step"] = flops * args.pairs
            if peak:
                row["mfu"] = flops * args.pairs / step_s / peak
        if args.profile and case.label in args.profile:
            row["profile"] = profile_step(setup, device, Path(args.profile_dir), case)
    except Exception as err:  # noqa: BLE001 - an OOM or failure is a result, not the end of the run
        if not _is_oom(err) and not args.keep_going:
            raise
        row["error"] = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"[:500]
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        del setup
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def profile_step(setup: Setup, device: torch.device, out_dir: Path, case: Case) -> dict:
    """One step under torch.profiler: the top kernels table (text) and device time by kind of op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        setup.step(10_000)
        synchronize(device)
    wall_ms = 1e3 * (time.perf_counter() - started)
    out_dir.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    name = case.label.replace("/", "_").replace("+", "-")
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    (out_dir / f"profile_{name}.txt").write_text(table)
    kinds = time_by_kind(prof, device)
    # wall vs the kernels' summed time: the share of the step the device idled (as train_e2e --profile)
    return {"table": str(out_dir / f"profile_{name}.txt"), "by_kind_ms": kinds, "wall_ms": wall_ms, "device_busy_ms": sum(kinds.values())}


KINDS = (
    ("communication", ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "reducescatter")),
    # attention before matmul: cuDNN's flash-attention kernels are named "...sdpa..._wgmma_..."
    ("attention", ("flash", "attention", "fmha", "sdpa", "efficient")),
    ("matmul", ("gemm", "mm", "matmul", "addmm", "linear", "cutlass", "sm90_xmma", "nvjet")),
    ("convolution", ("conv", "cudnn", "implicit_convolve", "winograd")),
    ("normalization", ("norm", "group_norm", "layer_norm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "cast", "to_copy", "memcpy", "memset")),
)


def time_by_kind(prof, device: torch.device) -> dict[str, float]:
    """Self device time (ms) per kind of kernel; a rough grouping by kernel-name keywords."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        ms = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0) / 1000 if device.type == "cuda" else event.self_cpu_time_total / 1000
        if ms <= 0 or (device.type == "cuda" and event.device_type.name != "CUDA"):
            continue
        if getattr(event, "is_user_annotation", False):  # a record_function range (Optimizer.step#...) spans kernels counted on their own
            continue
        name = event.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other elementwise")
        totals[kind] = totals.get(kind, 0.0) + ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def write_json(path: Path | None, result: dict) -> None:
    """A benchmark's result as JSON at ``path`` (its folder made), where one is given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def environment(device: torch.device, module: str = "benchmarks.train_step") -> dict:
    import accelerate
    import diffusers
    import transformers

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "bitsandbytes": _installed_version("bitsandbytes"),
        "command": " ".join([os.path.basename(sys.executable), "-m", module, *sys.argv[1:]]),
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = platform.processor() or "cpu"
    return env


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sdxl")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (per process)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated RECIPE/OBJECTIVE/MODE")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (rewritten after every case)")
    parser.add_argument("--profile", default="", help="comma-separated case labels to profile for one step")
    parser.add_argument("--profile-dir", default="benchmarks/results/profiles")
    parser.add_argument("--distributed", action="store_true", help="prepare the UNet and optimizer with accelerate (under accelerate launch)")
    parser.add_argument("--keep-going", action="store_true", default=True, help="record a failing case and go on (default)")
    parser.add_argument("--stop-on-error", dest="keep_going", action="store_false")
    args = parser.parse_args(argv)
    args.cases = [Case.parse(c) for c in args.cases.split(",") if c]
    args.profile = [c for c in args.profile.split(",") if c]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    arch = ARCHS[args.arch]
    accelerator = None
    if args.distributed:
        from accelerate import Accelerator

        accelerator = Accelerator()
        device = accelerator.device
    else:
        device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    main_process = accelerator is None or accelerator.is_main_process
    result = {"arch": arch.name, "resolution": arch.resolution, "pairs_per_step": args.pairs, "environment": environment(device), "rows": []}
    if accelerator is not None:
        result["distributed"] = {"type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}
    result["bf16_peak_flops"] = measure_matmul_peak(device)
    encoders = None
    if any(c.public for c in args.cases):
        vae, text_encoders, tokenizers = build_encoders(arch, device)
        for module in text_encoders:
            module.to(torch.bfloat16).requires_grad_(False).eval()
        vae.requires_grad_(False).eval()  # float32: SDXL's VAE config forces the upcast
        encoders = (vae, text_encoders, tokenizers)
    flops_cache: dict = {}
    for i, case in enumerate(args.cases):
        if encoders is not None and not any(c.public for c in args.cases[i:]):
            # the public recipe's VAE and text encoders (~2 GiB) must not count in later cases' peaks
            encoders = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = run_case(arch, case, args, device, encoders, result["bf16_peak_flops"], flops_cache, accelerator)
        result["rows"].append(row)
        if main_process:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ("step_s_all", "profile")}
            print(json.dumps(shown), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2))
    if main_process:
        print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    lines = ["| case | step (ms) | pairs/s | peak GiB | MFU |", "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['error']} | | {row.get('peak_mem_gib', float('nan')):.1f} | |")
            continue
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        mem = f"{row['peak_mem_gib']:.1f}" if "peak_mem_gib" in row else "-"
        lines.append(f"| {row['case']} | {row['step_s'] * 1000:.1f} | {row['pairs_per_s']:.2f} | {mem} | {mfu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
