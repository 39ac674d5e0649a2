"""Time generation with the bundled shapes model at its default settings (one 64x64 image).

    .venv/bin/python benchmarks/bench_shapes.py --repeats 20 [--model runs/shapes/model]

Prints the median and spread of wall-clock seconds per image, model loading excluded.
"""
import argparse
import statistics
import time

import torch

import nanodiffusion


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = nanodiffusion.load(args.model)
    pipe.generate("a red circle", seed=0, steps=args.steps)  # warm-up
    times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        pipe.generate(f"a {['red', 'blue', 'green'][i % 3]} star above a pink square", seed=i,
                      steps=args.steps)
        times.append(time.perf_counter() - t0)
    d = pipe.defaults
    print(f"{pipe.name}: {args.steps or d.steps} steps, {d.sampler}, guidance {d.guidance}, "
          f"{d.width}x{d.height}, threads {torch.get_num_threads()}")
    print(f"median {statistics.median(times):.3f} s/image, min {min(times):.3f}, "
          f"max {max(times):.3f} over {len(times)}")


if __name__ == "__main__":
    main()
