"""DeepCache's speed against the exact path (pipelines/deepcache.py; its fidelity comes from
`nanodiffusion eval shapes --deepcache N`, see docs/deepcache.md).

    .venv/bin/python benchmarks/bench_deepcache.py shapes --repeats 20
    .venv/bin/python benchmarks/bench_deepcache.py sd --size 256 --repeats 5 --loop-repeats 2 \
        --threads 2
    .venv/bin/python benchmarks/bench_deepcache.py sd --size 512 --repeats 3 --loop-repeats 1 \
        --threads 2

The fidelity of each interval (the bundled model's judged accuracy on the eval split):

    nanodiffusion eval shapes --out /tmp/exact.json
    nanodiffusion eval shapes --deepcache 3 --out /tmp/dc3.json   # and 2, 4, 5

shapes: the bundled shapes model at its defaults (15 dpmpp-2m steps, CFG batch 2, 64 px):
whole generate() calls, exact and at each --interval, and one UNet call full against shallow.
sd: the Stable Diffusion 1.5 UNet with random weights as the pipelines run it (for_inference,
its convolutions packed: pipeline_unet) at --size px, CFG batch 2, branch 0: one UNet call
full against shallow, with their FLOPs (bench_cpu.flop_counter) and the speed-up those FLOPs
allow at each interval, and the whole euler loop of --steps (20) steps (the UNet calls and the
sampler; no text encoder, no VAE) exact and at each interval, and with --tome R each of those
with token merging at R too. Runs are
interleaved (a, b, c, a, b, c, ...) so that drifts of the machine's speed fall on all alike;
medians. Not a test: nothing here gates CI.
"""
import argparse
import statistics
import time

import torch

from nanodiffusion import samplers
from nanodiffusion.diffusion import Denoiser, NoiseSchedule, ScheduleConfig, cfg_denoiser
from nanodiffusion.pipelines.deepcache import CachedUNet
from nanodiffusion.pipelines.tome import merging

PROMPTS = [f"a {c} star above a pink square" for c in ("red", "blue", "green")]


def interleaved(fns, repeats, warmup=1, cpu=False):
    """Median seconds of each function, called in turn `repeats` times after `warmup`; with
    `cpu`, (wall, CPU) pairs: the process's CPU seconds (all its threads) wait less on other
    jobs of a shared machine than wall time does."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            ts.append((time.perf_counter() - t0, time.process_time() - c0))
    wall = [statistics.median(t for t, _ in ts) for ts in times]
    return list(zip(wall, [statistics.median(c for _, c in ts) for ts in times])) if cpu else wall


def unet_calls(unet, x, t, cond):
    """(full call, shallow call) as functions of nothing, the shallow one on features kept
    from the same inputs."""
    _, deep = unet.forward_deepcache(x, t, **cond)
    return (lambda: unet.forward_deepcache(x, t, **cond),
            lambda: unet.forward_deepcache(x, t, **cond, deep=deep))


def flops(fn):
    from bench_cpu import flop_counter

    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def print_calls(unet, x, t, cond, repeats, intervals):
    full, shallow = unet_calls(unet, x, t, cond)
    ff, fs = flops(full), flops(shallow)
    tf, ts = interleaved([full, shallow], repeats)
    print(f"one UNet call, batch {x.shape[0]}, latents {tuple(x.shape[1:])}:")
    print(f"  full    {tf:8.4f} s  {ff / 1e9:9.2f} GFLOP")
    print(f"  shallow {ts:8.4f} s  {fs / 1e9:9.2f} GFLOP  ({tf / ts:.1f}x faster, "
          f"{ff / fs:.1f}x fewer FLOPs)")
    for n in intervals:  # one full call and n - 1 shallow ones against n full ones
        print(f"  interval {n}: at most {n * ff / (ff + (n - 1) * fs):.2f}x by FLOPs, "
              f"{n * tf / (tf + (n - 1) * ts):.2f}x by these call times")


@torch.no_grad()
def bench_shapes(args):
    import nanodiffusion

    pipe = nanodiffusion.load("shapes")
    runs = [None] + args.interval
    d = pipe.defaults
    ctx = pipe.encode_prompt(["", PROMPTS[0]])  # (2, 77, D): CFG's batch
    x = torch.randn(2, pipe.latent_channels, d.height // pipe.vae_factor,
                    d.width // pipe.vae_factor, generator=torch.Generator().manual_seed(0))
    print_calls(pipe.unet, x, torch.tensor([500.0, 500.0]), {"context": ctx},
                args.repeats * 5, args.interval)
    calls = [lambda n=n, i=i: pipe.generate(PROMPTS[i % 3], seed=i, deepcache=n)
             for i, n in enumerate(runs)]
    times = interleaved(calls, args.repeats)
    print(f"whole generate() ({d.steps} steps {d.sampler} g{d.guidance} {d.width}x{d.height}), "
          f"median of {args.repeats}:")
    for n, s in zip(runs, times):
        print(f"  {'exact' if n is None else f'interval {n}':<12}{s:8.3f} s  "
              f"{times[0] / s:5.2f}x")


def sd_unet():
    from nanodiffusion.models import unet

    torch.manual_seed(0)
    return unet.UNet(unet.SD15).eval()


def pipeline_unet():
    """sd_unet as the pipelines run it: for_inference (float32 linears on oneDNN), its
    convolutions packed (Pipeline.unet_loop); give it packing.cpu_input's layout."""
    from nanodiffusion.models.packing import pack
    from nanodiffusion.models.unet import for_inference

    model = for_inference(sd_unet())
    pack(model)
    return model


