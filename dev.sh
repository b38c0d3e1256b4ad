#!/usr/bin/env bash
# Set up (idempotent) and run: `bash dev.sh example` converts an example; `bash dev.sh test` runs the tests;
# `bash dev.sh zoo [--models a,b] [--timeout S] [--json PATH]` converts timm models in their own venv (.venv-zoo);
# `bash dev.sh test-cuda` runs a subset of the tests there, under torch's CUDA wheel (with triton).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

# pip over a flaky network: a new pip resumes a broken download (--resume-retries); the whole install is
# retried too, after a pause, so one dropped connection to PyPI does not fail a fresh setup
pip_install() {
  local py=$1; shift
  local extra=()
  local help
  help=$("$py" -m pip install --help 2>/dev/null || true)
  if [[ $help == *--resume-retries* ]]; then
    extra=(--resume-retries 20)
  fi
  local attempt
  for attempt in 1 2 3 4; do
    if "$py" -m pip install -q --timeout 60 "${extra[@]}" "$@"; then
      return 0
    fi
    [ "$attempt" = 4 ] && break
    echo "[setup] pip install $* failed (attempt $attempt of 4); retrying in $((attempt * 15)) s" >&2
    sleep $((attempt * 15))
  done
  echo "[setup] pip install $* failed 4 times: check the connection to the package index" >&2
  return 1
}

setup() {
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $PY" >&2
    "$PY" -m venv .venv
    pip_install .venv/bin/python --upgrade pip
  fi
  # torch first, pinned to the CPU build: anything that depends on torch would otherwise pull a CUDA build
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch (CPU)" >&2
    pip_install .venv/bin/python "torch==2.13.0"
  fi
  local stamp=.venv/.tracer-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing tracer and its dependencies (tensorflow, keras, onnx, ai-edge-litert)" >&2
    pip_install .venv/bin/python -e ".[test]"
    touch "$stamp"
  fi
}

# tests/test_report_html.py renders report.html in headless Chromium; without it that test skips
chromium_for_tests() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] no chromium (needs root and apt-get to install): the report.html rendering test will skip" >&2
    return 0
  fi
  echo "[setup] installing chromium (apt-get) for the report.html rendering test" >&2
  local log=.venv/.chromium-apt.log
  if ! (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium) >"$log" 2>&1; then
    echo "[setup] apt-get install chromium failed (see $log): the report.html rendering test will skip" >&2
  fi
}

# The timm zoo (bench/zoo.py) in a venv of its own: torchvision's PyPI wheels do not import beside the CPU
# torch build of .venv, so .venv-zoo gets the torch/torchvision pair they were built for, timm, and tracer.
setup_zoo() {
  if [ ! -x .venv-zoo/bin/python ]; then
    echo "[zoo] creating .venv-zoo with $PY" >&2
    "$PY" -m venv .venv-zoo
    pip_install .venv-zoo/bin/python --upgrade pip
  fi
  local stamp=.venv-zoo/.tracer-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[zoo] installing torch 2.14.1, torchvision 0.29.1, timm, transformers and tracer into .venv-zoo (several GB)" >&2
    pip_install .venv-zoo/bin/python "torch==2.14.1" "torchvision==0.29.1"
    # transformers 5.25 needs a package PyPI's mirror here lacks; 5.24.0 installs
    pip_install .venv-zoo/bin/python timm "transformers==5.24.0" pytest pytest-xdist scikit-learn -e .
    touch "$stamp"
  fi
}

CUDA_TESTS=(tests/test_cuda_wheel.py tests/test_external_subset.py tests/test_zoo_subset.py tests/test_model_names.py
            tests/op_rules/test_library.py tests/op_rules/test_reduce.py tests/test_capture_export.py
            tests/test_dynamic_text.py tests/test_external_dynamic_subset.py)

case "${1:-}" in
  setup)
    setup ;;
  example)
    setup
    .venv/bin/tracer convert examples/repvit_kws.py:build --input-shape 1,100,40 -o out/repvit_kws ;;
  test)
    setup
    chromium_for_tests
    shift || true
    .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@" ;;
  test-cuda)
    # the CUDA torch wheel (2.14.1, with triton) in .venv-zoo: the import-order and triton tests, the
    # torchvision/transformers/timm tests that skip in .venv, and a few fast rule families
    setup_zoo
    shift || true
    [ $# -gt 0 ] || set -- "${CUDA_TESTS[@]}"
    .venv-zoo/bin/python -m pytest -n 2 -q -p no:cacheprovider -m "slow or not slow" "$@" ;;
  zoo)
    setup_zoo
    shift || true
    .venv-zoo/bin/python bench/zoo.py "$@" ;;
  *)
    echo "usage: bash dev.sh setup|example|test [pytest args]|test-cuda [pytest args]|zoo [zoo args]" >&2
    exit 2 ;;
esac
