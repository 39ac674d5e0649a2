"""Time the tiny decoder (TAESD) against the VAE decoder it stands in for, same latents, same
process, the calls interleaved: the bundled shapes model's VAE and its shipped tiny decoder at
64x64, and Stable Diffusion's VAE against madebyollin's TAESD architecture (both random
weights) at --size (default 512), each also as diffusers runs it (AutoencoderKL,
AutoencoderTiny). Prints medians in ms and the ratios VAE / tiny.

    .venv/bin/python benchmarks/bench_tiny_decoder.py --size 512 --repeats 3 --threads 2

Needs diffusers. Not a test: nothing here gates CI.
"""
import argparse
import statistics
import time

import torch


def _median_ms(fns, repeats):
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1000 * statistics.median(ts) for ts in times]


def _shapes(batch, repeats):
    import nanodiffusion
    from nanodiffusion.pipelines.decoders import tiny_decode

    pipe = nanodiffusion.load("shapes")
    if pipe.tiny_decoder is None:
        print("shapes: the bundled model has no tiny decoder")
        return
    z = torch.randn(batch, 4, 16, 16)
    full, tiny = _median_ms([lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor),
                             lambda: tiny_decode(pipe.tiny_decoder, z)], repeats)
    print(f"shapes 64x64 batch {batch}: VAE {full:.2f} ms, tiny {tiny:.2f} ms "
          f"({full / tiny:.1f}x)")


def _sd(size, repeats):
    from diffusers import AutoencoderKL, AutoencoderTiny

    from nanodiffusion.models import taesd, vae
    from nanodiffusion.pipelines.decoders import for_inference, tiny_decode

    torch.manual_seed(0)
    ref_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4).eval()
    ours_vae = vae.VAE(vae.SD)
    ours_vae.load_state_dict(ref_vae.state_dict(), strict=True)
    ours_vae = vae.for_inference(ours_vae)  # as our pipelines run them
    ref_tiny = AutoencoderTiny().eval()
    ours_tiny = taesd.TAESD(taesd.SD)
    ours_tiny.load_state_dict(ref_tiny.state_dict(), strict=True)
    ours_tiny = for_inference(ours_tiny)
    z = torch.randn(1, 4, size // 8, size // 8)
    with torch.no_grad():
        times = _median_ms([lambda: ours_vae.decode(z), lambda: ref_vae.decode(z),
                            lambda: tiny_decode(ours_tiny, z), lambda: ref_tiny.decode(z)],
                           repeats)
    names = ("VAE (ours)", "VAE (diffusers)", "TAESD (ours)", "TAESD (diffusers)")
    print(f"SD {size}x{size}: " + ", ".join(f"{n} {t:.0f} ms" for n, t in zip(names, times)))
    print(f"  VAE / TAESD: ours {times[0] / times[2]:.1f}x, diffusers "
          f"{times[1] / times[3]:.1f}x; TAESD diffusers / ours {times[3] / times[2]:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    with torch.no_grad():
        for batch in (1, 4):
            _shapes(batch, max(args.repeats, 20))
        _sd(args.size, args.repeats)


if __name__ == "__main__":
    main()
