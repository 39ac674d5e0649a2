"""Real write failures of a training run, end to end: its folder on a small tmpfs that is
filled up, then remounted read-only. Needs root (mount), so it is a script, not a test.

    sudo .venv/bin/python benchmarks/fault_disk.py

A tiny VAE run trains to step 4, then resumes towards step 8 on a full disk and on a read-only
one: each must end with one `error:` line naming the file and the cause, exit 1, and leave the
step-4 checkpoint loadable; with room again it resumes to the end. Prints one line per check
and exits 1 if one fails.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanodiffusion.formats import checkpoint  # noqa: E402

RECIPE = """
[common]
data = "shapes"
image_size = 32
[vae]
steps = 8
batch_size = 4
warmup = 2
log_every = 1
ckpt_every = 4
sample_every = 0
[vae.model]
block_channels = [8, 16]
norm_groups = 8
"""
# room left on the "full" disk: the log's lines and the exported VAE (190 kB) fit, the
# training state (880 kB, written by torch.save: the RuntimeError of its zip writer) does not
FREE_KB = 400
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(name)


def train(recipe, out, steps):
    cmd = [sys.executable, "-m", "nanodiffusion.cli", "train", "vae", "--recipe", str(recipe),
           "--out", str(out), "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr


def fill(mount):
    """Fill the tmpfs, then give back FREE_KB."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - FREE_KB * 1024))
    return filler


def expect_refused(name, recipe, out, what, cause):
    """`what`: the first write that fails, as the message names it."""
    rc, err = train(recipe, out, 8)
    run = out / "vae"
    line = (f"error: cannot write {what.format(run=run)}: {cause}; "
            f"the last checkpoint (step 4) is intact")
    check(f"{name}: exit 1", rc == 1, f"exit {rc}")
    check(f"{name}: one clear line", err.strip().splitlines()[-1:] == [line]
          and "Traceback" not in err, err[-2000:])
    print(f"     {line}")
    check(f"{name}: checkpoint still at step 4",
          checkpoint.load_state(run / "state.pt")["step"] == 4)
    checkpoint.load_model(run / "vae.safetensors")  # raises if the model file is unreadable
    check(f"{name}: no temporary file left", not list(run.glob(".*.tmp")))


def main():
    if os.geteuid() != 0:
        sys.exit("needs root: it mounts a tmpfs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe, mount = tmp / "tiny.toml", tmp / "disk"
        recipe.write_text(RECIPE)
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                       check=True)
        try:
            out = mount / "run"
            rc, err = train(recipe, out, 4)
            check("first 4 steps", rc == 0, err[-2000:])
            filler = fill(mount)
            expect_refused("full disk", recipe, out, "checkpoint {run}/state.pt",
                           "No space left on device")
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
            # the log's steps 5-8 of the run above are cut on resume: the first write
            expect_refused("read-only disk", recipe, out, "log {run}/log.jsonl",
                           "Read-only file system")
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
            rc, err = train(recipe, out, 8)
            steps = [json.loads(line)["step"] for line in (out / "vae" / "log.jsonl").open()]
            check("resumed to the end, each step logged once", rc == 0 and steps == list(
                range(1, 9)) and checkpoint.load_state(out / "vae" / "state.pt")["step"] == 8,
                  f"exit {rc}, logged steps {steps}: {err[-2000:]}")
        finally:
            subprocess.run(["umount", str(mount)], check=False)
    print("all checks passed" if not failures else f"{len(failures)} failed: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