def euler_loop(model, plan, noise, ctx, interval=None, ratio=None):
    """The euler loop of `plan` from `noise` with CFG 7.5 on the pipeline-ready UNet `model`,
    with DeepCache at `interval` and token merging at `ratio` where they are given, its
    latents in packing.cpu_input's layout as the pipelines give them."""
    from nanodiffusion.models.packing import cpu_input

    unet = CachedUNet(model, interval) if interval else model
    tome = merging(ratio)
    extra = {} if tome is None else {"tome": tome}

    def fn(x, t, **cond):
        return unet(cpu_input(x), t, **cond, **extra)
    den = cfg_denoiser(Denoiser(fn, plan.schedule, quantize_t=plan.quantize_t), 7.5)
    return samplers.run(plan, den, noise, cond={"context": ctx})


@torch.no_grad()
def bench_sd(args):
    from nanodiffusion.models.packing import cpu_input

    model = pipeline_unet()
    h = args.size // 8
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, 768, generator=g)
    x = cpu_input(torch.randn(2, 4, h, h, generator=g))
    print_calls(model, x, torch.tensor([500.0, 500.0]), {"context": ctx}, args.repeats,
                args.interval)
    plan = samplers.plan("euler", NoiseSchedule(ScheduleConfig()), args.steps)
    noise = torch.randn(1, 4, h, h, generator=g)

    runs = [(n, None) for n in [None, *args.interval]]
    if args.tome:
        runs += [(n, args.tome) for n in [None, *args.interval]]
    times = interleaved([lambda n=n, r=r: euler_loop(model, plan, noise, ctx, n, r)
                         for n, r in runs], args.loop_repeats, warmup=0, cpu=True)
    print(f"whole {args.steps}-step euler loop, CFG 7.5 (batch 2), {args.size} px, "
          f"median of {args.loop_repeats}, wall and CPU seconds:")
    (w0, c0) = times[0]
    for (n, r), (w, c) in zip(runs, times):
        name = ("exact" if n is None else f"interval {n}") + (f" + tome {r}" if r else "")
        print(f"  {name:<22}{w:8.2f} s {w0 / w:5.2f}x{c:10.2f} s CPU {c0 / c:5.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["shapes", "sd"])
    ap.add_argument("--interval", type=int, action="append", default=None,
                    help="DeepCache intervals to time (default 2, 3, 5)")
    ap.add_argument("--repeats", type=int, default=None, help="(default: shapes 20, sd 3)")
    ap.add_argument("--loop-repeats", type=int, default=1, help="sd: the loops (--steps)")
    ap.add_argument("--size", type=int, default=256, help="sd: image side in pixels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20, help="sd: the loops' euler steps")
    ap.add_argument("--tome", type=float, default=None,
                    help="sd: also time each loop with token merging at this ratio")
    args = ap.parse_args()
    args.interval = args.interval or [2, 3, 5]
    args.repeats = args.repeats or (20 if args.model == "shapes" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, interleaved runs")
    (bench_shapes if args.model == "shapes" else bench_sd)(args)


if __name__ == "__main__":
    main()
