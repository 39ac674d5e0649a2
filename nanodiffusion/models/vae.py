"""KL autoencoder of LDM / Stable Diffusion (state-dict layout of diffusers' AutoencoderKL).

Encoder: conv_in, down blocks of ResBlocks (stride-2 conv between), a mid block (ResBlock,
single-head self-attention over the H*W tokens, ResBlock), GroupNorm, SiLU, conv_out to the
mean and log-variance of a diagonal Gaussian. The decoder mirrors it with nearest-neighbour
upsampling. Keys match diffusers so its weights load with `strict=True` and no renaming.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..malloc import trim
from . import upsample
from .layers import Attention, conv_residual, norm_silu
from .packing import channels_last, hooked, onednn_linears
from .winograd import Conv2d


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple = (128, 256, 512, 512)  # downsampling factor 2 ** (len - 1)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215               # latents are multiplied by this for the UNet
    mid_attention: bool = True


SD = VAEConfig()
TINY = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8)
# bytes of an upsampling block's output from which the decoder gives the heap back after it:
# past glibc's mmap threshold (its ceiling: 32 MiB) blocks are mapped apart, so what follows
# such a block reuses little of the freed smaller ones in the heap. SD 1.5 in bfloat16: at 512
# px (outputs 16, 64, 128 MiB) trimming after the last two gave the peak that trimming after
# all three did, 2.74 GB; at 256 px (4, 16, 32 MiB) trimming saved 10-30 MB of peak for 40-60
# ms of a 0.36-0.39 s decode, so it does not trim there
TRIM_ABOVE = 64 << 20


def _norm(channels, groups):
    # LDM's VAE uses eps 1e-6 in every GroupNorm (the UNet uses 1e-5)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 conv shortcut when the width changes."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        """At inference `x` may be overwritten with the output (conv_residual): the encoder's
        and the decoder's layer loops and the middle block hold it no more."""
        return self.run(x)[0]

    def run(self, x, spare=None):
        """forward(x) -> (output, spare'): `spare`, where given, is a dead activation that the
        first norm may write into (layers.norm_silu's `out`; ignored where its shape or layout
        differs); spare' is this block's own dead one after it (conv1's output, the output's
        shape), for the next block. The decoder passes them along its ResBlocks: a new
        activation's pages cost more to fault in than the fused GroupNorm that fills them (1 x
        128 x 512 x 512 bfloat16: 34-36 ms into a new tensor, 14 into one already resident)."""
        # conv1's output is normalised in place, and conv2 adds its output into x (or the
        # shortcut's output): no tensor of conv2's own beside them. With a shortcut, x is
        # needed no more once the shortcut has run, so it is normalised in place: SD 1.5's
        # decoder at 512 px holds 128 MiB less (bfloat16) in its widest block
        if self.conv_shortcut is not None:
            skip = self.conv_shortcut(x)
            h = norm_silu(self.norm1, x, inplace=True)
        else:
            fits = (spare is not None and spare.shape == x.shape and spare.dtype == x.dtype
                    and spare.is_contiguous(memory_format=torch.channels_last))
            skip, h = x, norm_silu(self.norm1, x, out=spare if fits else None)
        h = norm_silu(self.norm2, self.conv1(h), inplace=True)
        return conv_residual(self.conv2, h, skip), h  # h: conv2's input, dead after it


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads (0,1,0,1) (right and bottom only) before the stride-2 conv
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if upsample.takes(self.conv, x):  # on x itself: no upsampled copy, 2.25x less work
            return upsample.upsample_conv(self.conv, x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEAttention(Attention):
    """Single-head self-attention over the H*W positions, with its own GroupNorm and residual.

    Above `chunk_size` tokens the queries are processed in chunks of that many against all keys
    (projected once), so a 1024 px decode (16384 tokens) never holds the full T x T score matrix
    on torch's kernel. Each query row of softmax(q k^T) v depends on that row alone, so the
    result equals the unsliced one.
    """

    def __init__(self, channels, groups, chunk_size=4096):
        # LDM / diffusers compute this attention's softmax in float32 (upcast_softmax=True)
        super().__init__(channels, num_heads=1, qkv_bias=True, upcast=True)
        self.group_norm = _norm(channels, groups)
        self.chunk_size = chunk_size

    def forward(self, x):
        B, C, H, W = x.shape
        # permute then reshape is a free view when x is channels-last
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, T, C)
        if H * W <= self.chunk_size:
            y = super().forward(h)
        else:
            k, v = self.to_k(h), self.to_v(h)
            y = torch.cat([self.attend(self.to_q(h[:, i:i + self.chunk_size]), k, v)
                           for i in range(0, H * W, self.chunk_size)], dim=1)  # (B, T, C)
        return x + y.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, groups) for _ in range(2)])
        attn = [VAEAttention(channels, groups)] if attention else []
        self.attentions = nn.ModuleList(attn)

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Block(nn.Module):
    """`num_layers` ResBlocks, then an optional resampler (diffusers Down/UpDecoderBlock2D)."""

    def __init__(self, in_ch, out_ch, num_layers, groups, down=False, up=False):
        super().__init__()
        self.down, self.up = down, up
        self.resnets = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def layers(self):
        """Its layers in order: the ResBlocks, then the resampler if any. The encoder and the
        decoder run these one by one rather than calling the block, so that no frame holds
        the block's input while it runs (SD 1.5's decoder at 512 px: a 134 MB bfloat16
        activation held beside the last block's)."""
        yield from self.resnets
        if self.down:
            yield self.downsamplers[0]
        if self.up:
            yield self.upsamplers[0]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): mean and logvar stacked."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_channels, cfg.norm_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            for layer in block.layers():
                x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f); up blocks widest first."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_channels[::-1], cfg.norm_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        spare = None  # the last ResBlock's dead activation, at inference (ResBlock.run)
        inference = x.device.type == "cpu" and not torch.is_grad_enabled()
        for block in self.up_blocks:
            for layer in block.layers():
                if inference and isinstance(layer, ResBlock) and not hooked(layer):
                    x, spare = layer.run(x, spare)
                else:
                    spare = None
                    x = layer(x)
            if block.up and inference and x.numel() * x.element_size() >= TRIM_ABOVE:
                # each up block's activations are 4x the last's: glibc would keep the freed
                # smaller ones in its heap, resident beside them (SD 1.5 at 512 px in
                # bfloat16: txt2img's peak, the decode's, 2.93 -> 2.74 GB; the decode alone
                # ~0.1 s slower for the pages faulted in again, whole txt2img within noise;
                # TRIM_ABOVE says where)
                trim()
        return self.conv_out(norm_silu(self.conv_norm_out, x, inplace=True))  # x: the last
        # layer's fresh output


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element, as in LDM."""

    def __init__(self, mean, logvar):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # LDM's clamp keeps exp() finite

    def sample(self, generator=None):
        # Noise drawn on the generator's device, then moved, like diffusers' randn_tensor,
        # so the same seed gives the same latents as diffusers.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device,
                            dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over C, H, W -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar,
                               dim=[1, 2, 3])


class VAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        L = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * L, 2 * L, 1)
        self.post_quant_conv = Conv2d(L, L, 1)

    @property
    def downscale(self):
        """Pixels per latent along each side."""
        return 2 ** (len(self.config.block_channels) - 1)

    def encode(self, x):
        """(B, 3, H, W) image in [-1, 1] -> DiagonalGaussian over (B, L, H/f, W/f) latents."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # (B, L, h, w) each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z):
        """Unscaled latents (B, L, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, generator=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    @torch.no_grad()
    def tiled_decode(self, z, tile=64, overlap=16):
        """Decode latent tiles of `tile` x `tile` that overlap by `overlap` latents.

        Overlaps are cross-faded with linear weights, so memory scales with the tile, not the
        image. A latent no larger than one tile decodes exactly as `decode`. The mid-block
        attention sees one tile only, so the result differs slightly from a full decode.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        B, _, h, w = z.shape
        f = self.downscale
        out = z.new_zeros(B, self.config.out_channels, h * f, w * f)
        total = z.new_zeros(1, 1, h * f, w * f)  # summed blend weights
        for r in _tile_starts(h, tile, overlap):
            for c in _tile_starts(w, tile, overlap):
                x = self.decode(z[:, :, r:r + tile, c:c + tile])  # (B, 3, th*f, tw*f)
                wy = _blend_weights(r * f, x.shape[2], h * f, overlap * f, z)
                wx = _blend_weights(c * f, x.shape[3], w * f, overlap * f, z)
                wgt = wy[:, None] * wx[None, :]  # (th*f, tw*f)
                ys, xs = slice(r * f, r * f + x.shape[2]), slice(c * f, c * f + x.shape[3])
                out[:, :, ys, xs] += x * wgt
                total[:, :, ys, xs] += wgt
        return out / total


