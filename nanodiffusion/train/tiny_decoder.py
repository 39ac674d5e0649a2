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

export() writes <run>/tiny_decoder.safetensors and, when the teacher is the run's own VAE,
adds it to the model folders this run assembled (<out>/model, model-unclip, model-lcm: train
this part after them), whose pipelines then preview with it and decode with it on
vae_decoder="tiny"."""
import math

import torch
import torch.nn.functional as F

from ..formats import checkpoint
from ..formats.taesd import attach_to_folder
from ..models.taesd import SHAPES, TAESD
from ..pipelines.images import make_grid, to_pil
from .common import check_fixed, override, save_ema, source
from .unet import encoded_batch, latents_of

FILE = "tiny_decoder.safetensors"
ASSEMBLED = ("model", "model-unclip", "model-lcm")  # the run's model folders (same VAE)


def teacher_vae(cfg, device):
    """The VAE to distil: `teacher`'s (one of our VAE files, or any model the loader opens),
    else the run's."""
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
    return load_pipeline(cfg.teacher, device=device).vae


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


class TinyDecoderPart:
    @staticmethod
    def build(cfg, device):
        vae = teacher_vae(cfg, device).float().requires_grad_(False)
        vae = vae.eval().to(memory_format=torch.contiguous_format)
        model = TAESD(student_config(cfg, vae)).to(device)
        return model, {"source": source(cfg)[0], "vae": vae}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        return encoded_batch(cfg, frozen, indices, teacher_outputs(frozen["vae"]), device)[0]

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
        if cfg.teacher:
            return
        for name in ASSEMBLED:
            if (cfg.out_path(name) / "model.json").exists():
                attach_to_folder(cfg.out_path(name), path)

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

