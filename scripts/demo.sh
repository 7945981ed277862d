#!/usr/bin/env bash
# Set up (if needed) and run the main job: the offline shapes-world demo (MaPO), report in demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-demo_out}
HF_HUB_OFFLINE=1 .venv/bin/diffpo demo --out "$OUT"
