#!/usr/bin/env bash
# Issue 16, session 11's device calls (one H200).
#   PART=a (~9.5 min): setup; the shipped fast config cold, profiled at steps 8-9 with the device's idle gaps
#          (benchmarks/trace_gaps.py); the same warm (the first step with the AOTAutograd cache allowed for
#          GEGLU's autograd.Function); train.channels_last=true (a new layout: compiles anew)
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-575} STAGES=${STAGES:-"setup cold warm extra"} COLD_CAP=${COLD_CAP:-240} COLD_ARGS=${COLD_ARGS:-"--profile 8"} \
       WARM_CAP=${WARM_CAP:-90} EXTRA_CAP=${EXTRA_CAP:-200} EXTRA_ARGS=${EXTRA_ARGS-"--profile 8 train.channels_last=true"} ;;
  *) echo "PART is a" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
