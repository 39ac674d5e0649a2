"""The UNet part: latent denoising on frozen CLIP text states and frozen VAE latents (Stable
Diffusion's recipe), and the assembly of the finished model folder. With `base` it fine-tunes
a pretrained model's UNet instead of a fresh one (the base's VAE, text encoder, tokenizer,
schedule and prediction type; the folder assembled with them). Also what the unCLIP decoder
and the lora part share with it (unclip.py, lora.py): the frozen encoders' outputs per sample
(encoded_batch, cached over a latent pool), the part's noise schedule and the denoising loss."""
import torch
import torch.nn.functional as F

from ..diffusion import NoiseSchedule, ScheduleConfig, loss_weights, training_targets
from ..formats import checkpoint
from ..formats.ours import save_folder
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import SHAPES, UNet
from ..pipelines.images import make_grid
from ..pipelines.sd import Defaults, Pipeline
from .common import (check_fixed, folder_captions, images_and_captions, load_base, override,
                     rand, randn, save_ema, save_with_unet, source)

SAMPLE_PROMPTS = ["a red circle", "a blue square on the left", "a large green star",
                  "a yellow triangle at the top", "a pink circle above a cyan square",
                  "a purple star to the left of an orange triangle", "a red star",
                  "a blue circle below a green triangle"]


def frozen_parts(cfg, device):
    """The CLIP text tower, tokenizer and VAE that earlier parts of this run wrote."""
    clip_path = cfg.out_path("clip") / "clip.safetensors"
    vae_path = cfg.out_path("vae") / "vae.safetensors"
    for p in (clip_path, vae_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: train the clip and vae parts into "
                                    f"{cfg.out} before the unet")
    clip = checkpoint.load_model(clip_path, device=device)
    vae = checkpoint.load_model(vae_path, device=device)
    tok = CLIPTokenizer.from_folder(cfg.out_path("clip") / "tokenizer")
    for m in (clip, vae):
        m.requires_grad_(False)
    return clip, vae, tok


@torch.no_grad()
def frozen_text(frozen, captions):
    """(token states (B, T, D), pooled states (B, D), projected text embeddings (B, E)) of the
    frozen text encoder (frozen["text"], else frozen["clip"]'s text tower), cached per caption
    in frozen["cache"] (the shapes grammar repeats captions). The projection is CLIP's; a text
    encoder without its CLIP (a diffusers teacher) gives its pooled states there."""
    cache, clip = frozen["cache"], frozen.get("clip")
    text = frozen.get("text") or clip.text_model
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    if missing:
        ids = frozen["tokenizer"](missing, max_length=text.config.max_positions)
        hidden, pooled = text(ids.to(next(text.parameters()).device))
        projected = pooled if clip is None else clip.text_projection(pooled)
        cache.update(zip(missing, zip(hidden, pooled, projected)))
    return tuple(torch.stack([cache[c][k] for c in captions]) for k in range(3))


@torch.no_grad()
def encoded_batch(cfg, frozen, indices, encode, device, pool=None):
    """The samples `indices` as ({name: (B, ...) tensor} = encode(images), captions): what the
    frozen encoders make of them (VAE posteriors, CLIP embeddings). With a pool of N
    (cfg.latent_pool unless given), sample i is sample i % N of the data, and its encodings are
    kept in memory after its first use, so that N samples cost one pass of the encoders
    however long the part trains."""
    pool = cfg.latent_pool if pool is None else pool
    keys = [i % pool for i in indices] if pool else list(indices)
    cache = frozen.setdefault("encoded", {}) if pool else {}
    missing = [k for k in dict.fromkeys(keys) if k not in cache]
    if missing:
        images, captions = images_and_captions(cfg, frozen, missing, device)
        out = encode(images)
        for j, k in enumerate(missing):
            cache[k] = ({name: v[j] for name, v in out.items()}, captions[j])
    items = [cache[k] for k in keys]
    return ({name: torch.stack([enc[name] for enc, _ in items]) for name in items[0][0]},
            [c for _, c in items])


def vae_posterior(vae):
    """encode() for encoded_batch: the VAE posterior's mean and log-variance."""
    def encode(images):
        post = vae.encode(images)
        return {"mean": post.mean, "logvar": post.logvar}
    return encode


def latents_of(vae, enc, gens):
    """Scaled latents: a sample of the posterior enc["mean"], enc["logvar"] with each
    sample's own generator."""
    eps = randn(gens, enc["mean"].shape[1:], enc["mean"].device)
    return (enc["mean"] + torch.exp(0.5 * enc["logvar"]) * eps) * vae.config.scaling_factor


def noised(schedule, x0, gens, prediction_type="epsilon"):
    """(x_t, t, target): x0 through the forward process at per-sample timesteps t, and what a
    model of `prediction_type` predicts from x_t (diffusion.training_targets). Each sample's
    generator draws its timestep, then its noise."""
    T = schedule.config.num_train_timesteps
    t = (rand(gens, x0.device) * T).long().clamp(max=T - 1)
    noise = randn(gens, x0.shape[1:], x0.device)
    x_t, target = training_targets(schedule, x0, noise, t, prediction_type)
    return x_t, t, target


