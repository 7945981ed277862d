#!/usr/bin/env bash
# Issue 16's device calls after the trainer-step profile (BENCHMARKS.md, "Issue 16, the trainer's
# overhead"), on one H200, back to back on one warm machine (the second reuses WORK and the compile cache):
#   PART=c (~9.5 min): setup (16 pairs); `diffpo train` with the shipped fast config, cold, now taking the
#          gradients into the float32 masters before its host sync and clipping inside the 8-bit update;
#          the harness in the same call (public recipe and diffpo+compile+8bit/mapo/full): targets 1 and 2
#   PART=d (~4 min): the same trainer warm, optimizer steps 8-9 profiled (did the optimizer's idle go?);
#          then 8-bit moments for the largest tensors only (train.adam_8bit_min_size=5000000), warm
# Run after installing the carried wheels (diffusers, datasets, bitsandbytes):  PART=c bash benchmarks/device/call_16_next3.sh
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
export CASES=${CASES:-"public/mapo/full,diffpo+compile+8bit/mapo/full"}
case ${PART:-c} in
  c) export BUDGET=${BUDGET:-570} STAGES=${STAGES:-"setup cold harness"} COLD_CAP=${COLD_CAP:-320} ;;
  d) export BUDGET=${BUDGET:-240} STAGES=${STAGES:-"warm lever"} WARM_CAP=${WARM_CAP:-120} WARM_ARGS=${WARM_ARGS:-"--profile 8"} LEVER=${LEVER:-"train.adam_8bit_min_size=5000000"} ;;
  *) echo "PART is c or d" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
