"""The one door: find a model (our folder, a diffusers folder, an original single-file
checkpoint, a hub id, or the bundled default), read it with formats/, and build its pipeline
(Pipeline, or UnCLIPPipeline for our folders of kind "unclip")."""
from pathlib import Path

import torch

from .formats import checkpoint, ours
from .formats.files import WEIGHT_SUFFIXES
from .formats.taesd import check_fits, read_taesd
from .malloc import trim
from .models.taesd import TAESD
from .pipelines import offload
from .pipelines.decoders import for_inference as tiny_for_inference
from .pipelines.sd import Defaults, Pipeline
from .pipelines.unclip import UnCLIPDefaults, UnCLIPPipeline

BUNDLED = Path(__file__).parent / "weights"
BUNDLED_NAMES = {"shapes": "shapes", "shapes-unclip": "shapes-unclip",
                 "shapes-lcm": "shapes-lcm"}


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
        return "unclip" if ours.read_meta(p).get("kind") == "unclip" else "sd"
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
                  hints=None, tiny_decoder=None, low_memory=False):
    """Open any supported model as a Pipeline (or UnCLIPPipeline). `prediction_type` and
    `hints` (single_file.LDMHints) apply to single files only, which do not record them.
    `tiny_decoder`: a TAESD to attach (attach_tiny_decoder), in place of the model's own.
    `low_memory`: a Stable Diffusion model's text encoder, UNet and VAE stay on disk except
    while each runs (Pipeline.set_low_memory), each put there as soon as it is built, before
    the next is read (pipelines/offload.py; a single file is read whole, all its parts
    together, before that)."""
    if not low_memory:
        pipe = build_pipeline(read_parts(path, device, dtype, prediction_type, hints))
        trim()  # what reading and building freed, given back (SD 1.5 bfloat16: 0.17-0.19 GB)
    elif model_kind(path) == "unclip":
        raise ValueError(f"{path}: low_memory is for Stable Diffusion models, not unCLIP ones")
    else:
        with offload.built_to_disk():
            parts = read_parts(path, device, dtype, prediction_type, hints)
        for key, module in parts.modules.items():  # the whole CLIP, a tiny decoder: in memory
            if module is not None and key not in offload.PARTS:
                offload.to_memory(module)
        pipe = build_pipeline(parts).set_low_memory(True)
    return pipe if tiny_decoder is None else attach_tiny_decoder(pipe, tiny_decoder)


def attach_tiny_decoder(pipe, tiny):
    """Give `pipe` a tiny decoder for live previews and vae_decoder="tiny": a TAESD, or a path
    that formats/taesd.read_taesd opens (diffusers' AutoencoderTiny folder, madebyollin's
    taesd_decoder.safetensors, our tiny_decoder.safetensors), checked against the pipeline's
    VAE (latent channels and factor); on the VAE's device, in its dtype. Returns `pipe`."""
    like = next(pipe.vae.parameters())
    where = str(tiny) if not isinstance(tiny, TAESD) else \
        f"{getattr(pipe, 'source', pipe.name)}: its tiny_decoder"
    if not isinstance(tiny, TAESD):
        tiny = read_taesd(tiny, device=like.device, dtype=like.dtype)
    check_fits(tiny, pipe.vae.config.latent_channels, pipe.vae_factor, where)
    pipe.tiny_decoder = tiny_for_inference(tiny.to(device=like.device, dtype=like.dtype))
    return pipe


def read_parts(path=None, device="cpu", dtype=torch.float32, prediction_type=None, hints=None):
    """The formats.Parts of any supported model, read by the reader of its format."""
    p = resolve(path)
    if p.is_dir() and (prediction_type is not None or hints is not None):
        raise ValueError(f"{p}: prediction_type and hints are for single files; a folder's "
                         "configs already say them")
    if p.is_dir() and (p / "model.json").exists():
        return ours.read_folder(p, device, dtype)
    if p.is_dir() and (p / "model_index.json").exists():
        from .formats.diffusers import read_diffusers_folder

        return read_diffusers_folder(p, device, dtype)
    if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
        from .formats.single_file import read_single_file

        return read_single_file(p, device, dtype, prediction_type=prediction_type, hints=hints)
    raise ValueError(f"{p}: not a model: expected a folder with model.json (ours) or "
                     f"model_index.json (diffusers), or a .safetensors / .ckpt file")


def build_pipeline(parts):
    """formats.Parts -> the pipeline of its kind, with `source` set to where it was read."""
    m = parts.modules
    if parts.kind == "unclip":
        pipe = UnCLIPPipeline(m["prior"], m["decoder"], m["vae"], m["clip"], parts.tokenizer,
                              parts.schedule, parts.prior_schedule,
                              _defaults(UnCLIPDefaults, parts), name=parts.name,
                              decoder_text=parts.decoder_text)
    else:
        pipe = Pipeline(m["unet"], m["vae"], m["text_encoder"], parts.tokenizer, parts.schedule,
                        _defaults(Defaults, parts), clip=m["clip"], name=parts.name)
    pipe.source = parts.source
    if m.get("tiny_decoder") is not None:
        attach_tiny_decoder(pipe, m["tiny_decoder"])
    return pipe


def _defaults(cls, parts):
    try:
        return checkpoint.config_from_dict(cls, parts.defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{parts.source}: unreadable defaults ({e})") from None