def schedule_config(cfg):
    """The noise schedule a unet or decoder part trains with (and its model folder keeps):
    Stable Diffusion's, or with `zero_terminal_snr` the same rescaled to end in pure noise,
    sampled at trailing timesteps (Lin et al. 2024)."""
    if cfg.zero_terminal_snr:
        return ScheduleConfig(prediction_type=cfg.prediction_type, rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", steps_offset=0)
    return ScheduleConfig(prediction_type=cfg.prediction_type)


def denoising_loss(cfg, schedule, x0, gens, predict):
    """MSE of `predict(x_t, t)` against the target of the schedule's prediction type (the
    noise, v or x0: cfg.prediction_type, or a base model's), optionally min-SNR weighted."""
    kind = schedule.config.prediction_type
    x_t, t, target = noised(schedule, x0, gens, kind)
    pred = predict(x_t, t)
    per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma > 0:
        per_sample = per_sample * loss_weights(schedule, t, kind,
                                               cfg.min_snr_gamma).to(per_sample.device)
    return per_sample.mean()


def unet_loss(cfg, unet, frozen, batch, gens, text_of=None):
    """The denoising loss of `unet` on a batch of encoded_batch's, each caption dropped with
    probability cfg.caption_dropout; `text_of(captions)` -> (token states, pooled states),
    by default the frozen text encoder's (frozen_text)."""
    enc, captions = batch
    device = enc["mean"].device
    x0 = latents_of(frozen["vae"], enc, gens)
    drop = rand(gens, device) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    context, pooled = (text_of or (lambda c: frozen_text(frozen, c)[:2]))(captions)
    text = checkpoint.unwrap(unet).text_condition(context, pooled)  # (B, T, D), (B, D)
    return denoising_loss(cfg, frozen["schedule"], x0, gens,
                          lambda x_t, t: unet(x_t, t, **text))


class UnetPart:
    @staticmethod
    def build(cfg, device):
        if cfg.base:
            return from_base(cfg, device)
        clip, vae, tok = frozen_parts(cfg, device)
        text = clip.text_model
        fixed = {"in_channels": vae.config.latent_channels,
                 "out_channels": vae.config.latent_channels, "context_dim": text.config.width,
                 "pooled_text_dim": text.config.width if cfg.pooled_text else None}
        check_fixed("unet", fixed, cfg.model)
        model = UNet(override(SHAPES, {**cfg.model, **fixed})).to(device)
        schedule = NoiseSchedule(schedule_config(cfg))
        frozen = {"source": source(cfg)[0], "clip": clip, "text": text, "vae": vae,
                  "tokenizer": tok, "schedule": schedule, "cache": {}}
        return model, frozen

    @staticmethod
    def batch(cfg, frozen, indices, device):
        return encoded_batch(cfg, frozen, indices, vae_posterior(frozen["vae"]), device)

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        return unet_loss(cfg, model, frozen, batch, gens), {}

    @staticmethod
    def export(cfg, model, ema):
        save_ema(model, ema, cfg.run_dir / "unet.safetensors")
        assemble_model(cfg)

    @staticmethod
    def sample(cfg, model, frozen, path):
        model.eval()
        try:
            pipe = _pipeline_from(cfg, model, frozen)
            images = [pipe.generate(p, seed=i, steps=20, width=cfg.image_size,
                                    height=cfg.image_size)[0]
                      for i, p in enumerate(sample_prompts(cfg))]
            make_grid(images, rows=2).save(path)
        finally:
            model.train()


def sample_prompts(cfg, n=8):
    """What a run's samples show: the shapes prompts, or the first n captions of its folder."""
    if cfg.data == "shapes":
        return SAMPLE_PROMPTS[:n]
    return list(dict.fromkeys(folder_captions(cfg)))[:n]


def _pipeline_from(cfg, model, frozen):
    base = frozen.get("base")
    return Pipeline(model, frozen["vae"], frozen["text"], frozen["tokenizer"],
                    frozen["schedule"].config, defaults=base.defaults if base else
                    shapes_defaults(cfg), clip=frozen["clip"], name=base.name if base else
                    "shapes")


def from_base(cfg, device):
    """(the UNet of cfg.base, trainable; the base's frozen VAE, text encoder and schedule)."""
    if cfg.model:
        raise ValueError(f"unet model settings {sorted(cfg.model)} follow from the UNet of "
                         f"base {cfg.base!r}; remove them from the recipe")
    get = source(cfg)[0]  # first: a folder without images fails before the base loads
    pipe = load_base(cfg, device, "train unet --base")
    model = pipe.unet.requires_grad_(True).train()
    frozen = {"source": get, "clip": pipe.clip, "text": pipe.text_encoder, "vae": pipe.vae,
              "tokenizer": pipe.tokenizer, "schedule": NoiseSchedule(pipe.schedule_config),
              "cache": {}, "base": pipe}
    return model, frozen


def shapes_defaults(cfg):
    return Defaults(steps=15, guidance=3.0, sampler="dpmpp-2m", width=cfg.image_size,
                    height=cfg.image_size)


def assemble_model(cfg):
    """Gather the parts of this run into one model folder: <out>/model; with a base, the
    fine-tuned UNet and the base's other parts, schedule and defaults."""
    if cfg.base:
        save_with_unet(load_base(cfg, "cpu", "train unet --base"), cfg.out_path("model"),
                       cfg.run_dir / "unet.safetensors")
        return
    save_folder(cfg.out_path("model"), unet=cfg.run_dir / "unet.safetensors",
                vae=cfg.out_path("vae") / "vae.safetensors",
                clip=cfg.out_path("clip") / "clip.safetensors",
                tokenizer=cfg.out_path("clip") / "tokenizer",
                schedule=schedule_config(cfg), defaults=shapes_defaults(cfg), name="shapes")
