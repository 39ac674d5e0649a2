"""Whole txt2img on the CPU, each system in its own process: ours and diffusers in float32,
bfloat16 and float16, and stable-diffusion.cpp (f32 / f16 / q8_0) where its python bindings
are installed. The Stable Diffusion 1.5 architecture with random weights, euler, CFG 7.5, one
fixed prompt and seed, at 256 and 512 px.

    nice .venv/bin/python benchmarks/bench_cpu.py                     # 256 and 512 px, 4 steps
    nice .venv/bin/python benchmarks/bench_cpu.py --sizes 256 --system ours-bf16 \
        --system diffusers-bf16 --json bench.json
    nice .venv/bin/python benchmarks/bench_cpu.py --tiny               # a smoke test, minutes
    nice .venv/bin/python benchmarks/bench_cpu.py --sizes 256 --rounds 3 --system ours-fp32 \
        --system diffusers-fp32                                        # ratios per round

--rounds K runs every system K times, interleaved (every other round in reverse order, each
round with its own probe of the machine), and takes the ratio and roofline fraction within each
round, then their median (the ratio's range across rounds in brackets): on the shared 2-core
machines the matmul peak moved between 139 and 258 GFLOP/s float32 within one session, so
one system run at a slow moment against another at a fast one gave 0.95x where the next
run gave 1.23x.

A table per size: import s (the system's own modules, torch already imported), load s, first
call s, warm s (the median of --repeats calls), best s (the fastest of them: on a shared
2-core machine one call's time varied by up to 2x, with no steal time counted), peak RSS
(then, apart: the resident size once loaded, the load's peak, the calls' peak, the resident
size after them), "vs diffusers" (the warm time of the system's diffusers baseline, same
dtype, over its own: above 1x is faster), roofline (the fraction of the machine's roofline
reached: the work's FLOPs / the matmul peak of the dtype it computes in (the faster of torch.mm
and oneDNN's product: matmul_peak; float32's where that is faster, as on CPUs without
bfloat16 instructions), over the warm time; the peak is measured by a fresh child right after
the system's own, since the machine's speed moves within a run (the same bfloat16 2048 product
at 1522 GFLOP/s in a run's first probe and 2183-2319 in the same hour);
"at best": over the best time; ours float32 runs the wide 3x3 convolutions as Winograd's
F(4x4, 3x3), 4x fewer multiply-adds than counted, so its fraction can pass the direct
kernels'), peak (that GFLOP/s), and max |diff| to diffusers float32 in 1/255 steps. Every
system of ours but ours-fp32 also gets its max |diff| and PSNR against ours-fp32.

How it works. The parent never imports torch. It has children write the model once (a
diffusers folder, safetensors, float32, SD 1.5's scheduler config, the tokenizer from our own
CLIP vocabulary) into --cache, and reuses it after; it has a child measure the machine (the
CPU's flags; torch.mm and a 3x3 convolution per dtype at --threads, over growing shapes, at
the largest reached in a bounded time: fp16 without native support runs at ~1 GFLOP/s) and
count the work's FLOPs (FlopCounterMode over our modules on the meta device: --steps UNet
calls of batch 2, the text encoder on 2 x 77 tokens, one VAE decode); then it runs one fresh
child per (system, size), `bench_cpu.py --child run --system S --sizes N`, which loads, calls,
saves its image in --cache/images and prints one JSON line, and after each a fresh
`--child peaks` that measures the matmul peaks of that row's roofline. Our prompt cache is cleared
before each call (diffusers encodes the prompt at every call). Peak RSS is the child's VmHWM
from /proc, not ru_maxrss: Linux carries the parent's high-water mark across fork and exec
into the child's ru_maxrss (ru_maxrss where there is no /proc).

stable-diffusion.cpp loads the single file our exporter writes (the original LDM layout), as
`nanodiffusion export <folder> <file> --format single-file` does, converted to its wtype on
load. Its systems are held to the float32 peak (ggml's kernels are not torch's; f16 and q8_0
are its weights' format). It draws its own noise on its own sigma schedule, so its max |diff|
says only that it made an image. Its code path is stable-diffusion-cpp-python's documented API
(StableDiffusion(model_path, wtype, n_threads, ...).generate_image; txt_to_img before that), at
sd.cpp's defaults otherwise; it ran with 0.4.7 (`pip install stable-diffusion-cpp-python==0.4.7`
builds it from source with -march=native: 3 minutes on a 2-core AMX Xeon). Not in CI, and not
exercised by --tiny: sd.cpp knows only the published architectures.

--tiny: the tiny SD of tests/tiny_sd.py (its own cache folder; sizes 64 128 and 2 steps unless
given) and quick machine probes (smaller shapes: rough peaks, its roofline column means
little). To add a system, add one line to SYSTEMS: its runner, the dtype it loads in, the
dtype of its roofline, its diffusers baseline, and extra keyword arguments of the load and of
each call.

Needs the test extras (diffusers, transformers). Not a test: nothing here gates CI.
"""
import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
SEED, GUIDANCE = 0, 7.5
RESULT = "BENCH_CPU_RESULT "  # the prefix of a child's one JSON line on stdout
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16",
         "amx_tile")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class System:
    runner: str      # "ours", "diffusers" or "sdcpp": RUNNERS loads it and makes its call
    dtype: str       # the weights: a torch dtype name, or sd.cpp's wtype
    peak: str        # the dtype whose matmul peak is its roofline
    baseline: str    # the diffusers system its ratio is taken against
    load: dict = field(default_factory=dict)  # extra keyword arguments of the load
    call: dict = field(default_factory=dict)  # extra keyword arguments of each call


