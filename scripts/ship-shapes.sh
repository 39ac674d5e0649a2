#!/usr/bin/env bash
# Copy a trained shapes run into the package as the bundled default model (float16 storage),
# with its eval report.   bash scripts/ship-shapes.sh [RUN=runs/shapes]
set -euo pipefail
RUN=${1:-runs/shapes}
PY=${PYTHON:-.venv/bin/python}
DEST=nanodiffusion/weights/shapes
$PY - "$RUN" "$DEST" <<'PY'
import sys, torch
from nanodiffusion.loading import load_pipeline, save_pipeline
pipe = load_pipeline(f"{sys.argv[1]}/model")
save_pipeline(pipe, sys.argv[2], dtype=torch.float16)
PY
cp "$RUN/model/report.json" "$DEST/report.json" 2>/dev/null || true
du -sh "$DEST"
