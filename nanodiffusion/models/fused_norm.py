"""GroupNorm, with or without the SiLU after it, over channels-last CPU activations at inference:
fused_norm.cpp, built with g++ for AVX-512 and loaded with ctypes at its first use
(fused_attention.load: the same cache and loader). Two passes over the input where torch's
GroupNorm and SiLU made five, and float32 sums throughout: SD 1.5's VAE decoder at 512 px
(1 x 128 x 512 x 512, bfloat16, 2-core Intel Xeon with AMX) 35.6 -> 30.8 ms with a new output,
11.9 ms into an existing one (the rest is the new output's page faults); against float64 a
third less error than torch's (bfloat16 mean 7.1e-4 against 1.0e-3; float32 max 1.4e-6
against 1.5e-4).

`group_norm(norm, x, silu, out)` is the one call; `supports(norm, x)` says which it takes: an
nn.GroupNorm without gradients, on a float32 or bfloat16 CPU tensor (N, C, H, W) laid out
channels-last, C a multiple of 16, where the CPU has AVX-512 (F, BW, DQ; the build takes
AVX512-BF16 too where the CPU has it), a compiler is found and
NANODIFFUSION_FUSED_NORM is not 0. Elsewhere layers.norm_silu keeps torch's.
"""
import ctypes
import os
from pathlib import Path

import torch
import torch.nn as nn

from . import fused_attention

SOURCE = Path(__file__).with_name("fused_norm.cpp")
# fused_attention.LEVELS' flags it is built with: AVX512-BF16's where the CPU has it (one
# instruction rounds to bfloat16), else AVX-512's
LEVELS = ("avx512bf16", "avx512")
ENV = "NANODIFFUSION_FUSED_NORM"
FUNCTIONS = {torch.bfloat16: "nd_group_norm_bf16", torch.float32: "nd_group_norm_f32"}
_i64, _p = ctypes.c_int64, ctypes.c_void_p
ARGTYPES = [_p, _p, _i64, _i64, _i64, _i64, _p, _p, ctypes.c_float, ctypes.c_int,
            ctypes.c_int]  # FUNCTIONS' (fused_norm.cpp's nd_group_norm_*)


def library():
    """The loaded library, or None where it does not run here (see the module's text)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    for lvl in (lvl for lvl in LEVELS if lvl in fused_attention.cpu_levels()):
        lib = fused_attention.load(lvl, SOURCE, FUNCTIONS.values(), ARGTYPES,
                                   f"fused GroupNorm's {lvl} build failed (the next, or torch's, runs)")
        if lib is not None:  # else the next level's (an older g++ without AVX512-BF16)
            return lib
    return None


def supports(norm, x):
    """Whether `group_norm` takes this call of `norm` on `x` (see the module's text)."""
    return (type(norm) is nn.GroupNorm and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in FUNCTIONS and x.shape[1] % 16 == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight is not None
                                                   and norm.weight.requires_grad))
            and library() is not None)


def group_norm(norm, x, silu=False, out=None):
    """norm(x), then SiLU where `silu`, as `supports` takes them, into `out` or a new
    channels-last tensor. `out` may be x itself (the caller's input is then overwritten) or
    another tensor of x's shape and dtype, channels-last, not overlapping it (a dead activation
    reused: its pages are resident already, where a new tensor's are faulted in). It runs as an
    op of torch's (torch.ops.nanodiffusion.group_norm, as fused_attention's), so that
    profilers see it."""
    w = None if norm.weight is None else norm.weight.detach().float().contiguous()
    b = None if norm.bias is None else norm.bias.detach().float().contiguous()
    if out is None:
        return torch.ops.nanodiffusion.group_norm(x, w, b, norm.num_groups, norm.eps, silu)
    if out.data_ptr() == x.data_ptr():
        return torch.ops.nanodiffusion.group_norm_(x, w, b, norm.num_groups, norm.eps, silu)
    if (out.shape != x.shape or out.dtype != x.dtype
            or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"group_norm: out must be x or a channels-last {x.dtype} tensor of "
                         f"shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    lo, hi = sorted((x, out), key=lambda t: t.data_ptr())
    if lo.data_ptr() + lo.numel() * lo.element_size() > hi.data_ptr():
        raise ValueError("group_norm: out overlaps x without being x")
    return torch.ops.nanodiffusion.group_norm_out(x, out, w, b, norm.num_groups, norm.eps, silu)


def _run(x, w, b, groups, eps, silu, out):
    N, C, H, W = x.shape
    getattr(library(), FUNCTIONS[x.dtype])(
        x.data_ptr(), out.data_ptr(), N, H * W, C, groups,
        None if w is None else w.data_ptr(), None if b is None else b.data_ptr(), eps,
        int(silu), torch.get_num_threads())
    return out


def _new(x):
    return torch.empty_like(x, memory_format=torch.channels_last)


# The ops, registered with torch's dispatcher directly (fused_attention's library, defined there
# first): a new output, in place, and into a given tensor.
_OPS = torch.library.Library("nanodiffusion", "FRAGMENT")
_OPS.define("group_norm(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, "
            "bool silu) -> Tensor")
_OPS.define("group_norm_(Tensor(a!) x, Tensor? weight, Tensor? bias, int groups, float eps, "
            "bool silu) -> Tensor(a!)")
_OPS.impl("group_norm", lambda x, w, b, g, eps, silu: _run(x, w, b, g, eps, silu, _new(x)),
          "CPU")
_OPS.impl("group_norm_", lambda x, w, b, g, eps, silu: _run(x, w, b, g, eps, silu, x), "CPU")
_OPS.define("group_norm_out(Tensor x, Tensor(a!) out, Tensor? weight, Tensor? bias, int groups, "
            "float eps, bool silu) -> Tensor(a!)")
_OPS.impl("group_norm_out", lambda x, o, w, b, g, eps, silu: _run(x, w, b, g, eps, silu, o), "CPU")
_OPS.impl("group_norm", lambda x, w, b, g, eps, silu: _new(x), "Meta")
_OPS.impl("group_norm_", lambda x, w, b, g, eps, silu: x, "Meta")
_OPS.impl("group_norm_out", lambda x, o, w, b, g, eps, silu: o, "Meta")
