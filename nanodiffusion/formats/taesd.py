"""Tiny autoencoders (TAESD, models/taesd.py) in the layouts they are published in, read into
a TAESD module (strictly, through files.check_state_dict; errors name the file):

- diffusers' AutoencoderTiny folder: config.json + diffusion_pytorch_model.safetensors, keys
  `encoder.layers.N.*` and `decoder.layers.N.*`, ours as they are;
- madebyollin's single files, taesd_encoder.safetensors / taesd_decoder.safetensors (also
  taesdxl_*, taef1_*, .pth): one nn.Sequential each, keys `N.*`. The encoder's indices are
  diffusers' `encoder.layers.N`; the decoder's start with its clamp at 0, so its N is
  diffusers' `decoder.layers.N-1` (diffusers' convert_tiny_autoencoder_to_diffusers does the
  same). The files carry no config: the blocks per stage are read off the keys (a block has
  `conv.*`; a bias-free conv ends a decoder stage or starts an encoder one; the conv with a
  bias is the last), and the strict load then checks that reading against every key;
- our own files (checkpoint.py, class TAESD), as the training part writes them.

A folder holding both of madebyollin's files gives one TAESD with encoder and decoder.
"""
import json
import re
from pathlib import Path

import torch

from ..models.taesd import TAESD, TAESDConfig
from . import checkpoint
from .files import WEIGHT_SUFFIXES, build, key_list, read_state_dict

DIFFUSERS_CLASS = "AutoencoderTiny"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")
# AutoencoderTiny options our TAESD implements at one value only (diffusers' defaults)
FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
# options with no effect on the weights' meaning (block_out_channels: a copy of the decoder's)
INFO = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
        "force_upcast",
        "block_out_channels")
DEFAULTS = {"in_channels": 3, "out_channels": 3, "encoder_block_out_channels": [64] * 4,
            "decoder_block_out_channels": [64] * 4, "latent_channels": 4,
            "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1],
            "latent_magnitude": 3, "latent_shift": 0.5, "scaling_factor": 1.0,
            "shift_factor": 0.0}


# ---------------------------------------------------------------- diffusers' config.json

def _width(values, name):
    """AutoencoderTiny takes a width per stage but builds its convs for one width only."""
    if len(set(values)) != 1:
        raise ValueError(f"{DIFFUSERS_CLASS} config: {name} {list(values)} are not all "
                         f"equal; its layers run with one width throughout")
    return int(values[0])


def config_from_diffusers(d):
    """AutoencoderTiny's config.json (dict) -> TAESDConfig; unsupported options: ValueError."""
    unknown = set(d) - set(DEFAULTS) - set(FIXED) - set(INFO)
    if unknown:
        raise ValueError(f"{DIFFUSERS_CLASS} config: unknown options {key_list(unknown)}")
    for key, value in FIXED.items():
        if d.get(key, value) != value:
            raise ValueError(f"{DIFFUSERS_CLASS} config: {key}={d[key]!r} is not supported "
                             f"(only {value!r})")
    c = {**DEFAULTS, **d}
    if c["in_channels"] != c["out_channels"]:
        raise ValueError(f"{DIFFUSERS_CLASS} config: in_channels {c['in_channels']} != "
                         f"out_channels {c['out_channels']} (one image width is supported)")
    for part in ("encoder", "decoder"):
        if len(c[f"{part}_block_out_channels"]) != len(c[f"num_{part}_blocks"]):
            raise ValueError(f"{DIFFUSERS_CLASS} config: {part}_block_out_channels and "
                             f"num_{part}_blocks differ in length")
    return TAESDConfig(
        image_channels=c["in_channels"], latent_channels=c["latent_channels"],
        encoder_channels=_width(c["encoder_block_out_channels"], "encoder_block_out_channels"),
        decoder_channels=_width(c["decoder_block_out_channels"], "decoder_block_out_channels"),
        encoder_blocks=tuple(c["num_encoder_blocks"]),
        decoder_blocks=tuple(c["num_decoder_blocks"]),
        latent_magnitude=float(c["latent_magnitude"]), latent_shift=float(c["latent_shift"]),
        scaling_factor=float(c["scaling_factor"]), shift_factor=float(c["shift_factor"]))


