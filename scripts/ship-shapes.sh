#!/usr/bin/env bash
# Copy a trained shapes run into the package as the bundled models (float16 storage), with
# their eval reports: RUN/model -> weights/shapes and, if trained, RUN/model-unclip ->
# weights/shapes-unclip.   bash scripts/ship-shapes.sh [RUN=runs/shapes]
set -euo pipefail
RUN=${1:-runs/shapes}
PY=${PYTHON:-.venv/bin/python}
$PY - "$RUN" <<'PY'
import sys, torch
from pathlib import Path
from nanodiffusion.loading import load_pipeline, save_pipeline
from nanodiffusion.unclip import save_unclip_pipeline
run = Path(sys.argv[1])
for src, name, save in ((run / "model", "shapes", save_pipeline),
                        (run / "model-unclip", "shapes-unclip", save_unclip_pipeline)):
    if (src / "model.json").exists():
        save(load_pipeline(src), f"nanodiffusion/weights/{name}", dtype=torch.float16)
        print("shipped", src, "as", name)
PY
for pair in "model:shapes" "model-unclip:shapes-unclip"; do
    src=${pair%%:*}; dest=nanodiffusion/weights/${pair##*:}
    if [ -f "$RUN/$src/report.json" ]; then cp "$RUN/$src/report.json" "$dest/report.json"; fi
    if [ -d "$dest" ]; then du -sh "$dest"; fi
done
