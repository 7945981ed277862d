#!/usr/bin/env bash
# Issue 16, session 8's device calls: diffpo's diffpo 8-bit AdamW update (train.adam_8bit_kernel=diffpo,
# diffpo/adam8bit.py) against bitsandbytes' CUDA kernel (72 of each 487 ms SDXL step), end to end. One H200.
#   PART=h (~9.5 min): diffpo's 8-bit kernels: their tests on the GPU, then one 1 GiB bucket's update kernel by
#          kernel (bitsandbytes CUDA and Triton, diffpo's Triton tile shapes, torch.compile); the optimizer step
#          alone on SDXL (fused 32-bit AdamW, bitsandbytes' 8-bit kernel, diffpo's; each one's distance from
#          float32 AdamW after two steps); setup; `diffpo train` (shipped fast config) cold with diffpo's kernel;
#          the public recipe in the harness (the same machine's ratio)
#   PART=i (~9 min, same warm machine: WORK and the compile cache stay): `diffpo train` warm with diffpo's
#          kernel (profiled at step 8); the harness: the regional fast path with diffpo's kernel, with
#          bitsandbytes' (the lever side by side), and with channels_last
#   PART=j (~9 min, if time is left): `diffpo train` warm with bitsandbytes' kernel (the before, same
#          machine), then the harness with the whole UNet compiled as one graph (cold)
# (The first call of this session, before diffpo's Triton kernel existed, ran part h with the kernel in torch ops
# through torch.compile: results/gpu_2026-12-02/issue16_s8/call_h.)
export PAIRS=${PAIRS:-16} RESERVE=${RESERVE:-3}
case ${PART:-h} in
  h) export BUDGET=${BUDGET:-570} STAGES=${STAGES:-"kern optim setup cold harness"} COLD_CAP=${COLD_CAP:-260} \
       COLD_ARGS=${COLD_ARGS:-"train.adam_8bit_kernel=diffpo"} OPTIM_CAP=${OPTIM_CAP:-90} \
       OPTIM_ARGS=${OPTIM_ARGS:-"--only adamw,8bit-flat,8bit-flat-diffpo --steps 6"} CASES=${CASES:-"public/mapo/full"} ;;
  i) export BUDGET=${BUDGET:-540} STAGES=${STAGES:-"warm harness"} WARM_CAP=${WARM_CAP:-110} \
       WARM_ARGS=${WARM_ARGS:-"train.adam_8bit_kernel=diffpo --profile 8"} \
       CASES=${CASES:-"diffpo+compile+c8bit/mapo/full,diffpo+compile+8bit/mapo/full,diffpo+compile+cl+c8bit/mapo/full"} ;;
  j) export BUDGET=${BUDGET:-540} STAGES=${STAGES:-"warm harness"} WARM_CAP=${WARM_CAP:-110} WARM_ARGS=${WARM_ARGS:-""} \
       CASES=${CASES:-"diffpo+fullcompile+c8bit/mapo/full"} ;;
  *) echo "PART is h, i or j" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/call_16.sh"
