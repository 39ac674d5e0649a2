"""Original single-file (LDM / CompVis) Stable Diffusion checkpoints <-> diffusers layout.

Our UNet / VAE / CLIP text modules use the state-dict keys of diffusers' UNet2DConditionModel,
AutoencoderKL and transformers' CLIPTextModel (DESIGN.md, convention 3). Single-file checkpoints
(A1111, ComfyUI, the original `ldm` repository) name the same tensors differently; this file
holds the rename rules, both ways. Every source key is either used or on a named ignore list.
The key maps follow the LDM sources (ldm/modules/diffusionmodules/openaimodel.py, model.py) and
were checked against diffusers' loaders/single_file_utils.py, the reference in the tests.
"""
import torch

from .files import key_list

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."   # SD 1.x: transformers CLIP-L
OPENCLIP_PREFIX = "cond_stage_model.model."                # SD 2.x: OpenCLIP ViT-H

# Tensors of a single file that no component needs: the DDPM schedule buffers (ldm's
# DDPM.register_schedule; our schedule is computed), EMA bookkeeping, and CLIP leftovers.
IGNORED_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "model_ema.decay", "model_ema.num_updates",
    CLIP_PREFIX + "embeddings.position_ids",    # a buffer of arange(77), rebuilt by the model
    OPENCLIP_PREFIX + "logit_scale",            # contrastive training only
    OPENCLIP_PREFIX + "text_projection",        # SD 2.x reads token states, not the projection
)

