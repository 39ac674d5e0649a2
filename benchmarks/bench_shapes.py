"""Time generation with bundled models (one 64x64 image each), several settings side by side.

    .venv/bin/python benchmarks/bench_shapes.py --repeats 20
    .venv/bin/python benchmarks/bench_shapes.py --run shapes --run shapes-lcm:4 \
        --run shapes-lcm:2 --run shapes-lcm:1 --repeats 20

Each --run is MODEL[:STEPS] (a name, folder or file; STEPS default: the model's own). The runs
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


def _parse(run):
    model, _, steps = run.partition(":")
    return model, int(steps) if steps else None


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=None, metavar="MODEL[:STEPS]")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [_parse(r) for r in (args.run or ["shapes"])]
    pipes = {m: nanodiffusion.load(m) for m in dict.fromkeys(m for m, _ in runs)}
    for model, steps in runs:
        pipes[model].generate("a red circle", seed=0, steps=steps)  # warm-up
    times = [[] for _ in runs]
    for i in range(args.repeats):
        for (model, steps), ts in zip(runs, times):
            t0 = time.perf_counter()
            pipes[model].generate(PROMPTS[i % len(PROMPTS)], seed=i, steps=steps)
            ts.append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.repeats} images per run, interleaved")
    print(f"{'run':<28}{'settings':<34}{'median s':>9}{'min':>8}{'max':>8}{'speed-up':>9}")
    first = statistics.median(times[0])
    for (model, steps), ts in zip(runs, times):
        d = pipes[model].defaults
        settings = f"{steps or d.steps} steps {d.sampler} g{d.guidance} {d.width}x{d.height}"
        med = statistics.median(ts)
        print(f"{model + (f':{steps}' if steps else ''):<28}{settings:<34}{med:>9.3f}"
              f"{min(ts):>8.3f}{max(ts):>8.3f}{first / med:>8.2f}x")


if __name__ == "__main__":
    main()
