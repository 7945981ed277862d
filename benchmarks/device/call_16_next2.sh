#!/usr/bin/env bash
# Issue 16's next two device calls (after "Issue 16, final" in BENCHMARKS.md), on one warm H200; the
# second must follow the first within the machine's idle release (it reuses WORK):
#   PART=a (~7 min): setup (16 pairs); `diffpo train` with the fast config, its 4-step gradient
#          accumulation (the bf16 gradients then live through three forwards: the peak the shipped
#          config meets, less DDP's gradient buckets) and 8-bit moments for the largest tensors only
#          (train.adam_8bit_min_size=5000000: the optimizer step alone was 91.6 -> 68.0 ms), cold: its
#          peak memory decides whether the fast config can take it
#   PART=b (~7 min): the shipped fast config, warm, with optimizer steps 8-9 profiled (target 2: where
#          the trainer's +5.5% over the harness goes); the harness in one process: the public recipe and
#          diffpo+compile+8bit/mapo/full, profiled for one step (the same profile, harness side)
# Run after installing the carried wheels (diffusers, datasets, bitsandbytes):  PART=a bash benchmarks/device/call_16_next2.sh
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-5}
export CASES=${CASES:-"public/mapo/full,diffpo+compile+8bit/mapo/full"} HPROFILE=${HPROFILE:-"diffpo+compile+8bit/mapo/full"}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-450} STAGES=${STAGES:-"setup cold"} COLD_CAP=${COLD_CAP:-340} COLD_ARGS=${COLD_ARGS:-"train.adam_8bit_min_size=5000000 train.gradient_accumulation_steps=4"} ;;
  b) export BUDGET=${BUDGET:-480} STAGES=${STAGES:-"warm harness"} WARM_CAP=${WARM_CAP:-170} WARM_ARGS=${WARM_ARGS:-"--profile 8"} ;;
  *) echo "PART is a or b" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
