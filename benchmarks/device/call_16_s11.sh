#!/usr/bin/env bash
# Issue 16, session 11's device calls (one H200).
#   PART=a (~9.5 min): setup; the shipped fast config cold, profiled at steps 8-9 with the device's idle gaps
#          (benchmarks/trace_gaps.py); the same warm (the first step with the AOTAutograd cache allowed for
#          GEGLU's autograd.Function); train.channels_last=true (a new layout: compiles anew)
#          (as run: the machine was slower, cold and channels_last hit their caps; the warm run finished)
#   PART=b1 (~9 min): the in-place 8-bit update's GPU tests; setup; the shipped fast config (8-bit AdamW in place) cold, then warm profiled at
#          steps 8-9 with the idle gaps; the harness: public recipe and the fast path (MaPO)
#   PART=b2 (~3.5 min, same warm machine right after b1): the trainer warm through the copy path (the
#          in-place lever's side by side); the harness fast path for Diffusion-DPO (target 4)
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-575} STAGES=${STAGES:-"setup cold warm extra"} COLD_CAP=${COLD_CAP:-240} COLD_ARGS=${COLD_ARGS:-"--profile 8"} \
       WARM_CAP=${WARM_CAP:-90} EXTRA_CAP=${EXTRA_CAP:-200} EXTRA_ARGS=${EXTRA_ARGS-"--profile 8 train.channels_last=true"} ;;
  b1) export BUDGET=${BUDGET:-585} STAGES=${STAGES:-"inplacetest setup cold warm harness"} COLD_CAP=${COLD_CAP:-270} COLD_ARGS=${COLD_ARGS-} \
       WARM_CAP=${WARM_CAP:-130} WARM_ARGS=${WARM_ARGS-"--profile 8"} CASES=${CASES:-"public/mapo/full,diffpo+compile+c8bit+static+geglu/mapo/full"} ;;
  b2) export BUDGET=${BUDGET:-200} STAGES=${STAGES:-"extra harness"} EXTRA_NAME=copy EXTRA_CAP=${EXTRA_CAP:-80} EXTRA_ARGS=${EXTRA_ARGS-"--copy-path"} \
       CASES=${CASES:-"diffpo+compile+c8bit+static+geglu/diffusion_dpo/full"} ;;
  *) echo "PART is a, b1 or b2" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
