"""The unCLIP parts of the training loop: the DALL·E 2 prior (text encoding -> CLIP image
embedding, x0 prediction) and the decoder (a latent UNet conditioned on the CLIP image
embedding, Kandinsky 2.2 style), both on the frozen CLIP and VAE of <out>/clip and <out>/vae;
and the assembly of <out>/model-unclip once both exist.

With decoder_text, the decoder is DALL·E 2's: a text-to-image model (GLIDE there; here the
run's trained UNet, <out>/unet, whose weights it starts from) given the image embedding as
extra context tokens and in its time embedding, the caption dropped for a share
text_dropout of the samples (half, as in DALL·E 2)."""
import dataclasses
import json

import torch
import torch.nn.functional as F

from ..diffusion import PRIOR_SCHEDULE, NoiseSchedule, ScheduleConfig
from ..formats import checkpoint
from ..formats.ours import save_unclip_folder
from ..models import prior as prior_model
from ..models import unet as unet_model
from ..pipelines.images import make_grid
from ..pipelines.unclip import UnCLIPDefaults, UnCLIPPipeline
from .common import check_fixed, override, rand, save_ema, source
from .unet import (SAMPLE_PROMPTS, denoising_loss, encoded_batch, frozen_parts, frozen_text,
                   latents_of, noised, schedule_config, vae_posterior)

STATS_SAMPLES = 512   # images whose CLIP embeddings give the prior's clip_mean / clip_std
STATS_FIRST = 10_000_000  # past any training index, as the VAE's latent scale uses


def _clip_pixels(clip, images):
    """Training images (B, 3, S, S) in [-1, 1] -> CLIP image embeddings (B, E)."""
    return clip.encode_image(clip.preprocess((images + 1) / 2))


@torch.no_grad()
def _image_stats(cfg, clip, data, device, chunk=128):
    embs = []
    for lo in range(0, STATS_SAMPLES, chunk):
        idx = range(STATS_FIRST + lo, STATS_FIRST + min(lo + chunk, STATS_SAMPLES))
        images = torch.stack([data(i)[0] for i in idx]).to(device)  # (b, 3, S, S)
        embs.append(_clip_pixels(clip, images))
    return torch.cat(embs)  # (N, E)


class PriorPart:
    @staticmethod
    def build(cfg, device):
        clip, vae, tok = frozen_parts(cfg, device)
        text = clip.text_model.config
        fixed = {"embed_dim": clip.projection_dim, "text_dim": text.width,
                 "text_tokens": text.max_positions}
        check_fixed("prior", fixed, cfg.model)
        model = prior_model.Prior(override(prior_model.SHAPES, {**cfg.model, **fixed})).to(device)
        data = source(cfg)[0]
        model.set_stats(_image_stats(cfg, clip, data, device))
        return model, {"source": data, "clip": clip, "vae": vae, "tokenizer": tok,
                       "cache": {}, "schedule": NoiseSchedule(PRIOR_SCHEDULE)}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        def encode(images):
            return {"image_embeds": _clip_pixels(frozen["clip"], images)}
        return encoded_batch(cfg, frozen, indices, encode, device)

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        """DALL·E 2: MSE between the predicted and the true clean (normalised) embedding.
        caption_dropout drops the prior's condition, the caption, for that share of samples
        (the unconditional branch of guidance); the image embedding is the target, kept."""
        enc, captions = batch
        device, prior = enc["image_embeds"].device, checkpoint.unwrap(model)
        x0 = prior.normalize(enc["image_embeds"])  # (B, E)
        drop = rand(gens, device) < cfg.caption_dropout
        if prior.config.learned_null:
            states, _, emb = frozen_text(frozen, captions)
            states, emb = prior.drop_text(states, emb, drop)
        else:  # the empty caption stands for a dropped one (Karlo)
            states, _, emb = frozen_text(frozen, ["" if d else c
                                                  for c, d in zip(captions, drop.tolist())])
        x_t, t, _ = noised(frozen["schedule"], x0, gens)
        pred = model(x_t, t, states, emb)
        cos = F.cosine_similarity(prior.denormalize(pred.float()), prior.denormalize(x0)).mean()
        return F.mse_loss(pred.float(), x0), {"cos": cos.detach()}

    @staticmethod
    def export(cfg, model, ema):
        save_ema(model, ema, cfg.run_dir / "prior.safetensors")
        if (cfg.out_path("model-unclip") / "model.json").exists():
            assemble_unclip(cfg)  # a retrained prior replaces the assembled one

    @staticmethod
    def sample(cfg, model, frozen, path):
        decoder = cfg.out_path("decoder") / "decoder.safetensors"
        if decoder.exists():
            device = next(model.parameters()).device
            _sample_grid(cfg, model, checkpoint.load_model(decoder, device=device), frozen,
                         path, model)


