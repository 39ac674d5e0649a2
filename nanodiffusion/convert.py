"""Every foreign weight and config format <-> ours (DESIGN.md, convention 3).

- config.json of diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel
  <-> UNetConfig / VAEConfig / CLIPTextConfig, both ways; unsupported values raise ValueError.
- Original single-file checkpoints (LDM layout: A1111, ComfyUI) <-> diffusers-layout state
  dicts: `ldm_to_diffusers`, `diffusers_to_ldm` (the rename rules live in convert_ldm.py).
- Safe reading (`read_state_dict`: safetensors, or torch.load with weights_only=True) and
  strict loading with readable errors (`check_state_dict`).
"""
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import convert_ldm as ldm
from .convert_ldm import _indices, key_list
from .models.clip import CLIPTextConfig
from .models.unet import UNetConfig
from .models.vae import VAEConfig

# ---------------------------------------------------------------- diffusers UNet config.json

UNET_CLASS = "UNet2DConditionModel"
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
IMAGE_PROJ_TOKENS = 32  # diffusers' ImageProjection(num_image_text_embeds=32), not configurable
# diffusers options our UNet implements at one value only (the value is diffusers' default)
UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "dual_cross_attention": False,
    "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# the options we translate, with diffusers' defaults for configs that leave them out
UNET_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8, "num_attention_heads": None, "transformer_layers_per_block": 1,
    "use_linear_projection": False, "upcast_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "addition_embed_type": None, "class_embed_type": None,
    "projection_class_embeddings_input_dim": None,
}
INFO_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "sample_size",
             "force_upcast")  # descriptive or dtype hints, no effect on the weights' meaning


def _check_keys(d: dict, known, fixed: dict, what: str) -> None:
    unknown = set(d) - set(known) - set(fixed) - set(INFO_KEYS)
    if unknown:
        raise ValueError(f"{what} config: unknown options {key_list(unknown)}")
    for key, value in fixed.items():
        got = d.get(key, value)
        if any(v != value for v in (got if isinstance(got, list) else [got])):
            raise ValueError(f"{what} config: {key}={got!r} is not supported (only {value!r})")


def _one(value, name: str, n: int | None = None):
    """An option that diffusers allows per level but we keep as one value."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(set(value)) != 1 or (n is not None and len(value) != n):
        raise ValueError(f"{name}={value!r}: only one value for all levels is supported")
    return value[0]


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """UNet2DConditionModel config.json -> UNetConfig."""
    if d.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise ValueError(f"UNet config: _class_name={d['_class_name']!r}, expected {UNET_CLASS}")
    _check_keys(d, UNET_DEFAULTS, UNET_FIXED, "UNet")
    g = {**UNET_DEFAULTS, **d}
    bad = [t for t in g["down_block_types"] if t not in DOWN_TYPES]
    if bad:
        raise ValueError(f"UNet config: down_block_types {bad} not supported "
                         f"(only {list(DOWN_TYPES)})")
    attention = tuple(DOWN_TYPES[t] for t in g["down_block_types"])
    n = len(attention)
    if list(g["up_block_types"]) != [UP_TYPES[a] for a in reversed(attention)]:
        raise ValueError(f"UNet config: up_block_types {g['up_block_types']} do not mirror "
                         f"down_block_types {g['down_block_types']}")
    # diffusers' `attention_head_dim` is a number of heads when num_attention_heads is unset
    heads = g["num_attention_heads"] or g["attention_head_dim"]
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
    if len(heads) != n or len(g["block_out_channels"]) != n:
        raise ValueError(f"UNet config: {n} levels, but heads {heads} and block_out_channels "
                         f"{g['block_out_channels']}")
    return UNetConfig(
        in_channels=g["in_channels"], out_channels=g["out_channels"],
        block_channels=tuple(g["block_out_channels"]),
        layers_per_block=_one(g["layers_per_block"], "layers_per_block", n),
        attention_levels=attention, num_heads=heads, mid_num_heads=None,
        transformer_layers=_one(g["transformer_layers_per_block"],
                                "transformer_layers_per_block", n),
        context_dim=_one(g["cross_attention_dim"], "cross_attention_dim", n),
        linear_projection=g["use_linear_projection"], upcast_attention=g["upcast_attention"],
        norm_groups=g["norm_num_groups"], norm_eps=g["norm_eps"], **_image_embed_from(g),
        pooled_text_dim=_pooled_text_from(g))


def _pooled_text_from(g: dict):
    kind, dim = g["class_embed_type"], g["projection_class_embeddings_input_dim"]
    if kind is None:
        return None
    if kind != "projection" or not dim:
        raise ValueError(f"UNet config: class_embed_type={kind!r} is not supported (only "
                         "'projection' with a projection_class_embeddings_input_dim, or None)")
    return dim


def _image_embed_from(g: dict) -> dict:
    kinds = (g["encoder_hid_dim_type"], g["addition_embed_type"])
    if kinds == (None, None):
        return {}
    if kinds != ("image_proj", "image") or not g["encoder_hid_dim"]:
        raise ValueError(f"UNet config: encoder_hid_dim_type={kinds[0]!r} with "
                         f"addition_embed_type={kinds[1]!r} is not supported (only 'image_proj' "
                         "with 'image' and an encoder_hid_dim, or neither)")
    return {"image_embed_dim": g["encoder_hid_dim"], "image_tokens": IMAGE_PROJ_TOKENS}


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig -> UNet2DConditionModel config.json."""
    n = len(cfg.block_channels)
    if len(cfg.attention_levels) != n or len(cfg.num_heads) != n:
        raise ValueError(f"UNetConfig: {n} levels but attention_levels {cfg.attention_levels} "
                         f"and num_heads {cfg.num_heads}")
    if cfg.mid_num_heads not in (None, cfg.num_heads[-1]):
        raise ValueError(f"UNetConfig: mid_num_heads={cfg.mid_num_heads} is not expressible: "
                         f"diffusers' mid block uses the last level's {cfg.num_heads[-1]} heads")
    if cfg.image_embed_dim is not None and cfg.image_tokens != IMAGE_PROJ_TOKENS:
        raise ValueError(f"UNetConfig: image_tokens={cfg.image_tokens} is not expressible: "
                         f"diffusers' ImageProjection makes {IMAGE_PROJ_TOKENS} tokens")
    image = cfg.image_embed_dim is not None
    return {
        "_class_name": UNET_CLASS, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.layers_per_block,
        "down_block_types": [("CrossAttnDownBlock2D" if a else "DownBlock2D")
                             for a in cfg.attention_levels],
        "up_block_types": [UP_TYPES[a] for a in reversed(cfg.attention_levels)],
        "attention_head_dim": list(cfg.num_heads),  # diffusers' name for the number of heads
        "transformer_layers_per_block": cfg.transformer_layers,
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.linear_projection,
        "upcast_attention": cfg.upcast_attention, "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps, "encoder_hid_dim": cfg.image_embed_dim,
        "encoder_hid_dim_type": "image_proj" if image else None,
        "addition_embed_type": "image" if image else None,
        "class_embed_type": None if cfg.pooled_text_dim is None else "projection",
        "projection_class_embeddings_input_dim": cfg.pooled_text_dim,
    }


