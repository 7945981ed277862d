#!/usr/bin/env bash
# Issue 16 target 3 on one H200 (~8 minutes): where the GPU's warm first step goes (benchmarks/WARM_START.md).
# SDXL's own UNet (random weights, --width 320), 4 pairs at 1024 px (latents 128), bf16, gradient
# checkpointing, regional compile as compile_network does it; run twice on one cache folder: cold, then
# warm. Each JSON holds the first step, the compile phases, cache hits (FX graph, AOTAutograd, Triton
# async_compile), graphs and recompiles. Run after installing the carried wheels (diffusers).
set -u
OUT=${OUT:-/tmp/diffpo_out}
CACHE=${CACHE:-/tmp/ws_gpu}
LEVER=${LEVER:-regional}
mkdir -p "$OUT"
rm -rf "$CACHE"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
for run in cold warm; do
  timeout "${CAP:-290}" python3 -m benchmarks.warm_start --cache "$CACHE" --lever "$LEVER" --device cuda --dtype bfloat16 \
    --width 320 --latent 128 --checkpointing > "$OUT/warm_start_${LEVER}_$run.json" 2> "$OUT/warm_start_${LEVER}_$run.log"
  echo "$run rc=$?"; head -c 1500 "$OUT/warm_start_${LEVER}_$run.json"; echo
done
