"""UNet noise predictor with self/cross-attention (state-dict layout of diffusers'
UNet2DConditionModel, so published weights load with strict=True)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Attention, FeedForward, TimestepEmbedding, norm_silu, residual,
                     timestep_embedding)
from .packing import channels_last, onednn_linears
from .winograd import Conv2d


@dataclass
class UNetConfig:
    in_channels: int = 4                      # 9 for inpainting (latents, mask, masked latents)
    out_channels: int = 4
    block_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple = (True, True, True, False)  # per level: has transformer blocks
    num_heads: tuple = (8, 8, 8, 8)           # attention heads per level (a number of heads)
    mid_num_heads: int | None = None          # mid-block heads; None: the last level's
    transformer_layers: int = 1
    context_dim: int = 768
    linear_projection: bool = False           # SD 2.x: proj_in / proj_out are Linear, not 1x1 conv
    upcast_attention: bool = False            # SD 2.1: attention in float32
    norm_groups: int = 32
    norm_eps: float = 1e-5
    image_embed_dim: int | None = None        # unCLIP decoder: CLIP image embedding width
    image_tokens: int = 4                     # extra context tokens made from the image embedding
    pooled_text_dim: int | None = None        # pooled text state added to the time embedding
    time_cond_proj_dim: int | None = None     # LCM: the guidance-scale embedding's width


# DeepCache's skip branch (UNet.forward_deepcache): 0, the shallowest, gives the paper's Stable
# Diffusion 1.5 results (its code's cache_layer_id=0, cache_block_id=0)
DEEPCACHE_BRANCH = 0

SD15 = UNetConfig()
SD15_INPAINT = UNetConfig(in_channels=9)
SD21 = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True,
                  upcast_attention=True)
SD2_BASE = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True)
SD2_INPAINT = UNetConfig(in_channels=9, num_heads=(5, 10, 20, 20), context_dim=1024,
                         linear_projection=True)
TINY = UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                  num_heads=(2, 2), context_dim=32, norm_groups=8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (diffusers
    `ResnetBlock2D`). Takes the time embedding already passed through SiLU (see UNet.forward)."""

    def __init__(self, in_ch, out_ch, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        # a 1x1 conv matches the channel count of the skip path only where it changes
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(norm_silu(self.norm1, x))  # (B, C, H, W)
        h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(norm_silu(self.norm2, h, inplace=True))  # h: fresh, needed no more
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return residual(skip, h)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU MLP
    (diffusers `BasicTransformerBlock`)."""

    def __init__(self, dim, num_heads, context_dim, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, num_heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, num_heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x, context, merge=None):
        """`merge` (models/tome.py): the self-attention runs on the merged tokens."""
        if merge is None:
            x = self.attn1(self.norm1(x), residual=x)
        else:
            x = x + merge.unmerge(self.attn1(merge.merge(self.norm1(x))))
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus a residual
    (diffusers `Transformer2DModel`, continuous input)."""

    def __init__(self, ch, num_heads, context_dim, depth, groups, linear, upcast):
        super().__init__()
        self.linear = linear
        # LDM's Normalize() in the spatial transformer uses eps 1e-6, unlike the ResBlocks
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        proj = (lambda: nn.Linear(ch, ch)) if linear else (lambda: Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(ch, num_heads, context_dim, upcast) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context, tome=None):
        """`tome`: the run's TokenMerging (models/tome.py) or None."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        # permute then reshape is a free view when x is channels-last
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, T, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, None if tome is None else tome.plan(h, H, W))
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv with symmetric padding 1 (the UNet's; the VAE pads asymmetrically)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize then 3x3 conv. The target size is the skip tensor's, so odd
    latent sizes come back to their size (diffusers passes `upsample_size` for that case)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _transformer(cfg, ch, num_heads):
    return SpatialTransformer(ch, num_heads, cfg.context_dim, cfg.transformer_layers,
                              cfg.norm_groups, cfg.linear_projection, cfg.upcast_attention)


def _level_transformers(cfg, ch, level, count):
    """One transformer after each ResBlock of a level with attention, none otherwise."""
    if not cfg.attention_levels[level]:
        return nn.ModuleList()
    return nn.ModuleList([_transformer(cfg, ch, cfg.num_heads[level]) for _ in range(count)])


class DownBlock(nn.Module):
    """One resolution level on the way down (`CrossAttnDownBlock2D` or `DownBlock2D`)."""

    def __init__(self, cfg, in_ch, out_ch, temb_dim, level, downsample):
        super().__init__()
        chans = [in_ch] + [out_ch] * cfg.layers_per_block
        self.resnets = nn.ModuleList([ResBlock(a, out_ch, temb_dim, cfg.norm_groups, cfg.norm_eps)
                                      for a in chans[:-1]])
        self.attentions = _level_transformers(cfg, out_ch, level, len(self.resnets))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, h, temb, context, skips, tome=None):
        """Appends every output the up path will concatenate back to `skips`."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h, context, tome)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    """One resolution level on the way up (`CrossAttnUpBlock2D` or `UpBlock2D`): one more
    ResBlock than the down level, each eating one skip tensor from the stack."""

    def __init__(self, cfg, in_ch, skip_chans, out_ch, temb_dim, level, upsample):
        super().__init__()
        self.resnets = nn.ModuleList()
        for skip_ch in skip_chans:
            self.resnets.append(ResBlock(in_ch + skip_ch, out_ch, temb_dim, cfg.norm_groups,
                                         cfg.norm_eps))
            in_ch = out_ch
        self.attentions = _level_transformers(cfg, out_ch, level, len(self.resnets))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, h, temb, context, skips, tome=None):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)  # (B, C + Cskip, H, W) in
            if self.attentions:
                h = self.attentions[i](h, context, tome)
        for up in self.upsamplers:
            h = up(h, skips[-1].shape[-2:])
        return h


class MidBlock(nn.Module):
    """ResBlock, transformer, ResBlock at the lowest resolution (`UNetMidBlock2DCrossAttn`)."""

    def __init__(self, cfg, ch, temb_dim):
        super().__init__()
        heads = cfg.mid_num_heads or cfg.num_heads[-1]
        self.resnets = nn.ModuleList([ResBlock(ch, ch, temb_dim, cfg.norm_groups, cfg.norm_eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, ch, heads)])

    def forward(self, h, temb, context, tome=None):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, tome)
        return self.resnets[1](h, temb)


class ImageProjection(nn.Module):
    """CLIP image embedding -> `num_tokens` context tokens (diffusers `ImageProjection`,
    Kandinsky 2.2's `encoder_hid_proj`)."""

    def __init__(self, image_embed_dim, context_dim, num_tokens):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, e):
        return self.norm(self.image_embeds(e).view(e.shape[0], self.num_tokens, -1))  # (B, S, D)


class ImageTimeEmbedding(nn.Module):
    """CLIP image embedding -> addition to the time embedding (diffusers `ImageTimeEmbedding`)."""

    def __init__(self, image_embed_dim, temb_dim):
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, temb_dim)
        self.image_norm = nn.LayerNorm(temb_dim)

    def forward(self, e):
        return self.image_norm(self.image_proj(e))


