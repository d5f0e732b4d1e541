#!/usr/bin/env bash
# The one GPU check (see benchmarks/gpu_check.py): ≤ 8 minutes on one H100/H200, one Markdown table on stdout.
#   bash benchmarks/gpu_check.sh              # on the GPU machine (after `make setup TORCH_SPEC=...` there)
#   bash benchmarks/gpu_check.sh --cpu-smoke  # toy sizes on a CPU, to know it runs before a GPU is lent
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" benchmarks/gpu_check.py "$@"
