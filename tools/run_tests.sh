#!/usr/bin/env bash
# Install what the tests need (CPU torch first, so that no other pin pulls a CUDA build) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$PY" -m pytest -q -p no:cacheprovider "$@"
