"""The tiny-decoder part: a TAESD decoder (models/taesd.py) distilled from a VAE decoder, the
run's (<out>/vae/vae.safetensors) or the VAE of `teacher` (a model name, folder or file).

Each sample is a data image through the frozen VAE encoder; the student decodes a posterior
sample of its latents (scaled as the UNet sees them: generated latents carry the posterior's
noise too), and its target is the VAE decoder's image of the posterior's mean in 8 bits (the
image a pipeline saves). The VAE decoder gives the same image (54.7 dB on shapes) for a sample
as for the mean, so the targets are made once per sample with its posterior and kept with it
over the latent pool: the steps after the first pass cost the student's forward and backward
alone. The loss is L1 + MSE on pixels, each weighted by 1 + ink_weight * (how far the target is
from white), as the vae part weighs shapes' objects. TAESD's author trained its decoder as a
conditional GAN with a little MSE (and LPIPS from TAESD 1.1; madebyollin/taesd issue #2);
neither is cheap on a CPU, and flat shapes on white have no texture to make up, so this part
distils alone.

A model's own samples can be further from the VAE's posteriors than a tiny decoder bridges (the
distribution-matched shapes-lcm's are: 2 dB less from the decoder trained on data latents
alone). With generated_share s, that share of the samples (sample i where floor((i + 1) s) >
floor(i s)) are instead latents the model generates (`teacher`, else the run's <out>/model) at
its defaults, one of generated_steps (cycled; empty: the model's default) for the caption of
data sample g = floor(i s) % generated_pool, seed g: those are what its pipeline decodes. Their
targets are the VAE decoder's images of them, made with them once and kept like the data's.
The other samples are data samples i - floor((i + 1) s): the data's own numbering, so that the
latent pool keeps its size.

export() writes <run>/tiny_decoder.safetensors and, when the teacher is the run's own VAE,
adds it to the model folders this run assembled (<out>/model, model-unclip, model-lcm,
model-dmd: train this part after them), or to the teacher when it is one of them, whose
pipelines then preview with it and decode with it on vae_decoder="tiny"."""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats import checkpoint
from ..formats.taesd import attach_to_folder
from ..models.taesd import SHAPES, TAESD
from ..pipelines.images import make_grid, to_pil
from .common import check_fixed, override, save_ema, source
from .unet import encoded_batch, latents_of

FILE = "tiny_decoder.safetensors"
ASSEMBLED = ("model", "model-unclip", "model-lcm", "model-dmd")  # a run's model folders


def teacher_vae(cfg, device, pipe=None):
    """The VAE to distil: `teacher`'s (one of our VAE files, or any model the loader opens;
    `pipe`: that model, already loaded), else the run's."""
    if not cfg.teacher:
        path = cfg.out_path("vae") / "vae.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train the vae part into {cfg.out} "
                                    f"first, or name a model whose VAE to distil with "
                                    f"--teacher (e.g. shapes)")
        return checkpoint.load_model(path, device=device)
    from ..loading import load_pipeline

    if cfg.teacher.endswith(".safetensors") and \
            checkpoint.read_metadata(cfg.teacher).get("class") == "VAE":
        return checkpoint.load_model(cfg.teacher, device=device)
    return (pipe or load_pipeline(cfg.teacher, device=device)).vae


def student_config(cfg, vae):
    """SHAPES with the recipe's overrides, its latents and factor those of `vae`."""
    fixed = {"latent_channels": vae.config.latent_channels,
             "image_channels": vae.config.out_channels, "encoder_blocks": ()}
    check_fixed("tiny-decoder", fixed, cfg.model)
    c = override(SHAPES, {**cfg.model, **fixed})
    stages = round(math.log2(vae.downscale)) + 1
    if len(c.decoder_blocks) != stages:
        raise ValueError(f"tiny-decoder decoder_blocks {list(c.decoder_blocks)}: "
                         f"{len(c.decoder_blocks)} stages upsample by "
                         f"{2 ** (len(c.decoder_blocks) - 1)}, the VAE by {vae.downscale}; "
                         f"give {stages} stages (e.g. {[2] * (stages - 1) + [1]})")
    return c


def is_generated(cfg, i):
    """Whether sample `i` is one of the model's generated latents (generated_share)."""
    s = cfg.generated_share
    return s > 0 and math.floor((i + 1) * s) > math.floor(i * s)


def generator(cfg, device):
    """The model whose samples join the data (generated_share): the teacher, else the run's
    assembled <out>/model."""
    from ..loading import load_pipeline

    where = cfg.teacher or cfg.out_path("model")
    if not cfg.teacher and not (where / "model.json").exists():
        raise FileNotFoundError(f"generated_share {cfg.generated_share}: {where} not found; "
                                f"assemble the run's model first (train the unet part), or "
                                f"name the model whose samples to decode with --teacher")
    if str(where).endswith(".safetensors") and \
            checkpoint.read_metadata(where).get("class") == "VAE":
        raise ValueError(f"generated_share {cfg.generated_share}: --teacher {where} is a VAE "
                         f"file, which generates nothing; name a whole model, or set "
                         f"generated_share = 0 in the recipe to distil on data latents alone")
    return load_pipeline(where, device=device)


