"""Whole models in foreign layouts: diffusers folders and original single-file checkpoints,
read into a Pipeline and written back. Key and config translation lives in convert.py; this
file only knows where the parts of a folder are."""
import dataclasses
import json
import re
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
    # StableDiffusionPipeline.__init__ sets these on the scheduler it is given (a deprecation
    # shim all its users get); options the file leaves out stay `defaulted` (diffusers' record)
    schedule = dataclasses.replace(ScheduleConfig.from_diffusers(sched_json), steps_offset=1,
                                   clip_sample=False)
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
    """An original (LDM / CompVis) checkpoint: one file with UNet, VAE and text encoder. A file
    we wrote records our configs, schedule, defaults and tokenizer (MODEL_KEY) and comes back
    as it was. Other files: `hints` (convert.LDMHints) say what the tensors cannot (heads,
    GroupNorm groups; Stable Diffusion's by default). The prediction type, which LDM files do
    not store, is `prediction_type` if given, else what a `<stem>.yaml` beside the file says
    (`sidecar_prediction_type`), else the record's, else `ldm_prediction_type`'s guess."""
    from .pipeline import Pipeline

    path = Path(path)
    meta = _metadata(path)
    record = _read_record(path, meta)
    sd, global_step = convert.read_checkpoint(path)
    try:
        parts = convert.ldm_to_diffusers(sd, hints=hints or _read_hints(path, meta),
                                         configs=record)
    except ValueError as e:  # the conversion names keys and shapes; the file is named here
        raise ValueError(f"{path}: {e}") from e
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
    predicted = prediction_type or sidecar_prediction_type(path)
    if record is not None:
        schedule, tok, defaults, name = (record[k] for k in ("schedule", "tokenizer",
                                                              "defaults", "name"))
        if predicted is not None:
            schedule = dataclasses.replace(schedule, prediction_type=predicted)
    else:
        predicted = predicted or ldm_prediction_type(info, global_step)
        (schedule, tok, defaults), name = _sd_settings(info, predicted), path.stem
    pipe = Pipeline(unet, vae, text, tok, schedule, defaults, name=name)
    pipe.source = str(path)
    return pipe


def _sd_settings(info, prediction_type):
    """Schedule, tokenizer and defaults of a Stable Diffusion single file (none recorded)."""
    from .models.tokenizer import CLIPTokenizer
    from .pipeline import Defaults

    v2 = info["version"] == "v2"
    tok = CLIPTokenizer.default(pad_token_id=0 if v2 else 49407)
    size = 768 if prediction_type == "v_prediction" else 512
    defaults = Defaults(steps=25, guidance=7.5, sampler="dpmpp-2m-karras", width=size,
                        height=size)
    return ScheduleConfig(prediction_type=prediction_type), tok, defaults


SD2_512_BASE_STEP = 875000  # the global_step stabilityai's SD 2.x 512-base files record


def ldm_prediction_type(info, global_step):
    """What an LDM file's model predicts, guessed as diffusers guesses it (single_file_utils,
    `_legacy_load_scheduler`): SD 2.x predicts v, except inpainting models and the 512-base
    files (global_step 875000), which predict noise, as SD 1.x does. `info` is
    ldm_to_diffusers' (version, inpainting); global_step None where the file has none."""
    if info["version"] == "v2" and not info["inpainting"] and global_step != SD2_512_BASE_STEP:
        return "v_prediction"
    return "epsilon"


LDM_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_PARAMETERIZATION = re.compile(r"""\s*parameterization\s*:\s*(["']?)([^"'\s#]*)\1\s*(#.*)?""")


def sidecar_prediction_type(path):
    """The prediction type the model config beside a single file says, as AUTOMATIC1111 and
    ComfyUI read it: `<stem>.yaml`, an ldm config whose `parameterization` is "eps" (ldm's
    default, when absent), "v" or "x0". None where there is no such file. A line match, not a
    YAML parser: the key appears once in these configs (model.params)."""
    yaml = Path(path).with_suffix(".yaml")
    if not yaml.is_file():
        return None
    found = {m.group(2) for m in map(_PARAMETERIZATION.fullmatch,
                                     yaml.read_text(errors="replace").splitlines()) if m}
    if len(found) > 1:
        raise ValueError(f"{yaml}: parameterization is given as {sorted(found)}; one expected")
    value = found.pop() if found else "eps"
    if value not in LDM_PARAMETERIZATION:
        raise ValueError(f"{yaml}: parameterization={value!r} is not supported; accepted: "
                         f"{', '.join(LDM_PARAMETERIZATION)}")
    return LDM_PARAMETERIZATION[value]


