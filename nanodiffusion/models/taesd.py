"""Tiny autoencoder (TAESD, Ollin Boer Bohan's "Tiny AutoEncoder for Stable Diffusion"): a
small convolution-only encoder and decoder distilled from a KL VAE, in the same latent space:
the scaled latents the UNet works in (diffusers' pipelines divide by the TAESD's
scaling_factor, 1.0, before decoding), so a decode costs a fraction of the VAE's.

Decoder: latents soft-clamped to (-3, 3) by 3 tanh(z / 3), a conv and ReLU, then per stage
`n` residual blocks (three 3x3 convs with ReLUs between, added to the input, ReLU), and after
every stage but the last a nearest 2x upsampling and a bias-free conv; the last stage ends in
a conv to RGB in [0, 1], returned in [-1, 1] as diffusers does. The encoder mirrors it: the
image in [0, 1], a conv, then per stage a stride-2 bias-free conv (not before the first) and
`n` blocks, and a conv to the latents. One width throughout each of them.

State-dict keys are those of diffusers' AutoencoderTiny (`encoder.layers.N`,
`decoder.layers.N`: nn.Sequential indices, the parameter-free ReLUs and upsamplings counted),
so its weights load with strict=True; formats/taesd.py reads madebyollin's taesd_*.safetensors
files (the same indices, the decoder's shifted by its clamp at index 0).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import upsample
from .winograd import Conv2d


@dataclass
class TAESDConfig:
    image_channels: int = 3
    latent_channels: int = 4
    encoder_channels: int = 64
    decoder_channels: int = 64
    # blocks per stage; every encoder stage after the first halves the size, every decoder
    # stage but the last doubles it: the downsampling factor is 2 ** (len - 1). () leaves that
    # half out (madebyollin ships taesd_encoder and taesd_decoder as separate files)
    encoder_blocks: tuple = (1, 3, 3, 3)
    decoder_blocks: tuple = (3, 3, 3, 1)
    # scale_latents maps [-magnitude, magnitude] onto [0, 1] around `shift`, to store latents
    # in 8 bits (diffusers' AutoencoderTiny.forward; TAESD's own scale_latents)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    # what it takes as latents: (the UNet's latents) / scaling_factor + shift_factor, as
    # diffusers' pipelines hand them to their vae (1.0 and 0.0: the UNet's latents themselves)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0


SD = TAESDConfig()  # madebyollin/taesd (SD 1.x and 2.x), diffusers' AutoencoderTiny defaults
TINY = TAESDConfig(encoder_channels=8, decoder_channels=8, encoder_blocks=(1, 1),
                   decoder_blocks=(1, 1))
# The bundled shapes models' tiny decoder (train/tiny_decoder.py distils it): their VAE halves
# twice (factor 4), so two upsamplings. Its 64x64 stage is 16 wide, so a tiny decoder is only
# faster at 16 wide too (64x64, one thread: 2.9 ms against the VAE's 11.7; 32 wide: 7.1); the
# blocks at 16x16 cost little. Their scaled latents reach -11 (7% of one channel beyond 3),
# which TAESD's clamp (3 tanh(z / 3)) squashes: scaling_factor 2 halves them first.
SHAPES = TAESDConfig(decoder_channels=16, encoder_blocks=(), decoder_blocks=(3, 3, 1),
                     scaling_factor=2.0)


def _conv(n_in, n_out, **kwargs):
    """A 3x3 convolution: winograd.Conv2d, nn.Conv2d's call but where a bfloat16 one computes in
    float32 (AVX2-only CPUs: winograd.computes_in_float32); too narrow for Winograd itself."""
    return Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """relu(x + conv(relu(conv(relu(conv(x)))))): keys `conv.0`, `conv.2`, `conv.4` (diffusers'
    AutoencoderTinyBlock; its 1x1 `skip` conv exists only between different widths, which
    AutoencoderTiny never builds)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)


class TinyEncoder(nn.Module):
    """(B, 3, H, W) image in [-1, 1] -> (B, L, H/f, W/f) latents (the UNet's scale)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.encoder_channels
        layers = [_conv(cfg.image_channels, C)]
        for i, n in enumerate(cfg.encoder_blocks):
            if i > 0:
                layers.append(_conv(C, C, stride=2, bias=False))
            layers += [Block(C) for _ in range(n)]
        layers.append(_conv(C, cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.add(1).div(2))  # TAESD's images are in [0, 1]


class TinyDecoder(nn.Module):
    """(B, L, h, w) latents -> (B, 3, h*f, w*f) image in [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        C, last = cfg.decoder_channels, len(cfg.decoder_blocks) - 1
        layers = [_conv(cfg.latent_channels, C), nn.ReLU()]
        for i, n in enumerate(cfg.decoder_blocks):
            layers += [Block(C) for _ in range(n)]
            if i < last:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           _conv(C, C, bias=False)]
        layers.append(_conv(C, cfg.image_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        # TAESD's clamp: latents far outside the trained range saturate smoothly at +-3
        x = torch.tanh(z / 3) * 3
        layers = iter(self.layers)
        for layer in layers:
            if type(layer) is nn.Upsample:  # and the conv after it, on the small input where
                conv = next(layers)  # models/upsample.py takes it (2.25x less work, no copy)
                x = (upsample.upsample_conv(conv, x) if upsample.takes(conv, x)
                     else conv(layer(x)))
            else:
                x = layer(x)
        return x.mul(2).sub(1)  # [0, 1] -> [-1, 1]


class TAESD(nn.Module):
    """Encoder and/or decoder (a config with () blocks leaves one out)."""

    def __init__(self, config):
        super().__init__()
        if not config.encoder_blocks and not config.decoder_blocks:
            raise ValueError("a TAESD needs an encoder or a decoder: encoder_blocks and "
                             "decoder_blocks are both empty")
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(config, name)
            if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in blocks):
                raise ValueError(f"{name} must be block counts >= 0, got {blocks!r}")
        self.config = config
        self.encoder = TinyEncoder(config) if config.encoder_blocks else None
        self.decoder = TinyDecoder(config) if config.decoder_blocks else None

    @property
    def downscale(self):
        """Pixels per latent along each side."""
        blocks = self.config.decoder_blocks or self.config.encoder_blocks
        return 2 ** (len(blocks) - 1)

    def encode(self, x):
        """(B, 3, H, W) image in [-1, 1] -> latents (B, L, H/f, W/f) in the TAESD's scale."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (a decoder-only file)")
        return self.encoder(x)

    def decode(self, z):
        """Latents (B, L, h, w) in the TAESD's scale -> image (B, 3, h*f, w*f) in [-1, 1]."""
        if self.decoder is None:
            raise ValueError("this TAESD has no decoder (an encoder-only file)")
        return self.decoder(z)

    def scale_latents(self, z):
        """Latents -> [0, 1] (clamped), for storage in 8 bits."""
        c = self.config
        return z.div(2 * c.latent_magnitude).add(c.latent_shift).clamp(0, 1)

    def unscale_latents(self, x):
        """scale_latents' inverse (within its clamp)."""
        c = self.config
        return x.sub(c.latent_shift).mul(2 * c.latent_magnitude)

    def forward(self, x):
        """Encode, store the latents in 8 bits, decode (diffusers' AutoencoderTiny.forward)."""
        stored = self.scale_latents(self.encode(x)).mul(255).round().byte()
        return self.decode(self.unscale_latents(stored / 255.0))
