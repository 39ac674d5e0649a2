"""DALL·E 2 diffusion prior (Ramesh et al. 2022, §2.2): a decoder-only transformer that
denoises a CLIP image embedding given the caption's CLIP text encoding.

Tokens, in order, under a causal mask: the projected text token states (T), the pooled text
embedding, the timestep embedding, the noised image embedding, and a learned query whose
output is projected to the clean image embedding (the prior predicts x0, not the noise).
Embeddings are modelled normalised, (e - clip_mean) / clip_std, with the statistics of the
training data stored as buffers.

State-dict keys follow diffusers' `PriorTransformer` (Karlo's prior), so with
`learned_null=False` and `text_dim == embed_dim` its weights load with strict=True. Our
addition is a learned null condition (`null_text_states`, `null_text_emb`) that stands for a
dropped caption in training and is the unconditional branch of classifier-free guidance.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Attention, TimestepEmbedding, timestep_embedding


@dataclass
class PriorConfig:
    embed_dim: int = 768              # E: CLIP embedding width (image and pooled text)
    text_dim: int | None = None       # width of the text token states; None: embed_dim
    text_tokens: int = 77             # T: text token states per caption (the tokenizer length)
    width: int = 2048                 # transformer width (heads x head size)
    num_layers: int = 20
    num_heads: int = 32
    learned_null: bool = True         # learned null text condition for CFG (not in diffusers)


KARLO = PriorConfig(learned_null=False)  # diffusers' PriorTransformer defaults
TINY = PriorConfig(embed_dim=16, text_dim=32, text_tokens=77, width=32, num_layers=2,
                   num_heads=2)
# The shapes model's prior: shapes CLIP (projection 128, 32-token captions of width 128).
SHAPES = PriorConfig(embed_dim=128, text_dim=128, text_tokens=32, width=256, num_layers=6,
                     num_heads=4)

EXTRA_TOKENS = 4  # pooled text embedding, timestep, noised image embedding, query


class GELUProjection(nn.Module):
    """Linear then exact GELU (diffusers `GELU`, key `proj`)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x))


class PriorFeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu")`: keys `net.0.proj`, `net.2` (the UNet's
    feed-forward in layers.py is the gated GEGLU one)."""

    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is a parameter-free dropout in diffusers; an Identity keeps the indices.
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Identity(),
                                  nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class PriorBlock(nn.Module):
    """Pre-norm causal self-attention and MLP (diffusers `BasicTransformerBlock` without
    cross-attention, attention_bias=True: keys norm1, attn1, norm3, ff)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = PriorFeedForward(dim)

    def forward(self, x, mask):
        x = x + self.attn1(self.norm1(x), mask=mask)
        return x + self.ff(self.norm3(x))


class Prior(nn.Module):
    """forward(x_t (B, E) VP-scaled noised normalised embedding, t scalar or (B,),
    text_states (B, T, text_dim), text_emb (B, E)) -> predicted clean normalised embedding."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        cfg = self.config = config
        C, E = cfg.width, cfg.embed_dim
        text_dim = cfg.text_dim or E
        self.time_embedding = TimestepEmbedding(C, C)
        self.proj_in = nn.Linear(E, C)
        self.embedding_proj = nn.Linear(E, C)
        self.encoder_hidden_states_proj = nn.Linear(text_dim, C)
        self.positional_embedding = nn.Parameter(
            torch.randn(1, cfg.text_tokens + EXTRA_TOKENS, C) * 0.01)
        self.prd_embedding = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.transformer_blocks = nn.ModuleList(
            [PriorBlock(C, cfg.num_heads) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(C)
        self.proj_to_clip_embeddings = nn.Linear(C, E)
        # data statistics, not trained (diffusers keeps them as parameters; same keys)
        self.register_buffer("clip_mean", torch.zeros(1, E))
        self.register_buffer("clip_std", torch.ones(1, E))
        if cfg.learned_null:
            self.null_text_states = nn.Parameter(torch.zeros(1, cfg.text_tokens, text_dim))
            self.null_text_emb = nn.Parameter(torch.zeros(1, E))

    # ---- normalisation of embeddings ----------------------------------------------------
    @torch.no_grad()
    def set_stats(self, embeds):
        """Per-dimension mean and std of (N, E) training image embeddings."""
        self.clip_mean.copy_(embeds.float().mean(0, keepdim=True))
        self.clip_std.copy_(embeds.float().std(0, keepdim=True).clamp_min(1e-6))

    def normalize(self, embeds):
        return (embeds - self.clip_mean) / self.clip_std

    def denormalize(self, x):
        """diffusers' `post_process_latents`."""
        return x * self.clip_std + self.clip_mean

    # ---- the null condition -------------------------------------------------------------
    def null_condition(self, batch):
        """(text_states (B, T, D), text_emb (B, E)) of the learned null caption."""
        if not self.config.learned_null:
            raise ValueError("this prior has no learned null condition (learned_null=False): "
                             "encode the empty caption instead")
        return (self.null_text_states.expand(batch, -1, -1),
                self.null_text_emb.expand(batch, -1))

    def drop_text(self, text_states, text_emb, drop):
        """Replace the conditions where `drop` (B,) is True by the learned null ones."""
        null_states, null_emb = self.null_condition(text_states.shape[0])
        text_states = torch.where(drop[:, None, None], null_states.to(text_states), text_states)
        return text_states, torch.where(drop[:, None], null_emb.to(text_emb), text_emb)

    # ---- the network --------------------------------------------------------------------
    def _time_embed(self, t, x):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        if t.shape != (B,):
            raise ValueError(f"timesteps t must be a scalar or shape ({B},), got {tuple(t.shape)}")
        return self.time_embedding(timestep_embedding(t, self.config.width).to(x.dtype))

    def forward(self, x_t, t, text_states, text_emb):
        cfg = self.config
        B, E = x_t.shape
        want = (B, cfg.text_tokens, cfg.text_dim or cfg.embed_dim)
        if tuple(text_states.shape) != want or tuple(text_emb.shape) != (B, cfg.embed_dim):
            raise ValueError(f"text_states must be {want} and text_emb ({B}, {cfg.embed_dim}), "
                             f"got {tuple(text_states.shape)} and {tuple(text_emb.shape)}")
        tokens = torch.cat([
            self.encoder_hidden_states_proj(text_states),  # (B, T, C)
            self.embedding_proj(text_emb)[:, None],  # (B, 1, C)
            self._time_embed(t, x_t)[:, None],
            self.proj_in(x_t)[:, None],
            self.prd_embedding.to(x_t.dtype).expand(B, -1, -1),
        ], dim=1)  # (B, T + 4, C)
        h = tokens + self.positional_embedding.to(x_t.dtype)
        L = h.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()  # (L, L)
        for block in self.transformer_blocks:
            h = block(h, causal)
        # the output of the last (query) token is the prediction
        return self.proj_to_clip_embeddings(self.norm_out(h[:, -1]))  # (B, E)
