#!/usr/bin/env bash
# Create .venv with a CPU build of torch and diffpo (editable) plus test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first: a plain 'torch' requirement with no torch installed pulls several GB of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"
