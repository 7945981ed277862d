"""The main job: one preference-tuning experiment in the shapes world, end to end, offline.

build a task's pairs from the committed base model -> train (MaPO by default, through the same
trainer as real models) -> evaluate tuned vs base on held-out prompts with the same seeds -> write
``report.json``, ``report.md``, a base-vs-tuned sample grid and training curves.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from diffpo.config import config_from_dict
from diffpo.losses import get_loss
from diffpo.toy.base import ASSET_DIR, load_toy_model
from diffpo.toy.evaluate import evaluate_toy, task_scorer
from diffpo.toy.tasks import TASKS, Sampler, build_reward_pairs, build_style_pairs, prompt_split

# Per-objective defaults for the toy world. The pixel-space errors here are a few times larger than
# SD latents' (the DPO beta of 5000 was tuned for those), so the reference-based betas are scaled
# down to keep the initial logits in the same range.
# MaPO's beta (mapo-t2i/mapo args.py --beta_mapo, default 0.1) is 0.01 here: at 0.1 the margin term
# is what makes the tuned samples grainy (issue 17; benchmarks/TOY_COMPARISON.md, "Grain"). The
# base fits its own samples (the rejected images) far better than the new style, so MaPO's logit
# starts near -17 and its log-sigmoid is saturated: the push to raise err_l weighs 25 times the
# likelihood term, and the model raises it by denoising base-like images worse (err_l on the
# rejected images 0.041 -> 0.072 in 60 steps; SFT leaves it at 0.036), which leaves residual noise
# in every sample (background grain 0.031 base, 0.149 tuned; SFT 0.025). At 0.01: 0.048 and 0.032,
# with most of the style gain kept. SFT uses the paper's (no hparams).
TOY_LOSS_HPARAMS: dict[str, dict[str, float]] = {
    "sft": {},
    "mapo": {"beta": 0.01},
    "diffusion_dpo": {"beta": 1000.0},
    "dmpo": {"beta": 1000.0},
    "fdpo": {"beta": 1000.0},  # the same reward scale as diffusion_dpo (its reverse-KL member is DPO)
    "kto": {"beta": 1000.0},  # the official code's default, and DPO's toy value
}


TOY_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class DemoSettings:
    task: Literal["style", "reward"] = "style"
    """style: chosen = the prompt rendered in a style the base never makes, rejected = a base sample;
    reward: two base samples per prompt ranked by a programmatic reward."""
    style: Literal["outline", "striped"] = "outline"
    """The style task's target style."""
    severity: float = 0.5
    """How far the style is from the base's solid fill, in [0, 1]."""
    reward: str = "size"
    """The reward task's judge (``diffpo.toy.rewards``: saturation, centering, size, faithful_size)."""
    label_noise: float = 0.0
    """Reward task: this fraction of the labels is flipped (seeded), as a noisy human judge would."""
    tie_margin: float = 0.0
    """Reward task: reward differences at most this are labelled a tie (0.5)."""
    loss: str = "mapo"
    """The objective (``diffpo losses``)."""
    loss_hparams: dict[str, float] = field(default_factory=dict, metadata={"flag": "--hparam"})
    """Objective hparams over the shapes world's defaults, e.g. ``--hparam beta=0.05`` (repeatable)."""
    pairs_per_prompt: int = 4
    """Preference pairs built per training prompt."""
    steps: int = 60
    """Optimizer steps."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    learning_rate: float = field(default=5e-5, metadata={"flag": "--lr"})
    """Learning rate."""
    lora_rank: int = 0
    """0: full fine-tuning; otherwise LoRA of this rank on every conv and attention layer."""
    eval_per_prompt: int = 16
    """Evaluation images per held-out prompt and model."""
    seed: int = 0
    """Seed of the pairs, the training run and (plus 10000) the evaluation images."""
    device: str = "cpu"
    """Torch device for sampling and training."""
    num_inference_steps: int = 10
    """Sampling steps for the pairs and the evaluation."""
    guidance_scale: float = 3.0
    """Guidance scale for the pairs and the evaluation."""
    cache_base_images: bool = True
    """Read the base model's samples (rejected images, its half of the evaluation) from the image
    cache (``diffpo.image_cache``, under ``$DIFFPO_CACHE_DIR`` or ``~/.cache/diffpo``) when an
    earlier run made them with the same weights, prompts, seeds and sampler; they do not depend on
    the fine-tuning."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (valid: {', '.join(TASKS)})")