class UNet(nn.Module):
    """Predicts the noise (or v) in `x` at timestep `t`, attending to `context` tokens."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        chans, n = tuple(cfg.block_channels), len(cfg.block_channels)
        for name in ("attention_levels", "num_heads"):
            if len(getattr(cfg, name)) != n:
                raise ValueError(f"UNetConfig.{name} has {len(getattr(cfg, name))} entries, "
                                 f"expected one per level of block_channels ({n})")
        temb_dim = 4 * chans[0]
        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim, cfg.time_cond_proj_dim)
        if cfg.image_embed_dim is not None:
            self.encoder_hid_proj = ImageProjection(cfg.image_embed_dim, cfg.context_dim,
                                                    cfg.image_tokens)
            self.add_embedding = ImageTimeEmbedding(cfg.image_embed_dim, temb_dim)
        if cfg.pooled_text_dim is not None:
            # Imagen's pooled text embedding in the time embedding; the layout of diffusers'
            # class_embed_type="projection"
            self.class_embedding = TimestepEmbedding(cfg.pooled_text_dim, temb_dim)

        # Channel counts of the skip tensors, in the order the down path pushes them; the up
        # path pops them in reverse, which fixes every up ResBlock's input width.
        skip_chans, ch = [chans[0]], chans[0]
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(chans):
            self.down_blocks.append(DownBlock(cfg, ch, out_ch, temb_dim, i, i < n - 1))
            skip_chans += [out_ch] * (cfg.layers_per_block + (i < n - 1))
            ch = out_ch
        self.mid_block = MidBlock(cfg, ch, temb_dim)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            popped = [skip_chans.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(cfg, ch, popped, chans[i], temb_dim, i, i > 0))
            ch = chans[i]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch, cfg.out_channels, 3, padding=1)

    def _time_embed(self, t, x, timestep_cond=None):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"timesteps t must be a scalar or shape ({B},), got {tuple(t.shape)}")
        emb = timestep_embedding(t, self.config.block_channels[0])  # (B, C0) float32
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError("timestep_cond given but UNetConfig.time_cond_proj_dim is None")
        return self.time_embedding(emb.to(x.dtype), timestep_cond)  # (B, 4*C0)

    def _condition(self, emb, context, image_embeds, text_embeds):
        """unCLIP decoder: image tokens go after any text tokens, and the image embedding is
        also added to the time embedding (Kandinsky 2.2 `image_proj` + `image` addition). With
        pooled_text_dim, the pooled text state is added to the time embedding too."""
        if (text_embeds is None) != (self.config.pooled_text_dim is None):
            raise ValueError("text_embeds (B, pooled_text_dim) must be given exactly when "
                             f"UNetConfig.pooled_text_dim is set ({self.config.pooled_text_dim})")
        if text_embeds is not None:
            emb = emb + self.class_embedding(text_embeds.to(emb.dtype))
        if image_embeds is None:
            if self.config.image_embed_dim is not None:
                raise ValueError("this UNet has image_embed_dim set: pass image_embeds")
            if context is None:
                raise ValueError("UNet.forward needs context (B, S, context_dim)")
            return emb, context
        if self.config.image_embed_dim is None:
            raise ValueError("image_embeds given but UNetConfig.image_embed_dim is None")
        tokens = self.encoder_hid_proj(image_embeds)  # (B, image_tokens, D)
        context = tokens if context is None else torch.cat([context, tokens], dim=1)  # (B, S, D)
        return emb + self.add_embedding(image_embeds), context

    def text_condition(self, context, pooled):
        """forward()'s text kwargs from the text encoder's token states (B, T, D) and pooled
        states (B, D): the pooled ones only where this UNet takes them."""
        if self.config.pooled_text_dim is None:
            return {"context": context}
        return {"context": context, "text_embeds": pooled}

    def forward(self, x, t, context=None, image_embeds=None, text_embeds=None,
                timestep_cond=None, tome=None):
        """x (B, in_channels, h, w), t scalar or (B,) (fractional allowed), context
        (B, S, context_dim), image_embeds (B, image_embed_dim), text_embeds
        (B, pooled_text_dim), timestep_cond (B, time_cond_proj_dim): LCM's guidance
        embedding (layers.guidance_embedding) -> (B, out_channels, h, w). `tome`: a run's
        TokenMerging (models/tome.py), the approximate path of token merging; None: exact."""
        self._merge_level(x, tome)
        emb, context = self._condition(self._time_embed(t, x, timestep_cond), context,
                                       image_embeds, text_embeds)
        # every ResBlock's time projection starts with SiLU: apply it once here
        temb = F.silu(emb)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips, tome)
        h = self.mid_block(h, temb, context, tome)
        for block in self.up_blocks:
            h = block(h, temb, context, skips, tome)
        return self.conv_out(norm_silu(self.conv_norm_out, h))

    # ---- DeepCache (Ma, Fang, Wang 2023, "DeepCache: Accelerating Diffusion Models for Free")
    def forward_deepcache(self, x, t, context=None, image_embeds=None, text_embeds=None,
                          timestep_cond=None, tome=None, *, deep=None,
                          branch=DEEPCACHE_BRANCH):
        """forward() split at skip branch `branch` -> (output, deep). With deep None the whole
        UNet runs (the same operations as forward(), so the same output) and `deep` is what
        the up path hands to the sub-layer that reads skip branch `branch`: the features of
        everything below that branch. With `deep` given (of an earlier call) only the shallow
        part runs: conv_in, the down sub-layers down to the branch, and the up sub-layers from
        it (DeepCache's "retrieve" step). Sub-layers are a ResBlock with its transformer, or a
        down/upsampler; branch b is the skip tensor the (b+1)-th down sub-layer pushes, so
        branch 0 keeps one ResBlock (+ transformer) each way at full resolution (DeepCache's
        default for Stable Diffusion, layer 0 block 0)."""
        down, up = self._sublayers()
        if not isinstance(branch, int) or not 0 <= branch < len(down):
            raise ValueError(f"branch must be an integer in [0, {len(down) - 1}], got {branch!r}")
        # the up sub-layer that pops skip branch + 1 (pops run from the last skip to the first)
        pops = [i for i, (layer, _) in enumerate(up) if isinstance(layer, ResBlock)]
        enter = pops[len(down) - 1 - branch]
        self._merge_level(x, tome)
        emb, context = self._condition(self._time_embed(t, x, timestep_cond), context,
                                       image_embeds, text_embeds)
        temb = F.silu(emb)
        h = self.conv_in(x)
        skips = [h]
        for layer, attn in down[:branch + 1] if deep is not None else down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            if attn is not None:
                h = attn(h, context, tome)
            skips.append(h)
        if deep is None:
            h = self.mid_block(h, temb, context, tome)
        for i, (layer, attn) in enumerate(up):
            if i < enter and deep is not None:
                continue
            if i == enter:  # the full run keeps the deep features, the shallow one reads them
                h = deep = h if deep is None else deep
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
                continue
            h = layer(torch.cat([h, skips.pop()], dim=1), temb)  # (B, C + Cskip, H, W) in
            if attn is not None:
                h = attn(h, context, tome)
        return self.conv_out(norm_silu(self.conv_norm_out, h)), deep

    def _merge_level(self, x, tome):
        """Token merging happens at the finest attention level: tell `tome` its token count
        for input `x` (each downsample takes a side s to (s + 1) // 2)."""
        if tome is None:
            return
        if True not in self.config.attention_levels:
            tome.tokens = None
            return
        h, w = x.shape[-2:]
        for _ in range(self.config.attention_levels.index(True)):
            h, w = (h + 1) // 2, (w + 1) // 2
        tome.tokens = h * w

    def _sublayers(self):
        """The down and up paths as lists of (module, its transformer or None), in the order
        forward() runs them: each down one pushes a skip tensor, each up ResBlock pops one."""
        down, up = [], []
        for path, blocks, resize in ((down, self.down_blocks, "downsamplers"),
                                     (up, self.up_blocks, "upsamplers")):
            for block in blocks:
                path += [(r, block.attentions[i] if block.attentions else None)
                         for i, r in enumerate(block.resnets)]
                path += [(m, None) for m in getattr(block, resize)]
        return down, up

def for_inference(unet):
    """The UNet as pipelines run it: eval mode and, in bfloat16, its convolution weights in the
    channels-last layout, so its activations are channels-last too (oneDNN's bfloat16
    convolutions skip layout reorders: an SD 1.5 UNet call 1.26x faster at 256 px, 1.04-1.12x at
    512 px on an AVX512-BF16 CPU). Float32 stays as it is (channels-last measured 0.93x there).
    Its float32 linear layers run on oneDNN (packing.OneDNNLinear). The same results within
    rounding. Returns `unet`."""
    unet.eval()
    if relayouts(unet):
        channels_last(unet)
    onednn_linears(unet)
    return unet


def relayouts(unet):
    """Whether for_inference lays `unet`'s weights out anew (bfloat16); it reads only their
    dtype, which a module whose weights are on disk keeps (pipelines/offload.py)."""
    return next(unet.parameters()).dtype == torch.bfloat16


# The bundled shapes model: 16x16x4 latents (f=4 VAE on 64 px), attention only at 8x8 and 4x4
# (measured with diffusers' same UNet, batch 64 on 2 cores: attention at 16x16 as well took a
# step from 0.84 s to 1.9 s; it costs most at the finest level and is not needed here).
# 6.7M parameters, ~40 samples/s training on 2 cores (as fast as diffusers' same UNet).
SHAPES = UNetConfig(block_channels=(64, 128, 128), layers_per_block=1,
                    attention_levels=(False, True, True), num_heads=(4, 4, 4), context_dim=128,
                    norm_groups=32)
