#!/usr/bin/env bash
# The GPU check, ready to run on a GPU machine from a fresh checkout (docstring of gpu_check.py):
#   python scripts/gpu_check.py --prepare          # first, here: builds .cache/gpu_check (carry it)
#   bash scripts/gpu_check.sh                       # there: every item, reports in $OUT or .cache/gpu_check/out
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 python scripts/gpu_check.py "$@"
