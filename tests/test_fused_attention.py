"""The fused bfloat16 attention kernel (models/fused_attention.cpp): built here where the CPU
has AVX512-BF16 and a compiler is found, the same values as torch's kernel within its own
rounding, and the path layers.attention takes for bfloat16 at inference."""
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

from nanodiffusion.models import fused_attention, layers
from nanodiffusion.models.layers import Attention


def _heads(B, n, nh, hs, scale=1.0):
    """(B, nh, n, hs) bfloat16 views of (B, n, nh * hs) tokens, as Attention makes them."""
    return (torch.randn(B, n, nh * hs) * scale).bfloat16().view(B, n, nh, hs).transpose(1, 2)


def test_built_wherever_the_cpu_and_a_compiler_allow():
    expected = fused_attention.cpu_has_avx512_bf16() and shutil.which("g++") is not None
    assert fused_attention.available() == expected


def test_turned_off_by_its_environment_variable():
    code = ("from nanodiffusion.models import fused_attention as f; import torch; "
            "q = torch.randn(1, 1, 4, 8).bfloat16(); "
            "print(f.available(), f.supports(q, q, q))")
    env = {"NANODIFFUSION_FUSED_ATTENTION": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_fused_attention_is_torch_attention_within_its_rounding():
    """Odd sizes (queries and keys not multiples of the kernel's blocks, heads of 5, 40, 64 and
    160 dims, cross-attention), strided views: the error against float64 is torch's kernel's or
    near it, and the output is laid out (B, T, nh, hs)."""
    if not fused_attention.available():
        assert not (fused_attention.cpu_has_avx512_bf16() and shutil.which("g++"))
        return
    torch.manual_seed(0)
    for B, T, S, nh, hs in ((2, 300, 300, 3, 40), (1, 77, 1001, 2, 64), (2, 9, 77, 2, 160),
                            (1, 33, 5, 1, 5), (1, 1, 1, 1, 8)):
        q, k, v = _heads(B, T, nh, hs, 2), _heads(B, S, nh, hs, 2), _heads(B, S, nh, hs)
        assert fused_attention.supports(q, k, v)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        out = fused_attention.attention(q, k, v)
        kernel = F.scaled_dot_product_attention(q, k, v)
        assert out.dtype == torch.bfloat16 and out.shape == (B, nh, T, hs)
        assert out.transpose(1, 2).is_contiguous()
        err, kernel_err = (out.double() - ref).abs(), (kernel.double() - ref).abs()
        assert err.max() <= max(2e-2, 1.5 * kernel_err.max()), (B, T, S, nh, hs)
        assert err.mean() <= 1.2 * kernel_err.mean(), (B, T, S, nh, hs)
    # float32, a mask, gradients: not the fused kernel's
    q = _heads(1, 4, 1, 8)
    assert not fused_attention.supports(q.float(), q.float(), q.float())


def test_layers_attention_runs_bfloat16_inference_on_the_fused_kernel():
    """An SD-sized self-attention module in bfloat16 under no_grad takes the fused kernel (no
    softmax or attention op of torch's runs) where it is available, and gives torch's values
    within bfloat16 rounding; with gradients it is torch's kernel."""
    torch.manual_seed(0)
    attn = Attention(320, num_heads=8).eval().bfloat16()
    x = torch.randn(1, 1024, 320).bfloat16()
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = attn(x)
    ops = {e.key for e in prof.key_averages()}
    torch_ops = {o for o in ops if "softmax" in o or "scaled_dot_product" in o}
    assert bool(torch_ops) != fused_attention.available(), ops
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
