#!/usr/bin/env bash
# Issue 16, session 9's device calls: compile settings of the regional fast path (benchmarks/compile_levers.py:
# static graphs per shape, train.compile_dynamic=false; GEGLU's backward concatenation as one buffer,
# train.compile_options.max_pointwise_cat_inputs=1), end to end through `diffpo train`. One H200.
#   PART=a (~9.5 min): the levers on SDXL's feed-forward and resnet blocks (LEVER_ARGS := the settings that paid);
#          setup; `diffpo train` (shipped fast config + LEVER_ARGS) cold; the public recipe in the harness
#   PART=b (~6 min, same warm machine; pass LEVER_ARGS from part a): `diffpo train` warm with LEVER_ARGS
#          (profiled at step 8), then the fast config with symbolic sizes (BASE_ARGS: the same machine's before, cold)
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-a} in
  a) export BUDGET=${BUDGET:-560} STAGES=${STAGES:-"levers setup cold harness"} COLD_CAP=${COLD_CAP:-290} \
       CASES=${CASES:-"public/mapo/full"} ;;
  b) export BUDGET=${BUDGET:-480} STAGES=${STAGES:-"warm base"} WARM_CAP=${WARM_CAP:-110} \
       WARM_ARGS=${WARM_ARGS:-"--profile 8"} BASE_CAP=${BASE_CAP:-300} ;;
  *) echo "PART is a or b" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