SYSTEMS = {
    "ours-fp32": System("ours", "float32", "float32", "diffusers-fp32"),
    "ours-bf16": System("ours", "bfloat16", "bfloat16", "diffusers-bf16"),
    "ours-bf16-lowmem": System("ours", "bfloat16", "bfloat16", "diffusers-bf16",
                               load={"low_memory": True}),
    "ours-fp16": System("ours", "float16", "float16", "diffusers-fp16"),
    "diffusers-fp32": System("diffusers", "float32", "float32", "diffusers-fp32"),
    "diffusers-bf16": System("diffusers", "bfloat16", "bfloat16", "diffusers-bf16"),
    "diffusers-fp16": System("diffusers", "float16", "float16", "diffusers-fp16"),
    "sdcpp-f32": System("sdcpp", "f32", "float32", "diffusers-fp32"),
    "sdcpp-f16": System("sdcpp", "f16", "float32", "diffusers-bf16"),
    "sdcpp-q8_0": System("sdcpp", "q8_0", "float32", "diffusers-bf16"),
    # sd.cpp's flash attention (off by default): its attention's scores never whole in memory
    "sdcpp-f16-fa": System("sdcpp", "f16", "float32", "diffusers-bf16",
                           load={"flash_attn": True}),
    "sdcpp-q8_0-fa": System("sdcpp", "q8_0", "float32", "diffusers-bf16",
                            load={"flash_attn": True}),
}
REFERENCE, OURS_EXACT = "diffusers-fp32", "ours-fp32"


# ---- the model, written once --------------------------------------------------------------
def _sd15_modules():
    """diffusers' UNet2DConditionModel defaults are SD 1.x's but for the context width; the VAE
    and text encoder as in bench_sd.py."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        sample_size=512)
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768,
                                        intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, projection_dim=768))
    return unet, vae, text


def _tiny_modules():
    """The shapes of tests/tiny_sd.py (a VAE that downsamples by 2)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=2)  # diffusers' name for 2 heads
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return unet, vae, text