class DecoderPart:
    @staticmethod
    def build(cfg, device):
        clip, vae, tok = frozen_parts(cfg, device)
        c = vae.config.latent_channels
        fixed = {"in_channels": c, "out_channels": c, "image_embed_dim": clip.projection_dim}
        check_fixed("decoder", fixed, cfg.model)
        if cfg.decoder_text:
            model = _decoder_from_unet(cfg, clip, device)
        else:
            model = unet_model.UNet(override(unet_model.SHAPES, {**cfg.model, **fixed})).to(device)
        schedule = NoiseSchedule(schedule_config(cfg))
        return model, {"source": source(cfg)[0], "clip": clip, "vae": vae, "tokenizer": tok,
                       "schedule": schedule, "cache": {}}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        posterior = vae_posterior(frozen["vae"])

        def encode(images):
            return {**posterior(images), "image_embeds": _clip_pixels(frozen["clip"], images)}
        return encoded_batch(cfg, frozen, indices, encode, device)

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        """The UNet part's loss with the image embedding as the condition instead of the
        caption. Here caption_dropout zeroes the image embedding, the decoder's condition,
        for that share of samples (the zero embedding is the unconditional branch at
        sampling); with decoder_text the caption is dropped apart, by text_dropout."""
        enc, captions = batch
        device = enc["mean"].device
        x0 = latents_of(frozen["vae"], enc, gens)
        embeds = enc["image_embeds"]  # (B, E)
        keep = rand(gens, device) >= cfg.caption_dropout
        embeds = embeds * keep[:, None]
        text = {}
        if cfg.decoder_text:
            drop = (rand(gens, device) < cfg.text_dropout).tolist()
            context, pooled, _ = frozen_text(frozen, ["" if d else c
                                                      for c, d in zip(captions, drop)])
            text = checkpoint.unwrap(model).text_condition(context, pooled)
        return denoising_loss(cfg, frozen["schedule"], x0, gens,
                              lambda x_t, t: model(x_t, t, image_embeds=embeds, **text)), {}

    @staticmethod
    def export(cfg, model, ema):
        save_ema(model, ema, cfg.run_dir / "decoder.safetensors")
        if (cfg.out_path("prior") / "prior.safetensors").exists():
            assemble_unclip(cfg, schedule_config(cfg))

    @staticmethod
    def sample(cfg, model, frozen, path):
        prior = cfg.out_path("prior") / "prior.safetensors"
        if prior.exists():
            device = next(model.parameters()).device
            _sample_grid(cfg, checkpoint.load_model(prior, device=device), model, frozen,
                         path, model)


def _decoder_from_unet(cfg, clip, device):
    """The run's trained UNet with the image-embedding pathway added (its new layers at their
    initialisation, every other weight the UNet's)."""
    path = cfg.out_path("unet") / "unet.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: decoder_text starts the decoder from the "
                                f"run's UNet; train the unet part into {cfg.out} first")
    if cfg.model:
        raise ValueError(f"decoder_text: the decoder has the UNet's architecture; remove the "
                         f"decoder model settings {sorted(cfg.model)} from the recipe")
    base = checkpoint.load_model(path, device=device)
    model = unet_model.UNet(dataclasses.replace(base.config, image_embed_dim=clip.projection_dim))
    weights, fresh = base.state_dict(), model.state_dict()
    added, dropped = sorted(set(fresh) - set(weights)), sorted(set(weights) - set(fresh))
    if dropped or not all(k.startswith(("encoder_hid_proj.", "add_embedding.")) for k in added):
        raise ValueError(f"{path}: not the UNet this decoder extends (keys only in the UNet: "
                         f"{dropped[:5]}, only in the decoder: {added[:5]})")
    model.load_state_dict({**{k: fresh[k] for k in added}, **weights}, strict=True)
    return model.to(device)


@torch.no_grad()
def _sample_grid(cfg, prior, decoder, frozen, path, training):
    """Text-to-image samples of SAMPLE_PROMPTS; `training` (the part's model) goes back to
    train mode after. From the prior part, see _decoder_schedule."""
    try:
        pipe = UnCLIPPipeline(prior, decoder, frozen["vae"], frozen["clip"], frozen["tokenizer"],
                              _decoder_schedule(cfg), defaults=shapes_unclip_defaults(cfg),
                              decoder_text=_decoder_reads_text(cfg))
        images = [pipe.generate(p, seed=i)[0] for i, p in enumerate(SAMPLE_PROMPTS)]
        make_grid(images, rows=2).save(path)
    finally:
        training.train()


def _decoder_schedule(cfg):
    """The decoder's schedule: this config's when training the decoder, else the assembled
    model's, else Stable Diffusion's (epsilon)."""
    meta = cfg.out_path("model-unclip") / "model.json"
    if cfg.part == "decoder":
        return schedule_config(cfg)
    if not meta.exists():
        return ScheduleConfig()
    return checkpoint.config_from_dict(ScheduleConfig, json.loads(meta.read_text())["schedule"])


def _decoder_reads_text(cfg):
    """decoder_text of the decoder part, else of the assembled model-unclip."""
    meta = cfg.out_path("model-unclip") / "model.json"
    if cfg.part == "decoder" or not meta.exists():
        return cfg.decoder_text
    return json.loads(meta.read_text()).get("decoder_text", False)


def shapes_unclip_defaults(cfg):
    return UnCLIPDefaults(steps=20, guidance=4.0, sampler="dpmpp-2m", width=cfg.image_size,
                          height=cfg.image_size)


def assemble_unclip(cfg, schedule=None):
    """<out>/model-unclip from the prior, decoder, vae, clip and tokenizer of this run. The
    decoder's schedule is the decoder part's (or, from the prior part, the assembled one's)."""
    folder = cfg.out_path("model-unclip")
    decoder_text = _decoder_reads_text(cfg)
    if schedule is None:
        meta = json.loads((folder / "model.json").read_text())
        schedule = checkpoint.config_from_dict(ScheduleConfig, meta["schedule"])
    save_unclip_folder(folder, prior=cfg.out_path("prior") / "prior.safetensors",
                       decoder=cfg.out_path("decoder") / "decoder.safetensors",
                       vae=cfg.out_path("vae") / "vae.safetensors",
                       clip=cfg.out_path("clip") / "clip.safetensors",
                       tokenizer=cfg.out_path("clip") / "tokenizer", schedule=schedule,
                       defaults=shapes_unclip_defaults(cfg), name="shapes-unclip",
                       decoder_text=decoder_text)
