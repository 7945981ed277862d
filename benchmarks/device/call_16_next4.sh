#!/usr/bin/env bash
# Issue 16's next device calls (after "Issue 16, the trainer's overhead" in BENCHMARKS.md): the two levers
# left for target 1, each measured side by side before anything is wired into the trainer. One H200.
#   PART=e (~9.5 min): train.adam_8bit_kernel=triton's tests on the GPU (they skip in CI); the optimizer
#          step alone with bitsandbytes' Triton 8-bit kernel beside its CUDA one
#          (benchmarks/optimizer_step.py: time, and each one's distance from float32 AdamW after two
#          steps); then the harness: the public recipe, diffpo with the whole UNet compiled as one graph
#          (train.compile=full: fewer gaps between compiled regions; cold, so its compile time shows),
#          and the regional fast path it would replace
#   PART=f (~8 min): setup; `diffpo train`, shipped fast config, cold; the same warm with
#          train.adam_8bit_kernel=triton (bitsandbytes' Triton kernel for the 8-bit moments); the public
#          recipe in the harness (the same machine's ratio)
#   PART=g (~9.5 min, only if part e's whole-network compilation paid): setup, then `diffpo train` with
#          train.compile=full, cold then warm (first step with the compile cache)
# Run after installing the carried wheels (diffusers, datasets, bitsandbytes):  PART=e bash benchmarks/device/call_16_next4.sh
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-e} in
  e) export BUDGET=${BUDGET:-560} STAGES=${STAGES:-"tritontest optim harness"} OPTIM_CAP=${OPTIM_CAP:-150} \
       CASES=${CASES:-"public/mapo/full,diffpo+fullcompile+8bit/mapo/full,diffpo+compile+8bit/mapo/full"} ;;
  f) export BUDGET=${BUDGET:-560} STAGES=${STAGES:-"setup cold warm harness"} COLD_CAP=${COLD_CAP:-330} \
       WARM_CAP=${WARM_CAP:-100} WARM_ARGS=${WARM_ARGS:-"train.adam_8bit_kernel=triton"} CASES=${CASES:-"public/mapo/full"} ;;
  g) export BUDGET=${BUDGET:-560} STAGES=${STAGES:-"setup cold warm"} COLD_CAP=${COLD_CAP:-380} COLD_ARGS=${COLD_ARGS:-"train.compile=full"} \
       WARM_CAP=${WARM_CAP:-120} WARM_ARGS=${WARM_ARGS:-"train.compile=full"} ;;
  *) echo "PART is e, f or g" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