def config_to_diffusers(cfg):
    """TAESDConfig -> AutoencoderTiny's config (both halves needed: diffusers has no
    encoder- or decoder-only AutoencoderTiny)."""
    if not cfg.encoder_blocks or not cfg.decoder_blocks:
        raise ValueError(f"{DIFFUSERS_CLASS} has both an encoder and a decoder; this TAESD "
                         f"has only its {'decoder' if cfg.decoder_blocks else 'encoder'}")
    return {"_class_name": DIFFUSERS_CLASS, "in_channels": cfg.image_channels,
            "out_channels": cfg.image_channels, "latent_channels": cfg.latent_channels,
            "encoder_block_out_channels": [cfg.encoder_channels] * len(cfg.encoder_blocks),
            "decoder_block_out_channels": [cfg.decoder_channels] * len(cfg.decoder_blocks),
            "num_encoder_blocks": list(cfg.encoder_blocks),
            "num_decoder_blocks": list(cfg.decoder_blocks), **FIXED,
            "latent_magnitude": cfg.latent_magnitude, "latent_shift": cfg.latent_shift,
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor}


# ---------------------------------------------------------------- madebyollin's files

def _indices(sd, path):
    """{Sequential index: set of the rest of its keys}; other keys are a ValueError."""
    out = {}
    for k in sd:
        m = re.fullmatch(r"(\d+)\.(.+)", k)
        if m is None:
            raise ValueError(f"{path}: not a TAESD encoder or decoder file (key {k!r} is not "
                             f"an nn.Sequential index)")
        out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return dict(sorted(out.items()))


def _stages(layers, first):
    """Blocks per stage from the layers after the first conv (index `first`) -> (counts,
    index of the last conv). A bias-free conv ends a decoder stage / starts an encoder one."""
    counts, n = [], 0
    for i, keys in layers.items():
        if i <= first:
            continue
        if any(k.startswith("conv.") for k in keys):  # a block (a conv has weight, bias)
            n += 1
        elif "bias" in keys:
            return counts + [n], i
        else:
            counts.append(n)
            n = 0
    raise ValueError("no final conv (with a bias)")


def from_taesd_file(sd, path):
    """madebyollin's encoder or decoder file (tensors) -> (TAESDConfig, our keys)."""
    layers = _indices(sd, path)
    encoder = 0 in layers
    first = 0 if encoder else 1
    if f"{first}.weight" not in sd:
        raise ValueError(f"{path}: not a TAESD encoder or decoder file (no first conv, "
                         f"'0.weight' or '1.weight'; keys {key_list(sd)})")
    try:
        counts, last = _stages(layers, first)
    except ValueError as e:
        raise ValueError(f"{path}: not a TAESD encoder or decoder file ({e})") from None
    width, into = sd[f"{first}.weight"].shape[:2]
    out = sd[f"{last}.weight"].shape[0]
    if encoder:
        cfg = TAESDConfig(image_channels=into, latent_channels=out, encoder_channels=width,
                          encoder_blocks=tuple(counts), decoder_blocks=())
        return cfg, {f"encoder.layers.{k}": v for k, v in sd.items()}
    cfg = TAESDConfig(image_channels=out, latent_channels=into, decoder_channels=width,
                      encoder_blocks=(), decoder_blocks=tuple(counts))
    renamed = {}
    for k, v in sd.items():
        i, rest = k.split(".", 1)
        renamed[f"decoder.layers.{int(i) - 1}.{rest}"] = v  # index 0 was the clamp
    return cfg, renamed


def to_taesd_files(module):
    """A TAESD's halves in madebyollin's layout: {"encoder": tensors, "decoder": tensors},
    each where the module has it (the inverse of from_taesd_file)."""
    out = {}
    for k, v in module.state_dict().items():
        half, _, i, rest = k.split(".", 3)
        shift = 1 if half == "decoder" else 0
        out.setdefault(half, {})[f"{int(i) + shift}.{rest}"] = v.detach().cpu().contiguous()
    return out


def _merge(enc, dec, where):
    """Two single files' (config, tensors) -> one TAESD's."""
    (ce, se), (cd, sdd) = enc, dec
    for name in ("image_channels", "latent_channels"):
        if getattr(ce, name) != getattr(cd, name):
            raise ValueError(f"{where}: the encoder's {name} {getattr(ce, name)} != the "
                             f"decoder's {getattr(cd, name)}")
    cfg = TAESDConfig(image_channels=cd.image_channels, latent_channels=cd.latent_channels,
                      encoder_channels=ce.encoder_channels, decoder_channels=cd.decoder_channels,
                      encoder_blocks=ce.encoder_blocks, decoder_blocks=cd.decoder_blocks)
    return cfg, {**se, **sdd}


# ---------------------------------------------------------------- reading

def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: broken JSON ({e})") from None


