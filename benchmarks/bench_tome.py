"""Token merging's speed against the exact path (pipelines/tome.py; its fidelity comes from
`nanodiffusion eval shapes --tome R`, see docs/tome.md).

    .venv/bin/python benchmarks/bench_tome.py --size 256 --repeats 5 --threads 2
    .venv/bin/python benchmarks/bench_tome.py --size 512 --repeats 3 --loop-repeats 1 --threads 2

The Stable Diffusion 1.5 UNet with random weights, as the pipelines run it (bench_deepcache.py's
pipeline_unet: for_inference, packed), at --size px, CFG batch 2: one UNet call exact and at
each --ratio, with the FLOPs of the self-attention products at the finest level and its time;
then the whole 20-step euler loop (the UNet calls and the sampler; no text encoder, no VAE)
exact, at each ratio, and each ratio with DeepCache at --deepcache N (the two approximate paths
together). Runs are interleaved so that drifts of the machine's speed fall on all alike;
medians, wall and CPU seconds. Not a test: nothing here gates CI.
"""
import argparse

import torch
from bench_deepcache import euler_loop, flops, interleaved, pipeline_unet

from nanodiffusion import samplers
from nanodiffusion.diffusion import NoiseSchedule, ScheduleConfig
from nanodiffusion.models.packing import cpu_input
from nanodiffusion.pipelines.tome import merging


def attention_flops(model, side, ratio, batch=2):
    """FLOPs of QK^T and AV in the self-attention of the finest level's transformers (SD 1.5:
    the first level's) for latents side x side: the queries and keys are the tokens left after
    merging."""
    blocks = len(model.down_blocks[0].attentions) + len(model.up_blocks[-1].attentions)
    n = side * side
    left = n - min(int(n * ratio), n - (side // 2) ** 2)
    return blocks * 4 * batch * left * left * model.config.block_channels[0]


def label(ratio, deepcache=None):
    name = "exact" if not ratio else f"tome {ratio}"
    return name + (f" + deepcache {deepcache}" if deepcache else "")


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, action="append", default=None,
                    help="token merging ratios to time (default 0.3, 0.5, 0.7)")
    ap.add_argument("--deepcache", type=int, default=3, help="DeepCache's interval for the "
                    "combined runs (0: none)")
    ap.add_argument("--repeats", type=int, default=3, help="single UNet calls")
    ap.add_argument("--loop-repeats", type=int, default=1, help="the 20-step loops (0: none)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    ratios = [0.0] + (args.ratio or [0.3, 0.5, 0.7])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, interleaved runs")
    model = pipeline_unet()
    h = args.size // 8
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, 768, generator=g)
    x = cpu_input(torch.randn(2, 4, h, h, generator=g))
    t = torch.tensor([500.0, 500.0])

    calls = [lambda r=r: model(x, t, context=ctx, tome=merging(r)) for r in ratios]
    base = flops(calls[0])
    times = interleaved(calls, args.repeats, cpu=True)
    print(f"one UNet call, batch 2, latents (4, {h}, {h}), median of {args.repeats}:")
    print(f"  ({base / 1e9:.1f} GFLOP as our exact call computes them: float32's wide "
          f"convolutions as Winograd's products; of them, the self-attention products at the "
          f"finest level: 4 B N_q N_k C per transformer)")
    for r, (w, c) in zip(ratios, times):
        print(f"  {label(r):<12}{w:8.3f} s {times[0][0] / w:5.2f}x {c:8.3f} s CPU "
              f"{times[0][1] / c:5.2f}x   self-attention {attention_flops(model, h, r) / 1e9:6.1f}"
              f" GFLOP")

    if not args.loop_repeats:
        return
    plan = samplers.plan("euler", NoiseSchedule(ScheduleConfig()), 20)
    noise = torch.randn(1, 4, h, h, generator=g)

    runs = [(r, None) for r in ratios]
    if args.deepcache:
        runs += [(r, args.deepcache) for r in ratios]
    times = interleaved([lambda r=r, d=d: euler_loop(model, plan, noise, ctx, d, r)
                         for r, d in runs], args.loop_repeats, warmup=0, cpu=True)
    print(f"whole 20-step euler loop, CFG 7.5 (batch 2), {args.size} px, median of "
          f"{args.loop_repeats}, wall and CPU seconds:")
    w0, c0 = times[0]
    for (r, d), (w, c) in zip(runs, times):
        print(f"  {label(r, d):<26}{w:8.2f} s {w0 / w:5.2f}x{c:10.2f} s CPU {c0 / c:5.2f}x")


if __name__ == "__main__":
    main()
