#!/usr/bin/env bash
# Device call 17, one H200 (nvidia-h200), ~9.5 minutes: issue 17's comparison protocol (studies/compare.py)
# with issue 18's objectives, in one run; alongside it (niced, on the same card) a correctness check of
# issue 16's trainer on random-weight SDXL (its 2026-12-02 call failed in the first compiled backward).
#   OUT=... bash benchmarks/device/call_17.sh
set -u
OUT=${OUT:-/tmp/diffpo_out}
DEADLINE=${DEADLINE:-430}   # no new study run starts after this many seconds
OBJECTIVES=${OBJECTIVES:-sft,diffusion_dpo,mapo,dmpo,kto,fdpo_js}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/logs/gpus.csv" 2>&1
START=$(date +%s)

if [ -d .dev16 ]; then  # issue 16's branch, copied beside the checkout (git-ignored): does its trainer run compiled SDXL?
  ( cd .dev16 && export PYTHONPATH=$PWD:/tmp/site PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True &&
    nice -n 10 timeout 520 python3 -m benchmarks.train_e2e setup --arch sdxl --pairs 16 --work /tmp/e2e --device cuda --out "$OUT/e2e_setup.json" > "$OUT/logs/e2e_setup.log" 2>&1 &&
    nice -n 10 timeout $((540 - ($(date +%s) - START))) python3 -m benchmarks.train_e2e train --work /tmp/e2e --name check --steps 6 --skip 2 --out "$OUT/e2e_check.json" train.compile_cache_dir=null > "$OUT/logs/e2e_check.log" 2>&1
    echo "e2e rc=$? at $(( $(date +%s) - START ))s" >> "$OUT/logs/stages.txt"; cp /tmp/e2e/runs/check/metrics.jsonl "$OUT/logs/e2e_check_metrics.jsonl" 2>/dev/null ) &
fi

python3 -m studies.compare --out runs/compare17 --device cuda --workers 12 --deadline-s "$DEADLINE" --objectives "$OBJECTIVES" > "$OUT/logs/study.log" 2>&1
echo "study rc=$? at $(( $(date +%s) - START ))s" >> "$OUT/logs/stages.txt"
python3 -m studies.compare --out runs/compare17 --report-only --export "$OUT/toy_compare_protocol" > "$OUT/logs/report.log" 2>&1
echo "report rc=$? at $(( $(date +%s) - START ))s" >> "$OUT/logs/stages.txt"
wait
tar czf "$OUT/study_runs_min.tgz" -C runs --exclude='*/images/*' --exclude='*.safetensors' --exclude='*/pairs/*' --exclude='*/checkpoint-*' --exclude='*/logs/*' compare17 2>/dev/null
ls -la "$OUT" "$OUT/logs"
