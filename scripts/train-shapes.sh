#!/usr/bin/env bash
# Train the bundled shapes model from zero, every part, then evaluate it.
#   bash scripts/train-shapes.sh [OUT=runs/shapes] [DEVICE=cpu]
# Each part resumes from its last checkpoint when run again.
set -euo pipefail
OUT=${1:-runs/shapes}
DEVICE=${2:-cpu}
PY=${PYTHON:-.venv/bin/python}
RECIPE=${RECIPE:-recipes/shapes.toml}
for part in clip vae unet; do
    start=$(date +%s)
    $PY -m nanodiffusion.cli train "$part" --recipe "$RECIPE" --out "$OUT" --device "$DEVICE"
    echo "{\"part\": \"$part\", \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/times.jsonl"
done
$PY -m nanodiffusion.cli eval "$OUT" --n "${EVAL_N:-200}"