# ---------------------------------------------------------------- diffusers VAE config.json

VAE_CLASS = "AutoencoderKL"
VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
             "use_quant_conv": True, "use_post_quant_conv": True}
VAE_KNOWN = ("in_channels", "out_channels", "down_block_types", "up_block_types",
             "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
             "scaling_factor", "mid_block_add_attention")


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """AutoencoderKL config.json -> VAEConfig (diffusers' defaults for options left out)."""
    if d.get("_class_name", VAE_CLASS) != VAE_CLASS:
        raise ValueError(f"VAE config: _class_name={d['_class_name']!r}, expected {VAE_CLASS}")
    _check_keys(d, VAE_KNOWN, VAE_FIXED, "VAE")
    channels = tuple(d.get("block_out_channels", (64,)))
    n = len(channels)
    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
        if list(d.get(key, [block])) != [block] * n:
            raise ValueError(f"VAE config: {key}={d.get(key)!r} is not supported "
                             f"(only {n} x {block!r})")
    return VAEConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4), block_channels=channels,
        layers_per_block=d.get("layers_per_block", 1), norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
        mid_attention=d.get("mid_block_add_attention", True))


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    n = len(cfg.block_channels)
    return {
        "_class_name": VAE_CLASS, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "block_out_channels": list(cfg.block_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scaling_factor, "mid_block_add_attention": cfg.mid_attention,
    }


# ---------------------------------------------------------------- transformers CLIP config.json

CLIP_ACTIVATIONS = ("quick_gelu", "gelu")
CLIP_LEGACY_EOS = 2  # old CLIP configs say 2; transformers then pools at the argmax token id


def clip_text_config_from_transformers(d: dict) -> CLIPTextConfig:
    """transformers CLIPTextConfig config.json (or a CLIPConfig's text_config) -> ours."""
    architectures = d.get("architectures") or ["CLIPTextModel"]
    if "text_config" in d:  # a whole CLIPModel config
        d = {**d["text_config"], "projection_dim": d.get("projection_dim", 512)}
        architectures = ["CLIPTextModelWithProjection"]
    if d.get("hidden_act", "quick_gelu") not in CLIP_ACTIVATIONS:
        raise ValueError(f"CLIP text config: hidden_act={d['hidden_act']!r} is not supported "
                         f"(only {CLIP_ACTIVATIONS})")
    eos, pad = d.get("eos_token_id", 49407), d.get("pad_token_id", 1)
    if pad == 1:  # legacy CLIP configs say 1, which no SD tokenizer pads with: SD 2.x's OpenCLIP
        pad = 0 if d.get("hidden_act") == "gelu" else 49407  # (gelu) pads with 0, CLIP-L with EOT
    return CLIPTextConfig(
        vocab_size=d.get("vocab_size", 49408), max_positions=d.get("max_position_embeddings", 77),
        width=d.get("hidden_size", 512), num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 8), mlp_dim=d.get("intermediate_size", 2048),
        activation=d.get("hidden_act", "quick_gelu"), norm_eps=d.get("layer_norm_eps", 1e-5),
        eos_token_id=CLIPTextConfig.eos_token_id if eos == CLIP_LEGACY_EOS else eos,
        pad_token_id=pad,
        projection_dim=(d.get("projection_dim", 512) if "CLIPTextModelWithProjection"
                        in architectures else None))


