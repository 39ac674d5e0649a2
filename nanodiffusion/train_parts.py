"""The parts that `train.py` trains: for each, how to build it, what a batch is, its loss,
what it exports and what a sample grid shows. Random draws come from the per-sample
generators the loop passes in (resume- and DDP-invariant)."""
import dataclasses

import torch
import torch.nn.functional as F

from . import checkpoint
from .data.shapes import mirrored_caption


def _source(cfg):
    """(index -> (image (3, S, S) in [-1, 1], caption), dataset length or None if endless),
    for the shapes generator or an image folder."""
    if cfg.data == "shapes":
        from .data import shapes

        def get(i):
            img, caption, _ = shapes.sample(i, "train", cfg.seed, cfg.image_size,
                                            cfg.include_held_out)
            return shapes.to_tensor(img), caption
        return get, None
    from .data.folder import ImageFolderDataset

    ds = ImageFolderDataset(cfg.data, cfg.image_size, random_flip=False, seed=cfg.seed)

    def get(i):
        item = ds[i % len(ds)]
        return item["image"], item["caption"]
    return get, len(ds)


def _twin_source(cfg):
    """index -> the list of (image, caption) hard-negative twins of sample `index`, drawn to
    match their captions: with hard_negatives, the mirrored scene (every spatial word turned
    around) where the caption has one; with swap_negatives, for pairs, the scene with the two
    colours exchanged. Only the shapes generator can draw them; for an image folder this is
    None, and mirrored captions alone are the negatives."""
    if cfg.data != "shapes":
        return None
    from .data import shapes

    def twins(i):
        _, caption, attributes = shapes.sample(i, "train", cfg.seed, cfg.image_size,
                                               cfg.include_held_out)
        out = []
        if cfg.hard_negatives and (mirrored := mirrored_caption(caption)) != caption:
            out.append((shapes.rotated(attributes, cfg.image_size), mirrored))
        if cfg.swap_negatives and (swapped := shapes.colour_swapped(
                attributes, cfg.include_held_out)) is not None:
            out.append((swapped[1], swapped[0]))
        return [(shapes.to_tensor(shapes.render(a, cfg.image_size)), c) for a, c in out]
    return twins


def _captions(cfg):
    """The captions a tokenizer is learned from: a large draw of shapes, or all of a folder."""
    get, length = _source(cfg)
    return sorted({get(i)[1] for i in range(length or 20000)})


def _images_and_captions(cfg, frozen, indices, device):
    items = [frozen["source"](i) for i in indices]
    images = torch.stack([im for im, _ in items]).to(device)  # (B, 3, S, S)
    return images, [c for _, c in items]


def _randn(gens, shape, device):
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _rand(gens, device):
    return torch.cat([torch.rand(1, generator=g) for g in gens]).to(device)


def _override(cfg_obj, overrides):
    """A preset with a recipe's overrides: TOML lists become tuples where the field is a tuple
    (the config then equals the one its saved file rebuilds), unknown names a ValueError."""
    if not overrides:
        return cfg_obj
    return checkpoint.config_from_dict(type(cfg_obj), {**dataclasses.asdict(cfg_obj),
                                                       **overrides})


