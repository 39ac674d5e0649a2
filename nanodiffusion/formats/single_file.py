"""Original single-file (LDM / CompVis) Stable Diffusion checkpoints, read and written: the
layout AUTOMATIC1111 and ComfyUI load. Key renames live in ldm_keys.py; this file reads the
architecture off the tensors (with LDMHints for what they cannot tell), the prediction type
(diffusers' guess, or a .yaml beside), and the record our own single files carry.
"""
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..diffusion import ScheduleConfig
from ..models.clip import CLIPTextConfig
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from . import Parts, ldm_keys
from .checkpoint import atomic_write, config_from_dict
from .diffusers import build_sd_modules
from .files import key_list, read_checkpoint
from .ldm_keys import indices

@dataclass
class LDMHints:
    """What the tensors of a single file cannot tell; the defaults are Stable Diffusion's."""
    unet_num_heads: tuple | None = None   # None: SD 1.x 8 per level, SD 2.x channels // 64
    text_num_heads: int | None = None     # None: width // 64 (CLIP-L 12, OpenCLIP ViT-H 16)
    norm_groups: int = 32                 # GroupNorm groups of the UNet and of the VAE
    upcast_attention: bool | None = None  # None: True for SD 2.x (2.1 needs it, 2.0 is unhurt)
    scaling_factor: float = 0.18215       # VAE latent scale (SD 1.x and 2.x)


def _dim(sd: dict, key: str, dim: int) -> int:
    if key not in sd:
        raise ValueError(f"cannot infer the architecture: the weights lack {key}")
    return sd[key].shape[dim]


def infer_unet_config(sd: dict, version: str, hints: LDMHints) -> UNetConfig:
    """A UNetConfig read off diffusers-layout UNet weights (heads and groups from hints)."""
    levels, layers = len(indices(sd, "down_blocks.")), len(indices(sd, "down_blocks.0.resnets."))
    channels = tuple(_dim(sd, f"down_blocks.{b}.resnets.0.conv1.weight", 0) for b in range(levels))
    heads = hints.unet_num_heads or ((8,) * levels if version == "v1" else
                                     tuple(c // 64 for c in channels))  # SD 2.x: 64 per head
    if len(heads) != levels or any(h < 1 or c % h for c, h in zip(channels, heads)):
        raise ValueError(f"UNet heads {heads} do not fit {levels} levels of {channels} channels;"
                         " give LDMHints(unet_num_heads=...)")
    image = sd.get("encoder_hid_proj.image_embeds.weight")  # (tokens * context, image_embed_dim)
    context = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), 768)
    return UNetConfig(
        in_channels=_dim(sd, "conv_in.weight", 1), out_channels=_dim(sd, "conv_out.weight", 0),
        block_channels=channels, layers_per_block=layers,
        attention_levels=tuple(f"down_blocks.{b}.attentions.0.norm.weight" in sd
                               for b in range(levels)),
        num_heads=tuple(heads), transformer_layers=len(
            indices(sd, "mid_block.attentions.0.transformer_blocks.")) or 1,
        context_dim=context,  # SD 2.x: proj_in is a Linear (2-D weight), SD 1.x a 1x1 conv
        linear_projection=any(v.ndim == 2 for k, v in sd.items() if k.endswith("proj_in.weight")),
        upcast_attention=(version == "v2" if hints.upcast_attention is None
                          else hints.upcast_attention),
        norm_groups=hints.norm_groups,
        image_embed_dim=None if image is None else image.shape[1],
        image_tokens=UNetConfig.image_tokens if image is None else image.shape[0] // context,
        pooled_text_dim=(_dim(sd, "class_embedding.linear_1.weight", 1)
                         if "class_embedding.linear_1.weight" in sd else None))


def infer_vae_config(sd: dict, hints: LDMHints) -> VAEConfig:
    levels = len(indices(sd, "encoder.down_blocks."))
    return VAEConfig(
        in_channels=_dim(sd, "encoder.conv_in.weight", 1),
        out_channels=_dim(sd, "decoder.conv_out.weight", 0),
        latent_channels=_dim(sd, "decoder.conv_in.weight", 1),
        block_channels=tuple(_dim(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0)
                             for i in range(levels)),
        layers_per_block=len(indices(sd, "encoder.down_blocks.0.resnets.")),
        norm_groups=hints.norm_groups, scaling_factor=hints.scaling_factor,
        mid_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)


