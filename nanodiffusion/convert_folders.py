"""Whole models in foreign layouts: diffusers folders and original single-file checkpoints,
read into a Pipeline and written back. Key and config translation lives in convert.py; this
file only knows where the parts of a folder are."""
import dataclasses
import json
from pathlib import Path

import torch

from . import convert
from .diffusion import ScheduleConfig

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
# The diffusers scheduler a folder names -> our sampler of the same arithmetic.
SCHEDULER_SAMPLERS = {
    "PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-ancestral",
    "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp-2m", "UniPCMultistepScheduler": "unipc",
}


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: broken JSON ({e})") from None


def _weights(folder):
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return convert.read_state_dict(folder / name)
    raise ValueError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")


def _build(cls, cfg, sd, name, device, dtype):
    with torch.device("meta"):
        model = cls(cfg)
    convert.check_state_dict(model, sd, name)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def _components(unet_cfg, unet_sd, vae_cfg, vae_sd, text_cfg, text_sd, where, device, dtype):
    from .models.clip import CLIPTextModel
    from .models.unet import UNet
    from .models.vae import VAE

    unet = _build(UNet, unet_cfg, unet_sd, f"{where} unet", device, dtype)
    vae = _build(VAE, vae_cfg, vae_sd, f"{where} vae", device, dtype)
    text = _build(CLIPTextModel, text_cfg, text_sd, f"{where} text encoder", device, dtype)
    return unet, vae, text


def load_diffusers_folder(folder, device="cpu", dtype=torch.float32):
    from .models.tokenizer import CLIPTokenizer
    from .pipeline import Defaults, Pipeline

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (folder / part).is_dir():
            raise ValueError(f"{folder}: the diffusers component {part!r} is missing")
    unet_cfg = convert.unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae_cfg = convert.vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    text_cfg = convert.clip_text_config_from_transformers(
        _read_json(folder / "text_encoder" / "config.json"))
    text_sd = _weights(folder / "text_encoder")
    text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()
               if not k.endswith("position_ids")}
    unet, vae, text = _components(unet_cfg, _weights(folder / "unet"), vae_cfg,
                                  _weights(folder / "vae"), text_cfg, text_sd, folder, device,
                                  dtype)
    sched_json = _read_json(folder / "scheduler" / "scheduler_config.json")
    schedule = ScheduleConfig.from_diffusers(sched_json)
    tok = CLIPTokenizer.from_folder(folder / "tokenizer")
    size = _unet_sample_size(folder) * 2 ** (len(vae_cfg.block_channels) - 1)
    sampler = SCHEDULER_SAMPLERS.get(sched_json.get("_class_name"), "euler")
    defaults = Defaults(steps=50, guidance=7.5, sampler=sampler, width=size, height=size)
    pipe = Pipeline(unet, vae, text, tok, schedule, defaults, name=folder.name)
    pipe.source = str(folder)
    return pipe


def _unet_sample_size(folder):
    size = _read_json(folder / "unet" / "config.json").get("sample_size", 64)
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def load_single_file(path, device="cpu", dtype=torch.float32, prediction_type=None,
                     hints=None):
    """An original (LDM / CompVis) checkpoint: one file with UNet, VAE and text encoder.
    `hints` (convert.LDMHints) say what the tensors cannot: heads, GroupNorm groups; by default
    the ones a file we wrote carries in its metadata, else Stable Diffusion's."""
    from .models.tokenizer import CLIPTokenizer
    from .pipeline import Defaults, Pipeline

    path = Path(path)
    hints = hints or _read_hints(path)
    parts = convert.ldm_to_diffusers(convert.read_state_dict(path), hints=hints)
    info = parts["info"]
    missing = [name for name in ("vae", "text") if parts[name] is None]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {' and no '.join(missing)} weights "
                         "(a UNet-only file); a whole Stable Diffusion checkpoint is needed")
    try:
        unet, vae, text = _components(info["unet_config"], parts["unet"], info["vae_config"],
                                      parts["vae"], info["text_config"], parts["text"], path,
                                      device, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}. A single file does not record heads or GroupNorm groups; "
                         "for a model not shaped like Stable Diffusion give "
                         "hints=convert.LDMHints(...)") from e
    v2 = info["version"] == "v2"
    # Not stored in the file: SD 2.x 768 models predict v, 512-base and SD 1.x predict noise.
    prediction_type = prediction_type or ("v_prediction" if v2 else "epsilon")
    schedule = ScheduleConfig(prediction_type=prediction_type)
    tok = CLIPTokenizer.default(pad_token_id=0 if v2 else 49407)
    size = 768 if prediction_type == "v_prediction" else 512
    defaults = Defaults(steps=25, guidance=7.5, sampler="dpmpp-2m-karras", width=size,
                        height=size)
    pipe = Pipeline(unet, vae, text, tok, schedule, defaults, name=path.stem)
    pipe.source = str(path)
    return pipe


HINTS_KEY = "nanodiffusion_ldm_hints"  # safetensors metadata of the single files we write


def _read_hints(path):
    """The LDMHints a single file we wrote stores in its metadata; None for other files."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(HINTS_KEY)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return convert.LDMHints(**{**d, "unet_num_heads": tuple(d["unet_num_heads"])})
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable {HINTS_KEY} metadata ({e})") from None


def _hints_of(pipe):
    """The LDMHints that rebuild `pipe`'s models from a single file."""
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    if unet.norm_groups != vae.norm_groups:
        raise ValueError(f"a single file cannot express UNet norm_groups={unet.norm_groups} "
                         f"with VAE norm_groups={vae.norm_groups} (LDM uses one value)")
    return convert.LDMHints(unet_num_heads=tuple(unet.num_heads), text_num_heads=text.num_heads,
                            norm_groups=unet.norm_groups, upcast_attention=unet.upcast_attention,
                            scaling_factor=vae.scaling_factor)


def _save_weights(module, path, dtype):
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def save_diffusers_folder(pipe, folder, dtype=None):
    """Write a diffusers folder that StableDiffusionPipeline.from_pretrained loads."""
    from .samplers import diffusers_scheduler_for

    folder = Path(folder)
    factor = pipe.vae_factor
    unet_json = {**convert.unet_config_to_diffusers(pipe.unet.config),
                 "sample_size": pipe.defaults.height // factor}
    _write_json(folder / "unet" / "config.json", unet_json)
    _save_weights(pipe.unet, folder / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    _write_json(folder / "vae" / "config.json",
                {**convert.vae_config_to_diffusers(pipe.vae.config),
                 "sample_size": pipe.defaults.height})
    _save_weights(pipe.vae, folder / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    _write_json(folder / "text_encoder" / "config.json",
                convert.clip_text_config_to_transformers(pipe.text_encoder.config))
    _save_weights(pipe.text_encoder, folder / "text_encoder" / "model.safetensors", dtype)
    pipe.tokenizer.save(folder / "tokenizer")
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


def save_single_file(pipe, path, dtype=None):
    """Write an original-layout single file (what AUTOMATIC1111 and ComfyUI load)."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    version = "v2" if pipe.text_encoder.config.activation == "gelu" else "v1"
    sd = convert.diffusers_to_ldm(pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict(), version)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in sd.items()}
    meta = {HINTS_KEY: json.dumps(dataclasses.asdict(_hints_of(pipe)))}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return Path(path)
