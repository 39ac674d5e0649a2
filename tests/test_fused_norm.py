"""The fused GroupNorm (+ SiLU) kernel (models/fused_norm.cpp): built where the CPU has AVX-512
and a compiler is found, within float32 sums of float64 (less error than torch's), and the path
layers.norm_silu takes at inference, in place where the caller allows it."""
import shutil
import subprocess
import sys

import pytest

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.models import fused_attention, fused_norm, layers, vae
from nanodiffusion.models.packing import cpu_input

CL = torch.channels_last


def test_built_wherever_the_cpu_and_a_compiler_allow():
    expected = "avx512" in fused_attention.cpu_levels() and shutil.which("g++") is not None
    assert (fused_norm.library() is not None) == expected


def test_turned_off_by_its_environment_variable():
    code = ("from nanodiffusion.models import fused_norm as f; import torch; "
            "x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last); "
            "print(f.library() is None, f.supports(torch.nn.GroupNorm(4, 16), x))")
    env = {"NANODIFFUSION_FUSED_NORM": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]


def _reference(norm, x, silu):
    w = None if norm.weight is None else norm.weight.double()
    b = None if norm.bias is None else norm.bias.double()
    y = F.group_norm(x.double(), norm.num_groups, w, b, norm.eps)
    return F.silu(y) if silu else y


def test_values_within_float32_sums_of_float64():
    """Sizes off the kernel's blocks (HW not a multiple of its 256 rows, 3 groups of 16, two
    samples), with and without SiLU, affine or not, into a new tensor or in place: the error
    against float64 at most torch's own (bfloat16: its output's rounding; float32: ~1e-6)."""
    if fused_norm.library() is None:
        assert not ("avx512" in fused_attention.cpu_levels() and shutil.which("g++"))
        return
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for N, C, H, G, affine in ((2, 48, 23, 3, True), (1, 128, 40, 32, True),
                                   (2, 320, 8, 32, False), (1, 16, 2, 16, True)):
            norm = nn.GroupNorm(G, C, eps=1e-6, affine=affine)
            if affine:
                norm.weight.data.normal_(), norm.bias.data.normal_()
            norm = norm.to(dtype)
            x = (torch.randn(N, C, H, H) * 3 + 1).to(dtype).contiguous(memory_format=CL)
            for silu in (False, True):
                with torch.no_grad():
                    assert fused_norm.supports(norm, x)
                    out = fused_norm.group_norm(norm, x, silu)
                    ref = _reference(norm, x, silu)
                    theirs = norm(x)
                    theirs = F.silu(theirs) if silu else theirs
                    inplace = x.clone(memory_format=CL)
                    got = fused_norm.group_norm(norm, inplace, silu, out=inplace)
                assert got.data_ptr() == inplace.data_ptr() and torch.equal(got, out)
                assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
                err, their_err = (out.double() - ref).abs(), (theirs.double() - ref).abs()
                where = (dtype, N, C, H, G, affine, silu)
                assert err.max() <= max(1.1 * their_err.max(), 4e-6), where
                assert err.mean() <= max(1.1 * their_err.mean(), 1e-7), where


