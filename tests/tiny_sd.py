"""Tiny random Stable Diffusion pipelines built with diffusers and transformers, saved as
diffusers folders, for the whole-pipeline parity tests (test_pipeline.py, test_loading.py)."""
import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import diffusers
import torch
from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFTokenizer

import nanodiffusion
from nanodiffusion import samplers
from nanodiffusion.models.tokenizer import CLIPTokenizer

HINTS = dict(unet_num_heads=(2, 2), text_num_heads=2, norm_groups=8)  # what LDMHints need


def unet(in_channels=4, seed=0, time_cond_proj_dim=None):
    """`time_cond_proj_dim`: an LCM UNet, the guidance scale embedded (random cond_proj)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=2,  # diffusers' name for 2 heads
        time_cond_proj_dim=time_cond_proj_dim)


def vae(blocks=(16, 32), seed=1):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=blocks, norm_num_groups=8, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks))


def text_encoder(seed=2):
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def tokenizer(folder):
    CLIPTokenizer.default().save(folder)  # the real CLIP vocabulary, in transformers' layout
    return HFTokenizer.from_pretrained(folder)


def scheduler(prediction_type="epsilon"):
    """SD 1.5's scheduler_config.json (clip_sample included, which PNDM keeps unused), with
    every option spelled out: diffusers' from_config gives the options a config left at their
    default the *target* class's default (Euler: linspace spacing, DDIM: clip_sample)."""
    return PNDMScheduler.from_config(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
        clip_sample=False, steps_offset=1, timestep_spacing="leading",
        prediction_type=prediction_type))


def build(folder, *, vae_blocks=(16, 32), prediction_type="epsilon", in_channels=4,
          time_cond_proj_dim=None):
    """A diffusers pipeline saved to `folder`/pipe, and ours loaded from there."""
    folder = Path(folder)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    ref = cls(vae=vae(vae_blocks), text_encoder=text_encoder(),
              tokenizer=tokenizer(folder / "tok"),
              unet=unet(in_channels, time_cond_proj_dim=time_cond_proj_dim),
              scheduler=scheduler(prediction_type), safety_checker=None,
              feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(folder / "pipe")
    return SimpleNamespace(ref=ref, folder=folder / "pipe",
                           scheduler_config=dict(ref.scheduler.config),
                           ours=nanodiffusion.load(folder / "pipe"))


def use_sampler(pipe, config, name):
    """Give a diffusers pipeline the scheduler that our sampler `name` reproduces."""
    cls, extra = samplers.diffusers_scheduler_for(name)
    pipe.scheduler = getattr(diffusers, cls).from_config({**config, **extra})


@contextlib.contextmanager
def latents_of(vae):
    """Record the latents a VAE (ours or diffusers') decodes: post_quant_conv's input."""
    seen = []
    hook = vae.post_quant_conv.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        yield seen
    finally:
        hook.remove()


def as_array(images):
    """Our PIL images -> (B, H, W, 3) float in [0, 1], as diffusers' output_type='np'."""
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def fixed_indices(cfg, step, chunk, rank, world):
    """The loop's chunk_indices with the same samples at every step (a batch a model can
    overfit; noise and timesteps still vary): monkeypatch it over train.loop.chunk_indices."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    first = (chunk * world + rank) * micro
    return list(range(first, first + micro))


def assert_float32_rounding_apart(got, want):
    """Two float32 runs of the same images whose convolutions ran on oneDNN's packed and dense
    kernels: bit for bit on some machines, but on an AMD Zen 4 the two round some small
    convolutions differently (up to 6e-6, models/packing.py), and so does an AMX Xeon a 4-channel
    one (the shapes VAE's conv_in, 1.4e-6), and which kernel a call gets
    can depend on the calls before it: at most one level apart, on at most 1% of the bytes (a
    fresh-clone CI saw 4 of a 32x32 image's 3,072, 0.13%; a wrong setting moves most bytes by
    more than one level)."""
    for g, w in zip(got, want, strict=True):
        g, w = (np.asarray(im, dtype=np.int16) for im in (g, w))
        apart = np.abs(g - w)
        assert apart.max() <= 1 and (apart > 0).mean() <= 1e-2, (apart.max(), (apart > 0).mean())


def assert_close_images(got, want, latents=None, tol=2 / 255):
    """Pixels within `tol`; latents (got, want) within 2e-5 of the latents' scale."""
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= tol, f"max pixel difference {err * 255:.2f}/255"
    if latents is not None:
        (got_l,), (want_l,) = latents
        scale = want_l.abs().max().item()
        lat_err = (got_l - want_l).abs().max().item()
        assert lat_err <= 2e-5 * scale, f"latents differ by {lat_err:.2e} (scale {scale:.1f})"
