"""What the parts share: the data sources, the per-sample random draws, the model presets
with a recipe's overrides, the pretrained model a fine-tuning run starts from (load_base), and
the export of the EMA weights.

Every part (clip.py, vae.py, unet.py, unclip.py) is a class of static methods the loop calls:
build(cfg, device) -> (model, frozen), batch(cfg, frozen, indices, device), loss(cfg, model,
frozen, batch, gens) -> (loss, metrics), export(cfg, model, ema), sample(cfg, model, frozen,
path). Random draws come from the per-sample generators the loop passes in (resume- and
DDP-invariant)."""
import dataclasses

import torch

from ..data import shapes
from ..data.folder import ImageFolderDataset
from ..formats import checkpoint
from ..formats.ours import save_folder


def source(cfg):
    """(index -> (image (3, S, S) in [-1, 1], caption), dataset length or None if endless),
    for the shapes generator or an image folder."""
    if cfg.data == "shapes":
        def get(i):
            img, caption, _ = shapes.sample(i, "train", cfg.seed, cfg.image_size,
                                            cfg.include_held_out)
            return shapes.to_tensor(img), caption
        return get, None
    ds = ImageFolderDataset(cfg.data, cfg.image_size, random_flip=False, seed=cfg.seed)

    def get(i):
        item = ds[i % len(ds)]
        return item["image"], item["caption"]
    return get, len(ds)


def folder_captions(cfg):
    """The captions of the image folder cfg.data, in the order its samples come."""
    return [caption for _, caption in ImageFolderDataset(cfg.data, cfg.image_size).items]


def images_and_captions(cfg, frozen, indices, device):
    """(images (B, 3, S, S) on `device`, captions) of the samples `indices`."""
    items = [frozen["source"](i) for i in indices]
    images = torch.stack([im for im, _ in items]).to(device)  # (B, 3, S, S)
    return images, [c for _, c in items]


def randn(gens, shape, device):
    """(B, *shape) standard normal, row b drawn from gens[b]."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def rand(gens, device):
    """(B,) uniform in [0, 1), entry b drawn from gens[b]."""
    return torch.cat([torch.rand(1, generator=g) for g in gens]).to(device)


def override(cfg_obj, overrides):
    """A preset with a recipe's overrides: TOML lists become tuples where the field is a tuple
    (the config then equals the one its saved file rebuilds), unknown names a ValueError."""
    if not overrides:
        return cfg_obj
    return checkpoint.config_from_dict(type(cfg_obj), {**dataclasses.asdict(cfg_obj),
                                                       **overrides})


def check_fixed(part, fixed, model_cfg):
    """Refuse recipe model settings that follow from the run's trained vae and clip."""
    clash = sorted(set(fixed) & set(model_cfg))
    if clash:
        raise ValueError(f"{part} model settings {clash} follow from the trained vae and "
                         f"clip ({fixed}); remove them from the recipe")


def load_base(cfg, device, task):
    """The pretrained Stable Diffusion pipeline `task` (e.g. "train lora") fine-tunes: cfg.base,
    opened through the one door (a bundled name, a model folder, a single file), every module
    frozen. An unCLIP model or a size the VAE cannot take is a ValueError naming it."""
    from ..loading import load_pipeline, model_kind

    if not cfg.base:
        raise ValueError(f"{task} needs the model to start from: --base (a bundled name, a "
                         f"model folder or a single file; base = ... in a recipe)")
    if model_kind(cfg.base) != "sd":
        raise ValueError(f"base {cfg.base!r} is an unCLIP model; {task} fine-tunes Stable "
                         f"Diffusion models (kind sd)")
    pipe = load_pipeline(cfg.base, device=device)
    if cfg.image_size % pipe.vae_factor:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of the VAE factor "
                         f"{pipe.vae_factor} of base {cfg.base!r}")
    kind = pipe.schedule_config.prediction_type
    if cfg.zero_terminal_snr or cfg.prediction_type not in ("epsilon", kind):  # epsilon: unset
        raise ValueError(f"the noise schedule and prediction type ({kind}) follow from base "
                         f"{cfg.base!r}; remove prediction_type and zero_terminal_snr")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.clip):
        if m is not None:
            m.requires_grad_(False)
    return pipe


def save_ema(model, ema, path):
    """Export the EMA weights when there are some, the raw weights otherwise."""
    if ema is None:
        checkpoint.save_model(model, path)
        return
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema, strict=True)
    try:
        checkpoint.save_model(model, path)
    finally:
        model.load_state_dict(live, strict=True)


def save_with_unet(pipe, folder, unet):
    """`pipe`'s model folder (parts, schedule, defaults, name) written to `folder` with the
    UNet file `unet` in place of its own: a fine-tuned UNet assembled with its model."""
    save_folder(folder, unet=unet, vae=pipe.vae, clip=pipe.clip,
                text_encoder=None if pipe.clip is not None else pipe.text_encoder,
                tokenizer=pipe.tokenizer, schedule=pipe.schedule_config,
                defaults=pipe.defaults, name=pipe.name, tiny_decoder=pipe.tiny_decoder)