def train_config(settings: DemoSettings, pairs: Path, run_dir: Path, base: str) -> dict:
    hparams = {**TOY_LOSS_HPARAMS.get(settings.loss, {}), **settings.loss_hparams}
    lora = {"enabled": False}
    if settings.lora_rank:
        lora = {"enabled": True, "rank": settings.lora_rank, "alpha": float(settings.lora_rank), "target_modules": TOY_LORA_TARGETS}
    return {
        "output_dir": str(run_dir),
        "seed": settings.seed,
        # A new style needs the convolutions, not only the 8x8 attention that LoRA's default
        # targets reach: LoRA here covers every conv and attention projection of the UNet.
        "model": {"pretrained": base, "family": "sd", "lora": lora},
        # An objective that learns from single labelled images (Diffusion-KTO) gets the pairs split:
        # chosen desirable, rejected not (data.unpaired).
        "data": {"source": str(pairs), "resolution": 32, "random_flip": True, "unpaired": get_loss(settings.loss).examples == "unpaired"},
        "loss": {"name": settings.loss, **hparams},
        "train": {
            "batch_size": settings.batch_size, "max_steps": settings.steps, "learning_rate": settings.learning_rate,
            "lr_warmup_steps": min(20, settings.steps // 10), "checkpoint_every": settings.steps, "checkpoints_total_limit": 1,
            "mixed_precision": "no", "adam_weight_decay": 0.0,
        },
        "logging": {"report_to": "tensorboard", "progress": True},
    }


def plot_curves(metrics_path: Path, out_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(steps, [r.get("loss") for r in rows])
    axes[0].set_title("loss")
    axes[1].plot(steps, [r.get("err_w") for r in rows], label="err_w (chosen)")
    axes[1].plot(steps, [r.get("err_l") for r in rows], label="err_l (rejected)")
    axes[1].legend()
    axes[1].set_title("denoising error")
    axes[2].plot(steps, [r.get("implicit_accuracy") for r in rows])
    axes[2].set_title("implicit accuracy")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def image_cache(settings: DemoSettings):
    from diffpo.image_cache import ImageCache

    return ImageCache() if settings.cache_base_images else None


def build_pairs(settings: DemoSettings, components, out_dir: Path, *, progress: bool = True) -> Path:
    """The task's preference pairs from the base model, on the training prompts."""
    train_prompts, _ = prompt_split(seed=0)
    sampler = Sampler(settings.num_inference_steps, settings.guidance_scale)
    shutil.rmtree(out_dir, ignore_errors=True)
    common = dict(per_prompt=settings.pairs_per_prompt, seed=settings.seed, sampler=sampler, device=settings.device, progress=progress, cache=image_cache(settings))
    if settings.task == "style":
        return build_style_pairs(components, out_dir, train_prompts, style=settings.style, severity=settings.severity, **common)
    return build_reward_pairs(components, out_dir, train_prompts, reward=settings.reward, label_noise=settings.label_noise, tie_margin=settings.tie_margin, **common)


def run_experiment(settings: DemoSettings, out: Path, *, base: str | None = None, pairs: Path | None = None, progress: bool = True) -> dict:
    """Pairs (built here unless given) -> training -> evaluation; returns the report (also written)."""
    from diffpo.evaluate.run import load_tuned
    from diffpo.train import train

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = base or str(ASSET_DIR)
    sampler = Sampler(settings.num_inference_steps, settings.guidance_scale)
    _, heldout = prompt_split(seed=0)

    t0, c0 = time.perf_counter(), time.process_time()
    if pairs is None:
        pairs = build_pairs(settings, load_toy_model(base, settings.device), out / "pairs", progress=progress)
    seconds_pairs, cpu_pairs = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = out / "train"
    shutil.rmtree(run_dir, ignore_errors=True)  # the experiment owns its run folder: a re-run starts over
    cfg = config_from_dict(train_config(settings, pairs, run_dir, base))
    cfg.logging.progress = progress
    result = train(cfg)
    seconds_train, cpu_train = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    tuned_source = {"lora": str(result.final_dir)} if settings.lora_rank else {"tuned_model": str(result.final_dir)}
    base_c, tuned_c = load_tuned(base, **tuned_source)
    reward_name = task_scorer(settings.task, settings.reward)
    results = evaluate_toy(
        base_c, tuned_c, heldout, task_reward=reward_name, per_prompt=settings.eval_per_prompt, seed=10_000 + settings.seed,
        sampler=sampler, out_dir=out / "eval", device=settings.device, progress=progress, base_cache=image_cache(settings),
    )
    seconds_eval, cpu_eval = time.perf_counter() - t0, time.process_time() - c0
    plot_curves(run_dir / "metrics.jsonl", out / "curves.png", f"{settings.loss} on the {settings.task} task")

    task_summary = results["scorers"][reward_name]
    report = {
        "method": settings.loss,
        "task": settings.task if settings.task != "style" else f"style:{settings.style}@{settings.severity:g}",
        "task_reward": reward_name,
        "win_rate": task_summary["win_rate"],
        "win_rate_ci": task_summary["win_rate_ci"],
        "reward_base": task_summary["mean_base"],
        "reward_tuned": task_summary["mean_tuned"],
        "faithfulness_base": results["faithfulness"]["base"]["overall"],
        "faithfulness_tuned": results["faithfulness"]["tuned"]["overall"],
        "faithfulness": results["faithfulness"],
        "diversity_base": results["diversity"]["base"],
        "diversity_tuned": results["diversity"]["tuned"],
        "quality_base": results["quality"]["base"],
        "quality_tuned": results["quality"]["tuned"],
        "laplacian_base": results["laplacian"]["base"],
        "laplacian_tuned": results["laplacian"]["tuned"],
        "n_eval_images": task_summary["n"],
        "heldout_prompts": len(heldout),
        "pairs": str(pairs),
        "train_steps": result.steps,
        # median optimizer-step time (data loading included, model loading and saving not)
        "seconds_per_step": float(np.median([json.loads(line)["step_seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()])),
        "seconds": time.perf_counter() - started,
        "seconds_by_stage": {"pairs": seconds_pairs, "train": seconds_train, "eval": seconds_eval},
        # CPU seconds of this process (all its threads): on a shared machine they move far less than wall time
        "cpu_seconds_by_stage": {"pairs": cpu_pairs, "train": cpu_train, "eval": cpu_eval},
        # the machine's 1/5/15-minute load averages at the end: times on a shared CPU need them
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": asdict(settings),
        "base_model": base,
    }
    report["checks"] = pass_checks(report)
    report["passed"] = all(report["checks"].values())
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_demo_report(report))
    return report


FAITHFULNESS_TOLERANCE = 0.05
"""Largest faithfulness drop (tuned vs base, mean of colour and shape accuracy) that counts as kept.
Over seeds 0-7 the demo's change ranged from -3.5 to +2.8 points (benchmarks/TOY_COMPARISON.md),
and one model's accuracy over 176 images has a standard error of about 2 points at 0.92, so 5
points is about 2.5 standard errors of one model's measurement: a real loss, not the draw."""

QUALITY_TOLERANCE = 0.02
"""Largest quality drop (``shapes_quality``, i.e. added background grain) that counts as kept: the
grain of Gaussian pixel noise of std 1.4/255 (``diffpo.toy.quality``: grain ~3.6 x std), below
one 8-bit grey level, invisible; the grainy tuned models of issue 17 lost 0.1 or more."""


def pass_checks(report: dict) -> dict[str, bool]:
    """The demo's pass criteria: win rate up, faithfulness kept, quality kept."""
    return {
        "win_rate_up": report["win_rate_ci"][0] > 0.5,
        "faithfulness_kept": report["faithfulness_tuned"] >= report["faithfulness_base"] - FAITHFULNESS_TOLERANCE,
        "quality_kept": report["quality_tuned"] >= report["quality_base"] - QUALITY_TOLERANCE,
    }


def verdict(report: dict) -> str:
    """'PASS', or 'FAIL (the criteria not met)'."""
    failures = {"win_rate_up": "win rate not up", "faithfulness_kept": "faithfulness not kept", "quality_kept": "quality not kept"}
    failed = [failures[name] for name, ok in report["checks"].items() if not ok]
    return "PASS" if not failed else f"FAIL ({', '.join(failed)})"


def format_demo_report(report: dict) -> str:
    lo, hi = report["win_rate_ci"]
    fb, ft = report["faithfulness"]["base"], report["faithfulness"]["tuned"]
    return "\n".join(
        [
            f"# diffpo demo: {report['method']} on the shapes world ({report['task']})",
            "",
            f"Held-out prompts: {report['heldout_prompts']}, {report['n_eval_images']} images per model, same seeds for base and tuned.",
            "",
            "| metric | base | tuned |",
            "| --- | --- | --- |",
            f"| task reward `{report['task_reward']}` (mean) | {report['reward_base']:.3f} | {report['reward_tuned']:.3f} |",
            f"| color accuracy | {fb['color']:.3f} | {ft['color']:.3f} |",
            f"| shape accuracy | {fb['shape']:.3f} | {ft['shape']:.3f} |",
            f"| faithfulness (mean of the two) | {fb['overall']:.3f} | {ft['overall']:.3f} |",
            f"| diversity (pairwise RMS distance) | {report['diversity_base']:.3f} | {report['diversity_tuned']:.3f} |",
            f"| quality (1 - background grain; clean render 1) | {report['quality_base']:.3f} | {report['quality_tuned']:.3f} |",
            f"| whole-image mean abs. Laplacian (edges included) | {report['laplacian_base']:.3f} | {report['laplacian_tuned']:.3f} |",
            "",
            f"**Win rate of tuned over base on the task reward: {report['win_rate']:.3f} (95% CI {lo:.3f} to {hi:.3f}).**",
            "",
            f"**{verdict(report)}**: win rate up (CI low end above 0.5): {_yes(report['checks']['win_rate_up'])}; "
            f"faithfulness kept (drop at most {FAITHFULNESS_TOLERANCE:.2f}): {_yes(report['checks']['faithfulness_kept'])}; "
            f"quality kept (drop at most {QUALITY_TOLERANCE:.2f}): {_yes(report['checks']['quality_kept'])}.",
            "",
            f"Time: {report['seconds']:.0f} s in all (pairs {report['seconds_by_stage']['pairs']:.0f} s, training {report['seconds_by_stage']['train']:.0f} s "
            f"for {report['train_steps']} steps, evaluation {report['seconds_by_stage']['eval']:.0f} s){_cpu_and_load(report)}.",
            "",
            "![samples: base row above tuned row, same seed per column](eval/grid.png)",
            "",
            "![training curves](curves.png)",
            "",
        ]
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _cpu_and_load(report: dict) -> str:
    """'; CPU ... s; load average ...' when the report has them (times on a shared CPU need both)."""
    out = ""
    cpu = report.get("cpu_seconds_by_stage")
    if cpu:
        out += f"; CPU time {sum(cpu.values()):.0f} s (pairs {cpu['pairs']:.0f}, training {cpu['train']:.0f}, evaluation {cpu['eval']:.0f})"
    if report.get("load_average"):
        out += f"; load average at the end {report['load_average'][0]:.1f}"
    return out