def infer_clip_text_config(sd: dict, version: str, hints: LDMHints) -> CLIPTextConfig:
    width = _dim(sd, "embeddings.token_embedding.weight", 1)
    v2 = version == "v2"  # OpenCLIP ViT-H: gelu, and SD 2.x pads with token 0
    return CLIPTextConfig(
        vocab_size=_dim(sd, "embeddings.token_embedding.weight", 0),
        max_positions=_dim(sd, "embeddings.position_embedding.weight", 0), width=width,
        num_layers=len(indices(sd, "encoder.layers.")),
        num_heads=hints.text_num_heads or width // 64,
        mlp_dim=_dim(sd, "encoder.layers.0.mlp.fc1.weight", 0),
        activation="gelu" if v2 else "quick_gelu", pad_token_id=0 if v2 else 49407)


def ldm_to_diffusers(sd: dict, *, use_ema: bool = True, hints: LDMHints | None = None,
                     configs: dict | None = None) -> dict:
    """A single-file SD 1.x / 2.x checkpoint -> {"unet", "vae", "text": diffusers-layout state
    dicts (None where the file has no such part), "info": {"version", "inpainting", "ema",
    "unet_config", "vae_config", "text_config"}}. Every key must be used or on an ignore list.
    The configs are read off the tensors and `hints`, unless `configs` gives them (the keys
    "unet_config", "vae_config", "text_config": a file that records its own)."""
    hints = hints or LDMHints()
    version = ldm_keys.detect_version(sd)
    unet, accounted, ema = ldm_keys.unet_from_ldm(sd, use_ema)
    vae, used_vae = ldm_keys.vae_from_ldm(sd)
    text, used_text = ldm_keys.text_from_ldm(sd, version)
    unused = set(sd) - accounted - used_vae - used_text - set(ldm_keys.IGNORED_KEYS)
    if unused:
        raise ValueError(f"{len(unused)} keys of the checkpoint were not used: {key_list(unused)}")
    if configs is None:
        configs = {"unet_config": infer_unet_config(unet, version, hints),
                   "vae_config": None if vae is None else infer_vae_config(vae, hints),
                   "text_config": None if text is None else
                   infer_clip_text_config(text, version, hints)}
    info = {"version": version, "inpainting": configs["unet_config"].in_channels == 9,
            "ema": ema, **{k: configs[k] for k in ("unet_config", "vae_config", "text_config")}}
    return {"unet": unet, "vae": vae, "text": text, "info": info}


def diffusers_to_ldm(unet_sd: dict, vae_sd: dict | None, text_sd: dict | None,
                     version: str) -> dict:
    """diffusers-layout state dicts -> one single-file (LDM) state dict that A1111 and ComfyUI
    load. v1 writes no position_ids buffer (1130 keys for SD 1.5). v2 writes our 23 text layers
    as OpenCLIP resblocks 0..22 plus an identity resblocks.23 and text_projection, so the file
    has the full 24-layer key set; SD 2.x loaders read the penultimate layer, which is ours."""
    if version not in ("v1", "v2"):
        raise ValueError(f"version={version!r}: only 'v1' and 'v2' are supported"
                         + (" (SDXL is not supported yet)" if version == "xl" else ""))
    out = ldm_keys.unet_to_ldm(unet_sd)
    if vae_sd is not None:
        out.update(ldm_keys.vae_to_ldm(vae_sd))
    if text_sd is not None:
        out.update(ldm_keys.text_to_ldm(text_sd, version))
    return out


