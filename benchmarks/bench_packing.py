"""oneDNN weight prepacking (models/packing.py) against the dense UNet, one SD 1.5 UNet call
(random weights, CFG batch 2, channels-last input as pipelines give it), the two calls
interleaved in one process (two UNets with the same weights: one packed, one dense), their
outputs compared bit for bit, beside the machine's matmul peak for the dtype and the fraction
of the roofline each reaches.

    nice .venv/bin/python benchmarks/bench_packing.py --size 256 --repeats 6
    nice .venv/bin/python benchmarks/bench_packing.py --size 256 --repeats 3 --dtype float32
    nice .venv/bin/python benchmarks/bench_packing.py --size 512 --repeats 3 --threads 1

Not a test: nothing here gates CI.
"""
import argparse

import torch
from bench_cpu import machine_peaks
from bench_deepcache import flops, interleaved, sd_unet

from nanodiffusion.models import packing
from nanodiffusion.models.unet import for_inference


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latents / 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not packing.available():
        raise SystemExit("this torch has no oneDNN pointwise ops: nothing to measure")
    probe = machine_peaks(quick=False)
    name, dtype = args.dtype, getattr(torch, args.dtype)
    peak = probe["matmul"][name]
    print(f"{name} peak GFLOP/s, {args.threads} threads: matmul {peak:.1f} "
          f"({probe['matmul_shape'][name]}), conv 3x3 "
          f"{probe['conv3x3'][name]:.1f} ({probe['conv3x3_shape'][name]})")

    dense = for_inference(sd_unet().to(dtype))
    packed = for_inference(sd_unet().to(dtype))
    print(f"packed layers: {packing.pack(packed)}")
    h = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, h, h, generator=g).to(dtype, memory_format=torch.channels_last)
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.tensor([500, 500])
    calls = [lambda m=m: m(x, t, context=ctx) for m in (dense, packed)]
    work = flops(calls[0])
    same = torch.equal(calls[0](), calls[1]())
    (wd, cd), (wp, cp) = interleaved(calls, args.repeats, cpu=True)
    print(f"{args.size} px, one UNet call (CFG batch 2): {work / 1e12:.3f} TFLOP")
    for name, wall, cpu in (("dense", wd, cd), ("packed", wp, cp)):
        print(f"  {name:7s} wall {wall:6.3f} s  CPU {cpu:6.3f} s  roofline "
              f"{work / wall / 1e9 / peak:4.0%}")
    print(f"  packed / dense: {wd / wp:.2f}x wall, {cd / cp:.2f}x CPU; same output: {same}")


if __name__ == "__main__":
    main()
