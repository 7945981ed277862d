#!/usr/bin/env bash
# Create .venv with a CPU build of torch and diffpo (editable) plus test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first: a plain 'torch' requirement with no torch installed pulls several GB of CUDA wheels.
.venv/bin/python -c "import importlib.metadata as m; m.version(\"torch\")" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
# diffpo is installed editable: only a changed pyproject.toml (dependencies, entry points) needs pip
# again, so a stamp of its hash skips the ~8 s pip spends confirming nothing changed.
STAMP=.venv/.diffpo-pyproject.sha256
if ! sha256sum -c --status "$STAMP" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[test]"
  sha256sum pyproject.toml > "$STAMP"
fi
# The browser tests (tests/web) drive the system Chromium through Playwright; take it from the OS
# packages, never from Playwright's own browser download (`playwright install`).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium (Debian package) for the browser tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: no chromium found and cannot apt-get install it (not root); the browser tests will be skipped" >&2
  fi
fi
