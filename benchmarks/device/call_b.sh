#!/usr/bin/env bash
# Device call B, a 4-GPU H100 host (nvidia-h100-x4), about 8 minutes: issue 8's multi-GPU rows.
#   1. parity: `diffpo train` on the toy base model, 20 steps, 2 GPUs x 4 pairs against 1 GPU x 8 pairs,
#      with DDP (--num-processes 2) and with the shipped FSDP2 config
#   2. scaling: SDXL MaPO (fast path with gradient checkpointing so that it surely fits, full UNet,
#      4 pairs per GPU) on 1, 2 and 4 GPUs (DDP)
#   3. memory: SDXL full fine-tuning with float32 weights (the accelerate default) at 4 pairs per GPU:
#      plain DDP against FSDP2 (configs/accelerate/fsdp.yaml) on 4 GPUs
set -u
OUT=${OUT:-/tmp/diffpo_out}
mkdir -p "$OUT/logs"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L="python3 -m accelerate.commands.launch --num_machines 1 --dynamo_backend no"
XL=${XL:-sdxl}  # (override: CPU smoke runs)
B="-m benchmarks.train_step --arch $XL --distributed --steps 5 --warmup 3"

# 1. parity
P="configs/tiny.yaml model.pretrained=toy:base model.lora.enabled=false loss.name=mapo train.max_steps=20 train.checkpoint_every=20 train.learning_rate=1e-4 logging.report_to=none logging.progress=false"
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m diffpo train --config $P output_dir=$OUT/parity/one train.batch_size=8 > "$OUT/logs/parity_one.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1,2 timeout 150 python3 -m diffpo train --config $P output_dir=$OUT/parity/two train.batch_size=4 --num-processes 2 > "$OUT/logs/parity_two.log" 2>&1 &
wait
# the trainer under the shipped FSDP2 config, same global batch: parity with FSDP too
CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m diffpo train --config $P output_dir=$OUT/parity/fsdp train.batch_size=4 > "$OUT/logs/parity_fsdp.log" 2>&1
python3 - "$OUT/parity" > "$OUT/parity.json" 2> "$OUT/logs/parity_compare.log" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
runs = {}
for name in ("one", "two", "fsdp"):
    path = root / name / "metrics.jsonl"
    runs[name] = [json.loads(l)["loss"] for l in path.read_text().splitlines()] if path.is_file() else []
result = {"losses": runs}
for name in ("two", "fsdp"):
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(runs["one"], runs[name])]
    result[name] = {"steps": len(rel), "max_rel_diff": max(rel, default=None), "mean_rel_diff": sum(rel) / len(rel) if rel else None}
print(json.dumps(result, indent=2))
PY
rm -rf "$OUT/parity"

# 2. scaling (same case, same per-GPU batch)
CUDA_VISIBLE_DEVICES=0 timeout 110 $L --num_processes 1 --mixed_precision bf16 $B --pairs 4 --cases diffpo+ckpt/mapo/full --out "$OUT/scaling_1.json" > "$OUT/logs/scaling_1.log" 2>&1
CUDA_VISIBLE_DEVICES=0,1 timeout 120 $L --multi_gpu --num_processes 2 --mixed_precision bf16 $B --pairs 4 --cases diffpo+ckpt/mapo/full --out "$OUT/scaling_2.json" > "$OUT/logs/scaling_2.log" 2>&1
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 130 $L --multi_gpu --num_processes 4 --mixed_precision bf16 $B --pairs 4 --cases diffpo+ckpt/mapo/full --profile diffpo+ckpt/mapo/full --profile-dir "$OUT/profiles" --out "$OUT/scaling_4.json" > "$OUT/logs/scaling_4.log" 2>&1

# 3. memory: float32 weights, 4 pairs per GPU, DDP vs FSDP2
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 120 $L --multi_gpu --num_processes 4 --mixed_precision bf16 $B --pairs 4 --cases diffpo-fp32/mapo/full --out "$OUT/memory_ddp.json" > "$OUT/logs/memory_ddp.log" 2>&1
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 130 $L --config_file configs/accelerate/fsdp.yaml --num_processes 4 $B --pairs 4 --cases diffpo-fp32/mapo/full --out "$OUT/memory_fsdp.json" > "$OUT/logs/memory_fsdp.log" 2>&1
tar czf "$OUT/logs_b.tgz" -C "$OUT" logs $( [ -d "$OUT/profiles" ] && echo profiles ) && rm -rf "$OUT/logs" "$OUT/profiles"
ls -la "$OUT"
