#!/usr/bin/env bash
# Copy a trained shapes run into the package as the bundled models (float16 storage), with
# their eval reports: RUN/model -> weights/shapes and, if trained, RUN/model-unclip ->
# weights/shapes-unclip and RUN/model-dmd (else RUN/model-lcm) -> weights/shapes-lcm. A weight file whose tensors and metadata are unchanged keeps its
# bytes (safetensors writes metadata in a random order), and shapes-unclip's CLIP, VAE and
# tiny decoder, when they are the shapes model's, get that file's bytes, so git stores each
# blob once.
#   bash scripts/ship-shapes.sh [RUN=runs/shapes]
set -euo pipefail
RUN=${1:-runs/shapes}
PY=${PYTHON:-.venv/bin/python}
$PY - "$RUN" <<'PY'
import shutil, sys, tempfile, torch
from pathlib import Path
from safetensors import safe_open
from nanodiffusion.formats.ours import save_pipeline, save_unclip_pipeline
from nanodiffusion.loading import load_pipeline


def same(a, b):
    """Same tensors and metadata in two safetensors files."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys()) and
                all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


run, weights = Path(sys.argv[1]), Path("nanodiffusion/weights")
few = "model-dmd" if (run / "model-dmd" / "model.json").exists() else "model-lcm"
for src, name, save in ((run / "model", "shapes", save_pipeline),
                        (run / "model-unclip", "shapes-unclip", save_unclip_pipeline),
                        (run / few, "shapes-lcm", save_pipeline)):
    if not (src / "model.json").exists():
        continue
    dest = weights / name
    with tempfile.TemporaryDirectory() as tmp:
        save(load_pipeline(src), tmp, dtype=torch.float16)
        for f in Path(tmp).rglob("*"):
            old = dest / f.relative_to(tmp)
            keep = old.exists() and f.suffix == ".safetensors" and same(f, old)
            if f.is_file() and not keep:
                old.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, old)
    print("shipped", src, "as", name)
for part in ("clip", "vae", "tiny_decoder"):
    a, b = (weights / n / f"{part}.safetensors" for n in ("shapes", "shapes-unclip"))
    if a.exists() and b.exists() and same(a, b):
        shutil.copyfile(a, b)
        print(f"shapes-unclip's {part} is the shapes model's")
PY
few=model-lcm; if [ -f "$RUN/model-dmd/model.json" ]; then few=model-dmd; fi
for pair in "model:shapes" "model-unclip:shapes-unclip" "$few:shapes-lcm"; do
    src=${pair%%:*}; dest=nanodiffusion/weights/${pair##*:}
    if [ -f "$RUN/$src/report.json" ]; then cp "$RUN/$src/report.json" "$dest/report.json"; fi
    if [ -d "$dest" ]; then du -sh "$dest"; fi
done