def for_inference(vae):
    """The VAE as pipelines run it: eval mode, convolution weights in channels-last layout, so
    oneDNN convolves without reordering them and the activations (the decoder's full-size
    ones dominate its time) stay channels-last too. Same results within float rounding; a
    256 px decode on 2 CPU threads went from diffusers' speed to 1.19x it (benchmarks/
    bench_sd.py). Training keeps the default layout. Its float32 linear layers (the middle
    block's attention) run on oneDNN (packing.OneDNNLinear). The encoder is laid out when it
    is first run (`for_encoding`): the readers leave its weights in their file's mapping
    (formats.files.read_safetensors), so that txt2img, which never runs it, never holds them
    (SD 1.5's: 137 MB in float32)."""
    vae = vae.eval()
    channels_last(vae.decoder)
    channels_last(vae.post_quant_conv)
    onednn_linears(vae)
    return vae


def for_encoding(vae):
    """`vae` (for_inference's) with its encoder laid out as the decoder is, channels-last;
    nothing to do after its first call. -> vae."""
    channels_last(vae.encoder)
    channels_last(vae.quant_conv)
    return vae


def _tile_starts(n, tile, overlap):
    """Starts of tiles of `tile` covering 0..n, stride tile - overlap, the last flush with n."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _blend_weights(start, length, total, ramp, like):
    """(length,) weights: 1 inside, rising linearly over `ramp` pixels at edges shared with a
    neighbouring tile. Ramps of two tiles overlapping by exactly `ramp` sum to 1."""
    w = like.new_ones(length)
    n = min(ramp, length)
    if n == 0:
        return w
    up = torch.arange(1, n + 1, device=like.device, dtype=like.dtype) / (n + 1)  # (n,)
    if start > 0:
        w[:n] = torch.minimum(w[:n], up)
    if start + length < total:
        w[-n:] = torch.minimum(w[-n:], up.flip(0))
    return w

# The bundled shapes model: f=4 (64 px -> 16x16x4); flat colours on white need little capacity.
# (16, 32, 64) trains at ~37 samples/s on 2 cores against ~9 for (32, 64, 128).
SHAPES = VAEConfig(block_channels=(16, 32, 64), layers_per_block=1, norm_groups=16)