def clip_text_config_to_transformers(cfg: CLIPTextConfig) -> dict:
    # projection_dim is unused by CLIPTextModel; transformers still wants an int there
    with_projection = cfg.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
        "projection_dim": cfg.projection_dim if with_projection else cfg.width,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.norm_eps, "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.eos_token_id - 1,  # CLIP's start token precedes its end token
        "pad_token_id": cfg.pad_token_id,
    }


# ---------------------------------------------------------------- single-file checkpoints

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
    levels, layers = len(_indices(sd, "down_blocks.")), len(_indices(sd, "down_blocks.0.resnets."))
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
            _indices(sd, "mid_block.attentions.0.transformer_blocks.")) or 1,
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
    levels = len(_indices(sd, "encoder.down_blocks."))
    return VAEConfig(
        in_channels=_dim(sd, "encoder.conv_in.weight", 1),
        out_channels=_dim(sd, "decoder.conv_out.weight", 0),
        latent_channels=_dim(sd, "decoder.conv_in.weight", 1),
        block_channels=tuple(_dim(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0)
                             for i in range(levels)),
        layers_per_block=len(_indices(sd, "encoder.down_blocks.0.resnets.")),
        norm_groups=hints.norm_groups, scaling_factor=hints.scaling_factor,
        mid_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)


def infer_clip_text_config(sd: dict, version: str, hints: LDMHints) -> CLIPTextConfig:
    width = _dim(sd, "embeddings.token_embedding.weight", 1)
    v2 = version == "v2"  # OpenCLIP ViT-H: gelu, and SD 2.x pads with token 0
    return CLIPTextConfig(
        vocab_size=_dim(sd, "embeddings.token_embedding.weight", 0),
        max_positions=_dim(sd, "embeddings.position_embedding.weight", 0), width=width,
        num_layers=len(_indices(sd, "encoder.layers.")),
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
    version = ldm.detect_version(sd)
    unet, accounted, ema = ldm.unet_from_ldm(sd, use_ema)
    vae, used_vae = ldm.vae_from_ldm(sd)
    text, used_text = ldm.text_from_ldm(sd, version)
    unused = set(sd) - accounted - used_vae - used_text - set(ldm.IGNORED_KEYS)
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
    out = ldm.unet_to_ldm(unet_sd)
    if vae_sd is not None:
        out.update(ldm.vae_to_ldm(vae_sd))
    if text_sd is not None:
        out.update(ldm.text_to_ldm(text_sd, version))
    return out


# ---------------------------------------------------------------- reading and strict loading

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path) -> dict:
    """Tensors of a .safetensors file, or of a pickled .ckpt/.pt/.pth/.bin read with
    weights_only=True (no code runs; a file that needs code is refused)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path) -> tuple[dict, int | None]:
    """(tensors, global_step) of a weight file as read_state_dict reads it. global_step, the
    training step ldm's checkpoints record beside the weights (or a "global_step" tensor among
    them), is None where the file has none; it is taken out of the tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        return sd, _global_step(sd.pop("global_step", None), path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format (accepted: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: the file contains pickled code (objects other than tensors) "
                         f"and was refused; convert it to .safetensors with a trusted tool "
                         f"({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    step = obj.get("global_step") if isinstance(obj, dict) else None
    sd = _tensors_only(obj, path)
    inner = sd.pop("global_step", None)
    return sd, _global_step(inner if inner is not None else step, path)


def _global_step(value, path: Path) -> int | None:
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{path}: global_step={value!r} is not a whole number")


def _tensors_only(obj, path: Path) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not isinstance(obj.get("global_step", 0), torch.Tensor):  # a step beside the weights
        obj = {k: v for k, v in obj.items() if k != "global_step"}
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {key_list(bad)}")
    return obj


def check_state_dict(module: nn.Module, sd: dict, name: str) -> None:
    """Load `sd` into `module` strictly; missing, unexpected and wrongly shaped keys become one
    ValueError naming the component and the keys."""
    expected = module.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in (
        ("missing", missing), ("unexpected", unexpected),
        ("with the wrong shape (checkpoint != model)", shapes)) if keys]
    if problems:
        raise ValueError(f"{name} weights do not fit the model: " + "; ".join(problems))
    # a module built on the meta device takes the tensors themselves (no copy into nothing)
    module.load_state_dict(sd, strict=True, assign=any(p.is_meta for p in module.parameters()))
