"""The decoders of latents a pipeline may hold: its VAE's ("full") and a tiny one ("tiny": a
TAESD, models/taesd.py, `pipe.tiny_decoder`). Live previews always use the tiny decoder when the
model has one; the final images use it when asked (vae_decoder="tiny", AUTOMATIC1111's "VAE
type for decode": Full / TAESD), and their PNG parameters then say "VAE Decoder: TAESD", as
A1111's do. The tiny decoder takes the UNet's latents as diffusers' pipelines hand latents to
an AutoencoderTiny: divided by its scaling_factor (1.0 for madebyollin's), plus its
shift_factor.

A small preview (the server's live ones: `small_preview`) made by the VAE decodes the latents
averaged down to the preview's size first: a 128 px preview of a 512 px image costs 1/16 of
the whole decode (SD 1.5 on 2 cores: ~10 s a decode, and a 20-step job makes 5 previews)."""
import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.packing import channels_last

VAE_DECODERS = ("full", "tiny")
A1111_DECODERS = {"full": "Full", "tiny": "TAESD"}  # A1111's sd_vae_decode_method values


def check_vae_decoder(vae_decoder, tiny):
    """An InputError unless `vae_decoder` is one of VAE_DECODERS that the model has."""
    if vae_decoder not in VAE_DECODERS:
        raise InputError(f"vae_decoder must be one of {VAE_DECODERS}, got {vae_decoder!r}")
    if vae_decoder == "tiny" and tiny is None:
        raise InputError("vae_decoder 'tiny': this model has no tiny decoder; attach one "
                         "(TAESD weights: --tiny-decoder PATH, or tiny_decoder=PATH when "
                         "loading)")
    return vae_decoder


def parameters(vae_decoder):
    """The PNG parameters' fields for an image decoded by `vae_decoder` (A1111 writes the
    field only when it is not the full VAE)."""
    return {"VAE Decoder": A1111_DECODERS[vae_decoder]} if vae_decoder != "full" else {}


def preview_decoder(pipe):
    """What live previews decode with: the tiny decoder when the model has one."""
    return "tiny" if getattr(pipe, "tiny_decoder", None) is not None else "full"


def small_preview(pipe, latents, side):
    """The first image of scaled latents (B, C, h, w) as a PIL image at most `side` px per
    side, by `preview_decoder`: the tiny decoder decodes the whole latents; the VAE decodes
    them averaged over blocks of k x k, the largest k that keeps its image at least `side`
    px (each side ceil(h / k) latents), since its cost grows with the pixels it makes; the
    image is then shrunk to `side`."""
    decoder, z = preview_decoder(pipe), latents[:1]
    if decoder == "full":
        h, w = z.shape[-2:]
        k = max(1, max(h, w) * pipe.vae_factor // side)
        if k > 1:
            z = F.adaptive_avg_pool2d(z, (math.ceil(h / k), math.ceil(w / k)))
    image = pipe.decode_latents(z, decoder)[0]
    image.thumbnail((side, side))
    return image


@torch.no_grad()
def tiny_decode(tiny, latents):
    """The UNet's latents (B, C, h, w) -> (B, 3, h*f, w*f) in [-1, 1] by the tiny decoder."""
    c = tiny.config
    dtype = next(tiny.parameters()).dtype
    return tiny.decode((latents / c.scaling_factor + c.shift_factor).to(dtype))


def for_inference(tiny):
    """The tiny decoder as pipelines run it: eval mode, channels-last convolutions (as the
    VAE's: models/vae.for_inference)."""
    return channels_last(tiny.eval())