def read_single_file(path, device="cpu", dtype=torch.float32, prediction_type=None,
                     hints=None):
    """An original (LDM / CompVis) checkpoint: one file with UNet, VAE and text encoder. A file
    we wrote records our configs, schedule, defaults and tokenizer (MODEL_KEY) and comes back
    as it was. Other files: `hints` (LDMHints) say what the tensors cannot (heads,
    GroupNorm groups; Stable Diffusion's by default). The prediction type, which LDM files do
    not store, is `prediction_type` if given, else what a `<stem>.yaml` beside the file says
    (`sidecar_prediction_type`), else the record's, else `ldm_prediction_type`'s guess.
    -> Parts of kind "sd"."""
    path = Path(path)
    meta = _metadata(path)
    record = _read_record(path, meta)
    # each tensor in dtype as it is read, or left in the file's mapping (none of the
    # unused ones, EMA twins and the like, is ever read)
    sd, global_step = read_checkpoint(path, dtype, mapped=True)
    try:
        parts = ldm_to_diffusers(sd, hints=hints or _read_hints(path, meta), configs=record)
    except ValueError as e:  # the conversion names keys and shapes; the file is named here
        raise ValueError(f"{path}: {e}") from e
    del sd  # the parts hold what is used: the rest of the file (EMA twins, ...) goes now
    info = parts["info"]
    missing = [name for name in ("vae", "text") if parts[name] is None]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {' and no '.join(missing)} weights "
                         "(a UNet-only file); a whole Stable Diffusion checkpoint is needed")
    try:
        modules = build_sd_modules(info["unet_config"], parts["unet"], info["vae_config"],
                                   parts["vae"], info["text_config"], parts["text"], path,
                                   device, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}. A single file does not record heads or GroupNorm groups; "
                         "for a model not shaped like Stable Diffusion give "
                         "hints=LDMHints(...)") from e
    predicted = prediction_type or sidecar_prediction_type(path)
    if record is not None:
        schedule, tok, defaults, name = (record[k] for k in ("schedule", "tokenizer",
                                                              "defaults", "name"))
        if predicted is not None:
            schedule = dataclasses.replace(schedule, prediction_type=predicted)
    else:
        predicted = predicted or ldm_prediction_type(info, global_step)
        (schedule, tok, defaults), name = _sd_settings(info, predicted), path.stem
    return Parts("sd", name, str(path), modules, tok, schedule, defaults)


def _sd_settings(info, prediction_type):
    """Schedule, tokenizer and defaults of a Stable Diffusion single file (none recorded)."""
    v2 = info["version"] == "v2"
    tok = CLIPTokenizer.default(pad_token_id=0 if v2 else 49407)
    size = 768 if prediction_type == "v_prediction" else 512
    defaults = {"steps": 25, "guidance": 7.5, "sampler": "dpmpp-2m-karras", "width": size,
                "height": size}
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
        return LDMHints(**{**d, "unet_num_heads": tuple(d["unet_num_heads"])})
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable {HINTS_KEY} metadata ({e})") from None


def _read_record(path, meta):
    """What a single file of ours records (MODEL_KEY): {"unet_config", "vae_config",
    "text_config", "schedule", "defaults", "tokenizer", "name"}; None for other files. The
    defaults stay a dict (loading.py makes them the pipeline's Defaults)."""
    raw = meta.get(MODEL_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return {"unet_config": config_from_dict(UNetConfig, d["unet"]),
                "vae_config": config_from_dict(VAEConfig, d["vae"]),
                "text_config": config_from_dict(CLIPTextConfig, d["text_encoder"]),
                "schedule": config_from_dict(ScheduleConfig, d["schedule"]),
                "defaults": dict(d["defaults"]),
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
    rec = {"pad_token_id": tok.pad_token_id, "clean": tok.clean, "hf_pad_quirk": tok.hf_pad_quirk}
    clip = CLIPTokenizer.default()
    if tok.encoder != clip.encoder or tok.merges != clip.merges:
        rec.update(vocab=tok.encoder, merges=tok.merges)
    return rec


def _tokenizer_from(rec):
    kwargs = {k: rec[k] for k in ("pad_token_id", "clean", "hf_pad_quirk")}
    if "vocab" in rec:
        return CLIPTokenizer(rec["vocab"], rec["merges"], **kwargs)
    return CLIPTokenizer.default(**kwargs)


def save_single_file(pipe, path, dtype=None):
    """Write an original-layout single file (what AUTOMATIC1111 and ComfyUI load). Its metadata
    records our configs, schedule, defaults and tokenizer (MODEL_KEY), so that read_single_file
    gives the model back whatever its shapes; diffusers opens it with
    `StableDiffusionPipeline.from_single_file(path, config=<a diffusers folder of it>)`, or
    with its own configs if the model is shaped like a published Stable Diffusion."""
    version = "v2" if pipe.text_encoder.config.activation == "gelu" else "v1"
    sd = diffusers_to_ldm(pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict(), version)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in sd.items()}
    meta = {MODEL_KEY: json.dumps(_model_record(pipe))}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return Path(path)
