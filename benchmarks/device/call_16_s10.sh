#!/usr/bin/env bash
# Issue 16, session 10's device calls: GEGLU's one-pass backward (train.fused_geglu, diffpo/geglu.py) end to
# end through `diffpo train`, against the shipped fast config on the same machine. One H200.
#   PART=a (~9.5 min): setup; the shipped fast config (base, cold); the same + LEVER_ARGS (cold after base,
#          profiled at step 8); the public recipe in the harness
#   PART=b (~5 min, same warm machine): `diffpo train` + LEVER_ARGS warm; the harness: the fast path with
#          +geglu for MaPO and Diffusion-DPO (target 4) and without it (the trainer's overhead, target 2)
# (the block-level measurement came first: python -m benchmarks.compile_levers --blocks transformer ...)
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3} LEVER_ARGS=${LEVER_ARGS-train.fused_geglu=true}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-570} STAGES=${STAGES:-"setup base cold harness"} BASE_ARGS=${BASE_ARGS-} \
       BASE_CAP=${BASE_CAP:-260} COLD_CAP=${COLD_CAP:-200} COLD_ARGS=${COLD_ARGS:-"--profile 8"} CASES=${CASES:-"public/mapo/full"} ;;
  b) export BUDGET=${BUDGET:-330} STAGES=${STAGES:-"warm harness"} WARM_CAP=${WARM_CAP:-90} \
       CASES=${CASES:-"diffpo+compile+c8bit+static+geglu/mapo/full,diffpo+compile+c8bit+static+geglu/diffusion_dpo/full"} ;;
  *) echo "PART is a or b" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
