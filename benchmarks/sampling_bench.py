"""Sampling throughput: ``diffpo eval``'s sampler against the diffusers pipeline called directly.

    python -m benchmarks.sampling_bench --arch sdxl --device cuda --dtype bf16 --out benchmarks/results/sampling_h200.json
    python -m benchmarks.sampling_bench --arch tiny --device cpu --steps 2 --images 2 --out /tmp/s.json   # smoke run

What runs, in order (all under ``--workdir``, a temporary folder by default):

1. A random-weight SDXL-size pipeline (``benchmarks/archs.py``: the published SDXL UNet, VAE and
   CLIP-L/bigG configs; the shapes world's tokenizer padded to 77 tokens) is saved with
   ``save_pretrained``, as a downloaded model would be on disk. ``--arch tiny`` keeps the structure
   at toy size.
2. ``diffpo train`` (a subprocess) trains a LoRA on it: MaPO, rank 8, ``--train-steps`` steps on
   two generated pairs at the arch's resolution.
3. ``diffpo eval --lora`` (a subprocess) runs end to end on a few prompts (command and wall time
   recorded).
4. Timing, warm-up excluded, same prompts, seeds, steps, guidance, resolution, batch size and dtype:
   - ``diffpo``: ``diffpo.evaluate.run.load_tuned`` (base + the LoRA as a peft adapter on a copy of
     the network) and ``diffpo.sampling.generate``, the entry point ``diffpo eval`` samples through;
   - ``diffusers``: ``StableDiffusionXLPipeline.from_pretrained(torch_dtype=...)`` +
     ``load_lora_weights`` on the run's LoRA, called with the same per-image generators.
   Each side is timed ``--repeats`` times, alternating; the median is reported. The two sides'
   images are compared pixel by pixel (same seeds: they should be the same images).

Output JSON: images/s of each side and their ratio (diffpo / diffusers), settings, commands,
environment.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from benchmarks.archs import ARCHS, build_encoders, build_unet
from diffpo.sampling import resolve_settings

ARCH_NAMES = {"sdxl": "sdxl", "tiny": "tiny-sdxl"}
PROMPTS = [
    "a red circle on a gray background", "a blue square on a white background", "a green triangle on a black background",
    "a yellow circle on a blue background", "a purple square on a gray background", "an orange triangle on a white background",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCH_NAMES), default="sdxl", help="sdxl: the published SDXL sizes; tiny: a CPU smoke run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--images", type=int, default=8, help="images per timed run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (alternating); the median is reported")
    p.add_argument("--train-steps", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=2, help="prompts of the end-to-end diffpo eval run (1 image each; 0 skips it)")
    p.add_argument("--control", action="store_true",
                   help="also time a second, identically loaded diffusers pipeline (the noise floor: its ratio to the first should be 1) "
                        "and diffpo's pipeline object called directly (generate()'s per-call set-up excluded)")
    p.add_argument("--workdir", type=Path, default=None, help="where the model, run and eval go (default: a temporary folder, removed)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- set-up


def build_model(arch_name: str, out: Path, device: str) -> Path:
    """Random-weight SDXL pipeline of ``arch_name`` saved to ``out`` (float32, as published)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    arch = ARCHS[arch_name]
    build_device = device if torch.device(device).type == "cuda" else "cpu"
    unet = build_unet(arch, build_device)
    vae, encoders, tokenizers = build_encoders(arch, build_device)
    # SDXL base's scheduler_config.json
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.to("cpu").save_pretrained(out)
    del pipe, unet, vae, encoders
    _free()
    return out


