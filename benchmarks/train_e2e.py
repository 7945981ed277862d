"""`diffpo train` end to end on a random-weight SDXL saved to disk, step times from its own metrics.jsonl.

    python -m benchmarks.train_e2e setup --arch sdxl --pairs 64 --work /tmp/e2e          # model, images, latent cache
    python -m benchmarks.train_e2e train --work /tmp/e2e --name cold --steps 25 --out cold.json [key=value ...]
    python -m benchmarks.train_e2e train --work /tmp/e2e --name prof --steps 20 --profile 8 --out prof.json   # steps 8-9 profiled
    python -m benchmarks.train_e2e setup --arch tiny-sdxl --pairs 4 --work /tmp/e2e --device cpu   # CPU smoke run

``setup`` builds what a user would have before training: the published SDXL architecture with random
weights saved by ``save_pretrained`` (``benchmarks/archs.py``; no download), ``--pairs`` generated
image pairs at the arch's resolution, and their latent cache built by ``diffpo cache`` (bf16, flip
copies, as ``configs/sdxl_mapo_fast.yaml`` says).

``train`` runs the trainer (``diffpo.train.train``, what ``diffpo train`` calls) in this fresh
process with ``configs/sdxl_mapo_fast.yaml`` pointed at that model and cache, one micro-step per
optimizer step (4 pairs, as the harness's step) and ``train.compile_cache_dir`` under ``--work``:
run it twice with the same folder for the cold and the warm first step. Checkpoints and the final
save are left out (``--no-save``, the default): at SDXL size each is tens of GB written after the
last timed step, which no step time includes. Reported: every step's ``step_seconds`` and
``data_seconds`` from metrics.jsonl, the first step, the median of the steps after ``--skip``,
pairs/s, peak GPU memory, and the wall time of setup (loading, compiling) before the first step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

FAST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sdxl_mapo_fast.yaml"
ARCHS_E2E = ("sdxl", "tiny-sdxl")
# a CPU smoke run: float32 weights (no bf16 masters, so bitsandbytes' plain 8-bit AdamW, whose kernel is its own)
CPU_OVERRIDES = ["train.mixed_precision=no", "train.weight_dtype=float32", "train.adam_8bit_kernel=bitsandbytes"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="model on disk, image pairs, latent cache")
    s.add_argument("--arch", choices=ARCHS_E2E, default="sdxl")
    s.add_argument("--pairs", type=int, default=64)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--out", type=Path, default=None)
    t = sub.add_parser("train", help="one diffpo train run on what setup built")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--name", required=True, help="the run's folder under WORK/runs")
    t.add_argument("--steps", type=int, default=25)
    t.add_argument("--skip", type=int, default=5, help="steps left out of the median (compilation, warm-up)")
    t.add_argument("--config", type=Path, default=FAST_CONFIG)
    t.add_argument("--save", action="store_true", help="keep checkpoints and the final save (tens of GB at SDXL size)")
    t.add_argument("--profile", type=int, default=0, metavar="STEP", help="profile optimizer steps STEP and STEP+1 (torch.profiler): device time by kind of kernel, device busy vs wall time")
    t.add_argument("--copy-path", action="store_true", help="8-bit AdamW over float32 masters through the upcast bucket gradient and the copy back, not in place (MasterWeightAdamW8bit.in_place_8bit=False): the side-by-side of that lever")
    t.add_argument("--indirect", default="", metavar="RxW[-late]", help="the in-place 8-bit kernel's launch (diffpo.adam8bit.INDIRECT_LAUNCH): R blocks per program, W warps, -late: the state's loads after the member lookups (as benchmarks.adam8bit_kernel names them)")
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("overrides", nargs="*", help="more key=value config overrides")
    return p.parse_args(argv)


def write_pairs(root: Path, count: int, resolution: int) -> Path:
    """``count`` pairs of plain images (a disc against a square, colours varying by index)."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rows, r = [], resolution
    for i in range(count):
        chosen, rejected = Image.new("RGB", (r, r), (128, 128, 128)), Image.new("RGB", (r, r), (128, 128, 128))
        ImageDraw.Draw(chosen).ellipse((r // 5, r // 5, 4 * r // 5, 4 * r // 5), fill=(250, (40 * i) % 256, 40))
        ImageDraw.Draw(rejected).rectangle((r // 4, r // 4, 3 * r // 4, 3 * r // 4), fill=(20, 30, (90 + 30 * i) % 256))
        chosen.save(root / f"w{i}.png", compress_level=1)
        rejected.save(root / f"l{i}.png", compress_level=1)
        rows.append(json.dumps({"prompt": f"a shape number {i} on a gray background", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return root


def base_overrides(work: Path, resolution: int) -> list[str]:
    return [f"model.pretrained={work / 'model'}", f"data.source={work / 'pairs'}", "data.format=auto", f"data.resolution={resolution}"]


def setup(args) -> dict:
    from benchmarks.archs import ARCHS
    from benchmarks.sampling_bench import build_model

    arch = ARCHS[args.arch]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"arch": args.arch, "pairs": args.pairs, "resolution": arch.resolution}
    started = time.perf_counter()
    build_model(args.arch, work / "model", args.device)
    record["model_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    write_pairs(work / "pairs", args.pairs, arch.resolution)
    record["images_s"] = round(time.perf_counter() - started, 1)
    overrides = base_overrides(work, arch.resolution) + ([] if args.device.startswith("cuda") else CPU_OVERRIDES)
    cmd = [sys.executable, "-m", "diffpo", "cache", "--config", str(FAST_CONFIG), *overrides, "logging.progress=false", "--device", args.device, "--out", str(work / "cache"), "--flip-copies", "--dtype", "bfloat16"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    record.update(cache_s=round(time.perf_counter() - started, 1), cache_command=" ".join(cmd[2:]), cache_returncode=done.returncode)
    if done.returncode != 0:
        record["cache_stderr"] = done.stderr[-3000:]
    _write(args.out, record)
    print(json.dumps(record), flush=True)
    if done.returncode != 0:
        raise SystemExit(f"diffpo cache failed: {done.stderr[-1500:]}")
    return record


def train_run(args) -> dict:
    from benchmarks.archs import ARCHS
    from diffpo import train as train_module
    from diffpo.config import load_config

    meta = json.loads((args.work / "cache" / "meta.json").read_text())
    resolution = int(meta["data.resolution"])
    arch = next(name for name, a in ARCHS.items() if a.resolution == resolution and a.family == "sdxl")
    on_gpu = torch.cuda.is_available()
    out_dir = args.work / "runs" / args.name
    overrides = base_overrides(args.work, resolution) + [
        f"data.cache={args.work / 'cache'}", f"output_dir={out_dir}", "overwrite_output_dir=true",
        "train.gradient_accumulation_steps=1", f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}",
        f"train.compile_cache_dir={args.work / 'compile_cache'}", "logging.report_to=none", "logging.progress=false",
    ] + ([] if on_gpu else [*CPU_OVERRIDES, "train.compile=none", "data.num_workers=0"]) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    saves = train_module.save_checkpoint, train_module.save_final
    if not args.save:  # the steps are timed; the saves (tens of GB at SDXL size) come after them
        train_module.save_checkpoint = lambda *a, **k: None
        train_module.save_final = lambda cfg, accelerator, *a, **k: Path(cfg.output_dir) / "final"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if args.copy_path:
        from diffpo.fastpath import MasterWeightAdamW8bit

        MasterWeightAdamW8bit.in_place_8bit = False
    if args.indirect:
        from diffpo import adam8bit

        size, _, late = args.indirect.partition("-")
        rows, warps = (int(n) for n in size.split("x"))
        adam8bit.INDIRECT_LAUNCH.update(rows=rows, num_warps=warps, early=late != "late")
    profiled: dict = {}
    step_record = train_module.step_record
    if args.profile:
        train_module.step_record = _profiling_step_record(step_record, args.profile, profiled, args.out)
    started = time.perf_counter()
    try:
        result = train_module.train(cfg)
    finally:  # the trainer saves again for whatever runs next in this process
        train_module.save_checkpoint, train_module.save_final = saves
        train_module.step_record = step_record
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m["step_seconds"] for m in lines]
    # the profiled steps, and the one after them (it starts on a drained device: no previous
    # optimizer step left to finish), are not the step time
    profiled_steps = (args.profile, args.profile + 1, args.profile + 2) if args.profile else ()
    timed = [s for number, s in enumerate(steps, 1) if number > args.skip and number not in profiled_steps]
    median_of = f"{args.skip + 1}-{len(steps)}" + (f" without {profiled_steps[0]}-{profiled_steps[-1]} (profiled)" if profiled_steps else "")
    if not timed:  # a smoke run shorter than --skip: every step, compilation included, and said so
        timed, median_of = steps, f"1-{len(steps)} (all: fewer steps than --skip {args.skip} and the profiled ones)"
    median = statistics.median(timed)
    pairs = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    record = {
        "name": args.name, "arch": arch, "config": str(args.config), "overrides": overrides, "steps": result.steps, "copy_path": args.copy_path, "indirect": args.indirect,
        "first_step_s": steps[0], "median_step_s": median, "median_of_steps": median_of,
        "pairs_per_step": pairs, "pairs_per_s": pairs / median,
        "mean_step_s_after_skip": statistics.fmean(timed),
        "step_seconds": steps, "data_seconds": [m.get("data_seconds") for m in lines],
        "losses": [m.get("loss") for m in lines], "skipped": sum(bool(m["skipped"]) for m in lines),
        "wall_s": wall, "outside_steps_s": wall - sum(steps),  # loading and setup; compilation happens inside step 1
        "saves": "skipped (--save not given)" if not args.save else "written",
        "environment": {"torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
    }
    if on_gpu:
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profiled:
        record["profile"] = profiled
    record["compile_cache_counters"] = compile_cache_counters()
    record["compile_seconds"] = compile_seconds()
    _write(args.out, record)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items() if k not in ("step_seconds", "data_seconds", "losses", "overrides")}
    print(json.dumps(shown), flush=True)
    return record


def _profiling_step_record(step_record, first: int, profiled: dict, out: Path | None):
    """``diffpo.train.step_record`` (called once per optimizer step, after the step's work is
    launched) that also runs torch.profiler over optimizer steps ``first`` and ``first + 1``: from
    the end of step ``first - 1`` to the end of step ``first + 1``, the device drained at both ends
    (one extra host wait before and after the two steps, none inside them). Fills ``profiled``, per
    step (the two steps' mean, as the harness's one-step profile): wall time, device busy time (the
    kernels' summed time), device time by kind of kernel; and the top kernels table next to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.train_step import synchronize, time_by_kind

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    state: dict = {}

    def wrapped(step, *args, **kwargs):
        record = step_record(step, *args, **kwargs)
        if step == first - 1:
            synchronize(device)
            state["prof"] = profile(activities=activities)
            state["prof"].start()
            state["started"] = time.perf_counter()
        elif step == first + 1 and "prof" in state:
            synchronize(device)
            wall = time.perf_counter() - state["started"]
            prof = state.pop("prof")
            prof.stop()
            kinds = {kind: ms / 2 for kind, ms in time_by_kind(prof, device).items()}  # per step, as the harness's one-step profile
            profiled.update(steps=[first, first + 1], wall_ms=1e3 * wall / 2, device_busy_ms=sum(kinds.values()), by_kind_ms=kinds)
            profiled["device_idle_fraction"] = max(0.0, 1.0 - profiled["device_busy_ms"] / profiled["wall_ms"]) if device.type == "cuda" else None
            if out is not None:
                table = out.with_name(out.stem + "_profile.txt")
                sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                table.write_text(prof.key_averages().table(sort_by=sort, row_limit=50))
                profiled["table"] = table.name
                if device.type == "cuda":  # where the device waited, gap by gap (benchmarks/trace_gaps.py)
                    from benchmarks.trace_gaps import analyse, load_events

                    trace = out.with_name(out.stem + "_trace.json")
                    prof.export_chrome_trace(str(trace))
                    try:
                        profiled["gaps"] = {"over_steps": 2, **analyse(load_events(trace))}  # both profiled steps, not per step
                    finally:
                        trace.unlink()  # hundreds of MB: the gap summary is what comes back
        return record

    return wrapped


def compile_cache_counters() -> dict:
    """Hits, misses and bypasses of torch.compile's on-disk caches in this process (FX graph cache:
    inductor's compiled kernels; AOTAutograd cache: the traced forward/backward pair), to see why a
    warm first step is or is not fast."""
    from torch._dynamo.utils import counters

    return {group: {k: v for k, v in counters[group].items() if "cache" in k or "bypass" in k} for group in ("inductor", "aot_autograd")}


def compile_seconds(top: int = 30) -> dict[str, float]:
    """Where torch.compile spent this process's compile time, by phase (Dynamo tracing, AOTAutograd,
    inductor codegen, cache lookups), the ``top`` longest; empty when nothing was compiled.

    Read from Dynamo's own record (``compilation_time_metrics``, what ``compile_times()`` prints),
    not from ``compile_times(repr="str")``: that string is a ``tabulate`` table where the package is
    installed (the GPU image has it), comma-separated rows only where it is not."""
    from torch._dynamo.utils import compilation_time_metrics

    rows = {name: float(sum(values)) for name, values in compilation_time_metrics.items() if values}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1])[:top])


def _write(path: Path | None, record: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.command == "train" and args.profile == 1:
        raise SystemExit("--profile STEP: STEP >= 2 (profiling starts at the end of step STEP - 1)")
    return setup(args) if args.command == "setup" else train_run(args)


if __name__ == "__main__":
    main()
