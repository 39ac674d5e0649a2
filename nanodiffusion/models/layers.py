"""Blocks that several models share: attention, feed-forward, timestep embedding.

Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`,
`time_embedding.linear_1`) so that published weights load with `strict=True`.
"""
import contextlib
import math
import threading
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_attention, fused_norm, packing, winograd


def norm_silu(norm, x, inplace=False, out=None):
    """SiLU(norm(x)): on the fused kernel where it takes the call (fused_norm: a GroupNorm at
    inference on a channels-last CPU activation), into x itself where `inplace` (the caller's x
    is fresh and needed no more: its page faults spared), or into `out` where given (a dead
    activation of x's shape and layout, for the same reason); else torch's, the SiLU in place where
    no gradient is recorded: norm's output is fresh, and on a large activation a new tensor
    costs more in page faults than SiLU itself (a 128 x 512 x 512 bfloat16 one: 45 ms out of
    place, 17 ms in place, 2 threads)."""
    if fused_norm.supports(norm, x):
        return fused_norm.group_norm(norm, x, silu=True, out=x if inplace else out)
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def residual(x, h):
    """x + h, added into `h` (a block's fresh output) where no gradient is recorded."""
    return h.add_(x) if not torch.is_grad_enabled() and h.shape == x.shape else x + h


def linear_residual(layer, x, skip):
    """skip + layer(x): at inference on oneDNN or small_gemm's kernel, added in the product's
    epilogue (packing.linear_add); else residual(skip, layer(x))."""
    if not torch.is_grad_enabled():
        out = packing.linear_add(layer, x, skip)
        if out is not None:
            return out
    return residual(skip, layer(x))


def conv_residual(conv, x, skip):
    """skip + conv(x): at inference, where the call runs on oneDNN's convolution, added into
    `skip` itself in the kernel's epilogue (packing.add_into: the caller's `skip` is
    overwritten, so it must be fresh or needed no more); else residual(skip, conv(x))."""
    if not torch.is_grad_enabled():
        out = packing.add_into(conv, x, skip)
        if out is not None:
            return out
    return residual(skip, conv(x))


BLOCKED_MIN_KEYS = 1024  # below this many keys torch's kernel is as fast (256 tokens: 1.2 vs 1.6 ms)
BLOCKED_SCORES = 1 << 21  # float32 scores a block holds (8 MB); 4x that ran 1.2-2x slower


@lru_cache(maxsize=None)
def blocked_here():
    """Whether `blocked_attention` beats torch's kernel on this CPU: where torch runs its
    AVX-512 code (where it was measured to win: AMD Zen 4, below) on a CPU without AMX. On an
    AVX2-only AMD Zen 3 torch's kernel was the faster (2 threads, 2 x 8 heads: 4096 tokens x 40
    481 against 645 ms in float32, 429 against 642 in bfloat16; 1024 x 80 48 against 59-66),
    and so it was on an Intel Xeon with AMX, whose tiles it runs bfloat16 on (torch 2.13, 2
    threads: 2 x 8 heads of 4096 x 40 82 against 245 ms bfloat16, 200 against 259 float32; the
    VAE's one head of 4096 x 512 17 against 108 ms bfloat16, 92 against 118 float32)."""
    return ("AVX512" in torch.backends.cpu.get_cpu_capability()
            and not fused_attention.amx())