def write_model(folder, tiny):
    """A diffusers folder (float32 safetensors, SD 1.5's scheduler config), written next to
    `folder` and renamed into place, so that a run killed halfway leaves nothing reused."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    from nanodiffusion.models.tokenizer import CLIPTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    CLIPTokenizer.default().save(tmp / "vocabulary")  # the real CLIP vocabulary, HF's layout
    unet, vae, text = _tiny_modules() if tiny else _sd15_modules()
    scheduler = PNDMScheduler.from_config(dict(  # SD 1.5's scheduler_config.json
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
        clip_sample=False, steps_offset=1, timestep_spacing="leading",
        prediction_type="epsilon"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=HFTokenizer.from_pretrained(tmp / "vocabulary"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(tmp / "model", safe_serialization=True)
    (tmp / "model").rename(folder)
    shutil.rmtree(tmp)


def write_single_file(folder, path):
    """What `nanodiffusion export <folder> <path> --format single-file` writes."""
    import nanodiffusion
    from nanodiffusion.formats.single_file import save_single_file

    save_single_file(nanodiffusion.load(folder), path)


# ---- the machine and the work ---------------------------------------------------------------
def _best_seconds(fn, budget=3.0, reps=3):
    """The fastest of at least one and at most `reps` timed calls after a warm-up call (oneDNN
    builds its primitives there), stopping once `budget` seconds are spent."""
    fn()
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return best


def _peak(make, shapes, slow=0.5):
    """(GFLOP/s, shape) at the largest of the growing `shapes` reached; `make(shape)` -> (fn,
    FLOPs). Growing stops once a call takes over `slow` seconds (fp16 without native support
    runs at a few GFLOP/s or less: its largest shape would take minutes). The smaller shapes
    are only steps: their speeds are not the kernels the work runs (bf16 at 256 x 256 can
    take another kernel than at 2048)."""
    for shape in shapes:
        fn, flops = make(shape)
        secs = _best_seconds(fn)
        if secs > slow:
            break
    return flops / secs / 1e9, shape


def machine_peaks(quick):
    """GFLOP/s of an n x n matrix product and of a 3x3 convolution (batch 2, C -> C channels,
    32 x 32, NCHW) per dtype, at the thread count set, at the largest shape tried (_peak). The
    product is the faster of torch.mm and oneDNN's (torch.ops.mkldnn._linear_pointwise), both
    kept ("matmul_mm", "matmul_onednn"): torch.mm's float32 is MKL's sgemm, which runs AVX2
    code on AMD CPUs (a 2-core AMD EPYC with AVX-512: 191 GFLOP/s against oneDNN's 431), so it
    would put the roofline at half the hardware's."""
    import torch
    import torch.nn.functional as F

    cs, hw = ((32, 64, 128) if quick else (64, 128, 320)), 32
    g = torch.Generator().manual_seed(0)

    def conv(dt):
        def make(c):
            x = torch.randn(2, c, hw, hw, generator=g).to(dt)
            w = (torch.randn(c, c, 3, 3, generator=g) * 0.05).to(dt)
            return (lambda: F.conv2d(x, w, padding=1)), 2 * 2 * c * c * 9 * hw * hw
        return make
    out = {"matmul": {}, "conv3x3": {}, "matmul_shape": {}, "conv3x3_shape": {},
           "matmul_mm": {}, "matmul_onednn": {}}
    with torch.no_grad():
        for name in DTYPES:
            dt = getattr(torch, name)
            mm = matmul_peak(name, quick)
            for k in ("matmul", "matmul_shape", "matmul_mm", "matmul_onednn"):
                out[k][name] = mm[k]
            out["conv3x3"][name], c = _peak(conv(dt), cs)
            out["conv3x3_shape"][name] = f"2x{c}x{hw}x{hw}, {c} -> {c}"
    out["tried"] = {"matmul n": MATMUL_SIZES[bool(quick)], "conv3x3 C": cs}
    return out


MATMUL_SIZES = {False: (512, 1024, 2048), True: (256, 512, 1024)}  # n of matmul_peak, by quick


def matmul_peak(name, quick=False):
    """The matmul peak of dtype `name` (machine_peaks's "matmul" and its parts): GFLOP/s of an
    n x n product at the largest n of the growing shapes reached (_peak), the faster of
    torch.mm's and oneDNN's (torch.ops.mkldnn._linear_pointwise), with both ("matmul_mm",
    "matmul_onednn": None where oneDNN has no kernel for the dtype) and the shape."""
    import torch

    ns = MATMUL_SIZES[bool(quick)]
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(0)

    def matmul(mm):
        def make(n):
            a, b = (torch.randn(n, n, generator=g).to(dt) for _ in range(2))
            return (lambda: mm(a, b)), 2 * n ** 3
        return make

    def onednn(a, b):  # a @ b.T on oneDNN's kernel (float32: not MKL's, models/packing.py)
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")

    with torch.no_grad():
        mm, n = _peak(matmul(torch.mm), ns)
        try:
            dnn, m = _peak(matmul(onednn), ns)
        except RuntimeError:  # no oneDNN kernel for this dtype here
            dnn, m = None, None
    if dnn and dnn > mm:
        return {"matmul": dnn, "matmul_shape": f"{m}x{m} oneDNN", "matmul_mm": mm,
                "matmul_onednn": dnn}
    return {"matmul": mm, "matmul_shape": f"{n}x{n}", "matmul_mm": mm, "matmul_onednn": dnn}


def cpu_info():
    import torch

    info = {"model": "unknown", "flags": [], "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] == "unknown":
            info["model"] = value.strip()
        if key.strip() == "flags":
            have = set(value.split())
            info["flags"] = [f for f in FLAGS if f in have]
            break
    return info


def flop_counter():
    """torch's FlopCounterMode, silent, that also counts the two products its table lacks:
    torch's CPU attention kernel (`_scaled_dot_product_flash_attention_for_cpu`, as
    sdpa_flop_count counts any attention: 4 x B x heads x T x S x hs; without it an SD 1.5 UNet
    call at 512 px counted 1354 GFLOP, 252 short of its work) and oneDNN's matrix product
    (`mkldnn::_linear_pointwise`, x @ w.T: our float32 linears and blocked attention); and our
    fused attention kernel (`nanodiffusion::fused_attention`) as torch's. The one counter of
    the benchmarks."""
    import math

    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from nanodiffusion.models import fused_attention  # noqa: F401 (registers its op)

    def cpu_attention(q, k, v, *args, out_shape=None, **kwargs):  # shapes, as registered
        return sdpa_flop_count(q, k, v)

    def onednn_product(x, w, *args, out_shape=None, **kwargs):
        return 2 * math.prod(x) * w[0]
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
        torch.ops.nanodiffusion.fused_attention: cpu_attention,
        torch.ops.mkldnn._linear_pointwise: onednn_product})


