#!/usr/bin/env bash
# The tiny end-to-end job on CPU: install megawan (CPU torch, TensorBoard and matplotlib), then `megawan demo`:
# synthetic clips -> latent store -> `megawan train` on 4 CPU ranks (TP2 x DP2) -> checkpoints, validation and
# TensorBoard logs -> the held-out colour check -> generated mp4s and the loss plot. About 8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[logging]"
"$PY" -m megawan demo --out "${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
