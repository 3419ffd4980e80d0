#!/usr/bin/env bash
# The GPU check of issue 12, one command (<= 8 minutes, no downloads), from the repository root:
#     benchmarks/gpu_check.sh            # both shapes; without a CUDA GPU a CPU smoke run
# See benchmarks/gpu_check.py for what it prints. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CLIP_HEADS_PLOTS=0
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