# Module-level renames: (LDM prefix, diffusers prefix, suffix table). A suffix table renames
# the rest of the key; None keeps it as it is (transformer blocks have the same inner names).
RESNET = (  # ldm ResBlock -> diffusers ResnetBlock2D
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)
VAE_RESNET = (
    ("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
)
VAE_ATTENTION = (  # ldm AttnBlock (1x1 convs) -> diffusers Attention (linear layers)
    ("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
UNET_TOP = (
    ("time_embed.0.", "time_embedding.linear_1.", None),
    ("time_embed.2.", "time_embedding.linear_2.", None),
    # LCM's guidance projection has no CompVis name (its UNets ship in diffusers' layout, and
    # diffusers' single-file loader has no key for it): ours, so that an exported LCM model
    # round-trips
    ("time_embed.cond_proj.", "time_embedding.cond_proj.", None),
    ("input_blocks.0.0.", "conv_in.", None),
    ("middle_block.0.", "mid_block.resnets.0.", RESNET),
    ("middle_block.1.", "mid_block.attentions.0.", None),
    ("middle_block.2.", "mid_block.resnets.1.", RESNET),
    ("out.0.", "conv_norm_out.", None),
    ("out.2.", "conv_out.", None),
)
VAE_TOP = tuple((f"{part}.{ldm}", f"{part}.{ours}", None) for part in ("encoder", "decoder")
                for ldm, ours in (("conv_in.", "conv_in."), ("norm_out.", "conv_norm_out."),
                                  ("conv_out.", "conv_out."))) + (
    ("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None))
# OpenCLIP text transformer -> transformers CLIPTextModel (in_proj_* is split separately).
OPENCLIP_TOP = (
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"), ("ln_final.bias", "final_layer_norm.bias"),
)
OPENCLIP_LAYER = tuple((f"{ldm}.{p}", f"{ours}.{p}") for ldm, ours in (
    ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))
    for p in ("weight", "bias"))
QKV = ("q_proj", "k_proj", "v_proj")


def indices(sd: dict, prefix: str) -> set[int]:
    """The integers that follow `prefix` in the keys: {0, 1, 2} for 'down_blocks.'."""
    return {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _rename(sd: dict, pairs, to_diffusers: bool) -> tuple[dict, set]:
    """Rename keys by the longest matching module prefix; returns (renamed, used source keys)."""
    table = {(a if to_diffusers else b): ((b if to_diffusers else a), t) for a, b, t in pairs}
    out, used = {}, set()
    for key, value in sd.items():
        parts = key.split(".")
        prefix = next((p for p in (".".join(parts[:i]) + "." for i in range(len(parts) - 1, 0, -1))
                       if p in table), None)
        if prefix is None:
            continue
        target, suffixes = table[prefix]
        suffix = _rename_suffix(key[len(prefix):], suffixes, to_diffusers)
        if suffix is not None:
            out[target + suffix] = _conv_to_linear(value, to_diffusers) \
                if suffixes is VAE_ATTENTION else value
            used.add(key)
    return out, used


def _rename_suffix(suffix: str, suffixes, to_diffusers: bool) -> str | None:
    if suffixes is None:
        return suffix
    for ldm, ours in suffixes:
        src, dst = (ldm, ours) if to_diffusers else (ours, ldm)
        if suffix.startswith(src) and suffix[len(src):] in ("weight", "bias"):
            return dst + suffix[len(src):]
    return None


def _conv_to_linear(w: torch.Tensor, to_diffusers: bool) -> torch.Tensor:
    """ldm's VAE attention uses 1x1 convs (C, C, 1, 1); diffusers uses Linear (C, C)."""
    if to_diffusers and w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(f"VAE attention weight of shape {tuple(w.shape)} is not a 1x1 conv")
        return w.reshape(w.shape[0], w.shape[1])  # (C, C, 1, 1) -> (C, C)
    if not to_diffusers and w.ndim == 2:
        return w.reshape(*w.shape, 1, 1)          # (C, C) -> (C, C, 1, 1)
    return w


def _unet_pairs(levels: int, layers: int, attention: tuple) -> list:
    """Module renames of a UNet with `levels` resolutions, `layers` ResBlocks per level and
    transformer blocks where attention[level]; the same layout on both sides."""
    pairs = list(UNET_TOP)
    for b in range(levels):  # input_blocks.N: N = 1 + b * (layers + 1) + j
        for j in range(layers):
            n = 1 + b * (layers + 1) + j
            pairs.append((f"input_blocks.{n}.0.", f"down_blocks.{b}.resnets.{j}.", RESNET))
            if attention[b]:
                pairs.append((f"input_blocks.{n}.1.", f"down_blocks.{b}.attentions.{j}.", None))
        if b < levels - 1:
            n = (b + 1) * (layers + 1)
            pairs.append((f"input_blocks.{n}.0.op.", f"down_blocks.{b}.downsamplers.0.conv.", None))
    for b in range(levels):  # up block b mirrors level (levels - 1 - b) and has one more ResBlock
        has_attention = attention[levels - 1 - b]
        for j in range(layers + 1):
            n = b * (layers + 1) + j
            pairs.append((f"output_blocks.{n}.0.", f"up_blocks.{b}.resnets.{j}.", RESNET))
            if has_attention:
                pairs.append((f"output_blocks.{n}.1.", f"up_blocks.{b}.attentions.{j}.", None))
        if b < levels - 1:  # the Upsample follows the ResBlock (and the transformer, if any)
            n, k = b * (layers + 1) + layers, 2 if has_attention else 1
            pairs.append((f"output_blocks.{n}.{k}.conv.", f"up_blocks.{b}.upsamplers.0.conv.",
                          None))
    return pairs


def _vae_pairs(levels: int, layers: int) -> list:
    pairs = list(VAE_TOP)
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                          VAE_RESNET))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv.",
                          f"encoder.down_blocks.{i}.downsamplers.0.conv.", None))
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
                  (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)]
    for i in range(levels):  # ldm numbers decoder levels from the lowest resolution up: reversed
        up = levels - 1 - i
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{up}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                          VAE_RESNET))
        if i < levels - 1:
            pairs.append((f"decoder.up.{up}.upsample.conv.",
                          f"decoder.up_blocks.{i}.upsamplers.0.conv.", None))
    return pairs


def _unet_layout_ldm(sd: dict) -> tuple[int, int, tuple]:
    blocks = indices(sd, "input_blocks.")
    if not blocks:
        raise ValueError("no UNet input_blocks in the checkpoint")
    ops = sorted(n for n in blocks if f"input_blocks.{n}.0.op.weight" in sd)
    layers, levels = (ops[0] - 1 if ops else max(blocks)), len(ops) + 1
    attention = tuple(any(k.startswith(f"input_blocks.{1 + b * (layers + 1)}.1.") for k in sd)
                      for b in range(levels))
    return levels, layers, attention


