"""diffusers folders (model_index.json and a folder per part), read into Parts and written
back so that StableDiffusionPipeline.from_pretrained loads them. Config translation lives in
py; this file knows where the parts of a folder are.
"""
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..diffusion import ScheduleConfig
from ..models.clip import CLIPTextModel
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet
from ..models.vae import VAE
from ..samplers import diffusers_scheduler_for
from . import Parts
from .checkpoint import atomic_write
from .diffusers_config import (clip_text_config_from_transformers, clip_text_config_to_transformers,
                               unet_config_from_diffusers, unet_config_to_diffusers,
                               vae_config_from_diffusers, vae_config_to_diffusers)
from .files import build, read_state_dict

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
# The diffusers scheduler a folder names -> our sampler of the same arithmetic.
SCHEDULER_SAMPLERS = {
    "PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-ancestral",
    "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp-2m", "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm", "TCDScheduler": "tcd",
}
FEW_STEP_SAMPLERS = ("lcm", "tcd")


def default_settings(sampler, embedded_guidance, size):
    """What a diffusers folder is meant to run with, as its pipeline class would: 50 steps at
    guidance 7.5 (StableDiffusionPipeline); an LCM or TCD scheduler 4 steps, at guidance 8.5
    where the UNet embeds it (LatentConsistencyModelPipeline's default), else 1.0 (no CFG: an
    LCM-LoRA-style model saved with its scheduler)."""
    if sampler in FEW_STEP_SAMPLERS or embedded_guidance:
        return {"steps": 4, "guidance": 8.5 if embedded_guidance else 1.0,
                "sampler": sampler if sampler in FEW_STEP_SAMPLERS else "lcm",
                "width": size, "height": size}
    return {"steps": 50, "guidance": 7.5, "sampler": sampler, "width": size, "height": size}


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: broken JSON ({e})") from None


def _weights(folder, dtype=None):
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return read_state_dict(folder / name, dtype, mapped=True)
    raise ValueError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")


def build_sd_modules(unet_cfg, unet_sd, vae_cfg, vae_sd, text_cfg, text_sd, where, device,
                     dtype):
    """{"unet", "vae", "text_encoder", "clip": None} built strictly from diffusers-layout
    state dicts, or functions that read them (files.build), in that order; errors name `where`
    (the folder or file) and the part."""
    return {"unet": build(UNet, unet_cfg, unet_sd, f"{where} unet", device, dtype),
            "vae": build(VAE, vae_cfg, vae_sd, f"{where} vae", device, dtype),
            "text_encoder": build(CLIPTextModel, text_cfg, text_sd, f"{where} text encoder",
                                  device, dtype),
            "clip": None}


def read_vae_folder(folder, device="cpu", dtype=torch.float32):
    """A diffusers AutoencoderKL folder on its own (config.json and its weights, as a model
    folder's vae/, or stabilityai/sd-vae-ft-mse) -> VAE; errors name the folder."""
    folder = Path(folder)
    try:
        cfg = vae_config_from_diffusers(_read_json(folder / "config.json"))
    except ValueError as e:
        raise ValueError(e if str(folder) in str(e) else f"{folder}: {e}") from None
    return build(VAE, cfg, _weights(folder, dtype), str(folder), device, dtype)


def read_diffusers_folder(folder, device="cpu", dtype=torch.float32):
    """A diffusers Stable Diffusion folder -> Parts of kind "sd"."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (folder / part).is_dir():
            raise ValueError(f"{folder}: the diffusers component {part!r} is missing")
    unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    text_cfg = clip_text_config_from_transformers(
        _read_json(folder / "text_encoder" / "config.json"))

    def text_sd():
        return {k.removeprefix("text_model."): v for k, v in
                _weights(folder / "text_encoder", dtype).items()
                if not k.endswith("position_ids")}
    # each part read as it is built: one part's weights in memory at a time until it is built
    modules = build_sd_modules(unet_cfg, lambda: _weights(folder / "unet", dtype), vae_cfg,
                               lambda: _weights(folder / "vae", dtype), text_cfg, text_sd,
                               folder, device, dtype)
    sched_json = _read_json(folder / "scheduler" / "scheduler_config.json")
    # StableDiffusionPipeline.__init__ sets these on the scheduler it is given (a deprecation
    # shim all its users get); options the file leaves out stay `defaulted` (diffusers' record)
    schedule = dataclasses.replace(ScheduleConfig.from_diffusers(sched_json), steps_offset=1,
                                   clip_sample=False)
    tok = CLIPTokenizer.from_folder(folder / "tokenizer")
    size = _unet_sample_size(folder) * 2 ** (len(vae_cfg.block_channels) - 1)
    sampler = SCHEDULER_SAMPLERS.get(sched_json.get("_class_name"), "euler")
    defaults = default_settings(sampler, unet_cfg.time_cond_proj_dim is not None, size)
    return Parts("sd", folder.name, str(folder), modules, tok, schedule, defaults)


def _unet_sample_size(folder):
    size = _read_json(folder / "unet" / "config.json").get("sample_size", 64)
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def _save_weights(module, path, dtype):
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def save_diffusers_folder(pipe, folder, dtype=None):
    """Write a diffusers folder that StableDiffusionPipeline.from_pretrained loads (`pipe`: a
    Stable Diffusion pipeline, read for its parts and settings)."""
    folder = Path(folder)
    factor = pipe.vae_factor
    unet_json = {**unet_config_to_diffusers(pipe.unet.config),
                 "sample_size": pipe.defaults.height // factor}
    _write_json(folder / "unet" / "config.json", unet_json)
    _save_weights(pipe.unet, folder / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    _write_json(folder / "vae" / "config.json",
                {**vae_config_to_diffusers(pipe.vae.config),
                 "sample_size": pipe.defaults.height})
    _save_weights(pipe.vae, folder / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    _write_json(folder / "text_encoder" / "config.json",
                clip_text_config_to_transformers(pipe.text_encoder.config))
    _save_weights(pipe.text_encoder, folder / "text_encoder" / "model.safetensors", dtype)
    # diffusers pads prompts to model_max_length: the text encoder's positions, not always 77
    pipe.tokenizer.save(folder / "tokenizer", max_length=pipe.text_encoder.config.max_positions)
    cls, extra = diffusers_scheduler_for(pipe.defaults.sampler)
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_class_name": cls, **pipe.schedule_config.to_diffusers(), **extra})
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", cls],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False})
    return folder
