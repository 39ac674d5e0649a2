"""The benchmarks' FLOP counter (benchmarks/bench_cpu.py: flop_counter), which their roofline
fractions divide by: it counts the products torch's own table misses on the CPU."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_cpu import flop_counter  # noqa: E402

from nanodiffusion.models import layers, winograd  # noqa: E402


def count(fn):
    with torch.no_grad(), flop_counter() as fc:
        fn()
    return fc.get_total_flops()


def test_counts_torch_cpu_attention_kernel():
    q, k, v = torch.randn(2, 3, 64, 8), torch.randn(2, 3, 80, 8), torch.randn(2, 3, 80, 8)
    assert count(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * 2 * 3 * 64 * 80 * 8


def test_counts_onednn_products_and_blocked_attention(monkeypatch):
    x, w = torch.randn(5, 7, 16), torch.randn(24, 16)
    op = winograd.onednn_product()
    assert count(lambda: op(x, w, None, "none", [], "")) == 2 * 5 * 7 * 24 * 16
    # our blocked attention (two oneDNN products per block) counts as torch's kernel does
    S = layers.BLOCKED_MIN_KEYS
    q, k, v = torch.randn(1, 2, 300, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
    with monkeypatch.context() as m:
        m.setattr(layers.fused_attention, "supports", lambda *a: False)
        m.setattr(layers, "blocked_here", lambda: True)
        assert count(lambda: layers.attention(q, k, v)) == 4 * 1 * 2 * 300 * S * 8


def test_counts_the_fused_attention_kernel():
    """The fused kernel is an op of torch's, counted as torch's attention kernel is."""
    from nanodiffusion.models import fused_attention
    q, k, v = (torch.randn(1, 2, n, 8, device="meta") for n in (30, 50, 50))  # shapes only
    assert count(lambda: fused_attention.attention(q, k, v)) == 4 * 1 * 2 * 30 * 50 * 8
