#!/usr/bin/env bash
# Set up (idempotent) and run: `bash dev.sh example` converts an example; `bash dev.sh test` runs the tests.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

setup() {
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $PY" >&2
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  # torch first, pinned to the CPU build: anything that depends on torch would otherwise pull a CUDA build
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch (CPU)" >&2
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  local stamp=.venv/.tracer-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing tracer and its dependencies (tensorflow, keras, onnx, ai-edge-litert)" >&2
    .venv/bin/python -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  setup)
    setup ;;
  example)
    setup
    .venv/bin/tracer convert examples/repvit_kws.py:build --input-shape 1,100,40 -o out/repvit_kws ;;
  test)
    setup
    shift || true
    .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@" ;;
  *)
    echo "usage: bash dev.sh setup|example|test [pytest args]" >&2
    exit 2 ;;
esac