class ClipPart:
    @staticmethod
    def build(cfg, device):
        from .models import clip
        from .models.tokenizer import CLIPTokenizer, train_bpe

        tok_dir = cfg.run_dir / "tokenizer"
        if (tok_dir / "vocab.json").exists():  # resuming: the ids must not change
            tok = CLIPTokenizer.from_folder(tok_dir)
        else:
            tok = train_bpe(_captions(cfg), cfg.bpe_merges)
            tok.save(tok_dir)
        m = cfg.model
        text = _override(clip.SHAPES_TEXT, {**m.get("text", {}), "vocab_size": tok.vocab_size,
                                            "eos_token_id": tok.eot_token_id,
                                            "pad_token_id": tok.pad_token_id})
        vision = _override(clip.SHAPES_VISION, {"image_size": cfg.image_size,
                                                **m.get("vision", {})})
        model = clip.CLIPModel(text, vision).to(device)
        return model, {"source": _source(cfg)[0], "twin": _twin_source(cfg), "tokenizer": tok,
                       "max_length": text.max_positions}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        """(images, caption ids, negative caption ids or None). With hard_negatives, each
        sample with a spatial word brings its mirrored twin into the batch as one more pair
        (shapes: both sides of the loss get the hard negative), or, where no twin can be drawn
        (image folders), its mirrored caption as one more wrong caption for its image."""
        images, captions = _images_and_captions(cfg, frozen, indices, device)
        tok, n = frozen["tokenizer"], frozen["max_length"]
        negatives = None
        if (cfg.hard_negatives or cfg.swap_negatives) and frozen.get("twin") is not None:
            twins = [t for i in indices for t in frozen["twin"](i)]
            if twins:
                images = torch.cat([images, torch.stack([im for im, _ in twins]).to(device)])
                captions = captions + [c for _, c in twins]
        elif cfg.hard_negatives:
            mirrored = [m for m, c in zip(map(mirrored_caption, captions), captions) if m != c]
            negatives = tok(mirrored, max_length=n).to(device) if mirrored else None
        return images, tok(captions, max_length=n).to(device), negatives

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        images, ids, negatives = batch
        pixels = checkpoint.unwrap(model).preprocess((images + 1) / 2)
        loss = model(ids, pixels, negatives)
        return loss, {}

    @staticmethod
    def export(cfg, model, ema):
        _save_ema(model, ema, cfg.run_dir / "clip.safetensors")

    @staticmethod
    def sample(cfg, model, frozen, path):
        pass


def _save_ema(model, ema, path):
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


class VaePart:
    @staticmethod
    def build(cfg, device):
        from .models import vae

        model = vae.VAE(_override(vae.SHAPES, cfg.model)).to(device)
        return model, {"source": _source(cfg)[0]}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        return _images_and_captions(cfg, frozen, indices, device)[0]

    @staticmethod
    def loss(cfg, model, frozen, images, gens):
        vae = checkpoint.unwrap(model)
        post = vae.encode(images)
        eps = _randn(gens, post.mean.shape[1:], images.device)
        z = post.mean + torch.exp(0.5 * post.logvar) * eps
        recon = vae.decode(z)
        # On white-background data the objects are a few percent of the pixels, and their
        # colours are what a reconstruction gets wrong last; ink_weight weighs each pixel by
        # 1 + ink_weight * (how far it is from white).
        w = 1.0 + cfg.ink_weight * ((1 - images) / 2).amax(dim=1, keepdim=True)  # (B,1,H,W)
        err = recon - images
        l1, mse = (w * err.abs()).mean(), (w * err.square()).mean()
        kl = post.kl().mean()
        psnr = 10 * torch.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), images).clamp_min(1e-10))
        return l1 + mse + cfg.kl_weight * kl, {"kl": kl.detach(), "psnr": psnr.detach()}

    @staticmethod
    def export(cfg, model, ema):
        # The latent scale makes the UNet's inputs unit-variance (LDM: 1 / std of latents).
        src = _source(cfg)[0]
        x = torch.stack([src(10_000_000 + i)[0] for i in range(256)])
        with torch.no_grad():
            live = {k: v.clone() for k, v in model.state_dict().items()}
            if ema is not None:
                model.load_state_dict(ema, strict=True)
            z = model.encode(x.to(next(model.parameters()).device)).mean
            model.config.scaling_factor = float(1.0 / z.float().std())
            model.load_state_dict(live, strict=True)
        _save_ema(model, ema, cfg.run_dir / "vae.safetensors")

    @staticmethod
    def sample(cfg, model, frozen, path):
        from .pipeline import to_pil, make_grid

        x = torch.stack([frozen["source"](10_000_000 + i)[0] for i in range(8)])
        with torch.no_grad():
            model.eval()
            recon = model.decode(model.encode(x.to(next(model.parameters()).device)).mean)
            model.train()
        make_grid(to_pil(torch.cat([x, recon.cpu()])), rows=2).save(path)


from .train_unet import UnetPart  # noqa: E402  (the UNet part needs the helpers above)
from .train_unclip import DecoderPart, PriorPart  # noqa: E402


def get_part(name):
    table = {"clip": ClipPart, "vae": VaePart, "unet": UnetPart, "prior": PriorPart,
             "decoder": DecoderPart}
    if name not in table:
        raise ValueError(f"part {name!r} cannot be trained yet; trainable: {sorted(table)}")
    return table[name]
