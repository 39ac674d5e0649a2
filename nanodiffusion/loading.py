"""Find and open a model: our own folder (model.json), a diffusers folder (model_index.json), an
original single-file checkpoint, a hub id, or the bundled default. And write our folder back.

Our folder: model.json (kind, schedule, defaults, which file is which part) beside safetensors
files that each describe their own model (checkpoint.py) and a tokenizer/ folder.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from . import checkpoint
from .diffusion import ScheduleConfig

FORMAT = "nanodiffusion/1"
BUNDLED = Path(__file__).parent / "weights"
BUNDLED_NAMES = {"shapes": "shapes", "shapes-unclip": "shapes-unclip"}


def resolve(path):
    """A name or path -> a local path; None means the bundled default model."""
    if path is None:
        path = "shapes"
    if isinstance(path, str) and path in BUNDLED_NAMES:
        p = BUNDLED / BUNDLED_NAMES[path]
        if not (p / "model.json").exists():
            raise FileNotFoundError(f"the bundled model {path!r} is not shipped with this "
                                    f"version of nanodiffusion (it would be at {p}); give "
                                    f"the path of a model folder instead")
        return p
    p = Path(path).expanduser()
    if p.exists():
        return p
    if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/")):
        return _from_hub(path)
    raise FileNotFoundError(f"no model at {path!r}: give a folder (ours or diffusers'), a "
                            f".safetensors/.ckpt file, a hub id, or one of "
                            f"{sorted(BUNDLED_NAMES)}")


def model_kind(path=None):
    """"unclip" or "sd": the pipeline that load_pipeline(path) returns, read from model.json
    without loading weights (diffusers folders and single files are "sd")."""
    p = resolve(path)
    if p.is_dir() and (p / "model.json").exists():
        return "unclip" if _read_json(p / "model.json").get("kind") == "unclip" else "sd"
    return "sd"


def _from_hub(repo_id):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id!r} is not a local path, and huggingface_hub is not "
                                f"installed to fetch it (pip install 'nanodiffusion[hub]')")
    return Path(snapshot_download(repo_id, allow_patterns=[
        "*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors",
        "text_encoder/*.safetensors"]))


def load_pipeline(path=None, device="cpu", dtype=torch.float32, prediction_type=None,
                  hints=None):
    """Open any supported model as a Pipeline. `prediction_type` and `hints` (convert.LDMHints)
    apply to single files only, which do not record them."""
    p = resolve(path)
    if p.is_dir() and (prediction_type is not None or hints is not None):
        raise ValueError(f"{p}: prediction_type and hints are for single files; a folder's "
                         "configs already say them")
    if p.is_dir() and (p / "model.json").exists():
        return _load_ours(p, device, dtype)
    if p.is_dir() and (p / "model_index.json").exists():
        from .convert_folders import load_diffusers_folder

        return load_diffusers_folder(p, device, dtype)
    if p.is_file() and p.suffix in (".safetensors", ".ckpt", ".pt", ".bin", ".pth"):
        from .convert_folders import load_single_file

        return load_single_file(p, device, dtype, prediction_type=prediction_type, hints=hints)
    raise ValueError(f"{p}: not a model: expected a folder with model.json (ours) or "
                     f"model_index.json (diffusers), or a .safetensors / .ckpt file")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None


def _load_ours(folder, device, dtype):
    from .models.tokenizer import CLIPTokenizer
    from .pipeline import Defaults, Pipeline

    meta = _read_json(folder / "model.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / 'model.json'}: format {meta.get('format')!r}, expected "
                         f"{FORMAT!r}")
    if meta.get("kind") == "unclip":
        from .unclip import load_unclip_folder

        return load_unclip_folder(folder, meta, device, dtype)
    files = meta["files"]

    def part(name):
        return checkpoint.load_model(folder / files[name], dtype=dtype, device=device) \
            if name in files else None
    clip = part("clip")
    text = part("text_encoder")
    if text is None and clip is not None:
        text = clip.text_model
    if text is None:
        raise ValueError(f"{folder}: model.json names neither a text_encoder nor a clip file")
    schedule = checkpoint.config_from_dict(ScheduleConfig, meta["schedule"])
    defaults = checkpoint.config_from_dict(Defaults, meta.get("defaults", {}))
    tok = CLIPTokenizer.from_folder(folder / "tokenizer")
    pipe = Pipeline(part("unet"), part("vae"), text, tok, schedule, defaults, clip=clip,
                    name=meta.get("name", folder.name))
    pipe.source = str(folder)
    return pipe


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


def save_folder(folder, *, unet, vae, tokenizer, schedule, defaults, name, clip=None,
                text_encoder=None, dtype=None):
    """Write our model folder from part files (paths) or modules. `dtype=torch.float16` halves
    the files (compute stays float32: loading upcasts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_parts(folder, {"unet": unet, "vae": vae, "clip": clip,
                                 "text_encoder": text_encoder}, tokenizer, dtype)
    meta = {"format": FORMAT, "kind": "sd", "name": name, "files": files,
            "schedule": dataclasses.asdict(schedule), "defaults": dataclasses.asdict(defaults)}
    checkpoint.atomic_write(folder / "model.json",
                            lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


def save_pipeline(pipe, folder, dtype=None):
    """Write a loaded Pipeline as our folder (a model imported from diffusers included)."""
    return save_folder(folder, unet=pipe.unet, vae=pipe.vae, tokenizer=pipe.tokenizer,
                       schedule=pipe.schedule_config, defaults=pipe.defaults, name=pipe.name,
                       clip=pipe.clip, text_encoder=None if pipe.clip is not None else
                       pipe.text_encoder, dtype=dtype)
