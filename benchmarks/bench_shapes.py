"""Time generation with bundled models (one 64x64 image each), several settings side by side.

    .venv/bin/python benchmarks/bench_shapes.py --repeats 20
    .venv/bin/python benchmarks/bench_shapes.py --run shapes --run shapes-lcm:4 \
        --run shapes-lcm:2 --run shapes-lcm:1 --repeats 20
    .venv/bin/python benchmarks/bench_shapes.py --run shapes --run shapes-lcm \
        --run shapes-lcm:tiny --run shapes-lcm:bf16 --run shapes-lcm:tiny:bf16

Each --run is MODEL[:STEPS][:tiny][:bf16] (a name, folder or file; STEPS default: the model's
own; tiny: the final image from the model's tiny decoder, `--vae-decoder tiny`; bf16: the
model loaded in bfloat16, `--dtype bfloat16`). The runs
are interleaved (a, b, c, a, b, c, ...) so that drifts of the machine's speed fall on all of
them alike. Prints each run's median, min and max seconds per image, model loading excluded,
and its speed-up over the first run.
"""
import argparse
import statistics
import time

import torch

import nanodiffusion

PROMPTS = [f"a {c} star above a pink square" for c in ("red", "blue", "green")]


class Run:
    def __init__(self, spec):
        self.spec = spec
        model, *rest = spec.split(":")
        flags = {f for f in rest if f in ("tiny", "bf16")}
        steps = [f for f in rest if f not in flags]
        if len(steps) > 1 or (steps and not steps[0].isdigit()):
            raise SystemExit(f"--run {spec!r}: expected MODEL[:STEPS][:tiny][:bf16]")
        self.model, self.steps = model, int(steps[0]) if steps else None
        self.dtype = torch.bfloat16 if "bf16" in flags else torch.float32
        self.decoder = "tiny" if "tiny" in flags else "full"

    def generate(self, pipes, prompt, seed):
        pipes[self.model, self.dtype].generate(prompt, seed=seed, steps=self.steps,
                                               vae_decoder=self.decoder)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=None, metavar="MODEL[:STEPS]")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [Run(r) for r in (args.run or ["shapes"])]
    pipes = {(r.model, r.dtype): nanodiffusion.load(r.model, dtype=r.dtype) for r in runs}
    for r in runs:
        r.generate(pipes, "a red circle", seed=0)  # warm-up
    times = [[] for _ in runs]
    for i in range(args.repeats):
        for r, ts in zip(runs, times):
            t0 = time.perf_counter()
            r.generate(pipes, PROMPTS[i % len(PROMPTS)], seed=i)
            ts.append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.repeats} images per run, interleaved")
    print(f"{'run':<28}{'settings':<34}{'median s':>9}{'min':>8}{'max':>8}{'speed-up':>9}")
    first = statistics.median(times[0])
    for r, ts in zip(runs, times):
        d = pipes[r.model, r.dtype].defaults
        settings = f"{r.steps or d.steps} steps {d.sampler} g{d.guidance} {d.width}x{d.height}"
        med = statistics.median(ts)
        print(f"{r.spec:<28}{settings:<34}{med:>9.3f}"
              f"{min(ts):>8.3f}{max(ts):>8.3f}{first / med:>8.2f}x")


if __name__ == "__main__":
    main()
