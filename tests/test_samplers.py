"""Samplers against diffusers' schedulers in a pipeline-style loop, and against an analytic
Gaussian denoiser."""
import inspect
import math

import pytest
import torch

from nanodiffusion.diffusion import Denoiser, NoiseSchedule, ScheduleConfig
from nanodiffusion.samplers import (SAMPLER_NAMES, diffusers_scheduler_for, plan, run,
                                    sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun,
                                    sample_lms, sample_unipc)

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SHAPE = (2, 4, 6, 6)


def toy_model(x_in, t, **cond):
    """A smooth deterministic stand-in for a UNet: a function of (x_in, t) only."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x_in.ndim - 1)))
    idx = torch.arange(x_in[0].numel(), dtype=torch.float32).reshape(x_in.shape[1:])
    pattern = torch.sin(idx * 0.7)  # fixed per-position pattern
    return 0.3 * x_in * torch.tanh(t / 400) + 0.5 * pattern * torch.cos(t / 300)


def diffusers_loop(name, cfg, steps, seed, shape=SHAPE, strength=1.0, init=None, blend=None,
                   **step_kw):
    """What StableDiffusion(Img2Img)Pipeline does with the scheduler, minus the networks;
    `blend=(known, mask)`: the 4-channel inpainting blend after every step."""
    cls, extra = diffusers_scheduler_for(name)
    sched = getattr(diffusers, cls).from_config({**cfg.to_diffusers(), **extra})
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    timesteps = sched.timesteps
    if init is None:
        noise = randn_tensor(shape, generator=g)
        x = noise * sched.init_noise_sigma
    else:  # img2img get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        noise = randn_tensor(shape, generator=g)
        x = sched.add_noise(init, noise, timesteps[:1].repeat(shape[0]))
    if "generator" in inspect.signature(sched.step).parameters:
        step_kw["generator"] = g
    for i, t in enumerate(timesteps):
        out = toy_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **step_kw).prev_sample
        if blend is not None:  # StableDiffusionInpaintPipeline, num_channels_unet == 4
            known, m = blend
            if i < len(timesteps) - 1:
                known = sched.add_noise(known, noise, timesteps[i + 1:i + 2])
            x = (1 - m) * known + m * x
    return x, timesteps, g


def ours(name, cfg, steps, seed, shape=SHAPE, strength=1.0, init=None, **opts):
    schedule = NoiseSchedule(cfg)
    p = plan(name, schedule, steps, strength, **opts)
    den = Denoiser(toy_model, schedule, cfg.prediction_type, quantize_t=p.quantize_t)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    return run(p, den, noise, init=init, generator=g), p, g


def check(name, cfg, steps, shape=SHAPE, strength=1.0, **opts):
    init = None
    if strength < 1.0:
        init = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    ref, ref_ts, ref_g = diffusers_loop(name, cfg, steps, 3, shape, strength, init, **opts)
    got, p, g = ours(name, cfg, steps, 3, shape, strength, init, **opts)
    assert torch.isfinite(got).all()
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"{name} steps={steps} strength={strength}: max abs diff {err:.2e}"
    assert torch.equal(g.get_state(), ref_g.get_state()), "different number of noise draws"
    if name != "heun":  # heun's diffusers timesteps repeat each one for the corrector
        assert torch.allclose(p.timesteps, ref_ts.float(), atol=1e-3)


NAMES = [n for n in SAMPLER_NAMES if n != "plms"]  # plms is another name for pndm
SD = ScheduleConfig()
SD_V = ScheduleConfig(prediction_type="v_prediction")
TRAILING = ScheduleConfig(timestep_spacing="trailing", steps_offset=0)
LINSPACE = ScheduleConfig(timestep_spacing="linspace", steps_offset=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [10, 25])
def test_matches_diffusers_txt2img(name, steps):
    check(name, SD, steps)


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_img2img(name):
    check(name, SD, 10, strength=0.6)
    check(name, SD, 25, strength=0.6)


ZERO_SNR = ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          timestep_spacing="trailing", steps_offset=0)


@pytest.mark.parametrize("name", ["euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-sde",
                                  "unipc"])
def test_matches_diffusers_zero_terminal_snr(name):
    # the schedulers that diffusers gives zero-SNR support with alphas_cumprod[-1] = 2**-24
    check(name, ZERO_SNR, 10)
    check(name, ZERO_SNR, 6, strength=0.7)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "pndm"])
def test_matches_diffusers_v_prediction(name):
    # PNDM is left out: diffusers combines raw v outputs across steps before converting them to
    # noise, which differs from combining noise predictions (we document that)
    check(name, SD_V, 10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cfg", [TRAILING, LINSPACE], ids=["trailing", "linspace"])
def test_matches_diffusers_spacing(name, cfg):
    check(name, cfg, 10)
    check(name, cfg, 7, strength=0.6)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler-ancestral", "dpmpp-2m-sde", "lms"])
def test_matches_diffusers_on_embeddings(name):
    check(name, SD, 10, shape=(3, 16))


@pytest.mark.parametrize("name", ["euler", "ddim", "pndm", "dpmpp-2m", "unipc"])
def test_post_step_blend_matches_diffusers_inpainting(name):
    known = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    m = (torch.arange(36).reshape(6, 6) % 5 < 2).float()  # 1 = repaint
    ref = diffusers_loop(name, SD, 10, 3, blend=(known, m))[0]
    schedule = NoiseSchedule(SD)
    p = plan(name, schedule, 10)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    last = p.sigmas[-1].item()

    def post_step(i, x, sigma_next):  # blend in VE: the known latents noised to sigma_next
        k = known * (last**2 + 1) ** 0.5 if i == len(p.sigmas) - 2 else known + sigma_next * noise
        return (1 - m) * k + m * x

    den = Denoiser(toy_model, schedule, quantize_t=p.quantize_t)
    got = run(p, den, noise, post_step=post_step)
    assert (got - ref).abs().max().item() <= 1e-4


def test_ddim_eta_matches_diffusers():
    check("ddim", SD, 10, eta=1.0)
    check("ddim", SD, 10, strength=0.6, eta=0.5)


def test_same_seed_is_bitwise_identical():
    for name in ["euler-ancestral", "dpmpp-2m-sde", "ddpm"]:
        a, b, c = ours(name, SD, 10, 5)[0], ours(name, SD, 10, 5)[0], ours(name, SD, 10, 6)[0]
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_sampler_lists_names():
    with pytest.raises(ValueError, match="euler-ancestral"):
        plan("nope", NoiseSchedule(), 10)
    with pytest.raises(ValueError, match="strength"):
        plan("euler", NoiseSchedule(), 10, strength=0.05)


def test_callback_sees_every_step():
    seen = []
    p = plan("heun", NoiseSchedule(), 6)
    den = Denoiser(toy_model, NoiseSchedule(), quantize_t=p.quantize_t)
    run(p, den, torch.randn(1, 8), generator=torch.Generator(), callback=seen.append)
    assert [d["step"] for d in seen] == list(range(6)) and seen[0]["total"] == 6
    assert seen[0]["denoised"].shape == (1, 8)


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun, sample_lms, sample_dpmpp_2m,
                                     sample_unipc, sample_ddim])
def test_gaussian_data_is_recovered(sampler):
    """Data ~ N(mu, s^2) per dim; the exact denoiser is E[x0 | x] = (s^2 x + sigma^2 mu) /
    (s^2 + sigma^2). Deterministic samplers must carry noise to samples with mean mu, std s."""
    E = 8
    mu, s = torch.linspace(-1, 1, E), torch.linspace(0.3, 1.2, E)

    def denoiser(x, sigma):
        sig2 = sigma.reshape(-1, 1) ** 2
        return (s**2 * x + sig2 * mu) / (s**2 + sig2)

    sigmas = torch.cat([torch.exp(torch.linspace(math.log(80), math.log(0.01), 60)),
                        torch.zeros(1)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, E, generator=g) * math.sqrt(80**2 + s.max() ** 2)
    out = sampler(denoiser, x, sigmas)
    assert out.shape == (4000, E)
    assert torch.allclose(out.mean(0), mu, atol=0.06)
    assert torch.allclose(out.std(0), s, rtol=0.05)