def test_norm_silu_takes_it_at_inference_only():
    """layers.norm_silu runs the kernel on a channels-last activation without gradients, and
    torch's GroupNorm and SiLU with gradients, on NCHW, or with channels not a multiple of 16,
    with the same values within rounding; `inplace` writes into the input."""
    if fused_norm.library() is None:
        return
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 64)
    x = torch.randn(2, 64, 12, 12).contiguous(memory_format=CL)
    calls = []
    real = fused_norm.group_norm

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    fused_norm.group_norm = spy
    try:
        with torch.no_grad():
            fused = layers.norm_silu(norm, x)
            assert len(calls) == 1
            plain = layers.norm_silu(norm, x.contiguous())  # NCHW: torch's
            odd = nn.GroupNorm(4, 40)
            layers.norm_silu(odd, torch.randn(1, 40, 4, 4).contiguous(memory_format=CL))
            assert len(calls) == 1
            y = x.clone(memory_format=CL)
            assert layers.norm_silu(norm, y, inplace=True).data_ptr() == y.data_ptr()
            assert len(calls) == 2
        xg = x.clone().requires_grad_()
        layers.norm_silu(norm, xg).sum().backward()
        assert len(calls) == 2 and xg.grad is not None
    finally:
        fused_norm.group_norm = real
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def _small_vae(layers_per_block):
    """A small VAE laid out for inference (32 and 64 channels, 16 groups), and latents for it."""
    torch.manual_seed(0)
    cfg = vae.VAEConfig(block_channels=(32, 64), layers_per_block=layers_per_block,
                        norm_groups=16, latent_channels=4)
    return vae.for_inference(vae.VAE(cfg).eval()), torch.randn(1, 4, 12, 12)


def test_vae_decode_equals_torchs_norms_within_rounding(monkeypatch):
    """A small VAE decoder (its ResBlocks normalise conv1's output in place, and its last
    norm the last layer's) gives torch's GroupNorm's image within rounding, in float32 and
    bfloat16."""
    if fused_norm.library() is None:
        return
    model, z = _small_vae(layers_per_block=1)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        m = model.to(dtype)
        zz = cpu_input(z.to(dtype))
        with torch.no_grad():
            fused = m.decode(zz).float()
            monkeypatch.setattr(fused_norm, "library", lambda: None)
            plain = m.decode(zz).float()
            monkeypatch.undo()
        assert (fused - plain).abs().max() <= tol, dtype


def test_profilers_see_it_as_an_op():
    """The kernel runs as torch ops (nanodiffusion::group_norm, group_norm_ in place and
    group_norm_out into a given tensor), so torch.profiler names it; an `out` other than x
    gets x's values in place of a new tensor's, and one of another shape, dtype or layout, or
    overlapping x, is refused."""
    if fused_norm.library() is None:
        return
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=CL)
    out = torch.full_like(x, float("nan"))
    with torch.no_grad(), torch.profiler.profile() as prof:
        new = fused_norm.group_norm(norm, x, True)
        fused_norm.group_norm(norm, x.clone(memory_format=CL), True, out=None)
        y = x.clone(memory_format=CL)
        fused_norm.group_norm(norm, y, True, out=y)
        into = fused_norm.group_norm(norm, x, True, out=out)
    keys = [e.key for e in prof.key_averages()]
    for op in ("group_norm", "group_norm_", "group_norm_out"):
        assert "nanodiffusion::" + op in keys, keys
    assert into is out and torch.equal(out, new) and torch.equal(y, new)
    wide = torch.empty(1, 16, 4, 8).contiguous(memory_format=CL)
    for bad in (torch.empty(1, 16, 4, 5).contiguous(memory_format=CL),  # shape
                torch.empty_like(x, dtype=torch.bfloat16),  # dtype
                torch.empty_like(x, memory_format=torch.contiguous_format),  # layout
                wide[..., :4]):  # not dense
        with pytest.raises(ValueError, match="group_norm: out"):
            with torch.no_grad():
                fused_norm.group_norm(norm, x, True, out=bad)
    buf = torch.randn(2 * x.numel())
    a, b = (buf[i:i + x.numel()].view(1, 4, 4, 16).permute(0, 3, 1, 2) for i in (0, 16))
    assert a.is_contiguous(memory_format=CL) and b.is_contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="overlaps x"):
        with torch.no_grad():
            fused_norm.group_norm(norm, a, True, out=b)


