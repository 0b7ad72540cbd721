#!/usr/bin/env bash
# The tiny end-to-end job on CPU: install megawan (CPU torch), then train a tiny Wan DiT on 2 tensor-
# parallel ranks, checkpoint it with megatron-core dist_checkpointing, and reload it on one rank.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[logging]"
"$PY" -m megawan demo --out "${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
