"""A VAE on its own, as people download one to put in place of a model's (AUTOMATIC1111's
models/VAE, diffusers' `vae=`): an original (LDM) single file such as
vae-ft-mse-840000-ema-pruned.safetensors / .ckpt (`encoder.down.0...`, `decoder.up.0...`,
with or without the `first_stage_model.` prefix of a whole checkpoint), the same tensors under
diffusers' names, or a diffusers AutoencoderKL folder (config.json and its weights). The
renames and configs are those of whole models: ldm_keys.vae_from_ldm,
single_file.infer_vae_config, diffusers.read_vae_folder. pipelines/vae_swap.py swaps it in.
"""
from pathlib import Path

import torch

from ..models.vae import VAE
from .diffusers import read_vae_folder
from .files import build, key_list, read_checkpoint
from .ldm_keys import VAE_PREFIX, vae_from_ldm
from .single_file import infer_vae_config

# What VAE files carry beside the VAE, dropped as AUTOMATIC1111 drops them (sd_vae.py): the
# training loss's tensors (keys starting with "loss": LPIPS, discriminator, logvar) and the
# EMA bookkeeping of an ema-pruned file.
IGNORED_PREFIX = "loss"
IGNORED_KEYS = ("model_ema.decay", "model_ema.num_updates")
DIFFUSERS_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"  # a VAE under diffusers' names


def read_vae(path, hints, device="cpu", dtype=torch.float32):
    """The VAE at `path`, a file or a diffusers folder, built strictly. `hints`
    (single_file.LDMHints): its GroupNorm groups and latent scale, which a file does not
    record (a swap gives the model's); a folder's config.json says them. Errors (ValueError,
    FileNotFoundError) name the path."""
    path = Path(path)
    if path.is_dir():
        return read_vae_folder(path, device, dtype)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VAE file or folder")
    sd, _ = read_checkpoint(path, dtype, mapped=True)  # as single_file reads
    weights = vae_weights(sd, path)
    try:
        cfg = infer_vae_config(weights, hints)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return build(VAE, cfg, weights, str(path), device, dtype)


def vae_weights(sd, path):
    """A VAE file's tensors -> the VAE's weights under diffusers' names; a ValueError naming
    `path` when the file holds no VAE, or anything besides one (a UNet, a whole model)."""
    sd = {k: v for k, v in sd.items()
          if not k.startswith(IGNORED_PREFIX) and k not in IGNORED_KEYS}
    prefixed = any(k.startswith(VAE_PREFIX) for k in sd)
    src = sd if prefixed else {VAE_PREFIX + k: v for k, v in sd.items()}
    if VAE_PREFIX + DIFFUSERS_KEY in src:
        used = {k for k in src if k.startswith(VAE_PREFIX)}
        vae = {k[len(VAE_PREFIX):]: src[k] for k in used}
    else:
        vae, used = vae_from_ldm(src)
    shown = sorted(k if prefixed else k[len(VAE_PREFIX):] for k in set(src) - used)
    if not vae:
        raise ValueError(f"{path}: not a VAE: none of its {len(src)} tensors is an "
                         f"autoencoder's (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*,"
                         f" under LDM or diffusers names); it holds {key_list(shown, 8)}")
    if shown:
        raise ValueError(f"{path}: not a VAE file: beside the VAE it holds {len(shown)} other "
                         f"tensors ({key_list(shown, 8)}); a whole model is given as the model, "
                         f"not as its VAE")
    return vae
