"""Time the Stable Diffusion 1.5 architecture (random weights) against diffusers, same weights,
same inputs, same process: a UNet step with classifier-free guidance (batch 2), the CLIP text
encoder (2 x 77 tokens) and a VAE decode. Ours runs as the pipelines run it (for_inference,
float32 linears on oneDNN, the UNet's and the VAE decoder's convolutions packed, channels-last
input on the CPU). Prints medians, ratios (diffusers / ours), each part's FLOPs (counted on
diffusers' call by bench_cpu.flop_counter, attention's products included) and, on the CPU, our
GFLOP/s and its fraction of the machine's matmul peak in that dtype (bench_cpu.matmul_peak: the
faster of torch.mm and oneDNN's product), measured right after each part's calls, as the
machine's speed moves.

    .venv/bin/python benchmarks/bench_sd.py --size 256 --repeats 3

Needs the test extras (diffusers, transformers). Not a test: nothing here gates CI.
"""
import argparse
import statistics
import time

import torch


def _sync(device):
    if device.type != "cpu":
        torch.accelerator.synchronize()


def _median_times(fns, repeats, device, warmup=1):
    """Median seconds of each function, the calls interleaved (a, b, a, b, ...) so that drifts
    of the machine's speed fall on both sides alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def build_pairs():
    """(ours, diffusers/transformers) modules holding the same random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nanodiffusion.models import clip, unet, vae

    torch.manual_seed(0)
    ref_unet = UNet2DConditionModel(cross_attention_dim=768)  # else diffusers' SD 1.x defaults
    ours_unet = unet.UNet(unet.SD15)
    ours_unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ref_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
    ours_vae = vae.VAE(vae.SD)
    ours_vae.load_state_dict(ref_vae.state_dict(), strict=True)
    ours_vae = vae.for_inference(ours_vae)  # as our pipelines run it
    ref_text = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768,
                                            intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768))
    ours_text = clip.CLIPTextModel(clip.SD15_TEXT)
    ours_text.load_state_dict(ref_text.state_dict(), strict=True)
    return [m.eval() for m in (ours_unet, ref_unet, ours_vae, ref_vae, ours_text, ref_text)]


def _flops(fn):
    from bench_cpu import flop_counter

    with flop_counter() as fc:
        fn()
    return fc.get_total_flops()


@torch.no_grad()
def run(size, repeats, device, dtype):
    from nanodiffusion.models import unet
    from nanodiffusion.models.packing import cpu_input, onednn_linears, pack

    mods = [m.to(device=device, dtype=dtype) for m in build_pairs()]
    ours_unet, ref_unet, ours_vae, ref_vae, ours_text, ref_text = mods
    ours_unet = unet.for_inference(ours_unet)  # after the cast: its layout follows the dtype
    onednn_linears(ours_text)  # the UNet's and the VAE's: their for_inference
    pack(ours_unet), pack(ours_vae.decoder)  # as Pipeline.unet_loop and _decode do
    h = size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, h, h, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    ids = torch.randint(0, 49407, (2, 77), generator=g).to(device)
    z = torch.randn(1, 4, h, h, generator=g).to(device, dtype)
    xo, zo = cpu_input(x), cpu_input(z)  # the pipelines' one rule for these inputs
    rows = [
        ("unet step, CFG batch 2", lambda: ours_unet(xo, t, ctx),
         lambda: ref_unet(x, t, ctx).sample),
        ("text encoder 2x77", lambda: ours_text(ids)[0],
         lambda: ref_text(ids).last_hidden_state),
        (f"vae decode {size}px", lambda: ours_vae.decode(zo), lambda: ref_vae.decode(z).sample),
    ]
    print(f"torch {torch.__version__}, {device}, {dtype}, threads {torch.get_num_threads()}, "
          f"{size}px, median of {repeats}, interleaved; peak: the {dtype} matmul peak in "
          "GFLOP/s (bench_cpu.matmul_peak), measured right after each part's calls")
    print(f"{'part':<26}{'ours s':>10}{'diffusers s':>13}{'ratio':>8}{'GFLOP':>8}"
          f"{'ours GFLOP/s':>14}{'peak':>7}{'roofline':>10}{'max |diff|':>12}")
    for name, ours, ref in rows:
        diff = (ours().float() - ref().float()).abs().max().item()
        work = _flops(ref) / 1e9
        a, b = _median_times([ours, ref], repeats, device)
        peak = None
        if device.type == "cpu":
            from bench_cpu import matmul_peak

            peak = matmul_peak(str(dtype).removeprefix("torch."))["matmul"]
        roof = "-" if peak is None else f"{work / a / peak:.0%}"
        top = "-" if peak is None else f"{peak:.0f}"
        print(f"{name:<26}{a:>10.4f}{b:>13.4f}{b / a:>8.2f}{work:>8.0f}{work / a:>14.0f}"
              f"{top:>7}{roof:>10}{diff:>12.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.size, args.repeats, torch.device(args.device), getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