def _single_files(folder):
    """madebyollin's *_encoder / *_decoder weight files in `folder`: {"encoder": path, ...}."""
    found = {}
    for half in ("encoder", "decoder"):
        paths = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES
                       and p.stem.endswith(f"_{half}"))
        if len(paths) > 1:
            raise ValueError(f"{folder}: several TAESD {half} files "
                             f"({', '.join(p.name for p in paths)}); give one file's path")
        if paths:
            found[half] = paths[0]
    return found


def _diffusers_weights(folder):
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    raise ValueError(f"{folder}: no weights file (looked for {', '.join(DIFFUSERS_WEIGHTS)})")


def _is_diffusers(config_path):
    return config_path.is_file() and \
        _read_json(config_path).get("_class_name") == DIFFUSERS_CLASS


def read_taesd(path, device="cpu", dtype=torch.float32):
    """A TAESD from a diffusers AutoencoderTiny folder, a folder of madebyollin's files, our
    own file (or a folder holding tiny_decoder.safetensors), or one of madebyollin's files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tiny autoencoder at {str(path)!r}")
    if path.is_dir():
        if _is_diffusers(path / "config.json"):
            return _read_diffusers(path, _diffusers_weights(path), device, dtype)
        if (path / "tiny_decoder.safetensors").is_file():
            return read_taesd(path / "tiny_decoder.safetensors", device, dtype)
        files = _single_files(path)
        if not files:
            raise ValueError(f"{path}: no tiny autoencoder here (expected an AutoencoderTiny "
                             f"config.json, tiny_decoder.safetensors, or madebyollin's "
                             f"taesd_decoder.safetensors / taesd_encoder.safetensors)")
        halves = [_half(p, half) for half, p in files.items()]
        cfg, sd = halves[0] if len(halves) == 1 else _merge(*halves, path)
        where = " + ".join(str(p) for p in files.values())
        return build(TAESD, cfg, sd, where, device, dtype)
    if path.suffix == ".safetensors" and \
            checkpoint.read_metadata(path).get("format") == checkpoint.FORMAT:
        model = checkpoint.load_model(path, dtype=dtype, device=device)
        if not isinstance(model, TAESD):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a tiny "
                             f"autoencoder (TAESD)")
        return model
    if _is_diffusers(path.parent / "config.json"):
        return _read_diffusers(path.parent, path, device, dtype)
    cfg, sd = from_taesd_file(read_state_dict(path), path)
    return build(TAESD, cfg, sd, str(path), device, dtype)


def _half(path, half):
    """A folder's *_encoder / *_decoder file -> (config, our keys), that half indeed."""
    cfg, sd = from_taesd_file(read_state_dict(path), path)
    if not getattr(cfg, f"{half}_blocks"):
        raise ValueError(f"{path}: named a TAESD {half}, but its keys are the other half's")
    return cfg, sd


def _read_diffusers(folder, weights, device, dtype):
    try:
        cfg = config_from_diffusers(_read_json(folder / "config.json"))
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    return build(TAESD, cfg, read_state_dict(weights), str(weights), device, dtype)


def check_fits(tiny, latent_channels, factor, where):
    """A ValueError naming `where` unless `tiny` decodes latents of `latent_channels` channels
    at `factor` pixels per latent (a model's VAE). Whether it was distilled from that VAE's
    latent space (SD 1.x's, not SDXL's) the weights cannot tell."""
    if tiny.decoder is None:
        raise ValueError(f"{where}: this tiny autoencoder has no decoder (an encoder file?)")
    c = tiny.config
    if c.latent_channels != latent_channels or tiny.downscale != factor:
        raise ValueError(f"{where}: the tiny decoder takes {c.latent_channels}-channel latents "
                         f"at {tiny.downscale} pixels per latent; this model's VAE makes "
                         f"{latent_channels}-channel latents at {factor}")
    return tiny


# ---------------------------------------------------------------- our model folders

FOLDER_ENTRY = "tiny_decoder"  # model.json "files" key of a model's tiny decoder


def attach_to_folder(folder, tiny, dtype=None):
    """Write `tiny` (a TAESD, or a path read_taesd opens) into our model folder as
    tiny_decoder.safetensors, named in its model.json "files"; checked against the folder's
    VAE first. `dtype` (e.g. torch.float16, as the bundled models) shrinks the file."""
    from .ours import read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    if not isinstance(tiny, TAESD):
        tiny = read_taesd(tiny)
    vae = checkpoint.load_model(folder / meta["files"]["vae"])
    check_fits(tiny, vae.config.latent_channels, vae.downscale, folder)
    name = f"{FOLDER_ENTRY}.safetensors"
    checkpoint.save_model(tiny, folder / name, dtype=dtype)
    meta["files"] = {**meta["files"], FOLDER_ENTRY: name}
    checkpoint.atomic_write(folder / "model.json",
                            lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder / name
