"""diffusers' and transformers' config.json <-> our config dataclasses, both ways (DESIGN.md,
convention 2): UNet2DConditionModel <-> UNetConfig, AutoencoderKL <-> VAEConfig, CLIPTextModel
<-> CLIPTextConfig. Unsupported values raise ValueError naming the option and what is accepted.
"""
from ..models.clip import CLIPTextConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .files import key_list

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
    "conv_in_kernel": 3, "conv_out_kernel": 3,
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
    "projection_class_embeddings_input_dim": None, "time_cond_proj_dim": None,
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
        pooled_text_dim=_pooled_text_from(g), time_cond_proj_dim=g["time_cond_proj_dim"])


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
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
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