def attention(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(hs)) v over (B, nh, T, hs) queries and (B, nh, S, hs) keys/values
    (`causal`: query t sees keys 0..t only, as torch's is_causal),
    -> (B, nh, T, hs) in q's dtype. At inference on the CPU without a mask, where the fused
    kernel (fused_attention) runs and takes these heads: on it; else `blocked_attention` over
    at least BLOCKED_MIN_KEYS keys where it wins (blocked_here); everywhere else
    F.scaled_dot_product_attention."""
    inference = mask is None and q.device.type == "cpu" and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    long = k.shape[2] >= BLOCKED_MIN_KEYS
    if inference and fused_attention.supports(q, k, v):
        return fused_attention.attention(q, k, v, causal)
    op = winograd.onednn_product()
    if not inference or op is None or not long or causal or not blocked_here():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return blocked_attention(q, k, v, op)


def blocked_attention(q, k, v, op):
    """The attention of `attention`, a head and a block of queries at a time, with float32
    scores, softmax and products on oneDNN's matrix product `op` (winograd.onednn_product).

    torch's CPU kernel (flash attention) runs SD 1.5's 40-wide heads at 135-150 GFLOP/s in
    float32 and bfloat16 alike; here a block's scores are whole rows, so the softmax is exact in
    one pass, and the products run at oneDNN's float32 speed. On a 2-core AMD EPYC (Zen 4), 16
    heads of 4096 tokens x 40: 281 -> 173 ms in bfloat16, 278 -> 184 ms in float32, with the
    kernel's error or less against float64 (bfloat16 mean 8.2e-4 against 8.6e-4). The output is
    laid out (B, T, nh, hs), so the caller's transpose back to tokens is free."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    out = q.new_empty(B, T, nh, hs).transpose(1, 2)
    rows = min(T, max(256, BLOCKED_SCORES // S))
    scale = hs ** -0.5
    for b in range(B):
        for h in range(nh):
            qh = q[b, h].float() * scale  # (T, hs), a fresh contiguous copy
            kh = k[b, h].float().contiguous()  # (S, hs): the product's "weight"
            vt = v[b, h].float().t().contiguous()  # (hs, S)
            for i in range(0, T, rows):
                s = op(qh[i:i + rows], kh, None, "none", [], "")  # (rows, S) scores
                torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place: no new 8 MB
                out[b, h, i:i + rows] = op(s, vt, None, "none", [], "")
    return out


_KEPT = threading.local()  # .projections: kept_context_projections' dict, or None outside it


@contextlib.contextmanager
def kept_context_projections():
    """Within it (a sampling loop: pipelines' unet_loop), each cross-attention layer projects a
    context tensor to its keys and values once and keeps them for the loop's later calls on
    the same tensor (the prompt's token states, the same at every step): the same values, so
    the same bits, without 2 x 16 products of 2 x 77 tokens per UNet call (SD 1.5: 5.9 GFLOP
    and 38 MB of weights a call). A layer with hooks on to_k or to_v (LoRA training's) and
    calls with gradients project every time. Nested, the outer one keeps; at its end the
    projections go."""
    if getattr(_KEPT, "projections", None) is not None:
        yield
        return
    _KEPT.projections = {}
    try:
        yield
    finally:
        _KEPT.projections = None


class Attention(nn.Module):
    """Multi-head attention over (B, T, C) tokens; cross-attention when `context` is given.

    `upcast` computes the attention of float16 inputs in float32 (SD 2.1 needs it to avoid
    overflow in half precision; so do the VAE's LDM weights). bfloat16 has float32's range and
    runs as it is: every kernel here sums its scores and softmax in float32 already, and the
    VAE's one 512-wide head of 4096 tokens took 110 ms in float32, 17 ms so (SD 1.5 at 512 px,
    2-core Intel Xeon with AMX), as diffusers runs it (its SDPA processor in the input dtype).
    """

    def __init__(self, dim, num_heads, context_dim=None, qkv_bias=False, upcast=False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, mask=None, residual=None):
        k, v = self.keys_values(x if context is None else context, context is not None)
        return self.attend(self.to_q(x), k, v, mask, residual)

    def keys_values(self, context, cross=True):
        """to_k(context), to_v(context): for cross-attention (`cross`) inside
        kept_context_projections, kept for the same context tensor (the same object, not
        written to since)."""
        kept = getattr(_KEPT, "projections", None)
        if (not cross or kept is None or torch.is_grad_enabled()
                or packing.hooked(self.to_k) or packing.hooked(self.to_v)):
            return self.to_k(context), self.to_v(context)
        # an inference tensor (torch.inference_mode) has no version counter: its identity
        version = None if context.is_inference() else context._version
        entry = kept.get(self)
        if entry is not None and entry[0] is context and entry[1] == version:
            return entry[2], entry[3]
        k, v = self.to_k(context), self.to_v(context)
        kept[self] = (context, version, k, v)
        return k, v

    def attend(self, q, k, v, mask=None, residual=None):
        """The heads' attention of projected (B, T, C) queries over (B, S, C) keys and values,
        then to_out (plus `residual` where given: linear_residual): forward after its
        projections."""
        B, T, C = q.shape
        nh = self.num_heads
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, S, hs)
        dtype = q.dtype
        if self.upcast and dtype == torch.float16:
            q, k, v = q.float(), k.float(), v.float()
        y = attention(q, k, v, mask).to(dtype).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.to_out[0](y) if residual is None else linear_residual(self.to_out[0], y, residual)


class GEGLU(nn.Module):
    """Gated GELU projection (diffusers `GEGLU`): one linear gives value and gate halves.

    Without gradients each half is its own product (the rows of the weight are its halves, no
    copy), GELU runs in place on the gate and the value is multiplied in place: one new
    tensor of the output's size, where the one product, its GELU and the product made three of
    twice, half and half that size (SD 1.5 at 512 px in float32: 84, 42 and 42 MB per call,
    each paged in anew). In bfloat16 on oneDNN the GELU and the multiply run inside the two
    products (packing.OneDNNLinear.gated_gelu). A layer with hooks on it (LoRA training's) keeps
    the one product."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        proj = self.proj
        if (torch.is_grad_enabled() or type(proj) not in (nn.Linear, packing.OneDNNLinear)
                or packing.hooked(proj)):
            h, gate = proj(x).chunk(2, dim=-1)
            return h * F.gelu(gate)
        fused = proj.gated_gelu(x) if type(proj) is packing.OneDNNLinear else None
        if fused is not None:
            return fused
        n = proj.out_features // 2
        product = proj.product if type(proj) is packing.OneDNNLinear else F.linear
        w, b = proj.weight, proj.bias
        gate = product(x, w[n:], None if b is None else b[n:])
        h = product(x, w[:n], None if b is None else b[:n])
        return h.mul_(torch.ops.aten.gelu_(gate))


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input, hidden width `mult * dim`; keys `net.0.proj`, `net.2`."""

    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is a parameter-free dropout in diffusers; an Identity keeps the indices.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x, residual=None):
        """The MLP of x (plus `residual` where given: linear_residual)."""
        h = self.net[1](self.net[0](x))
        return self.net[2](h) if residual is None else linear_residual(self.net[2], h, residual)


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, as in LDM / diffusers.

    diffusers' SD UNets use flip_sin_to_cos=True (cos first) and freq_shift=0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: keys `linear_1`, `linear_2` (SiLU between). With
    `cond_dim`, a condition (B, cond_dim) is projected (`cond_proj`, no bias) and added to the
    input first: LCM's embedded guidance scale (diffusers' `time_cond_proj_dim`)."""

    def __init__(self, in_dim, dim, cond_dim=None):
        super().__init__()
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x, cond=None):
        if cond is not None:
            x = x + self.cond_proj(cond.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


def guidance_embedding(w, dim):
    """LCM's embedding of guidance scales w (B,) -> (B, dim) float32: sin then cos of
    1000 w at `dim // 2` frequencies from 1 down to 1/10000 (VDM's; the operations in the
    order diffusers' `get_guidance_scale_embedding` does them, so the phases at 1000 w agree
    to the last bit)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    args = (torch.as_tensor(w, dtype=torch.float32) * 1000.0)[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim % 2))
