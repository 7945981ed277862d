#!/usr/bin/env bash
# Issue 16, session 11's device calls (one H200).
#   PART=a (~9.5 min): setup; the shipped fast config cold, profiled at steps 8-9 with the device's idle gaps
#          (benchmarks/trace_gaps.py); the same warm (the first step with the AOTAutograd cache allowed for
#          GEGLU's autograd.Function); train.channels_last=true (a new layout: compiles anew)
#          (as run: the machine was slower, cold and channels_last hit their caps; the warm run finished)
#   PART=b1 (~9.8 min): the in-place 8-bit update's GPU tests; setup; the shipped fast config cold through the
#          copy path (--copy-path: the float32 gradient bucket and the copy back, the lever's "before"), then
#          warm in place (the lever's "after" and the warm first step), profiled at steps 8-9 with the idle
#          gaps; the harness: public recipe, the fast path for MaPO and for Diffusion-DPO (target 4)
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-575} STAGES=${STAGES:-"setup cold warm extra"} COLD_CAP=${COLD_CAP:-240} COLD_ARGS=${COLD_ARGS:-"--profile 8"} \
       WARM_CAP=${WARM_CAP:-90} EXTRA_CAP=${EXTRA_CAP:-200} EXTRA_ARGS=${EXTRA_ARGS-"--profile 8 train.channels_last=true"} ;;
  b1) export BUDGET=${BUDGET:-590} STAGES=${STAGES:-"inplacetest setup cold warm harness"} COLD_CAP=${COLD_CAP:-260} COLD_ARGS=${COLD_ARGS-"--copy-path"} \
       WARM_CAP=${WARM_CAP:-130} WARM_ARGS=${WARM_ARGS-"--profile 8"} \
       CASES=${CASES:-"public/mapo/full,diffpo+compile+c8bit+static+geglu/mapo/full,diffpo+compile+c8bit+static+geglu/diffusion_dpo/full"} ;;
  *) echo "PART is a or b1" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
