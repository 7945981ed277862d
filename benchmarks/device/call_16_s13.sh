#!/usr/bin/env bash
# Issue 16, session 13's device calls (one H200).
#   PART=a (~9.8 min): the in-place 8-bit tests, then the one-bucket kernels (the in-place kernel at several
#          launches: blocks per program x warps, the state's loads before or after the member lookups),
#          beside setup; the shipped config cold, profiled at steps 8-9; warm with the fastest launch; the
#          same + train.gc_every=50 (no automatic garbage collection inside a step), profiled at 8-9; the
#          harness's public recipe (the ratio's denominator on the same machine)
#   PART=c (~9 min, a new machine): PART=a with the kernel's defaults as they were then (2 blocks x 4 warps, the
#          state's loads first; the hyperparameters copied from pinned memory) and smaller launches
#   PART=b (on the machine PART=a leaves warm: its compile cache and setup): the harness's fast MaPO and
#          fast Diffusion-DPO (target 4), then the public recipe again
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
INDIRECT_ROWS=diffpo-indirect-4x4,diffpo-indirect-4x4-late,diffpo-indirect-2x4,diffpo-indirect-4x2,diffpo-indirect-8x4,diffpo-indirect-8x8,diffpo-indirect-8x8-late,diffpo-indirect-16x8
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-585} STAGES=${STAGES:-"testsetup cold pickkernel warm extra harness"} COLD_CAP=${COLD_CAP:-260} COLD_ARGS=${COLD_ARGS-"--profile 8"} \
       KERN_ONLY=${KERN_ONLY-"diffpo-triton-4x4,$INDIRECT_ROWS"} KERN_CAP=${KERN_CAP:-90} WARM_CAP=${WARM_CAP:-90} \
       EXTRA_NAME=${EXTRA_NAME:-gc} EXTRA_CAP=${EXTRA_CAP:-100} EXTRA_ARGS=${EXTRA_ARGS-"--profile 8 train.gc_every=50"} \
       CASES=${CASES:-"public/mapo/full"} ;;
  c) export BUDGET=${BUDGET:-560} STAGES=${STAGES:-"testsetup cold pickkernel warm extra harness"} COLD_CAP=${COLD_CAP:-260} COLD_ARGS=${COLD_ARGS-"--profile 8"} \
       KERN_ONLY=${KERN_ONLY-"diffpo-triton-4x4,diffpo-indirect-1x1,diffpo-indirect-1x2,diffpo-indirect-1x4,diffpo-indirect-2x2,diffpo-indirect-2x4,diffpo-indirect-2x8,diffpo-indirect-4x4,diffpo-indirect-2x4-late"} \
       KERN_CAP=${KERN_CAP:-90} WARM_CAP=${WARM_CAP:-90} EXTRA_NAME=${EXTRA_NAME:-gc} EXTRA_CAP=${EXTRA_CAP:-100} EXTRA_ARGS=${EXTRA_ARGS-"train.gc_every=50"} \
       CASES=${CASES:-"public/mapo/full"} ;;
  b) export BUDGET=${BUDGET:-560} STAGES=${STAGES:-"harness"} \
       CASES=${CASES:-"diffpo+compile+c8bit+static+geglu/mapo/full,diffpo+compile+c8bit+static+geglu/diffusion_dpo/full,public/mapo/full"} ;;
  *) echo "PART is a, b or c" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