def _unet_layout_diffusers(sd: dict) -> tuple[int, int, tuple]:
    levels = len(indices(sd, "down_blocks."))
    layers = len(indices(sd, "down_blocks.0.resnets."))
    attention = tuple(any(k.startswith(f"down_blocks.{b}.attentions.") for k in sd)
                      for b in range(levels))
    return levels, layers, attention


def _openclip_to_hf(src: dict) -> tuple[dict, set, set]:
    """OpenCLIP text keys (prefix removed) -> CLIPTextModel keys, without the last layer:
    SD 2.x conditions on the penultimate layer's states followed by ln_final."""
    out, used = {}, set()
    for ldm, ours in OPENCLIP_TOP:
        if ldm in src:
            out[ours] = src[ldm]
            used.add(ldm)
    last = max(indices(src, "transformer.resblocks."), default=0)
    for i in range(last):
        ldm, ours = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in OPENCLIP_LAYER:
            if ldm + a in src:
                out[ours + b] = src[ldm + a]
                used.add(ldm + a)
        for p in ("weight", "bias"):  # in_proj packs q, k, v along dim 0: (3C, C) -> 3 x (C, C)
            if ldm + f"attn.in_proj_{p}" in src:
                packed = src[ldm + f"attn.in_proj_{p}"]
                used.add(ldm + f"attn.in_proj_{p}")
                for name, part in zip(QKV, packed.chunk(3, dim=0)):
                    out[ours + f"self_attn.{name}.{p}"] = part.clone()  # own storage for saving
    skipped = {k for k in src if k.startswith(f"transformer.resblocks.{last}.")}
    return out, used, skipped


def _hf_to_openclip(text: dict) -> tuple[dict, set]:
    """CLIPTextModel keys -> OpenCLIP keys (prefix not added), plus an identity last layer."""
    out, used = {}, set()
    for ldm, ours in OPENCLIP_TOP:
        if ours in text:
            out[ldm] = text[ours]
            used.add(ours)
    layers = len(indices(text, "encoder.layers."))
    for i in range(layers):
        ldm, ours = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in OPENCLIP_LAYER:
            if ours + b in text:
                out[ldm + a] = text[ours + b]
                used.add(ours + b)
        for p in ("weight", "bias"):
            names = [ours + f"self_attn.{n}.{p}" for n in QKV]
            if all(n in text for n in names):
                out[ldm + f"attn.in_proj_{p}"] = torch.cat([text[n] for n in names])
                used.update(names)
    out.update(_identity_openclip_layer(text, layers))
    return out, used


def _identity_openclip_layer(text: dict, index: int) -> dict:
    """A residual block whose output projections are zero (so it returns its input) and an
    identity text_projection: SD 2.x files have 24 layers but use the penultimate one, and our
    model keeps 23. Writing these keeps the file complete for loaders that expect them."""
    emb = text["embeddings.token_embedding.weight"]
    c, hidden = emb.shape[1], text["encoder.layers.0.mlp.fc1.weight"].shape[0]
    zeros = lambda *shape: emb.new_zeros(shape)  # noqa: E731
    ldm = f"transformer.resblocks.{index}."
    layer = {"ln_1.weight": emb.new_ones(c), "ln_1.bias": zeros(c),
             "attn.in_proj_weight": zeros(3 * c, c), "attn.in_proj_bias": zeros(3 * c),
             "attn.out_proj.weight": zeros(c, c), "attn.out_proj.bias": zeros(c),
             "ln_2.weight": emb.new_ones(c), "ln_2.bias": zeros(c),
             "mlp.c_fc.weight": zeros(hidden, c), "mlp.c_fc.bias": zeros(hidden),
             "mlp.c_proj.weight": zeros(c, hidden), "mlp.c_proj.bias": zeros(c)}
    out = {ldm + k: v for k, v in layer.items()}
    out["text_projection"] = torch.eye(c, dtype=emb.dtype, device=emb.device)
    return out


