"""The fused attention kernel (models/fused_attention.cpp): built here where the CPU has
AVX-512 (bfloat16 too with AVX512-BF16) and a compiler is found, each build the same values as
torch's kernel within its own rounding, and the path layers.attention takes at inference."""
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanodiffusion.models import fused_attention, layers
from nanodiffusion.models.layers import Attention


def _heads(B, n, nh, hs, scale=1.0, dtype=torch.bfloat16):
    """(B, nh, n, hs) views of (B, n, nh * hs) tokens, as Attention makes them."""
    return (torch.randn(B, n, nh * hs) * scale).to(dtype).view(B, n, nh, hs).transpose(1, 2)


def test_built_wherever_the_cpu_and_a_compiler_allow():
    expected = bool(fused_attention.cpu_levels()) and shutil.which("g++") is not None
    assert fused_attention.available() == expected
    if expected:
        assert fused_attention.level() == fused_attention.cpu_levels()[0]
        assert all(fused_attention.library(n) is not None for n in fused_attention.cpu_levels())


def test_turned_off_by_its_environment_variable():
    code = ("from nanodiffusion.models import fused_attention as f; import torch; "
            "q = torch.randn(1, 1, 4, 8).bfloat16(); "
            "print(f.available(), f.supports(q, q, q))")
    env = {"NANODIFFUSION_FUSED_ATTENTION": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_its_first_call_imports_no_compiler_stack():
    """The op is registered with torch's dispatcher directly: calling it does not import
    torch._dynamo / torch._inductor (torch.library.custom_op did at the first call: 822
    modules, 1.0 s, where nothing had imported them yet)."""
    code = ("import sys, torch; from nanodiffusion.models import fused_attention as f; "
            "d = 'cpu' if f.available(torch.float32) else 'meta'; "
            "q = torch.randn(1, 2, 8, 16, device=d); f.attention(q, q, q); "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_the_variable_names_a_build(monkeypatch):
    """NANODIFFUSION_FUSED_ATTENTION=avx512: the float32-only build, as on a CPU with AVX-512
    but not AVX512-BF16 (Skylake to Ice Lake): bfloat16 attention keeps the other paths."""
    if "avx512" not in fused_attention.cpu_levels() or shutil.which("g++") is None:
        return
    monkeypatch.setenv("NANODIFFUSION_FUSED_ATTENTION", "avx512")
    assert fused_attention.level() == "avx512"
    assert fused_attention.available(torch.float32)
    assert not fused_attention.available(torch.bfloat16)
    for dtype, fused in ((torch.float32, True), (torch.bfloat16, False)):
        q = _heads(1, 256, 2, 40, 1, dtype)
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = layers.attention(q, q, q)
        keys = {e.key for e in prof.key_averages()}
        assert ("nanodiffusion::fused_attention" in keys) == fused, (dtype, keys)
        ref = F.scaled_dot_product_attention(q.double(), q.double(), q.double())
        assert (out.double() - ref).abs().max() < (1e-5 if fused else 2e-2)
    monkeypatch.setenv("NANODIFFUSION_FUSED_ATTENTION", "no-such-build")
    assert fused_attention.level() == fused_attention.cpu_levels()[0]


def test_fused_attention_is_torch_attention_within_its_rounding():
    """Odd sizes (queries and keys not multiples of the kernel's blocks, heads of 5, 40, 64 and
    160 dims, cross-attention), strided views: the error against float64 is torch's kernel's or
    near it, and the output is laid out (B, T, nh, hs)."""
    if not fused_attention.available():
        assert not (fused_attention.cpu_levels() and shutil.which("g++"))
        return
    for name in fused_attention.cpu_levels():
        torch.manual_seed(0)
        _within_torch_rounding(fused_attention.library(name), fused_attention.LEVELS[name][1])
    # float16, heads wider than MAX_WIDTH, keys of another batch size: not the kernel's
    q = _heads(1, 4, 1, 8)
    assert not fused_attention.supports(q.half(), q.half(), q.half())
    wide = _heads(1, 4, 1, fused_attention.MAX_WIDTH + 1)
    assert not fused_attention.supports(wide, wide, wide)
    k = _heads(2, 4, 1, 8)
    assert not fused_attention.supports(q, k, k)


def test_masked_and_far_keys_weigh_nothing():
    """A key a causal query must not see, or one whose score is more than 126 powers of two
    below the row's best, weighs exactly 0, as in torch's kernel: even a value near float's
    max at such a key leaves the output alone. (The kernel's exp gave them 2^-126, so each such
    key added about 4 to the output here; and in float32 its products with that weight were
    subnormal numbers, which Intel's cores run by microcode: 5x slower causal heads.)"""
    if not fused_attention.available():
        return
    for name in fused_attention.cpu_levels():
        for dtype in fused_attention.LEVELS[name][1]:
            T, hs = 9, 16
            q = torch.zeros(1, 1, T, hs, dtype=dtype)
            k = torch.zeros(1, 1, T, hs, dtype=dtype)
            v = torch.ones(1, 1, T, hs, dtype=dtype)
            v[0, 0, 1:] = 3e38  # every key but the first: masked for query 0
            out = fused_attention.run(fused_attention.library(name), q, k, v, True)
            assert out[0, 0, 0].tolist() == [1.0] * hs, (name, dtype, out[0, 0, 0])
            # unmasked: key 0 scores 0, the others -1000 (exp underflows far below 2^-126)
            q[0, 0, :, 0], k[0, 0, 1:, 0] = 1.0, -1000.0
            out = fused_attention.run(fused_attention.library(name), q, k, v)
            assert out[0, 0, :, 0].tolist() == [1.0] * T, (name, dtype, out[0, 0, :, 0])


def test_scores_rising_from_chunk_to_chunk():
    """Keys whose scores climb along the sequence, so that each row's best score rises from one
    chunk of keys to the next: slowly (a chunk exponentiated against an older, lower max, its
    probabilities above 1) and steeply (past the kernel's slack: the chunk done again from its
    own max). Both within torch's rounding, none infinite or NaN; with the steep climb alone
    every probability but the last keys' is far below 2^-126."""
    if not fused_attention.available():
        return
    torch.manual_seed(0)
    T, S, hs = 70, 1000, 40
    for name in fused_attention.cpu_levels():
        lib = fused_attention.library(name)
        for dtype in fused_attention.LEVELS[name][1]:
            for slope in (0.02, 0.1, 2.0):  # score units per key (the slack is 35 at hs 40)
                q = torch.zeros(1, 1, T, hs)
                q[..., 0] = 1.0
                q[..., 1:] = torch.randn(1, 1, T, hs - 1) * 0.3
                k = torch.randn(1, 1, S, hs) * 0.3
                k[..., 0] = torch.arange(S) * slope * hs ** 0.5
                v = torch.randn(1, 1, S, hs)
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
                ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                kernel = F.scaled_dot_product_attention(q, k, v)
                out = fused_attention.run(lib, q, k, v).double()
                assert torch.isfinite(out).all(), (name, dtype, slope)
                err, kernel_err = (out - ref).abs(), (kernel.double() - ref).abs()
                floor = 2e-2 if dtype == torch.bfloat16 else 2e-6
                assert err.max() <= max(floor, 1.5 * kernel_err.max()), (name, dtype, slope)


def _within_torch_rounding(lib, dtypes):
    shapes = ((2, 300, 300, 3, 40), (1, 77, 1001, 2, 64), (2, 9, 77, 2, 160), (1, 33, 5, 1, 5),
              (1, 1, 1, 1, 8), (1, 64, 4096, 2, 40))
    # float32 as bfloat16: torch's error or near it, over 4096 keys too (the output product
    # sums in chunks of keys; one running sum over all of them was 1.3x torch's on mean); a
    # few tokens' float32 errors are below an ulp of the output (1e-7), where a ratio is luck
    bounds = {torch.bfloat16: (2e-2, 1.5, 0.0, 1.2), torch.float32: (2e-6, 1.5, 1e-7, 1.2)}
    for dtype in dtypes:
        max_floor, max_factor, mean_floor, mean_factor = bounds[dtype]
        for B, T, S, nh, hs in shapes:
            q, k, v = (_heads(B, T, nh, hs, 2, dtype), _heads(B, S, nh, hs, 2, dtype),
                       _heads(B, S, nh, hs, 1, dtype))
            assert fused_attention.supports(q, k, v) == fused_attention.available(dtype)
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
            out = fused_attention.run(lib, q, k, v)
            kernel = F.scaled_dot_product_attention(q, k, v)
            assert out.dtype == dtype and out.shape == (B, nh, T, hs)
            assert out.transpose(1, 2).is_contiguous()
            err, kernel_err = (out.double() - ref).abs(), (kernel.double() - ref).abs()
            where = (dtype, B, T, S, nh, hs)
            assert err.max() <= max(max_floor, max_factor * kernel_err.max()), where
            assert err.mean() <= max(mean_floor, mean_factor * kernel_err.mean()), where
        # causal (CLIP's text encoder): query t sees keys 0..t, as torch's is_causal
        for T in (77, 5, 300):
            q, k, v = (_heads(2, T, 3, 64, 2, dtype), _heads(2, T, 3, 64, 2, dtype),
                       _heads(2, T, 3, 64, 1, dtype))
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                 is_causal=True)
            kernel = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            err = (fused_attention.run(lib, q, k, v, True).double() - ref).abs()
            kernel_err = (kernel.double() - ref).abs()
            assert err.max() <= max(max_floor, max_factor * kernel_err.max()), (dtype, T)
            assert err.mean() <= max(mean_floor, mean_factor * kernel_err.mean()), (dtype, T)


def test_bfloat16_heads_on_a_cpu_with_amx(monkeypatch):
    """On a CPU with AMX torch's kernel runs bfloat16 on its tiles, 3x the vector build: there
    bfloat16 heads, long ones too, take the AMX build where it runs, else torch's kernel
    (neither the vector build nor blocked_attention's products), while float32 keeps the fused
    kernel; NANODIFFUSION_FUSED_ATTENTION naming the vector build brings bfloat16 back to it."""
    monkeypatch.delenv("NANODIFFUSION_FUSED_ATTENTION", raising=False)
    levels = fused_attention.cpu_levels() if shutil.which("g++") else ()
    monkeypatch.setattr(fused_attention, "amx", lambda: True)
    assert not layers.blocked_here()
    for lvl in {"amx", "avx512bf16"} & set(levels):
        monkeypatch.setattr(fused_attention, "level", lambda: lvl)
        assert fused_attention.available(torch.bfloat16) == (lvl == "amx")
        assert fused_attention.available(torch.float32)
        for n, dtype in ((layers.BLOCKED_MIN_KEYS, torch.bfloat16), (77, torch.bfloat16),
                         (layers.BLOCKED_MIN_KEYS, torch.float32)):
            q = _heads(1, n, 2, 40, 1, dtype)
            with torch.no_grad(), torch.profiler.profile() as prof:
                layers.attention(q, q, q)
            keys = {e.key for e in prof.key_averages()}
            fused = "nanodiffusion::fused_attention" in keys
            assert fused == (dtype == torch.float32 or lvl == "amx"), (lvl, n, dtype)
            assert fused or "aten::_scaled_dot_product_flash_attention_for_cpu" in keys, keys
    if "avx512bf16" in levels:
        monkeypatch.setenv("NANODIFFUSION_FUSED_ATTENTION", "avx512bf16")
        monkeypatch.setattr(fused_attention, "level", lambda: "avx512bf16")
        assert fused_attention.available(torch.bfloat16)


def test_layers_attention_runs_inference_on_the_fused_kernel():
    """An SD-sized self-attention module in bfloat16 under no_grad takes the fused kernel (no
    softmax or attention op of torch's runs) where it is available, and gives torch's values
    within bfloat16 rounding; with gradients it is torch's kernel. float32 takes it too; a mask
    keeps torch's kernel."""
    torch.manual_seed(0)
    attn = Attention(320, num_heads=8).eval().bfloat16()
    x = torch.randn(1, 1024, 320).bfloat16()
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = attn(x)
    ops = {e.key for e in prof.key_averages()}
    torch_ops = {o for o in ops if "softmax" in o or "scaled_dot_product" in o}
    assert bool(torch_ops) != fused_attention.available(torch.bfloat16), ops
    with torch.no_grad():
        q = attn.to_q(x).view(1, 1024, 8, 40).transpose(1, 2)
        k = attn.to_k(x).view(1, 1024, 8, 40).transpose(1, 2)
        v = attn.to_v(x).view(1, 1024, 8, 40).transpose(1, 2)
        ref = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                             .reshape(1, 1024, 320))
    assert (out.float() - ref.float()).abs().max() < 0.02
    xg = x.clone().requires_grad_()
    with torch.profiler.profile() as prof:
        attn(xg).float().sum().backward()
    assert any("scaled_dot_product" in e.key for e in prof.key_averages())
    assert xg.grad is not None
    # float32 too, long and short (ToMe's merged sequences, a tiny model's 64 tokens)
    for n in (layers.BLOCKED_MIN_KEYS, 512, 64):
        q = _heads(1, n, 2, 40, 1, torch.float32)
        with torch.no_grad(), torch.profiler.profile() as prof:
            layers.attention(q, q, q)
        fused = "nanodiffusion::fused_attention" in {e.key for e in prof.key_averages()}
        assert fused == fused_attention.available(torch.float32), n
    # causal bfloat16 (CLIP's text encoder) takes it too
    q = _heads(2, 77, 12, 64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = layers.attention(q, q, q, causal=True)
    fused = "nanodiffusion::fused_attention" in {e.key for e in prof.key_averages()}
    assert fused == fused_attention.available(torch.bfloat16)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert (out.float() - ref.float()).abs().max() < 0.02
    q = _heads(1, 16, 2, 8)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = layers.attention(q, q, q, mask)
    assert any("scaled_dot_product" in e.key for e in prof.key_averages())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask))