def test_the_bfloat16_build_rounds_as_the_plain_one():
    """Where the CPU has AVX512-BF16 the kernel is built for it (fused_norm.LEVELS), and its one
    rounding instruction gives the plain AVX-512 build's bits: ties, infinities, NaN and all.
    Its bfloat16 SiLU (a shorter fit, fused_norm.cpp's silu_bf16) is checked against float64
    in test_values_within_float32_sums_of_float64."""
    have = [lvl for lvl in fused_norm.LEVELS if lvl in fused_attention.cpu_levels()]
    if len(have) < 2 or shutil.which("g++") is None:
        return
    libs = [fused_attention.load(lvl, fused_norm.SOURCE, fused_norm.FUNCTIONS.values(),
                                 fused_norm.ARGTYPES, "not built") for lvl in have]
    assert fused_norm.library() is libs[0]
    torch.manual_seed(0)
    x = (torch.randn(1, 64, 32, 32) * 3).bfloat16().contiguous(memory_format=CL)
    flat = x.permute(0, 2, 3, 1).reshape(-1)
    flat[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e38])
    w = torch.ones(64)
    b = torch.linspace(-1, 1, 64)
    outs = []
    for lib in libs:
        out = torch.empty_like(x)
        assert lib.nd_group_norm_bf16(x.data_ptr(), out.data_ptr(), 1, 32 * 32, 64, 64,
                                      w.data_ptr(), b.data_ptr(), 1e-6, 0, 2) == 0
        outs.append(out)
    same = outs[0].view(torch.int16) == outs[1].view(torch.int16)
    assert (same | outs[0].isnan() & outs[1].isnan()).all()
    assert same.float().mean() > 0.9  # the finite channels, bit for bit


def test_a_failed_bfloat16_build_falls_back_to_the_plain_one(monkeypatch):
    """An older g++ without AVX512-BF16 (its build fails) still gets the kernel: the plain
    AVX-512 build, not torch's GroupNorm."""
    if "avx512" not in fused_attention.cpu_levels() or shutil.which("g++") is None:
        return
    real = fused_attention.load
    tried = []
    monkeypatch.setattr(fused_attention, "load", lambda lvl, *a: tried.append(lvl) or (
        None if lvl == "avx512bf16" else real(lvl, *a)))
    assert fused_norm.library() is real("avx512", fused_norm.SOURCE, fused_norm.FUNCTIONS.values(),
                                        fused_norm.ARGTYPES, "not built")
    assert tried[-1] == "avx512" and tried[:-1] == [
        lvl for lvl in fused_norm.LEVELS[:-1] if lvl in fused_attention.cpu_levels()]


def test_the_decoder_normalises_into_the_last_resblocks_dead_activation():
    """At inference the decoder hands each ResBlock the one before's dead activation (its
    conv1 output, ResBlock.run), and the first norm writes into it (group_norm_out) where
    the shapes match, in place of a new tensor: the image bit for bit the one without (every
    ResBlock hooked, so each is called as before), float32 and bfloat16."""
    if fused_norm.library() is None:
        return
    model, z = _small_vae(layers_per_block=2)
    blocks = [m for m in model.decoder.up_blocks.modules() if isinstance(m, vae.ResBlock)]
    # in each up block (3 ResBlocks) the second and third follow one of their own shape
    expected = sum(1 for b in model.decoder.up_blocks for i, r in enumerate(b.resnets)
                   if i > 0 and r.conv_shortcut is None)
    assert expected == 4
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        zz = cpu_input(z.to(dtype))
        with torch.no_grad(), torch.profiler.profile() as prof:
            reused = m.decode(zz)
        ops = [e.key for e in prof.events()]
        assert ops.count("nanodiffusion::group_norm_out") == expected, dtype
        hooks = [b.register_forward_pre_hook(lambda *a: None) for b in blocks]
        try:
            with torch.no_grad(), torch.profiler.profile() as prof:
                apart = m.decode(zz)
        finally:
            for h in hooks:
                h.remove()
        assert "nanodiffusion::group_norm_out" not in [e.key for e in prof.events()]
        assert torch.equal(reused, apart), dtype
