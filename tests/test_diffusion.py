"""Schedules, denoiser wrappers, guidance and training targets (diffusers as the reference)."""
import dataclasses

import numpy as np
import pytest
import torch

from nanodiffusion.diffusion import (Denoiser, NoiseSchedule, ScheduleConfig,
                                     add_noise, cfg_denoiser, karras_sigmas, loss_weights, snr,
                                     training_targets)

diffusers = pytest.importorskip("diffusers")

SCHEDULES = [ScheduleConfig(),
             ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             ScheduleConfig(beta_schedule="squaredcos_cap_v2")]


def test_config_round_trip_and_errors():
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    cfg = ScheduleConfig.from_diffusers(sd15)
    # the keys SD 1.5's file leaves out take PNDMScheduler's defaults, and are remembered
    assert cfg.defaulted == ("prediction_type", "timestep_spacing", "clip_sample_range",
                             "rescale_betas_zero_snr", "original_inference_steps")
    assert dataclasses.replace(cfg, defaulted=()) == ScheduleConfig()
    assert ScheduleConfig.from_diffusers({"_class_name": "PNDMScheduler",
                                          **cfg.to_diffusers()}) == cfg
    with pytest.raises(ValueError, match="'cosine'.*squaredcos_cap_v2"):
        ScheduleConfig.from_diffusers({"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="v_prediction"):
        ScheduleConfig(prediction_type="v")
    with pytest.raises(ValueError, match="trained_betas"):
        ScheduleConfig.from_diffusers({"trained_betas": [0.1, 0.2]})


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: c.beta_schedule)
def test_schedule_matches_diffusers(cfg):
    ref = diffusers.DDPMScheduler.from_config(cfg.to_diffusers())
    s = NoiseSchedule(cfg)
    assert torch.equal(s.betas, ref.betas) and torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    assert torch.allclose(s.sigma_to_t(s.sigmas), torch.arange(1000.0), atol=2e-3)
    assert torch.equal(s.t_to_sigma(torch.tensor([0.0, 999.0])), s.sigmas[[0, 999]])


def test_sigma_to_t_matches_diffusers():
    s = NoiseSchedule()
    ref = diffusers.EulerDiscreteScheduler.from_config(s.config.to_diffusers())
    sig = karras_sigmas(s.sigmas[0].item(), s.sigmas[-1].item(), 17)
    want = ref._sigma_to_t(sig, np.log(s.sigmas.numpy()))
    got = s.sigma_to_t(torch.from_numpy(sig).float())
    assert np.allclose(got.numpy(), want, atol=2e-3)
    assert s.sigma_to_t(torch.tensor(1e-4)) == 0 and s.sigma_to_t(torch.tensor(1e3)) == 999


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50])
def test_timesteps_match_diffusers(spacing, steps):
    cfg = ScheduleConfig(timestep_spacing=spacing)
    s = NoiseSchedule(cfg)
    for cls, kw in [("DDIMScheduler", {}), ("EulerDiscreteScheduler", dict(rounded=False)),
                    ("DPMSolverMultistepScheduler", dict(multistep=True))]:
        ref = getattr(diffusers, cls).from_config(cfg.to_diffusers())
        ref.set_timesteps(steps)
        assert np.array_equal(s.timesteps(steps, **kw), ref.timesteps.double().numpy()), cls


def oracle(schedule, x0, noise, prediction_type):
    """A model that knows x0 and the noise and answers in the given parametrisation."""
    def model(x_in, t, **cond):
        a = schedule.alphas_cumprod[t.round().long()].reshape(-1, 1, 1)
        tol = 1e-5 if x_in.dtype == torch.float32 else 5e-3
        assert torch.allclose(x_in.float(), a**0.5 * x0 + (1 - a) ** 0.5 * noise, atol=tol)
        return {"epsilon": noise, "sample": x0,
                "v_prediction": a**0.5 * noise - (1 - a) ** 0.5 * x0}[prediction_type]
    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0(prediction_type):
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    t = torch.tensor([10, 500, 990])
    sigma = s.sigmas[t]
    x = x0 + sigma.reshape(-1, 1, 1) * noise  # VE
    den = Denoiser(oracle(s, x0, noise, prediction_type), s, prediction_type, quantize_t=True)
    assert torch.allclose(den(x, sigma), x0, atol=1e-4)
    x_t, target = training_targets(s, x0, noise, t, prediction_type)
    assert torch.allclose(x_t, x / (sigma.reshape(-1, 1, 1) ** 2 + 1) ** 0.5, atol=1e-5)
    if prediction_type == "v_prediction":
        ref = diffusers.DDPMScheduler.from_config(s.config.to_diffusers())
        assert torch.allclose(target, ref.get_velocity(x0, noise, t), atol=1e-6)
    one = Denoiser(oracle(s, x0[:1], noise[:1], prediction_type), s, prediction_type, True)
    out = one(x[:1].half(), sigma[0])  # scalar sigma; output keeps the input dtype
    assert out.dtype == torch.float16 and torch.allclose(out.float(), x0[:1], atol=2e-2)


