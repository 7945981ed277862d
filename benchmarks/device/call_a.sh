#!/usr/bin/env bash
# Device call A, a 4-GPU H100 host (nvidia-h100-x4), about 9 minutes: issue 7's single-GPU tables
# and issue 3's method comparison, each job on its own GPU so that none shares a card.
#   GPU 0: SDXL 1024px, 4 pairs: the public recipe against the fast path (the headline ratios)
#   GPU 1: SDXL LoRA cases and the remaining objectives, then SD 1.5 512px, 16 pairs
#   GPU 2: the shapes-world comparison (python -m studies.compare; GPU 3 idle)
# Results go to $OUT (bench JSON, profiles, compare reports) as a few files.
set -u
OUT=${OUT:-/tmp/diffpo_out}
LIMIT=${LIMIT:-500}
XL=${XL:-sdxl} SD15=${SD15:-sd15} DEV=${DEV:-cuda} CMP_STEPS=${CMP_STEPS:-150} CMP_EVAL=${CMP_EVAL:-16} CMP_EXTRA=${CMP_EXTRA:-}  # (overrides: CPU smoke runs)
mkdir -p "$OUT/logs" "$OUT/profiles"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/logs/gpus.csv" 2>&1
B="python3 -m benchmarks.train_step"

CUDA_VISIBLE_DEVICES=0 timeout $LIMIT $B --arch $XL --pairs 4 \
  --cases public/mapo/full,diffpo/mapo/full,diffpo+compile/mapo/full,diffpo+compile+ckpt/mapo/full,public/diffusion_dpo/full,diffpo+compile/diffusion_dpo/full,diffpo+compile+ckpt/diffusion_dpo/full,diffpo/unet/full,diffpo+compile/unet/full \
  --profile public/mapo/full,diffpo+compile/mapo/full,diffpo+compile+ckpt/mapo/full,diffpo+compile/unet/full --profile-dir "$OUT/profiles" \
  --out "$OUT/sdxl_headline.json" > "$OUT/logs/sdxl_headline.log" 2>&1 &

(
  CUDA_VISIBLE_DEVICES=1 timeout $((LIMIT * 55 / 100)) $B --arch $XL --pairs 4 \
    --cases diffpo+compile/sft/full,diffpo+compile/dmpo/full,public/mapo/lora,diffpo/mapo/lora,diffpo+compile/mapo/lora,diffpo/diffusion_dpo/lora,diffpo/sft/lora,diffpo/dmpo/lora \
    --out "$OUT/sdxl_rest.json" > "$OUT/logs/sdxl_rest.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout $((LIMIT * 40 / 100)) $B --arch $SD15 --pairs 16 \
    --cases public/mapo/full,diffpo/mapo/full,public/diffusion_dpo/full,diffpo/diffusion_dpo/full,diffpo/unet/full,diffpo+compile/unet/full,diffpo+compile/mapo/full,diffpo/mapo/lora \
    --out "$OUT/sd15.json" > "$OUT/logs/sd15.log" 2>&1
) &

# issue 17's protocol (studies/compare.py): sweep on training seeds, selection, 5 evaluation seeds
CUDA_VISIBLE_DEVICES=2 timeout $LIMIT python3 -m studies.compare --out $OUT/compare --device $DEV --workers 12 --deadline-s $((LIMIT - 60)) \
  --steps $CMP_STEPS --eval-per-prompt $CMP_EVAL $CMP_EXTRA > "$OUT/logs/compare.log" 2>&1 &
wait
nvidia-smi > "$OUT/logs/nvidia-smi-end.txt" 2>&1
# the compare folders hold images and checkpoints: keep the reports only, in one archive
tar czf "$OUT/compare.tgz" -C "$OUT" --exclude='*/images/*' --exclude='*/pairs/*' --exclude='*/checkpoint-*' --exclude='*/final/*' --exclude='*/logs/events*' compare 2>/dev/null
rm -rf "$OUT/compare"
tar czf "$OUT/logs_profiles.tgz" -C "$OUT" logs profiles && rm -rf "$OUT/logs" "$OUT/profiles"
ls -la "$OUT"
