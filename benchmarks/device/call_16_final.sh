#!/usr/bin/env bash
# Issue 16's last two device calls, on one warm H200 (the second must follow the first within the
# machine's idle release, so that it finds the first's model, latents and compile cache in WORK):
#   PART=a (~7.5 min): setup (16 pairs), `diffpo train --config configs/sdxl_mapo_fast.yaml` with an
#          empty compile cache (the cold first step, the step times), the optimizer step alone side by side
#   PART=b (~7.5 min): the same run with the cache of part a (the warm first step), then the harness in
#          one process: the public recipe, diffpo+compile+8bit for MaPO and Diffusion-DPO (the same call:
#          the trainer's overhead over the harness, the DPO/MaPO step ratio, the ratio to the public recipe)
# Run after installing the carried wheels (diffusers, datasets, bitsandbytes):  PART=a bash benchmarks/device/call_16_final.sh
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-5}
export CASES=${CASES:-"public/mapo/full,diffpo+compile+8bit/mapo/full,diffpo+compile+8bit/diffusion_dpo/full"}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-450} STAGES=${STAGES:-"setup cold optim"} COLD_CAP=${COLD_CAP:-330} ;;
  b) export BUDGET=${BUDGET:-450} STAGES=${STAGES:-"warm harness"} WARM_CAP=${WARM_CAP:-170} ;;
  *) echo "PART is a or b" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