def test_add_noise_matches_diffusers():
    s = NoiseSchedule()
    ref = diffusers.DDPMScheduler.from_config(s.config.to_diffusers())
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([3, 700])
    assert torch.allclose(add_noise(s, x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)


def _toy_model(calls):
    def model(x_in, t, context):
        calls.append(x_in.shape[0])
        c = context.mean(dim=(1, 2)).reshape(-1, 1)
        return x_in * (0.1 + c) + c * torch.cos(t / 100)[:, None]
    return model


def test_cfg_batches_once_and_combines():
    calls = []
    den = Denoiser(_toy_model(calls), NoiseSchedule())
    x, sigma = torch.randn(3, 6), torch.full((3,), 2.0)
    cond, uncond = torch.randn(3, 5, 4), torch.zeros(3, 5, 4)
    out1 = cfg_denoiser(den, 1.0)(x, sigma, context=cond)
    assert calls == [3] and torch.allclose(out1, den(x, sigma, context=cond))
    calls.clear()
    guided = cfg_denoiser(den, 7.5)(x, 2.0, context=torch.cat([uncond, cond]))
    assert calls == [6]
    u, c = den(x, sigma, context=uncond), den(x, sigma, context=cond)
    assert torch.allclose(guided, u + 7.5 * (c - u), atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_guidance_rescale_is_diffusers_rescale_of_the_model_output(prediction_type):
    """Our guidance works on x0; diffusers' guidance_rescale on the model output (eps or v).
    The x0 we return must be the x0 of diffusers' rescaled output."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    s = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    model = _toy_model([])
    den = Denoiser(model, s)
    x, sigma = torch.randn(2, 6) * 3, torch.tensor([2.0, 0.5])
    cond, uncond = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    got = cfg_denoiser(den, 7.5, rescale=0.7)(x, sigma, context=torch.cat([uncond, cond]))
    plain = cfg_denoiser(den, 7.5)(x, sigma, context=torch.cat([uncond, cond]))
    # diffusers: outputs on the VP input, guidance, rescale, then the same x0 conversion
    x_in, t = x / (sigma[:, None] ** 2 + 1) ** 0.5, s.sigma_to_t(sigma)
    out_u, out_c = model(x_in, t, uncond), model(x_in, t, cond)
    out = rescale_noise_cfg(out_u + 7.5 * (out_c - out_u), out_c, guidance_rescale=0.7)
    want = Denoiser(lambda *a, **k: out, s)(x, sigma)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # rescale changed the result
    with pytest.raises(ValueError, match="guidance_rescale"):
        cfg_denoiser(den, 7.5, rescale=1.5)


def test_min_snr_weights():
    s = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    w = snr(s, t)
    assert torch.allclose(w, 1 / s.sigmas[t] ** 2, rtol=1e-5)
    assert torch.equal(loss_weights(s, t), torch.ones(3))
    eps = loss_weights(s, t, "epsilon", min_snr_gamma=5.0)
    assert eps[0] < 1 and eps[2] == 1  # high-SNR (small t) steps are down-weighted
    v = loss_weights(s, t, "v_prediction", min_snr_gamma=5.0)
    assert torch.allclose(v, torch.minimum(w + 1, torch.tensor(5.0)) / (w + 1))
    assert v[2] == 1  # the v loss already weighs x0 errors by snr + 1 >= 1


def test_zero_terminal_snr_matches_diffusers():
    cfg = ScheduleConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                         timestep_spacing="trailing", steps_offset=0)
    s = NoiseSchedule(cfg)
    ref = diffusers.DDPMScheduler.from_config(cfg.to_diffusers())
    assert torch.allclose(s.betas, ref.betas, atol=1e-7)
    assert torch.allclose(s.alphas_cumprod[:-1], ref.alphas_cumprod[:-1], rtol=1e-5)
    assert ref.alphas_cumprod[-1] < 1e-9 and s.alphas_cumprod[-1] == 2**-24
    euler = diffusers.EulerDiscreteScheduler.from_config(cfg.to_diffusers())
    assert torch.allclose(s.sigmas, ((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5)
    assert s.alphas_cumprod[0] == NoiseSchedule().alphas_cumprod[0]  # the first step is kept
    w = loss_weights(s, torch.tensor([999]), "v_prediction", min_snr_gamma=5.0)
    assert torch.isfinite(w).all() and w.item() == 1.0
    eps = loss_weights(s, torch.tensor([999]), "epsilon", min_snr_gamma=5.0)
    assert torch.isfinite(eps).all()
    assert ScheduleConfig.from_diffusers(ref.config).rescale_betas_zero_snr


def test_cfg_denoiser_with_prebatched_cond():
    calls = []

    def model(x_in, t, context):
        calls.append(x_in.shape[0])
        return x_in * 0.2 + context[:, :1, 0].reshape(-1, 1)

    s = NoiseSchedule()
    den = Denoiser(model, s)  # prediction type from the schedule
    x, sigma, ctx = torch.randn(2, 3), torch.tensor(1.5), torch.randn(4, 7, 5)  # [uncond; cond]
    guided = cfg_denoiser(den, 3.0)(x, sigma, context=ctx)
    assert calls == [4]
    u, c = den(x, sigma, context=ctx[:2]), den(x, sigma, context=ctx[2:])
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)
    assert cfg_denoiser(den, 1.0) is den