def generated(cfg, frozen, g):
    """Generated sample g: {"mean": its latents unscaled, "logvar": -inf (no posterior noise),
    "target": the VAE decoder's image of them in 8 bits}, made once and kept."""
    cache = frozen.setdefault("generated", {})
    if g not in cache:
        pipe, vae = frozen["generator"], frozen["vae"]
        steps = cfg.generated_steps[g % len(cfg.generated_steps)] if cfg.generated_steps \
            else None
        caption = frozen["source"](g)[1]
        z = pipe.generate(caption, seed=g, steps=steps, width=cfg.image_size,
                          height=cfg.image_size, output_type="latent")  # (1, C, h, w)
        mean = (z / vae.config.scaling_factor).to(next(vae.parameters()).device)
        with torch.no_grad():
            full = vae.decode(mean).clamp(-1, 1)
        cache[g] = {"mean": mean[0], "logvar": torch.full_like(mean[0], -math.inf),
                    "target": ((full[0] + 1) * 127.5).round().to(torch.uint8)}
    return cache[g]


def teacher_outputs(vae):
    """encode() for encoded_batch: the VAE posterior's mean and log-variance, and the VAE
    decoder's image of the mean in 8 bits (B, 3, H, W) uint8, as a pipeline would save it."""
    def encode(images):
        post = vae.encode(images)
        full = vae.decode(post.mean).clamp(-1, 1)
        return {"mean": post.mean, "logvar": post.logvar,
                "target": ((full + 1) * 127.5).round().to(torch.uint8)}
    return encode


def _scaled(tiny, z):
    """The UNet's latents as this TAESD takes them."""
    return z / tiny.config.scaling_factor + tiny.config.shift_factor


def attached_folders(cfg):
    """The model folders the trained decoder joins: this run's assembled ones when it distils
    the run's VAE; the teacher when it is one of them (e.g. --teacher <out>/model-dmd); none
    for a teacher from elsewhere, which is never written."""
    if not cfg.teacher:
        folders = [cfg.out_path(name) for name in ASSEMBLED]
    else:
        own = {cfg.out_path(name).resolve() for name in ASSEMBLED}
        folders = [Path(cfg.teacher)] if Path(cfg.teacher).resolve() in own else []
    return [f for f in folders if (f / "model.json").exists()]


class TinyDecoderPart:
    @staticmethod
    def build(cfg, device):
        # a model teacher loaded once: its generate() of latents never runs its VAE
        gen = generator(cfg, device) if cfg.generated_share else None
        vae = teacher_vae(cfg, device, gen if cfg.teacher else None)
        vae = vae.float().requires_grad_(False).eval().to(memory_format=torch.contiguous_format)
        model = TAESD(student_config(cfg, vae)).to(device)
        frozen = {"source": source(cfg)[0], "vae": vae}
        if gen is not None:
            frozen["generator"] = gen
        return model, frozen

    @staticmethod
    def batch(cfg, frozen, indices, device):
        """The samples' {"mean", "logvar", "target"}: data samples through the VAE (kept in
        the latent pool), generated ones (generated_share) from the model."""
        share = cfg.generated_share  # data samples are numbered among themselves:
        data = [i - math.floor((i + 1) * share) for i in indices if not is_generated(cfg, i)]
        enc = encoded_batch(cfg, frozen, data, teacher_outputs(frozen["vae"]), device)[0] \
            if data else {}
        if len(data) == len(indices):
            return enc
        items, row = [], 0
        for i in indices:
            if is_generated(cfg, i):
                g = math.floor(i * share) % cfg.generated_pool
                items.append(generated(cfg, frozen, g))
            else:
                items.append({k: v[row] for k, v in enc.items()})
                row += 1
        return {k: torch.stack([item[k] for item in items]).to(device) for k in items[0]}

    @staticmethod
    def loss(cfg, model, frozen, enc, gens):
        vae, tiny = frozen["vae"], checkpoint.unwrap(model)
        z = latents_of(vae, enc, gens)  # (B, L, h, w) as the UNet sees them
        target = enc["target"].float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        pred = tiny.decode(_scaled(tiny, z)).float()  # (B, 3, H, W)
        w = 1.0 + cfg.ink_weight * ((1 - target) / 2).amax(dim=1, keepdim=True)  # (B, 1, H, W)
        err = pred - target
        mse = F.mse_loss(pred.detach().clamp(-1, 1), target)
        psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
        return (w * err.abs()).mean() + (w * err.square()).mean(), {"psnr": psnr}

    @staticmethod
    def export(cfg, model, ema):
        path = cfg.run_dir / FILE
        save_ema(model, ema, path)
        for folder in attached_folders(cfg):
            attach_to_folder(folder, path)

    @staticmethod
    def sample(cfg, model, frozen, path):
        """Eval images: the full decoder's (top row) against the tiny decoder's (bottom)."""
        vae = frozen["vae"]
        x = torch.stack([frozen["source"](10_000_000 + i)[0] for i in range(8)])
        with torch.no_grad():
            model.eval()
            z = vae.encode(x.to(next(vae.parameters()).device)).mean * vae.config.scaling_factor
            full = vae.decode(z / vae.config.scaling_factor)
            tiny = model.decode(_scaled(model, z))
            model.train()
        make_grid(to_pil(torch.cat([full, tiny]).cpu()), rows=2).save(path)

