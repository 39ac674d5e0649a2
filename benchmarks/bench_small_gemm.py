"""The few-row bfloat16 product (models/small_gemm.cpp, on AMX's tiles) against oneDNN's
(torch.ops.mkldnn._linear_pointwise) at the shapes SD 1.5 runs on it: the UNet's 8x8 and 4x4
levels at 256 px (128 and 32 rows: 3x3 convolutions as products of their columns, and the
transformers' linears) and the text encoder (154 rows for a prompt and its negative, 77 for
one). Each product with its weight in cache ("warm": the same weight every call) and from
memory ("cold": a new weight each call, each kernel cycling through its own --cold-mb of
them: with one pool, the kernel that ran second in a round found the first's weights in L3,
which on a VM reporting 480 MB of it favoured it by up to 2x; the pools' weights allocated in
turn), the two kernels' calls interleaved in rounds, the order alternating, the median of
each; with the weight's read rate and the fraction of the machine's bfloat16 matmul peak
(bench_cpu.machine_peaks). On a shared machine the cold figures move with its memory's load:
compare within one run. Both kernels' outputs are compared (the sums are float32 in another
order: the last bfloat16 bit here and there).

Neither case is how a model reads its weights, once a call between other layers. There the
kernel is the faster: SD 1.5 at 256 px in bfloat16, NANODIFFUSION_SMALL_GEMM=1 against 0,
three interleaved pairs of processes on an AMX Xeon, the UNet call 407-418 against 471-481
ms and the text encoder on 2 x 77 tokens 35-37 against 47-50 ms, where this script's cold
column had oneDNN's ahead for 128 x 1280 -> 1280 and 154 x 768 -> 3072 in the same hour: its
pools were then allocated one whole before the other, ours first. With them allocated in
turn, the cold column had ours 0.99-1.40x oneDNN's at four shapes where the old allocation
had said 0.49-0.85x (the same machine, the same hour).

`--many` runs the same library's kernel of many rows (past small_gemm.MAX_ROWS: Linear layers'
bfloat16 products) at SD 1.5's 512 px shapes instead, and GEGLU whole (`small_gemm.gated_gelu`,
one product) against oneDNN's two (GELU's post-op, then the value's with the gate multiplied).

    nice .venv/bin/python benchmarks/bench_small_gemm.py
    nice .venv/bin/python benchmarks/bench_small_gemm.py --shapes 128x11520x1280 77x768x3072 \
        --rounds 8
    nice .venv/bin/python benchmarks/bench_small_gemm.py --many --cold-mb 300

Needs an AMX CPU where Linux grants the tiles (the kernel runs nowhere else). Not a test:
nothing here gates CI.
"""
import argparse
import statistics
import time

import torch
from bench_cpu import machine_peaks

from nanodiffusion.models import small_gemm

SHAPES = ["128x11520x1280", "128x1280x1280", "128x1280x5120", "32x11520x1280",
          "32x23040x1280", "154x768x3072", "154x3072x768", "77x768x768", "77x768x3072"]
# --many: the kernel of many rows at SD 1.5's 512 px shapes (its transformers' linears at the
# 64x64, 32x32 and 16x16 levels, batch 2), and GEGLU whole ("geglu": N the weight's rows, both
# halves) against oneDNN's two products (GELU's, then the value's with the gate multiplied in)
MANY = ["8192x320x1280", "8192x1280x320", "8192x320x320", "2048x640x2560", "2048x2560x640",
        "2048x640x640", "512x1280x5120", "512x5120x1280", "512x1280x1280", "8192x320x2560geglu",
        "2048x640x5120geglu", "512x1280x10240geglu"]


def _ours(x, w, geglu=False):
    if geglu:
        return small_gemm.gated_gelu(x, w)
    return torch.ops.nanodiffusion.small_linear(x, w, None, "none", None, "none")


def _onednn(x, w, geglu=False):
    op = torch.ops.mkldnn._linear_pointwise
    if geglu:
        n = w.shape[0] // 2
        return op.binary(x, op(x, w[n:], None, "gelu", [], "none"), w[:n], None, "mul")
    return op(x, w, None, "none", [], "")


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES,
                    help="MxKxN: rows, inputs, outputs (a 'geglu' suffix: GEGLU whole)")
    ap.add_argument("--many", action="store_true", help="the shapes of many rows (MANY)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per kernel and round")
    ap.add_argument("--cold-mb", type=int, default=1000,
                    help="MB of weights cycled through for the cold calls")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.many:
        args.shapes = MANY
    torch.set_num_threads(args.threads)
    if small_gemm.library() is None:
        raise SystemExit("small_gemm's kernel does not run here (it needs AMX and g++)")
    peak = machine_peaks(quick=False)["matmul"]["bfloat16"]
    print(f"bfloat16 matmul peak {peak:.0f} GFLOP/s, {args.threads} threads; "
          f"times are medians of {args.rounds} x {args.calls} interleaved calls")
    print(f"{'product':>18} {'weight':>6} {'ours ms':>8} {'oneDNN ms':>10} {'ratio':>6} "
          f"{'ours GB/s':>10} {'ours of peak':>13} {'max|diff|':>10}")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        geglu = shape.endswith("geglu")
        M, K, N = (int(v) for v in shape.removesuffix("geglu").split("x"))
        x = torch.randn(M, K, generator=g).bfloat16()
        for cold in (False, True):
            count = max(1, (args.cold_mb << 20) // (2 * N * K)) if cold else 1
            # the two pools' weights allocated in turn, so that both get the same mix of the
            # process's memory: on the AMX Xeon VM a pool allocated whole before the other read
            # up to 3.7x slower from memory (the first memory a process is handed, from free
            # memory broken into small blocks: docs/performance.md's twelfth AMX session)
            pools = {_ours: [], _onednn: []}
            for _ in range(count):
                for fn in pools:
                    pools[fn].append((torch.randn(N, K, generator=g) / K ** 0.5).bfloat16())
            w0 = pools[_ours][0]
            diff = (_ours(x, w0, geglu).float() - _onednn(x, w0, geglu).float()).abs().max().item()
            times = {_ours: [], _onednn: []}
            for r in range(args.rounds):
                for fn in (_ours, _onednn) if r % 2 == 0 else (_onednn, _ours):
                    ws = pools[fn]
                    for w in ws[:2]:
                        fn(x, w, geglu)
                    for i in range(args.calls):
                        w = ws[(r * args.calls + i) % count]
                        t0 = time.perf_counter()
                        fn(x, w, geglu)
                        times[fn].append(time.perf_counter() - t0)
            del pools
            ours, theirs = (statistics.median(times[f]) for f in (_ours, _onednn))
            print(f"{shape:>18} {'cold' if cold else 'warm':>6} {ours * 1e3:8.3f} "
                  f"{theirs * 1e3:10.3f} {theirs / ours:5.2f}x {2 * N * K / ours / 1e9:10.1f} "
                  f"{2 * M * K * N / ours / 1e9 / peak:12.0%} {diff:10.3g}")


if __name__ == "__main__":
    main()