def count_flops(folder, sizes, steps):
    """FLOPs per size of one txt2img: `steps` UNet calls of batch 2 (CFG), the text encoder on
    2 x 77 tokens, one VAE decode; our modules built on the meta device from the folder's
    configs (FlopCounterMode counts by shapes, so nothing is computed)."""
    import torch

    from nanodiffusion.formats import diffusers_config as dc
    from nanodiffusion.models.clip import CLIPTextModel
    from nanodiffusion.models.unet import UNet
    from nanodiffusion.models.vae import VAE

    def cfg(part):
        return json.loads((folder / part / "config.json").read_text())
    ucfg = dc.unet_config_from_diffusers(cfg("unet"))
    vcfg = dc.vae_config_from_diffusers(cfg("vae"))
    tcfg = dc.clip_text_config_from_transformers(cfg("text_encoder"))
    with torch.device("meta"):
        unet, vae, text = UNet(ucfg), VAE(vcfg), CLIPTextModel(tcfg)

    def flops(fn, *shapes_and_dtypes):
        with torch.device("meta"), torch.no_grad(), flop_counter() as fc:
            fn(*[torch.zeros(s, dtype=d) for s, d in shapes_and_dtypes])
        return fc.get_total_flops()
    text_f = flops(text, ((2, 77), torch.long))
    out = {}
    for size in sizes:
        h = size // 2 ** (len(vcfg.block_channels) - 1)
        c = vcfg.latent_channels
        unet_f = flops(lambda x, t, ctx: unet(x, t, ctx), ((2, c, h, h), torch.float32),
                       ((2,), torch.float32), ((2, 77, ucfg.context_dim), torch.float32))
        vae_f = flops(vae.decode, ((1, c, h, h), torch.float32))
        out[size] = {"unet_call": unet_f, "text": text_f, "vae_decode": vae_f,
                     "total": steps * unet_f + text_f + vae_f}
    return out


# ---- the systems, each in its own child -----------------------------------------------------
# A runner imports what its system needs and returns load(), which returns call(size) -> a
# PIL image: the imports, the load and the calls are timed apart.
def _ours(system, args):
    import torch

    import nanodiffusion
    import nanodiffusion.loading  # noqa: F401 (what load() imports: timed as the import)

    def load():
        pipe = nanodiffusion.load(args.model, dtype=getattr(torch, system.dtype), **system.load)

        def call(size):
            # diffusers encodes the prompt at every call; ours caches it: cleared, the same work
            pipe._prompt_cache.clear()
            return pipe.generate(PROMPT, seed=SEED, steps=args.steps, guidance=GUIDANCE,
                                 sampler="euler", width=size, height=size, **system.call)[0]
        return call
    return load


