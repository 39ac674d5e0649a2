#!/usr/bin/env bash
# Train the bundled shapes model from zero, every part, then evaluate it.
#   bash scripts/train-shapes.sh [OUT=runs/shapes] [DEVICE=cpu]
# On a 2-core CPU, CLIP and the VAE (independent of each other) train side by side on one core
# each, then the UNet on both. Each part resumes from its last checkpoint when run again.
# Per-part wall-clock seconds are appended to OUT/times.jsonl. UNCLIP=1 also trains the unCLIP
# prior and decoder (after the unet) and evaluates OUT/model-unclip. Last, the tiny decoder
# (TAESD) is distilled from the VAE and added to the model folders assembled before it.
set -euo pipefail
OUT=${1:-runs/shapes}
DEVICE=${2:-cpu}
PY=${PYTHON:-.venv/bin/python}
RECIPE=${RECIPE:-recipes/shapes.toml}
mkdir -p "$OUT"
part() {  # part NAME THREADS [extra train options]
    local start; start=$(date +%s)
    OMP_NUM_THREADS=$2 $PY -m nanodiffusion.cli train "$1" --recipe "$RECIPE" --out "$OUT" \
        --device "$DEVICE" "${@:3}" >> "$OUT/$1.log" 2>&1
    echo "{\"part\": \"$1\", \"seconds\": $(( $(date +%s) - start )), \"threads\": $2}" \
        >> "$OUT/times.jsonl"
}
start=$(date +%s)
part clip 1 & clip_pid=$!
part vae 1 & vae_pid=$!
wait $clip_pid
wait $vae_pid
part unet "$(nproc)"
echo "{\"part\": \"all\", \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/times.jsonl"
$PY -m nanodiffusion.cli eval "$OUT" --n "${EVAL_N:-200}"
if [ "${UNCLIP:-0}" = 1 ]; then
    part prior "$(nproc)"
    part decoder "$(nproc)"
    $PY -m nanodiffusion.cli eval "$OUT/model-unclip" --n "${EVAL_N:-200}" --best-of 8
fi
part tiny-decoder 1