def test_a_failed_build_falls_back_to_the_next_level(monkeypatch):
    """Where the best build fails (an older g++ without AMX's flags), the next level the CPU
    has runs, with one warning, and the failed build is not tried again."""
    levels = fused_attention.cpu_levels() if shutil.which("g++") else ()
    if len(levels) < 2:
        return
    monkeypatch.delenv("NANODIFFUSION_FUSED_ATTENTION", raising=False)
    monkeypatch.setattr(fused_attention, "_libs", {})
    real, tried = fused_attention.build, []

    def build(lvl, source=fused_attention.SOURCE, extra=()):
        tried.append(lvl)
        if lvl == levels[0]:
            raise RuntimeError("g++: error: unrecognized command-line option")
        return real(lvl, source, extra)

    monkeypatch.setattr(fused_attention, "build", build)
    with pytest.warns(UserWarning, match="unrecognized"):
        assert fused_attention.level() == levels[1]
    assert fused_attention.level() == levels[1] and tried == list(levels[:2])
    q = _heads(1, 64, 2, 40, 1, torch.float32)
    out = fused_attention.attention(q, q, q)
    ref = F.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert (out.double() - ref).abs().max() < 1e-5


def test_a_header_beside_the_source_is_part_of_its_build(tmp_path, monkeypatch):
    """The kernels include headers from their folder (amx_tiles.h): a change to one builds the
    source again (the cache key hashes the headers with the source), where the cached library
    would have kept the old code."""
    if shutil.which("g++") is None:
        return
    import ctypes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "value.h").write_text("#define VALUE 1\n")
    source = tmp_path / "k.cpp"
    source.write_text('#include "value.h"\nextern "C" int nd_value() { return VALUE; }\n')
    first = fused_attention.build("avx512", source)
    assert fused_attention.build("avx512", source) == first  # cached
    (tmp_path / "value.h").write_text("#define VALUE 2\n")
    second = fused_attention.build("avx512", source)
    assert second != first and ctypes.CDLL(str(second)).nd_value() == 2