MODEL_KEY = "nanodiffusion_model"  # safetensors metadata of the single files we write
HINTS_KEY = "nanodiffusion_ldm_hints"  # what the files we wrote before MODEL_KEY carry


def _metadata(path):
    """The safetensors metadata of `path` ({} for other files)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _read_hints(path, meta):
    """The LDMHints an older single file of ours stores in its metadata; None for others."""
    raw = meta.get(HINTS_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return convert.LDMHints(**{**d, "unet_num_heads": tuple(d["unet_num_heads"])})
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable {HINTS_KEY} metadata ({e})") from None


def _read_record(path, meta):
    """What a single file of ours records (MODEL_KEY): {"unet_config", "vae_config",
    "text_config", "schedule", "defaults", "tokenizer", "name"}; None for other files."""
    from .checkpoint import config_from_dict
    from .models.clip import CLIPTextConfig
    from .models.unet import UNetConfig
    from .models.vae import VAEConfig
    from .pipeline import Defaults

    raw = meta.get(MODEL_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return {"unet_config": config_from_dict(UNetConfig, d["unet"]),
                "vae_config": config_from_dict(VAEConfig, d["vae"]),
                "text_config": config_from_dict(CLIPTextConfig, d["text_encoder"]),
                "schedule": config_from_dict(ScheduleConfig, d["schedule"]),
                "defaults": config_from_dict(Defaults, d["defaults"]),
                "tokenizer": _tokenizer_from(d["tokenizer"]), "name": str(d["name"])}
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: unreadable {MODEL_KEY} metadata ({e})") from None


def _model_record(pipe):
    as_dict = dataclasses.asdict
    return {"unet": as_dict(pipe.unet.config), "vae": as_dict(pipe.vae.config),
            "text_encoder": as_dict(pipe.text_encoder.config),
            "schedule": as_dict(pipe.schedule_config), "defaults": as_dict(pipe.defaults),
            "tokenizer": _tokenizer_record(pipe.tokenizer), "name": pipe.name}


def _tokenizer_record(tok):
    """The tokenizer's settings, and its vocabulary where it is not CLIP's own (which every
    installation has: not stored again)."""
    from .models.tokenizer import CLIPTokenizer

    rec = {"pad_token_id": tok.pad_token_id, "clean": tok.clean, "hf_pad_quirk": tok.hf_pad_quirk}
    clip = CLIPTokenizer.default()
    if tok.encoder != clip.encoder or tok.merges != clip.merges:
        rec.update(vocab=tok.encoder, merges=tok.merges)
    return rec


def _tokenizer_from(rec):
    from .models.tokenizer import CLIPTokenizer

    kwargs = {k: rec[k] for k in ("pad_token_id", "clean", "hf_pad_quirk")}
    if "vocab" in rec:
        return CLIPTokenizer(rec["vocab"], rec["merges"], **kwargs)
    return CLIPTokenizer.default(**kwargs)


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


def save_single_file(pipe, path, dtype=None):
    """Write an original-layout single file (what AUTOMATIC1111 and ComfyUI load). Its metadata
    records our configs, schedule, defaults and tokenizer (MODEL_KEY), so that load_single_file
    gives the model back whatever its shapes; diffusers opens it with
    `StableDiffusionPipeline.from_single_file(path, config=<a diffusers folder of it>)`, or
    with its own configs if the model is shaped like a published Stable Diffusion."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    version = "v2" if pipe.text_encoder.config.activation == "gelu" else "v1"
    sd = convert.diffusers_to_ldm(pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict(), version)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in sd.items()}
    meta = {MODEL_KEY: json.dumps(_model_record(pipe))}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return Path(path)
