#!/usr/bin/env bash
# Issue 16, session 12's device calls (one H200).
#   PART=a (~9.8 min): session 11's PART=b1 as it was (benchmarks/device/call_16_s11.sh): the in-place 8-bit
#          tests; setup; the shipped config cold through the copy path, then warm in place, profiled;
#          the harness (public, fast MaPO, fast Diffusion-DPO)
#   PART=c (~9.8 min): the in-place 8-bit tests (incl. the folded weights check) and the one-bucket kernels
#          (the in-place kernel with its 16-byte vector path against the same kernel sent down its
#          per-value path, beside the float32-bucket kernel) beside setup; the shipped config cold (the
#          vector path and the folded check), profiled at steps 8-9 with the idle gaps; the harness:
#          public recipe, fast MaPO, fast Diffusion-DPO (targets 1, 2 and 4 from one machine)
#          (as run: the tests ran out of their 100 s beside setup, so the trainer took the copy path and the
#          harness ran the public recipe only; the tests then passed alone on the same machine, 67 s:
#          pytest tests/test_adam8bit.py -k "in_place or triton_kernel or member_tables or updated_weights")
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-c} in
  a) exec env PART=b1 bash "$(dirname "$0")/call_16_s11.sh" ;;
  c) export BUDGET=${BUDGET:-585} STAGES=${STAGES:-"testsetup cold harness"} COLD_CAP=${COLD_CAP:-260} COLD_ARGS=${COLD_ARGS-"--profile 8"} \
       KERN_ONLY=${KERN_ONLY-"diffpo-triton-4x4,diffpo-indirect,diffpo-indirect-unaligned"} \
       CASES=${CASES:-"public/mapo/full,diffpo+compile+c8bit+static+geglu/mapo/full,diffpo+compile+c8bit+static+geglu/diffusion_dpo/full"} ;;
  *) echo "PART is a or c" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