def _diffusers(system, args):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    def load():
        pipe = StableDiffusionPipeline.from_pretrained(
            args.model, torch_dtype=getattr(torch, system.dtype), safety_checker=None,
            requires_safety_checker=False, **system.load)
        # what our "euler" reproduces (samplers.diffusers_scheduler_for("euler"): as is)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def call(size):
            return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                        height=size, width=size, **system.call,
                        generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        return call
    return load


def _sdcpp(system, args):
    """stable-diffusion-cpp-python's documented API (StableDiffusion, generate_image;
    txt_to_img in versions before generate_image), run with 0.4.7."""
    from stable_diffusion_cpp import StableDiffusion

    def load():
        sd = StableDiffusion(model_path=str(args.single_file), wtype=system.dtype,
                             n_threads=args.threads, vae_decode_only=True, verbose=False,
                             **system.load)
        generate = getattr(sd, "generate_image", None) or sd.txt_to_img

        def call(size):
            return generate(prompt=PROMPT, width=size, height=size, cfg_scale=GUIDANCE,
                            sample_method="euler", sample_steps=args.steps, seed=SEED,
                            **system.call)[0].convert("RGB")
        return call
    return load


RUNNERS = {"ours": _ours, "diffusers": _diffusers, "sdcpp": _sdcpp}


