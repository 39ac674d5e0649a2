"""The VAE part: the KL autoencoder trained on reconstruction (L1 + MSE, ink-weighted) with a
small KL term; its export measures the latent scale."""
import torch
import torch.nn.functional as F

from ..formats import checkpoint
from ..models.vae import SHAPES, VAE
from ..pipelines.images import make_grid, to_pil
from .common import images_and_captions, override, randn, save_ema, source


class VaePart:
    @staticmethod
    def build(cfg, device):
        model = VAE(override(SHAPES, cfg.model)).to(device)
        return model, {"source": source(cfg)[0]}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        return images_and_captions(cfg, frozen, indices, device)[0]

    @staticmethod
    def loss(cfg, model, frozen, images, gens):
        vae = checkpoint.unwrap(model)
        post = vae.encode(images)
        eps = randn(gens, post.mean.shape[1:], images.device)
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
        src = source(cfg)[0]
        x = torch.stack([src(10_000_000 + i)[0] for i in range(256)])
        with torch.no_grad():
            live = {k: v.clone() for k, v in model.state_dict().items()}
            if ema is not None:
                model.load_state_dict(ema, strict=True)
            z = model.encode(x.to(next(model.parameters()).device)).mean
            model.config.scaling_factor = float(1.0 / z.float().std())
            model.load_state_dict(live, strict=True)
        save_ema(model, ema, cfg.run_dir / "vae.safetensors")

    @staticmethod
    def sample(cfg, model, frozen, path):
        x = torch.stack([frozen["source"](10_000_000 + i)[0] for i in range(8)])
        with torch.no_grad():
            model.eval()
            recon = model.decode(model.encode(x.to(next(model.parameters()).device)).mean)
            model.train()
        make_grid(to_pil(torch.cat([x, recon.cpu()])), rows=2).save(path)
