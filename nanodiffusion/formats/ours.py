"""Our model folder: model.json (format, kind, name, schedule, defaults, which file is which
part) beside safetensors files that each describe their own model (checkpoint.py) and a
tokenizer/ folder. Kind "sd": unet, vae, and a text_encoder or a whole clip; kind "unclip":
prior, decoder, vae, clip, and the prior's own schedule.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ..diffusion import PRIOR_SCHEDULE, ScheduleConfig
from ..models.tokenizer import CLIPTokenizer
from . import Parts, checkpoint
from .checkpoint import FORMAT

SD_PARTS = ("clip", "text_encoder", "unet", "vae")
UNCLIP_PARTS = ("prior", "decoder", "vae", "clip")
OPTIONAL_PARTS = ("tiny_decoder",)  # either kind: a TAESD in the VAE's latent space


def read_meta(folder):
    """The model.json of our folder, as a dict."""
    path = Path(folder) / "model.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None


def read_folder(folder, device="cpu", dtype=torch.float32):
    """Our folder (either kind) -> Parts."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / 'model.json'}: format {meta.get('format')!r}, expected "
                         f"{FORMAT!r}")
    files, unclip = meta["files"], meta.get("kind") == "unclip"
    names = UNCLIP_PARTS if unclip else SD_PARTS
    if unclip and any(p not in files for p in names):
        raise ValueError(f"{folder / 'model.json'}: an unclip model needs files {list(names)}, "
                         f"missing {[p for p in names if p not in files]}")
    modules = {p: checkpoint.load_model(folder / files[p], dtype=dtype, device=device)
               for p in names + OPTIONAL_PARTS if p in files}
    return Parts(
        "unclip" if unclip else "sd", meta.get("name", folder.name), str(folder),
        modules if unclip else _sd_modules(folder, modules),
        CLIPTokenizer.from_folder(folder / "tokenizer"),
        checkpoint.config_from_dict(ScheduleConfig, meta["schedule"]), meta.get("defaults", {}),
        prior_schedule=(checkpoint.config_from_dict(ScheduleConfig, meta["prior_schedule"])
                        if unclip else None),
        decoder_text=meta.get("decoder_text", False))


def _sd_modules(folder, modules):
    """unet, vae, clip and the text encoder (the clip's text model where no file names one)."""
    clip, text = modules.get("clip"), modules.get("text_encoder")
    if text is None and clip is not None:
        text = clip.text_model
    if text is None:
        raise ValueError(f"{folder}: model.json names neither a text_encoder nor a clip file")
    return {"unet": modules.get("unet"), "vae": modules.get("vae"), "text_encoder": text,
            "clip": clip, "tiny_decoder": modules.get("tiny_decoder")}


def write_parts(folder, parts, tokenizer, dtype=None):
    """Write each part (a module or a path to one of our files; None: skipped) as
    <name>.safetensors and the tokenizer (object or folder) as tokenizer/; -> {name: file}."""
    files = {}
    for key, src in parts.items():
        if src is None:
            continue
        files[key] = f"{key}.safetensors"
        if isinstance(src, (str, Path)):
            src = checkpoint.load_model(src)
        checkpoint.save_model(src, folder / files[key], dtype=dtype)
    tok_dir = folder / "tokenizer"
    if isinstance(tokenizer, (str, Path)):
        if Path(tokenizer).resolve() != tok_dir.resolve():
            shutil.copytree(tokenizer, tok_dir, dirs_exist_ok=True)
    else:
        tokenizer.save(tok_dir)
    return files


def _write_meta(folder, meta):
    checkpoint.atomic_write(folder / "model.json",
                            lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


def save_folder(folder, *, unet, vae, tokenizer, schedule, defaults, name, clip=None,
                text_encoder=None, dtype=None, tiny_decoder=None):
    """Write our model folder (kind "sd") from part files (paths) or modules.
    `dtype=torch.float16` halves the files (compute stays float32: loading upcasts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_parts(folder, {"unet": unet, "vae": vae, "clip": clip,
                                 "text_encoder": text_encoder, "tiny_decoder": tiny_decoder},
                        tokenizer, dtype)
    return _write_meta(folder, {
        "format": FORMAT, "kind": "sd", "name": name, "files": files,
        "schedule": dataclasses.asdict(schedule), "defaults": dataclasses.asdict(defaults)})


def save_pipeline(pipe, folder, dtype=None):
    """Write a loaded Stable Diffusion pipeline as our folder (one imported from diffusers
    included)."""
    return save_folder(folder, unet=pipe.unet, vae=pipe.vae, tokenizer=pipe.tokenizer,
                       schedule=pipe.schedule_config, defaults=pipe.defaults, name=pipe.name,
                       clip=pipe.clip, text_encoder=None if pipe.clip is not None else
                       pipe.text_encoder, dtype=dtype, tiny_decoder=pipe.tiny_decoder)


def save_unclip_folder(folder, *, prior, decoder, vae, clip, tokenizer, schedule, defaults,
                       name, prior_schedule=PRIOR_SCHEDULE, dtype=None, decoder_text=False,
                       tiny_decoder=None):
    """Write model.json (kind "unclip"), the four part files (paths or modules), a tiny
    decoder's where given, and tokenizer/ (a folder path or a tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = dict(zip(UNCLIP_PARTS, (prior, decoder, vae, clip)), tiny_decoder=tiny_decoder)
    files = write_parts(folder, parts, tokenizer, dtype)
    return _write_meta(folder, {
        "format": FORMAT, "kind": "unclip", "name": name, "files": files,
        "schedule": dataclasses.asdict(schedule),
        "prior_schedule": dataclasses.asdict(prior_schedule),
        "defaults": dataclasses.asdict(defaults), "decoder_text": bool(decoder_text)})


def save_unclip_pipeline(pipe, folder, dtype=None):
    """Write a loaded unCLIP pipeline as our folder."""
    return save_unclip_folder(folder, prior=pipe.prior, decoder=pipe.decoder, vae=pipe.vae,
                              clip=pipe.clip, tokenizer=pipe.tokenizer,
                              schedule=pipe.schedule_config, defaults=pipe.defaults,
                              name=pipe.name, prior_schedule=pipe.prior_schedule, dtype=dtype,
                              decoder_text=pipe.decoder_text, tiny_decoder=pipe.tiny_decoder)