def write_pairs(root: Path, resolution: int) -> Path:
    """Two pairs: chosen = a bright disc, rejected = a dark square."""
    from PIL import ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(2):
        chosen, rejected = Image.new("RGB", (resolution,) * 2, (128, 128, 128)), Image.new("RGB", (resolution,) * 2, (128, 128, 128))
        r = resolution
        ImageDraw.Draw(chosen).ellipse((r // 5, r // 5, 4 * r // 5, 4 * r // 5), fill=(250, 200, 40))
        ImageDraw.Draw(rejected).rectangle((r // 4, r // 4, 3 * r // 4, 3 * r // 4), fill=(20, 30, 90))
        chosen.save(root / f"w{i}.png")
        rejected.save(root / f"l{i}.png")
        rows.append(json.dumps({"prompt": PROMPTS[i], "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return root


def run_command(cmd: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    record = {"command": " ".join(cmd[2:] if cmd[1:3] == ["-m", "diffpo"] else cmd), "returncode": done.returncode, "wall_s": round(time.perf_counter() - started, 2)}
    if done.returncode != 0:
        record["stderr_tail"] = done.stderr[-3000:]
    return record


def train_lora(model: Path, work: Path, args, resolution: int) -> tuple[Path, dict]:
    on_gpu = torch.device(args.device).type == "cuda"
    config = {
        "output_dir": str(work / "run"), "seed": 0,
        "model": {"pretrained": str(model), "family": "sdxl", "lora": {"enabled": True, "rank": 8, "alpha": 8}},
        "data": {"source": str(write_pairs(work / "pairs", resolution)), "resolution": resolution},
        "loss": {"name": "mapo"},
        "train": {"batch_size": 1, "max_steps": args.train_steps, "learning_rate": 1e-4, "checkpoint_every": args.train_steps,
                  "mixed_precision": "bf16" if on_gpu else "no"},
        "logging": {"report_to": "none", "progress": False},
    }
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    record = run_command([sys.executable, "-m", "diffpo", "train", "--config", str(path)])
    if record["returncode"] != 0:
        raise SystemExit(f"diffpo train failed:\n{record.get('stderr_tail', '')}")
    return work / "run", record


def eval_end_to_end(model: Path, run: Path, work: Path, args) -> dict:
    prompts = work / "eval_prompts.txt"
    prompts.write_text("\n".join(PROMPTS[: args.eval_prompts]) + "\n")
    cmd = [sys.executable, "-m", "diffpo", "eval", "--model", str(model), "--lora", str(run), "--prompts", str(prompts),
           "--scorers", "shapes_color", "--images-per-prompt", "1", "--steps", str(args.steps), "--guidance", str(args.guidance),
           "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device, "--out", str(work / "eval")]
    record = run_command(cmd)
    if record["returncode"] == 0:
        record["report_head"] = (work / "eval" / "report.md").read_text().splitlines()[:5]
    return record


# ---------------------------------------------------------------------------------- timing


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def diffpo_sampler(model: Path, run: Path, args):
    from diffpo.evaluate.run import load_tuned
    from diffpo.sampling import generate

    _, tuned = load_tuned(str(model), lora=str(run))
    settings = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "dtype": args.dtype}

    def sample(prompts, seeds):
        return generate(tuned, prompts, seeds, settings=settings, batch_size=args.batch_size, device=args.device, progress=False)

    return sample, tuned


def diffusers_sampler(model: Path, run: Path, args):
    from diffusers import StableDiffusionXLPipeline

    from diffpo.sampling import DTYPES

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), torch_dtype=DTYPES[args.dtype]).to(args.device)
    pipe.load_lora_weights(str(run / "final"))
    pipe.set_progress_bar_config(disable=True)

    def sample(prompts, seeds):
        images = []
        for start in range(0, len(prompts), args.batch_size):
            generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + args.batch_size]]
            images += pipe(prompt=prompts[start : start + args.batch_size], num_inference_steps=args.steps, guidance_scale=args.guidance,
                           generator=generators, output_type="pil").images
        return images

    return sample, pipe


def diffpo_pipeline_sampler(tuned, args):
    """diffpo's own pipeline object (``Family.sampler``), built once and called directly: what
    ``generate`` runs per batch, without its per-call set-up (settings, moves, pipeline build)."""
    from diffpo.sampling import resolve_settings

    settings = resolve_settings(tuned, num_inference_steps=args.steps, guidance_scale=args.guidance, dtype=args.dtype)
    sampler = tuned.family.sampler(tuned, tuned.network, settings, torch.device(args.device))

    def sample(prompts, seeds):
        images = []
        with torch.no_grad():
            for start in range(0, len(prompts), args.batch_size):
                images += sampler(prompts[start : start + args.batch_size], seeds[start : start + args.batch_size])
        return images

    return sample


def timed(sample, prompts, seeds, device) -> tuple[float, list[Image.Image]]:
    _sync(device)
    started = time.perf_counter()
    images = sample(prompts, seeds)
    _sync(device)
    return time.perf_counter() - started, images


def main(argv=None) -> dict:
    args = parse_args(argv)
    arch = ARCHS[ARCH_NAMES[args.arch]]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sampling_bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        model = build_model(arch.name, work / "model", args.device)
        build_s = time.perf_counter() - started
        run, train_record = train_lora(model, work, args, arch.resolution)
        eval_record = eval_end_to_end(model, run, work, args) if args.eval_prompts > 0 else None

        prompts = [PROMPTS[k % len(PROMPTS)] for k in range(args.images)]
        seeds = list(range(args.images))
        ours, ours_model = diffpo_sampler(model, run, args)
        theirs, theirs_pipe = diffusers_sampler(model, run, args)
        sides = {"diffpo": ours, "diffusers": theirs}
        if args.control:
            sides["diffusers_b"] = diffusers_sampler(model, run, args)[0]
            sides["diffpo_pipeline"] = diffpo_pipeline_sampler(ours_model, args)
        warm = min(args.batch_size, args.images)
        for sample in sides.values():  # warm-up: kernels, allocator, cuDNN autotuning
            sample(prompts[:warm], seeds[:warm])
        times = {label: [] for label in sides}
        images = {}
        labels = list(sides)
        for repeat in range(args.repeats):
            # Rotate the order each repeat, so no side always runs right after the same other one.
            for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
                seconds, images[label] = timed(sides[label], prompts, seeds, args.device)
                times[label].append(seconds)
        diff = [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in zip(images["diffpo"], images["diffusers"], strict=True)]
        rate = {label: args.images / statistics.median(t) for label, t in times.items()}
        result = {
            "arch": arch.name,
            "resolution": images["diffpo"][0].size[0],
            "settings": {"steps": args.steps, "guidance": args.guidance, "images": args.images, "batch_size": args.batch_size,
                         "dtype": args.dtype, "device": args.device, "repeats": args.repeats},
            "images_per_s": {label: round(value, 4) for label, value in rate.items()},
            "ratio_diffpo_over_diffusers": round(rate["diffpo"] / rate["diffusers"], 4),
            "ratios_over_diffusers": {label: round(value / rate["diffusers"], 4) for label, value in rate.items()},
            "seconds": {label: [round(t, 3) for t in values] for label, values in times.items()},
            "same_images": {"max_abs_pixel_diff": int(max(d.max() for d in diff)), "mean_abs_pixel_diff": float(np.mean([d.mean() for d in diff]))},
            "diffpo_sampler": resolve_settings(ours_model, num_inference_steps=args.steps, guidance_scale=args.guidance, dtype=args.dtype).as_dict(),
            "diffusers_scheduler": type(theirs_pipe.scheduler).__name__,
            "build_model_s": round(build_s, 2),
            "diffpo_train": train_record,
            "diffpo_eval": eval_record,
            "environment": {
                "torch": torch.__version__, "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
                "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            },
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("arch", "resolution", "images_per_s", "ratio_diffpo_over_diffusers", "same_images")}, indent=2))
    return result


if __name__ == "__main__":
    main()