def _status_bytes(field):
    """A field of /proc/self/status in bytes (VmHWM, VmRSS), or None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes():
    """This process's peak resident set: VmHWM (Linux: this process's own, from its exec on,
    or from the last reset_peak_rss), else ru_maxrss (kilobytes on Linux, bytes on macOS)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss():
    """VmHWM back to the resident size now (Linux >= 4.0); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_run(args):
    """Load, a first call, --repeats warm calls; the image saved; one JSON line printed."""
    name, size = args.system[0], args.sizes[0]
    system = SYSTEMS[name]
    if system.load.get("low_memory"):  # as the CLI's --low-memory: before torch's import
        from nanodiffusion.malloc import torch_huge_pages

        torch_huge_pages()
    if system.runner != "sdcpp":  # sd.cpp takes n_threads, and needs no torch in memory
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load = RUNNERS[system.runner](system, args)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    call = load()
    load_s = time.perf_counter() - t0
    load_peak, loaded = peak_rss_bytes(), _status_bytes("VmRSS")
    apart = reset_peak_rss()  # the calls' own peak, apart from the load's
    t0 = time.perf_counter()
    image = call(size)
    first_s = time.perf_counter() - t0
    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        image = call(size)
        warm.append(time.perf_counter() - t0)
    path = image_path(args.cache, name, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return {"system": name, "size": size, "import_s": import_s, "load_s": load_s,
            "first_s": first_s, "warm_s": statistics.median(warm), "warm_all_s": warm,
            "peak_rss_bytes": max(load_peak, peak_rss_bytes()), "load_peak_bytes": load_peak,
            "call_peak_bytes": peak_rss_bytes() if apart else None, "loaded_rss_bytes": loaded,
            "after_rss_bytes": _status_bytes("VmRSS"), "image": str(path)}


def child_peaks(args):
    """The matmul peaks of a system's roofline (its dtype's and float32's), measured in a fresh
    process right after the system's own: the run child's allocator settings (low memory maps
    every block of 256 KiB and more anew) would slow the probe's products there (the bfloat16
    peak 1425-1462 GFLOP/s inside low memory's child, 1874-2013 in the others' in that run)."""
    import torch

    torch.set_num_threads(args.threads)
    system = SYSTEMS[args.system[0]]
    return {"peaks": {d: matmul_peak(d, args.tiny)["matmul"]
                      for d in dict.fromkeys((system.peak, "float32"))}}


def child_probe(args):
    import torch

    torch.set_num_threads(args.threads)
    return {"cpu": cpu_info(), "threads": args.threads, "peaks": machine_peaks(args.tiny),
            "flops": count_flops(args.model, args.sizes, args.steps)}


# ---- the parent -----------------------------------------------------------------------------
def image_path(cache, name, size):
    return Path(cache) / "images" / f"{name}-{size}.png"


def _child(args, kind, extra=(), expect_result=True):
    """Run `bench_cpu.py --child kind` with this run's settings; its JSON line, or
    {"error": ...} with the end of its output when it fails."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--cache", str(args.cache), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--threads", str(args.threads), *extra]
    cmd += ["--tiny"] if args.tiny else []
    env = {**os.environ, **{k: str(args.threads) for k in
                            ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or (expect_result and not lines):
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-20:]
        return {"error": f"exit {proc.returncode}: {tail[-1]}", "output_tail": tail}
    return json.loads(lines[-1][len(RESULT):]) if lines else {}


def ensure_model(args, want_single_file):
    if not (args.model / "model_index.json").exists():
        print(f"writing the model to {args.model} (once) ...", flush=True)
        done = _child(args, "write", expect_result=False)
        if "error" in done:
            sys.exit(f"writing the model failed: {done['error']}")
    if want_single_file and not args.single_file.exists():
        print(f"writing the single file {args.single_file} (once) ...", flush=True)
        done = _child(args, "single-file", expect_result=False)
        if "error" in done:
            sys.exit(f"writing the single file failed: {done['error']}")


def choose_systems(args):
    """The systems asked for (default: all), less sd.cpp's where it cannot run, said so."""
    names = list(dict.fromkeys(args.system or SYSTEMS))
    have_sdcpp = importlib.util.find_spec("stable_diffusion_cpp") is not None
    chosen = []
    for name in names:
        if SYSTEMS[name].runner == "sdcpp" and not have_sdcpp:
            print(f"skipping {name}: stable_diffusion_cpp is not importable "
                  f"(pip install stable-diffusion-cpp-python; it builds from source)")
        elif SYSTEMS[name].runner == "sdcpp" and args.tiny:
            print(f"skipping {name}: sd.cpp knows only the published architectures, not --tiny")
        else:
            chosen.append(name)
    return chosen


def compare(path_a, path_b):
    """(max |a - b| in /255, PSNR in dB) of two PNGs, or None where one is missing."""
    import numpy as np
    from PIL import Image

    if not (path_a and path_b and Path(path_a).exists() and Path(path_b).exists()):
        return None
    a = np.asarray(Image.open(path_a).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(path_b).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return None
    mse = ((a - b) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
    return int(np.abs(a - b).max()), float(psnr)


def add_derived(rows, probe):
    """ratio, roofline fraction and the pixel comparisons, per row."""
    by = {(r["system"], r["size"]): r for r in rows if "error" not in r}
    for r in by.values():
        system, size = SYSTEMS[r["system"]], r["size"]
        base = by.get((system.baseline, size))
        r["ratio"] = base["warm_s"] / r["warm_s"] if base else None
        # the peaks a child measured right after its run (child_peaks: the machine's speed
        # moves within a run, the same bfloat16 2048 product 1522 GFLOP/s in the run's probe
        # and 2183-2319 in the same hour), else the run's probe's
        peaks = r.get("peaks") or probe.get("peaks", {}).get("matmul", {})
        # the faster of its dtype's peak and float32's: a CPU without bfloat16 instructions
        # (AVX2 only: 1 GFLOP/s for torch.mm) computes ours' bfloat16 in float32
        # (winograd.computes_in_float32), so float32's peak is its roofline there
        peak = max((p for p in (peaks.get(system.peak), peaks.get("float32")) if p),
                   default=None)
        work = probe.get("flops", {}).get(str(size), {}).get("total")
        r["roofline_peak"] = peak
        r["roofline_s"] = work / (peak * 1e9) if peak and work else None
        r["roofline_fraction"] = r["roofline_s"] / r["warm_s"] if r["roofline_s"] else None
        r["best_s"] = min(r.get("warm_all_s") or [r["warm_s"]])
        r["roofline_best"] = r["roofline_s"] / r["best_s"] if r["roofline_s"] else None
        ref = by.get((REFERENCE, size))
        r["vs_reference"] = compare(r["image"], ref and ref["image"])
        exact = by.get((OURS_EXACT, size))
        if system.runner == "ours" and r["system"] != OURS_EXACT:
            r["vs_ours_exact"] = compare(r["image"], exact and exact["image"])


def _fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def print_machine(probe):
    cpu, peaks = probe["cpu"], probe["peaks"]
    missing = [f for f in FLAGS if f not in cpu["flags"]]
    print(f"CPU {cpu['model']}; flags {' '.join(cpu['flags']) or '-'} (not: "
          f"{' '.join(missing) or '-'}); torch {cpu['torch']} ({cpu['capability']}), "
          f"{probe['threads']} threads")
    tried = peaks["tried"]
    print(f"{'peak GFLOP/s (at the shape)':<38}" + "".join(f"{d:>26}" for d in DTYPES))
    for op, label in (("matmul", f"matmul n x n, n in {tried['matmul n']}"),
                      ("conv3x3", f"conv 3x3 32x32, C in {tried['conv3x3 C']}")):
        cells = [f"{peaks[op][d]:.1f} ({peaks[op + '_shape'][d].split(',')[0]})"
                 for d in DTYPES]
        print(f"{label:<38}" + "".join(f"{c:>26}" for c in cells))
    for op, label in (("matmul_mm", "  matmul: torch.mm"), ("matmul_onednn", "  matmul: oneDNN")):
        if op in peaks:  # a probe from before both were kept has neither
            print(f"{label:<38}" + "".join(f"{_fmt(peaks[op][d], '.1f'):>26}" for d in DTYPES))


def print_size(size, rows, probe, args):
    f = probe["flops"][str(size)]
    print(f"\n{size} px: txt2img, euler, {args.steps} steps, CFG {GUIDANCE}, "
          f"{args.threads} threads; work {f['total'] / 1e12:.3f} TFLOP (UNet {args.steps} x "
          f"{f['unet_call'] / 1e12:.3f}, text encoder {f['text'] / 1e12:.3f}, VAE decode "
          f"{f['vae_decode'] / 1e12:.3f})")
    width = 24 if any(r.get("ratio_range") for r in rows) else 13  # merged rounds
    print(f"{'system':<18}{'import s':>9}{'load s':>8}{'first s':>9}{'warm s':>9}{'best s':>8}"
          f"{'RSS GB':>8}{'vs diffusers':>{width}}{'roofline':>9}{'at best':>8}{'peak':>7}"
          f"{'max|diff| /255':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<18} failed: {r['error'][:300]}")
            continue
        diff = r["vs_reference"]
        ratio = None if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if ratio and r.get("ratio_range"):
            ratio += " ({:.2f}-{:.2f})".format(*r["ratio_range"])
        print(f"{r['system']:<18}{r['import_s']:>9.2f}{r['load_s']:>8.2f}{r['first_s']:>9.2f}"
              f"{r['warm_s']:>9.2f}{r['best_s']:>8.2f}{r['peak_rss_bytes'] / 1e9:>8.2f}"
              f"{_fmt(ratio, ''):>{width}}{_fmt(r['roofline_fraction'], '.0%'):>9}"
              f"{_fmt(r['roofline_best'], '.0%'):>8}{_fmt(r.get('roofline_peak'), '.0f'):>7}"
              f"{_fmt(diff and diff[0], 'd'):>16}")
    print(f"{'RSS GB of':<18}{'loaded':>9}{'load peak':>10}{'call peak':>10}{'after':>8}")
    for r in rows:
        if "error" not in r and r.get("loaded_rss_bytes") is not None:
            gb = [None if r.get(k) is None else r[k] / 1e9 for k in (
                "loaded_rss_bytes", "load_peak_bytes", "call_peak_bytes", "after_rss_bytes")]
            print(f"{r['system']:<18}{_fmt(gb[0], '.2f'):>9}{_fmt(gb[1], '.2f'):>10}"
                  f"{_fmt(gb[2], '.2f'):>10}{_fmt(gb[3], '.2f'):>8}")
    for r in rows:
        if r.get("vs_ours_exact"):
            top, psnr = r["vs_ours_exact"]
            print(f"{r['system']} against {OURS_EXACT}: max |diff| {top}/255, "
                  f"PSNR {psnr:.1f} dB")


def merge_rounds(rounds):
    """One row per (system, size) from --rounds runs, each already through add_derived with its
    own round's probe: the warm calls of every round (warm s: their median, best s: the
    fastest), the median first call, import and load, the highest RSS figures, and the ratio
    and roofline fraction as the median of the rounds' (each taken within its round, so a
    machine that speeds up or slows down between rounds moves both sides), with the ratio's
    range across rounds."""
    merged = []
    for row in rounds[0]:
        key = (row["system"], row["size"])
        runs = [r for rows in rounds for r in rows if (r["system"], r["size"]) == key]
        failed = [r for r in runs if "error" in r]
        if failed:  # a failed round: keep its error
            merged.append(failed[0])
            continue
        out = dict(runs[-1])
        out["warm_all_s"] = [t for r in runs for t in r["warm_all_s"]]
        out["warm_s"] = statistics.median(out["warm_all_s"])
        out["best_s"] = min(out["warm_all_s"])
        for k in ("import_s", "load_s", "first_s"):
            out[k] = statistics.median(r[k] for r in runs)
        for k in ("peak_rss_bytes", "load_peak_bytes", "call_peak_bytes", "loaded_rss_bytes",
                  "after_rss_bytes"):
            vals = [r[k] for r in runs if r.get(k) is not None]
            out[k] = max(vals) if vals else None
        for k in ("ratio", "roofline_fraction", "roofline_best"):
            vals = [r[k] for r in runs if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
            if k == "ratio":
                out["ratio_range"] = [min(vals), max(vals)] if vals else None
        out["rounds"] = [{k: r.get(k) for k in ("warm_s", "ratio", "roofline_fraction",
                                                  "peak_rss_bytes")} for r in runs]
        merged.append(out)
    return merged


def parent(args):
    names = choose_systems(args)
    if not names:
        sys.exit("no system to run")
    ensure_model(args, any(SYSTEMS[n].runner == "sdcpp" for n in names))
    rounds, probes = [], []
    for k in range(args.rounds):
        print(f"measuring the machine and counting the work's FLOPs"
              f"{f' (round {k + 1} of {args.rounds})' if args.rounds > 1 else ''} ...",
              flush=True)
        probe = _child(args, "probe", ["--sizes", *map(str, args.sizes)])
        if "error" in probe:
            sys.exit(f"the probe failed: {probe['error']}")
        print_machine(probe)
        rows = []
        for size in args.sizes:  # every other round in reverse: no system always goes first
            for name in (names if k % 2 == 0 else names[::-1]):
                print(f"  {name} at {size} px ...", flush=True)
                r = _child(args, "run", ["--system", name, "--sizes", str(size)])
                if "error" not in r:  # the machine's peaks now, for this row's roofline
                    r["peaks"] = _child(args, "peaks", ["--system", name]).get("peaks")
                rows.append({"system": name, "size": size, **r})
        add_derived(rows, probe)
        rounds.append(sorted(rows, key=lambda r: (r["size"], names.index(r["system"]))))
        probes.append(probe)
    rows = merge_rounds(rounds) if args.rounds > 1 else rounds[0]
    if args.rounds > 1:
        print(f"\n{args.rounds} rounds: warm s is the median of all their warm calls; the "
              "ratio and roofline, the median of the rounds' own (the ratio's range in "
              "brackets)")
    for size in args.sizes:
        print_size(size, [r for r in rows if r["size"] == size], probes[-1], args)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        out = {"settings": {**settings, "prompt": PROMPT, "seed": SEED, "guidance": GUIDANCE},
               "systems": {n: asdict(SYSTEMS[n]) for n in names}, "machine": probes[-1],
               "machines": probes, "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", action="append", choices=list(SYSTEMS), default=None,
                    help="a system to run (repeatable; default: all that can run here)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="image sides in pixels (default 256 512; --tiny: 64 128)")
    ap.add_argument("--steps", type=int, default=None, help="(default 4; --tiny: 2)")
    ap.add_argument("--repeats", type=int, default=2, help="warm calls, their median")
    ap.add_argument("--rounds", type=int, default=1, help="run every system this many times, "
                    "interleaved (every other round in reverse order); ratios per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="the model, the single file and "
                    "the images (default ~/.cache/nanodiffusion-bench/sd15-random, or "
                    "tiny-random with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a tiny SD: a smoke test")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    ap.add_argument("--child", choices=["write", "single-file", "probe", "run", "peaks"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.sizes = args.sizes or ([64, 128] if args.tiny else [256, 512])
    args.steps = args.steps or (2 if args.tiny else 4)
    args.cache = (args.cache or Path.home() / ".cache" / "nanodiffusion-bench" /
                  ("tiny-random" if args.tiny else "sd15-random")).expanduser().resolve()
    args.model = args.cache / "model"
    args.single_file = args.cache / "single-file.safetensors"
    return args


def main():
    args = parse_args()
    if args.child is None:
        return parent(args)
    if args.child == "write":
        args.cache.mkdir(parents=True, exist_ok=True)
        return write_model(args.model, args.tiny)
    if args.child == "single-file":
        return write_single_file(args.model, args.single_file)
    result = {"probe": child_probe, "run": child_run, "peaks": child_peaks}[args.child](args)
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
