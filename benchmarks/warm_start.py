"""Where a warm first step of regional torch.compile goes, on the CPU (issue 16, target 3).

One process = build a narrow UNet with SDXL's structure (3 blocks, transformer depths 1/2/10 -> 70
BasicTransformerBlocks, text_time conditioning), compile its regions, run one forward+backward of a
MaPO-like loss and time it, then print torch.compile's phase times, cache counters, graphs and
recompiles as one JSON line. Run it twice with the same cache folder: the first run is cold, the second
warm (Dynamo re-traces every region in a new process; Inductor's FX-graph and AOTAutograd caches skip
the compilation after the trace). Dynamo's tracing cost depends on the network's structure, not its
width, so a narrow stand-in measures the trace; Inductor's codegen differs on the CPU (C++ instead of
Triton) but a warm start loads it from the cache.

    python -m benchmarks.warm_start --cache /tmp/wc_a --lever regional    # cold
    python -m benchmarks.warm_start --cache /tmp/wc_a --lever regional    # warm

Levers (``--lever``): ``regional`` (``diffpo.fastpath.compile_network`` as shipped: torch.compile's
default ``dynamic=None``), ``static`` (regions compiled with ``dynamic=False``), ``dynamic``
(``dynamic=None`` set explicitly, the same as ``regional``), ``blocks`` (BasicTransformerBlock instead of
Transformer2DModel), ``none`` (eager). Results: benchmarks/WARM_START.md.
``--mega`` saves ``torch.compiler.save_cache_artifacts()`` at the end and loads it at the start.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def sdxl_like_unet(width: int = 32):
    """SDXL's UNet config (diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json) with
    channels, heads and embedding sizes divided down; the block structure is SDXL's."""
    from diffusers import UNet2DConditionModel

    full = width >= 320  # SDXL's own sizes (width 320): for a GPU run
    time_dim = 256 if full else 8
    pooled = 1280 if full else 32
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(width, 2 * width, 4 * width),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20) if full else (2, 4, 8),  # SDXL: (5, 10, 20) heads of 64 channels
        cross_attention_dim=2048 if full else 64,
        norm_num_groups=min(32, width),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        upcast_attention=False,
    )


BLOCKS = {
    "regional": ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"),
    "static": ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"),
    "dynamic": ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"),
    "blocks": ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D"),
    "none": (),
}


class RecompileCounter(logging.Handler):
    """Counts Dynamo's recompile messages (the ``recompiles`` log artifact) and keeps their first lines."""

    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record):
        self.reasons.append(record.getMessage().strip().splitlines()[0][:200] + " | " + " ".join(record.getMessage().split("\n")[1:3])[:300])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="TORCHINDUCTOR_CACHE_DIR (the same for the cold and the warm run)")
    parser.add_argument("--lever", choices=sorted(BLOCKS), default="regional")
    parser.add_argument("--mega", action="store_true", help="load/save torch.compiler cache artifacts (mega-cache) at start/end")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (configs/sdxl_mapo_fast.yaml)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--dynamo", action="append", default=[], help="torch._dynamo.config NAME=VALUE (python literal)")
    parser.add_argument("--inductor", action="append", default=[], help="torch._inductor.config NAME=VALUE")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU's Triton path")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import ast

    import torch
    import torch._dynamo
    import torch._inductor.config

    from diffpo.fastpath import compile_network, use_compile_cache

    use_compile_cache(args.cache)  # as train.compile_cache_dir: Inductor's caches and Triton's in one folder

    for target, settings in ((torch._dynamo.config, args.dynamo), (torch._inductor.config, args.inductor)):
        for item in settings:
            name, value = item.split("=", 1)
            setattr(target, name, ast.literal_eval(value))

    counter = RecompileCounter()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards").addHandler(counter)
    logging.getLogger("torch._dynamo").propagate = False
    mega_path = Path(args.cache) / "mega.bin"
    mega_load = None
    if args.mega and mega_path.exists():
        t = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(mega_path.read_bytes())
        mega_load = time.perf_counter() - t

    torch.manual_seed(0)
    with torch.device(args.device):  # initialise where it runs (SDXL's 2.6B parameters: seconds on a GPU, a minute on a CPU)
        unet = sdxl_like_unet(args.width)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(args.device, dtype=getattr(torch, args.dtype)).train()
    t_import_build = time.perf_counter() - t0
    if args.lever != "none":
        compile_network(unet, "regional", BLOCKS[args.lever])
        if args.lever in ("static", "dynamic"):
            # static: dynamic=False (one static graph per shape); dynamic: torch.compile's default
            # dynamic=None, what compile_network does
            for module in unet.modules():
                if getattr(module, "_compiled_call_impl", None) is not None:
                    module._compiled_call_impl = None
                    module.compile(**({"dynamic": False} if args.lever == "static" else {}))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    b, s = args.batch, args.latent
    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, args.dtype)
    latents = torch.randn(b, 4, s, s, generator=g).to(args.device, dt)
    noise = torch.randn(b, 4, s, s, generator=g).to(args.device, dt)
    timesteps = torch.randint(0, 1000, (b // 2,), generator=g).repeat(2).to(args.device)
    text = torch.randn(b, 77, 64 if args.width < 320 else 2048, generator=g).to(args.device, dt)
    pooled = 32 if args.width < 320 else 1280
    added = {"text_embeds": torch.randn(b, pooled, generator=g).to(args.device, dt), "time_ids": torch.tensor([[s * 8, s * 8, 0, 0, s * 8, s * 8]] * b, dtype=dt, device=args.device)}

    def step() -> float:
        pred = unet(latents + noise, timesteps, text, added_cond_kwargs=added).sample
        err = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
        err_w, err_l = err.chunk(2)
        # MaPO (LOSSES.md): the winner's error plus an odds-ratio margin (here a log-sigmoid of the gap)
        loss = (err_w - torch.nn.functional.logsigmoid(0.1 * (err_l - err_w))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync: the step's time includes the device's work

    step_times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t)
    mega_save = None
    if args.mega:
        t = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            mega_path.write_bytes(saved[0])
        mega_save = time.perf_counter() - t

    from torch._dynamo.utils import counters

    from benchmarks.train_e2e import compile_cache_counters, compile_seconds

    top = {k: round(v, 2) for k, v in compile_seconds(top=8).items()}
    inductor = compile_cache_counters()["inductor"]
    aot = dict(counters["aot_autograd"])
    result = {
        "lever": args.lever + ("+mega" if args.mega else "") + ("+ckpt" if args.checkpointing else "") + "".join(f"+{x}" for x in args.dynamo + args.inductor),
        "import_build_s": round(t_import_build, 2),
        "step_s": [round(x, 2) for x in step_times],
        "mega_load_s": mega_load and round(mega_load, 2),
        "mega_save_s": mega_save and round(mega_save, 2),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "frames_ok": counters["frames"].get("ok", 0),
        "recompiles": len(counter.reasons),
        "recompile_reasons": counter.reasons[:40],
        "inductor_cache": inductor,
        "aot_autograd": aot,
        "top_phases_s": top,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
