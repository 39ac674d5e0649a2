"""Blocks that several models share: attention, feed-forward, timestep embedding.

Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`,
`time_embedding.linear_1`) so that published weights load with `strict=True`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm_silu(norm, x):
    """SiLU(norm(x)), the SiLU in place where no gradient is recorded: norm's output is fresh,
    and on a large activation a new tensor costs more in page faults than SiLU itself (a
    128 x 512 x 512 bfloat16 one: 45 ms out of place, 17 ms in place, 2 threads)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def residual(x, h):
    """x + h, added into `h` (a block's fresh output) where no gradient is recorded."""
    return h.add_(x) if not torch.is_grad_enabled() and h.shape == x.shape else x + h


class Attention(nn.Module):
    """Multi-head attention over (B, T, C) tokens; cross-attention when `context` is given.

    `upcast` computes the attention in float32 whatever the input dtype (SD 2.1 needs it to
    avoid overflow in half precision).
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

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        B, T, C = x.shape
        nh = self.num_heads
        q = self.to_q(x).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        k = self.to_k(context).view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, S, hs)
        v = self.to_v(context).view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, S, hs)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.to_out[0](y)


class GEGLU(nn.Module):
    """Gated GELU projection (diffusers `GEGLU`): one linear gives value and gate halves."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input, hidden width `mult * dim`; keys `net.0.proj`, `net.2`."""

    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is a parameter-free dropout in diffusers; an Identity keeps the indices.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


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
