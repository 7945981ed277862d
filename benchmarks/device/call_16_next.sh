#!/usr/bin/env bash
# Issue 16's next device call (one H200, ~9.5 minutes), after the table of 2026-12-02 (BENCHMARKS.md):
# the wait-free 8-bit AdamW (diffpo.fastpath.AdamW8bit, built after that run) without gradient
# checkpointing, in the harness beside the public recipe (MaPO, and Diffusion-DPO for the step ratio),
# then through `diffpo train` end to end; its JSON records the warm first step's compile phases and
# cache hits (compile_seconds, compile_cache_counters).
# Run after installing the carried wheels (diffusers, datasets, bitsandbytes):  bash benchmarks/device/call_16_next.sh
export BUDGET=${BUDGET:-565} PAIRS=${PAIRS:-32} STAGES=${STAGES:-"setup harness lever"} RESERVE=${RESERVE:-150}
export CASES=${CASES:-"public/mapo/full,diffpo+compile+8bit/mapo/full,diffpo+compile+8bit/diffusion_dpo/full"}
export LEVER=${LEVER:-"model.gradient_checkpointing=false train.use_8bit_adam=true"}
exec bash "$(dirname "$0")/call_16.sh"