def detect_version(sd: dict) -> str:
    """'v1' (CLIP-L text, context 768) or 'v2' (OpenCLIP text, context 1024); SDXL is refused."""
    if any(k.startswith("conditioner.") for k in sd):
        raise ValueError("this is an SDXL checkpoint (conditioner.embedders.*): SDXL is not "
                         "supported yet; SD 1.x and 2.x single files are")
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ValueError(f"no UNet weights ({UNET_PREFIX}*) in the checkpoint")
    if any(k.startswith(OPENCLIP_PREFIX) for k in sd):
        return "v2"
    if any(k.startswith(CLIP_PREFIX) for k in sd):
        return "v1"
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    return "v2" if to_k is not None and to_k.shape[1] == 1024 else "v1"


def unet_from_ldm(sd: dict, use_ema: bool) -> tuple[dict, set, bool]:
    """The UNet of a single file in diffusers layout: (weights, source keys accounted for,
    whether the EMA copy was used). EMA is used if asked and more than 100 keys have it."""
    src = _strip(sd, UNET_PREFIX)
    ema_keys = {k for k in sd if k.startswith(EMA_PREFIX)}
    ema = use_ema and len(ema_keys) > 100
    # ldm's LitEma names each parameter by its key after `model.`, with the dots removed
    flat = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in src}
    if ema:
        missing = [UNET_PREFIX + k for k, e in flat.items() if e not in sd]
        if missing:
            raise ValueError(f"the checkpoint's EMA weights lack: {key_list(missing)}")
        src = {k: sd[e] for k, e in flat.items()}
    out, used = _rename(src, _unet_pairs(*_unet_layout_ldm(src)), to_diffusers=True)
    accounted = {UNET_PREFIX + k for k in used}
    # with EMA, the training weights are superseded; without, the EMA copy is not wanted
    accounted |= {flat[k] for k in used} if ema else ema_keys
    return out, accounted, ema


def vae_from_ldm(sd: dict) -> tuple[dict | None, set]:
    src = _strip(sd, VAE_PREFIX)
    if not src:
        return None, set()
    layout = len(indices(src, "encoder.down.")), len(indices(src, "encoder.down.0.block."))
    out, used = _rename(src, _vae_pairs(*layout), to_diffusers=True)
    return out, {VAE_PREFIX + k for k in used}


def text_from_ldm(sd: dict, version: str) -> tuple[dict | None, set]:
    if version == "v1":  # transformers' CLIPTextModel already; only the prefix differs
        src = _strip(sd, CLIP_PREFIX)
        src.pop("embeddings.position_ids", None)
        return src or None, {CLIP_PREFIX + k for k in src}
    out, used, skipped = _openclip_to_hf(_strip(sd, OPENCLIP_PREFIX))
    return out or None, {OPENCLIP_PREFIX + k for k in used | skipped}


def _require_all(sd: dict, used: set, name: str) -> None:
    unused = set(sd) - used
    if unused:
        raise ValueError(f"{name}: {len(unused)} keys have no single-file (LDM) equivalent: "
                         f"{key_list(unused)}")


def unet_to_ldm(unet: dict) -> dict:
    out, used = _rename(unet, _unet_pairs(*_unet_layout_diffusers(unet)), to_diffusers=False)
    _require_all(unet, used, "UNet")
    return {UNET_PREFIX + k: v for k, v in out.items()}


def vae_to_ldm(vae: dict) -> dict:
    layout = (len(indices(vae, "encoder.down_blocks.")),
              len(indices(vae, "encoder.down_blocks.0.resnets.")))
    out, used = _rename(vae, _vae_pairs(*layout), to_diffusers=False)
    _require_all(vae, used, "VAE")
    return {VAE_PREFIX + k: v for k, v in out.items()}


def text_to_ldm(text: dict, version: str) -> dict:
    if version == "v1":
        return {CLIP_PREFIX + k: v for k, v in text.items()}
    out, used = _hf_to_openclip(text)
    _require_all(text, used, "text encoder")
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}
