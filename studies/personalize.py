"""Personalization in the shapes world: DreamBooth and MaPO taught the same new subject.

    python -m studies.personalize --out personalize_out --seeds 0,1,2

The subject is the star, a shape the base model never drew (``EXTRA_SHAPES``; the base draws
circles for "star"), named by the identifier ``sks`` that no base prompt contains. DreamBooth's
prompt template "a [V] [class noun]" becomes "a red sks star on a white background" and its class
prompt "a red star on a white background" (Ruiz et al. 2023, sec. 3.2-3.3): the grammar puts the
identifier before the shape word, and the class noun is the subject's own shape word, as "dog" is
for a dog (the base has no better class word: its prior for "star" is a circle-ish blob).

Data (one set per seed, shared by both methods): a handful of subject renders (``TRAIN_LOOKS``: 8
of the 18 colour x background combinations, 4 colours) written to a folder with caption files, then
``build_pairs_from_images`` (the code of ``diffpo pairs from-images``) pairs each subject image
with base generations of its class prompt: chosen = subject image with the identifier prompt,
rejected = class-prior image, ``rejected_prompt`` = the class prompt.

How each method reads a pair:
* DreamBooth (``loss.name=dreambooth``): err(subject | identifier prompt) + lambda * err(class image
  | class prompt), the class-specific prior-preservation loss (eq. 2).
* MaPO: a preference "given the identifier prompt, the subject image beats the generic class
  image" (Hong et al. 2024 build their personalization pairs from DreamBooth's subject and prior
  images). Both halves are conditioned on the pair's prompt, the identifier prompt: a
  Bradley-Terry preference p(x_w > x_l | c) has one c. Conditioning the loser on the class prompt
  instead would make MaPO's margin term *lower* the likelihood of the base's own class samples
  under the class prompt, i.e. actively unlearn the prior that DreamBooth preserves.

Evaluation, same seeds for every model: held-out prompts put the subject in new colours and
backgrounds (``heldout_looks``; 2 colours never seen with the subject); subject fidelity = the
checker sees a star; prompt faithfulness = it sees the prompt's colour and background. Drift, on
prompts without the token: faithfulness on all 54 base prompts (tuned minus base, same seeds),
the pixel change from the base image of the same seed, and how often the bare class prompt now
draws a star (the language drift that prior preservation exists to prevent). 95% CIs: cluster
bootstrap over (training seed, prompt) units (``diffpo.evaluate.stats``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from diffpo.toy.grammar import BACKGROUNDS, COLORS, SHAPES, ShapePrompt, all_prompts

SUBJECT = "star"
TOKEN = "sks"
TRAIN_LOOKS: tuple[tuple[str, str], ...] = (
    ("red", "white"), ("red", "gray"), ("blue", "black"), ("blue", "white"),
    ("green", "gray"), ("green", "black"), ("yellow", "black"), ("yellow", "gray"),
)
"""(colour, background) of the 8 subject images: 4 colours, each on two of the three backgrounds."""

METHODS: tuple[str, ...] = ("dreambooth", "mapo")


def identifier_prompt(color: str, background: str) -> ShapePrompt:
    return ShapePrompt(color=color, shape=SUBJECT, background=background, token=TOKEN)


def class_prompt(color: str, background: str) -> ShapePrompt:
    return ShapePrompt(color=color, shape=SUBJECT, background=background)


def heldout_looks() -> list[tuple[str, str]]:
    """Every (colour, background) not among the subject images: 6 with colours the subject was
    never shown in (purple, orange), 4 new combinations of shown colours and backgrounds."""
    return [(c, b) for c in COLORS for b in BACKGROUNDS if (c, b) not in TRAIN_LOOKS]


@dataclass
class PersonalizeSettings:
    """One experiment; both methods use the same data, steps, batch and learning rate."""

    class_images: int = 8
    """Class-prior images per subject image (DreamBooth: ~200 for 3-5 subject images)."""
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 3e-4
    prior_weight: float = 1.0
    """DreamBooth's lambda (paper and diffusers default)."""
    mapo_beta: float = 0.1
    """MaPO's beta (paper default)."""
    eval_per_prompt: int = 6
    """Images per held-out subject prompt (the class prompts get half as many, at least 1)."""
    drift_per_prompt: int = 1
    """Images per base prompt (54 prompts) for the drift measurement."""
    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    device: str = "cpu"
    max_prompts: int | None = None
    """Evaluate only the first K prompts of each set (smoke runs); None = all."""

    def __post_init__(self) -> None:
        from diffpo.config import ConfigError

        for key in ("class_images", "steps", "batch_size", "eval_per_prompt", "drift_per_prompt", "num_inference_steps", "max_prompts"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')}: must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0 or self.prior_weight < 0 or self.mapo_beta < 0:
            raise ConfigError(f"lr must be > 0, prior-weight and mapo-beta >= 0 (got {self.learning_rate}, {self.prior_weight}, {self.mapo_beta})")
        if self.batch_size > len(TRAIN_LOOKS) * self.class_images:
            raise ConfigError(f"batch-size {self.batch_size} exceeds the {len(TRAIN_LOOKS) * self.class_images} pairs per seed ({len(TRAIN_LOOKS)} subject images x class-images {self.class_images})")


# ----------------------------------------------------------------------------------------------
# Data: subject images -> pairs, through the from-images code path
# ----------------------------------------------------------------------------------------------


def write_subject_folder(folder: Path, seed: int) -> Path:
    """Subject renders with caption files (``NN.png`` + ``NN.txt``) and ``class_prompts.txt``
    (one class prompt per image, file-name order): what a user would hand ``from-images``."""
    from diffpo.toy.render import render

    folder.mkdir(parents=True, exist_ok=True)
    class_lines = []
    for i, (color, background) in enumerate(TRAIN_LOOKS):
        render(identifier_prompt(color, background), seed=seed * 1000 + i).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(identifier_prompt(color, background).text + "\n")
        class_lines.append(class_prompt(color, background).text)
    (folder.parent / "class_prompts.txt").write_text("\n".join(class_lines) + "\n")
    return folder


def build_subject_pairs(components, out_dir: Path, seed: int, settings: PersonalizeSettings, progress: bool = False) -> Path:
    """The seed's subject folder and its pairs (``out_dir/pairs/pairs.jsonl``)."""
    from diffpo.data.from_images import build_pairs_from_images, list_images, read_prompts

    subject = write_subject_folder(out_dir / "subject", seed)
    images = list_images(subject)
    prompts = read_prompts("captions", images)
    class_prompts = read_prompts(str(out_dir / "class_prompts.txt"), images, "--rejected-prompts")
    sampler = {"num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale}
    return build_pairs_from_images(
        components, images, prompts, out_dir / "pairs", seed=seed * 100_000, rejected_prompts=class_prompts,
        per_image=settings.class_images, sampler=sampler, batch_size=64, device=settings.device, progress=progress,
    )


def train_config(method: str, settings: PersonalizeSettings, pairs: Path, run_dir: Path, base: str, seed: int) -> dict:
    """The trainer config of one run; ``configs/toy_personalize_{method}.yaml`` ship the same."""
    loss = {"dreambooth": {"name": "dreambooth", "prior_weight": settings.prior_weight}, "mapo": {"name": "mapo", "beta": settings.mapo_beta}}[method]
    return {
        "output_dir": str(run_dir),
        "seed": seed,
        "model": {"pretrained": base, "family": "sd", "lora": {"enabled": False}},  # full fine-tuning, as DreamBooth
        "data": {"source": str(pairs), "resolution": 32, "random_flip": True},
        "loss": loss,
        "train": {
            "batch_size": settings.batch_size, "max_steps": settings.steps, "learning_rate": settings.learning_rate,
            "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": min(20, settings.steps // 10),
            "checkpoint_every": settings.steps, "checkpoints_total_limit": 1, "adam_weight_decay": 0.0,
        },
        "logging": {"report_to": "none", "progress": False},
    }


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

EVAL_SEED = 20_000

CLEAN_SHAPE_IOU = 0.8
"""Template soft-IoU above which a recognised shape counts as cleanly drawn. The checker names the
best of four templates, so a ragged blob with spikes can still read as a star; clean shapes score
higher: star renders >= 0.875 and the base's correctly drawn shapes >= 0.91 (5th percentiles,
30 renders of the held-out subject prompts; one base sample of each of the 54 base prompts)."""


def eval_prompt_sets() -> dict[str, list[ShapePrompt]]:
    looks = heldout_looks()
    return {
        "subject": [identifier_prompt(c, b) for c, b in looks],
        "seen": [identifier_prompt(c, b) for c, b in TRAIN_LOOKS],
        "class": [class_prompt(c, b) for c, b in looks],
        "base": all_prompts(shapes=SHAPES),
    }


def sample_set(components, prompts: Sequence[ShapePrompt], per_prompt: int, settings: PersonalizeSettings) -> dict:
    """Images (uint8 arrays) and checker verdicts. Image k of the set uses seed EVAL_SEED + k in
    every model (so tuned and base images pair up), and no two images of a set share their noise:
    with few images per prompt, one unlucky noise shared by every prompt would bias a whole set."""
    from diffpo.sampling import generate
    from diffpo.toy.checker import detect

    flat = [p for p in prompts for _ in range(per_prompt)]
    seeds = [EVAL_SEED + k for k in range(len(flat))]
    images = generate(
        components, [p.text for p in flat], seeds, num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale, batch_size=256, device=settings.device, progress=False,
    )
    found = [detect(image) for image in images]
    return {
        "pixels": np.stack([np.asarray(image) for image in images]),
        "prompt_index": np.repeat(np.arange(len(prompts)), per_prompt),
        **{key: np.array([float(getattr(f, key) == getattr(p, key)) for f, p in zip(found, flat)]) for key in ("color", "shape", "background")},
        "clean_shape": np.array([float(f.shape == p.shape and f.shape_score >= CLEAN_SHAPE_IOU) for f, p in zip(found, flat)]),
    }


def per_image_metrics(samples: dict[str, dict], base: dict[str, dict] | None) -> dict[str, np.ndarray]:
    """One value per evaluation image for every reported metric (drift metrics need ``base``)."""
    s, c, b = samples["subject"], samples["class"], samples["base"]
    out = {
        "subject_fidelity": s["shape"],
        "subject_fidelity_clean": s["clean_shape"],
        "subject_fidelity_seen_looks": samples["seen"]["shape"],  # the subject images' own prompts: memorisation
        "color": s["color"],
        "background": s["background"],
        "prompt_faithfulness": s["color"] * s["background"],  # both of the prompt's new attributes right
        "class_prompt_star_rate": c["shape"],
        "base_prompt_faithfulness": (b["color"] + b["shape"]) / 2,  # the testbed's "overall" faithfulness
    }
    if base is not None:
        diff = np.abs(b["pixels"].astype(np.float64) - base["base"]["pixels"].astype(np.float64)) / 255.0
        out["base_prompt_pixel_change"] = diff.reshape(len(diff), -1).mean(axis=1)
    return out


METRIC_SETS = {  # which prompt set each metric's images come from (for the bootstrap's groups)
    "subject_fidelity": "subject", "subject_fidelity_clean": "subject", "subject_fidelity_seen_looks": "seen", "color": "subject", "background": "subject", "prompt_faithfulness": "subject",
    "class_prompt_star_rate": "class", "base_prompt_faithfulness": "base", "base_prompt_pixel_change": "base",
}


def _mean_ci(values: np.ndarray, groups: np.ndarray) -> list[float]:
    from diffpo.evaluate.stats import bootstrap_ci

    return list(bootstrap_ci(values, np.zeros_like(values), stat="mean_diff", groups=groups))


def summarize_runs(base_metrics: dict[str, np.ndarray], runs: dict[str, dict[int, dict[str, np.ndarray]]], groups_by_set: dict[str, np.ndarray]) -> dict:
    """Mean and 95% CI of every metric for the base and each method (pooled over seeds), the
    per-seed means, and the paired differences tuned - base and mapo - dreambooth."""
    from diffpo.evaluate.stats import bootstrap_ci

    seeds = sorted(next(iter(runs.values())))
    out: dict = {"base": {}, "methods": {}, "mapo_minus_dreambooth": {}}
    for metric, values in base_metrics.items():
        out["base"][metric] = {"mean": float(values.mean()), "ci": _mean_ci(values, groups_by_set[METRIC_SETS[metric]])}

    def pooled(method: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        groups = groups_by_set[METRIC_SETS[metric]]
        values = np.concatenate([runs[method][s][metric] for s in seeds])
        return values, np.concatenate([groups + 1000 * k for k in range(len(seeds))])  # unit: (seed, prompt)

    for method in runs:
        out["methods"][method] = {}
        for metric in runs[method][seeds[0]]:
            values, groups = pooled(method, metric)
            entry = {"mean": float(values.mean()), "ci": _mean_ci(values, groups), "per_seed": [float(runs[method][s][metric].mean()) for s in seeds]}
            if metric in base_metrics:
                base_values = np.tile(base_metrics[metric], len(seeds))
                entry["minus_base"] = float(values.mean() - base_values.mean())
                entry["minus_base_ci"] = list(bootstrap_ci(values, base_values, stat="mean_diff", groups=groups))
            out["methods"][method][metric] = entry
    if {"mapo", "dreambooth"} <= set(runs):
        for metric in runs["mapo"][seeds[0]]:
            m, groups = pooled("mapo", metric)
            d, _ = pooled("dreambooth", metric)
            out["mapo_minus_dreambooth"][metric] = {"mean": float(m.mean() - d.mean()), "ci": list(bootstrap_ci(m, d, stat="mean_diff", groups=groups))}
    return out


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def run_personalization(out: Path, seeds: Sequence[int], settings: PersonalizeSettings = PersonalizeSettings(), *, base: str | None = None, command: str = "", progress: bool = True) -> dict:
    """Pairs per seed -> DreamBooth and MaPO runs -> evaluation -> ``out/report.{json,md}`` and a grid."""
    from tqdm.auto import tqdm

    from diffpo.config import config_from_dict
    from diffpo.toy.base import ASSET_DIR, load_toy_model
    from diffpo.train import train
    from studies import meta

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = base or str(ASSET_DIR)
    sets = {name: prompts[: settings.max_prompts] for name, prompts in eval_prompt_sets().items()}
    half = max(1, settings.eval_per_prompt // 2)
    per = {"subject": settings.eval_per_prompt, "seen": half, "class": half, "base": settings.drift_per_prompt}
    groups_by_set = {name: np.repeat(np.arange(len(prompts)), per[name]) for name, prompts in sets.items()}

    base_components = load_toy_model(base, settings.device)
    base_samples = {name: sample_set(base_components, prompts, per[name], settings) for name, prompts in sets.items()}
    base_metrics = per_image_metrics(base_samples, None)
    runs: dict[str, dict[int, dict[str, np.ndarray]]] = {m: {} for m in METHODS}
    grid_rows = {"base": base_samples["subject"]["pixels"]}
    seconds_train: dict[str, list[float]] = {m: [] for m in METHODS}
    jobs = [(seed, method) for seed in seeds for method in METHODS]
    bar = tqdm(total=len(jobs), desc="personalize (seed x method)", disable=not progress)
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        pairs = build_subject_pairs(base_components, seed_dir, seed, settings)
        for method in METHODS:
            run_dir = seed_dir / method
            shutil.rmtree(run_dir, ignore_errors=True)
            result = train(config_from_dict(train_config(method, settings, pairs, run_dir, base, seed)))
            seconds_train[method].append(result.seconds)
            tuned = load_toy_model(result.final_dir, settings.device)
            samples = {name: sample_set(tuned, prompts, per[name], settings) for name, prompts in sets.items()}
            runs[method][seed] = per_image_metrics(samples, base_samples)
            if seed == seeds[0]:
                grid_rows[method] = samples["subject"]["pixels"]
            shutil.rmtree(run_dir / "final")  # 6 MB a run; the metrics and config stay
            bar.update(1)
    bar.close()

    report = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": meta.git_commit()["commit"],
        "machine": meta.machine(settings.device),
        "seeds": list(seeds),
        "settings": asdict(settings),
        "base_model": base,
        "subject": {"shape": SUBJECT, "token": TOKEN, "train_looks": [list(x) for x in TRAIN_LOOKS], "subject_images": len(TRAIN_LOOKS),
                    "pairs_per_seed": len(TRAIN_LOOKS) * settings.class_images},
        "eval": {"heldout_subject_prompts": [p.text for p in sets["subject"]], "images_per_prompt": per,
                 "base_prompts": len(sets["base"]), "first_seed": EVAL_SEED, "sampler": {"num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale}},
        "results": summarize_runs(base_metrics, runs, groups_by_set),
        "seconds_train_per_run": {m: float(np.mean(v)) for m, v in seconds_train.items()},
        "seconds": time.perf_counter() - started,
    }
    write_grid(grid_rows, out / "grid.png", per_prompt=settings.eval_per_prompt)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    return report


def write_grid(rows: dict[str, np.ndarray], path: Path, per_prompt: int) -> None:
    """One row per model (base, dreambooth, mapo): the first image of every held-out subject prompt."""
    from PIL import Image

    picked = {name: pixels[::per_prompt] for name, pixels in rows.items()}
    strip = [np.concatenate(list(pixels), axis=1) for pixels in picked.values()]
    Image.fromarray(np.concatenate(strip, axis=0)).resize((strip[0].shape[1] * 2, len(strip) * strip[0].shape[0] * 2), Image.NEAREST).save(path)


LABELS = {
    "subject_fidelity": "subject fidelity (checker sees a star)",
    "subject_fidelity_clean": f"... and cleanly drawn (template IoU >= {CLEAN_SHAPE_IOU})",
    "subject_fidelity_seen_looks": "subject fidelity on the subject images' own prompts",
    "color": "colour faithfulness",
    "background": "background faithfulness",
    "prompt_faithfulness": "colour and background both right",
    "class_prompt_star_rate": "class prompt without the token draws a star",
    "base_prompt_faithfulness": "base prompts: faithfulness (colour+shape)/2",
    "base_prompt_pixel_change": "base prompts: mean pixel change from base, same seed",
}


def format_summary(report: dict) -> str:
    """A few lines for the terminal: the headline numbers of each method."""
    r = report["results"]
    lines = [f"base: subject fidelity {_fmt(r['base']['subject_fidelity'])}"]
    for method, m in r["methods"].items():
        lines.append(
            f"{method}: subject fidelity {_fmt(m['subject_fidelity'])} (clean {_fmt(m['subject_fidelity_clean'])}); colour+background {_fmt(m['prompt_faithfulness'])}; "
            f"base-prompt faithfulness change {_fmt(m['base_prompt_faithfulness'], 'minus_base', 'minus_base_ci')}; "
            f"class prompt draws a star {_fmt(m['class_prompt_star_rate'])}"
        )
    return "\n".join(lines)


def _fmt(entry: dict | None, key: str = "mean", ci: str = "ci") -> str:
    if entry is None:
        return "-"
    lo, hi = entry[ci]
    return f"{entry[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def format_report(report: dict) -> str:
    r = report["results"]
    methods = list(r["methods"])
    lines = [
        "# Personalization in the shapes world: DreamBooth vs MaPO",
        "",
        f"Subject: `{report['subject']['shape']}` named `{report['subject']['token']}`, {report['subject']['subject_images']} subject images, "
        f"{report['subject']['pairs_per_seed']} pairs per seed; seeds {report['seeds']}; {report['settings']['steps']} steps, batch "
        f"{report['settings']['batch_size']}, lr {report['settings']['learning_rate']:g}, full fine-tuning of `{Path(report['base_model']).name}`.",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; commit {report['commit']}; machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']}; {report['seconds']:.0f} s in all.",
        "",
        "Mean over all evaluation images and seeds, 95% cluster-bootstrap CI over (seed, prompt) in brackets.",
        "",
        "| metric | base | " + " | ".join(methods) + " | mapo - dreambooth |",
        "| --- | --- | " + " | ".join("---" for _ in methods) + " | --- |",
    ]
    for metric, label in LABELS.items():
        cells = [_fmt(r["base"].get(metric))] + [_fmt(r["methods"][m].get(metric)) for m in methods] + [_fmt(r["mapo_minus_dreambooth"].get(metric))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per-seed means:", "", "| metric | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for metric, label in LABELS.items():
        lines.append(f"| {label} | " + " | ".join(", ".join(f"{v:.3f}" for v in r["methods"][m][metric]["per_seed"]) for m in methods) + " |")
    lines += ["", "![held-out subject prompts, first seed: base / " + " / ".join(methods) + " rows](grid.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = PersonalizeSettings()
    p = argparse.ArgumentParser(prog="python -m studies.personalize", description="DreamBooth vs MaPO teaching the base a new subject (a star named 'sks'); a report with 95%% CIs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2", help="one pair set and one run per method for each seed")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--class-images", type=int, default=d.class_images, help="class-prior images per subject image")
    p.add_argument("--prior-weight", type=float, default=d.prior_weight, help="DreamBooth's lambda")
    p.add_argument("--mapo-beta", type=float, default=d.mapo_beta)
    p.add_argument("--eval-per-prompt", type=int, default=d.eval_per_prompt)
    p.add_argument("--drift-per-prompt", type=int, default=d.drift_per_prompt)
    p.add_argument("--inference-steps", type=int, default=d.num_inference_steps, help="DDIM steps for class images and evaluation")
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first K prompts of each set (smoke runs)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--base", default=None, help="base model folder (default: the committed toy base)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line naming the argument for input that cannot run."""
    from diffpo.config import ConfigError
    from diffpo.devices import resolve_device
    from studies import meta

    args = build_parser().parse_args(argv)
    try:
        resolve_device(args.device)
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: use comma-separated integers, e.g. 0,1,2") from None
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds {args.seeds!r}: a seed is repeated")
        settings = PersonalizeSettings(
            class_images=args.class_images, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, prior_weight=args.prior_weight,
            mapo_beta=args.mapo_beta, eval_per_prompt=args.eval_per_prompt, drift_per_prompt=args.drift_per_prompt,
            num_inference_steps=args.inference_steps, max_prompts=args.max_prompts, device=args.device,
        )
    except ConfigError as err:
        print(f"python -m studies.personalize: error: {err}", file=sys.stderr)
        return 2
    report = run_personalization(args.out, seeds, settings, base=args.base, command=meta.command_line("studies.personalize", argv))
    print(format_summary(report))
    print(f"Report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
