"""The decoders of latents a pipeline may hold: its VAE's ("full") and a tiny one ("tiny": a
TAESD, models/taesd.py, `pipe.tiny_decoder`). Live previews always use the tiny decoder when the
model has one; the final images use it when asked (vae_decoder="tiny", AUTOMATIC1111's "VAE
type for decode": Full / TAESD), and their PNG parameters then say "VAE Decoder: TAESD", as
A1111's do. The tiny decoder takes the UNet's latents as diffusers' pipelines hand latents to
an AutoencoderTiny: divided by its scaling_factor (1.0 for madebyollin's), plus its
shift_factor."""
import torch

from ..errors import InputError

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


@torch.no_grad()
def tiny_decode(tiny, latents):
    """The UNet's latents (B, C, h, w) -> (B, 3, h*f, w*f) in [-1, 1] by the tiny decoder."""
    c = tiny.config
    dtype = next(tiny.parameters()).dtype
    return tiny.decode((latents / c.scaling_factor + c.shift_factor).to(dtype))


def for_inference(tiny):
    """The tiny decoder as pipelines run it: eval mode, channels-last convolutions (as the
    VAE's: models/vae.for_inference)."""
    return tiny.eval().to(memory_format=torch.channels_last)
