"""The few-step samplers lcm and tcd against diffusers' LCMScheduler and TCDScheduler: final
latents of the scheduler loop (test_samplers' helpers) on SD's schedule and a zero-terminal-SNR
one, and whole pipelines against StableDiffusion(Img2Img)Pipeline on tiny random models
(test_pipeline's check_parity)."""
import functools
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import test_samplers  # noqa: E402
from test_pipeline import H, W, check_parity, img2img_ref, init_image, sd, sd_v  # noqa: E402,F401
from test_samplers import SD, SD_V, ZERO_SNR, diffusers_loop, ours, toy_model  # noqa: E402
from test_scheduler_defaults import DDIM_JSON, EULER_JSON, SD15_JSON, loaded  # noqa: E402

import nanodiffusion  # noqa: E402
import tiny_sd  # noqa: E402
from nanodiffusion import pnginfo  # noqa: E402
from nanodiffusion.diffusion import Denoiser, NoiseSchedule, ScheduleConfig  # noqa: E402
from nanodiffusion.errors import InputError  # noqa: E402
from nanodiffusion.pipelines.checks import check_eta  # noqa: E402
from nanodiffusion.samplers import plan, run  # noqa: E402
from nanodiffusion.server.params import get_sampler  # noqa: E402

SCHEDULES = {"sd": SD, "sd_v": SD_V, "zero_snr": ZERO_SNR}
STEPS = [1, 2, 4, 8]
SEED = 3


def config_option(monkeypatch, name, **config):
    """Give the diffusers scheduler of test_samplers' loop these config options
    (LCMScheduler.from_config({..., original_inference_steps=20}))."""
    cls, extra = test_samplers.diffusers_scheduler_for(name)
    monkeypatch.setattr(test_samplers, "diffusers_scheduler_for",
                        lambda _: (cls, {**extra, **config}))


def compare(name, cfg, steps, strength=1.0, original=None, **step_kw):
    """Max abs difference of our final latents from diffusers' loop (same toy model, same CPU
    generator seed), after checking the timesteps and the number of noise draws agree."""
    init = None
    if strength < 1.0:
        init = torch.randn(test_samplers.SHAPE, generator=torch.Generator().manual_seed(7))
    ref, ref_ts, ref_g = diffusers_loop(name, cfg, steps, SEED, strength=strength, init=init,
                                        **step_kw)
    opts = {} if original is None else {"original_inference_steps": original}
    got, p, g = ours(name, cfg, steps, SEED, strength=strength, init=init, **opts, **step_kw)
    assert p.timesteps.tolist() == ref_ts.float().tolist()
    assert torch.equal(g.get_state(), ref_g.get_state()), "different number of noise draws"
    assert torch.isfinite(got).all()
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("original", [50, 20])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lcm_matches_diffusers(monkeypatch, schedule, steps, original):
    config_option(monkeypatch, "lcm", original_inference_steps=original)
    err = compare("lcm", SCHEDULES[schedule], steps, original=original)
    assert err <= 1e-4, f"max abs diff {err:.2e}"


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("original", [50, 20])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tcd_matches_diffusers(monkeypatch, schedule, steps, original, eta):
    config_option(monkeypatch, "tcd", original_inference_steps=original)
    err = compare("tcd", SCHEDULES[schedule], steps, original=original, eta=eta)
    assert err <= 1e-4, f"max abs diff {err:.2e}"


def test_tcd_default_eta_is_diffusers_step_default():
    """TCDScheduler.step's eta default is 0.3; ours too (diffusers' pipelines pass their own
    eta=0.0 default to it, see test_tcd_pipeline_matches_diffusers)."""
    assert compare("tcd", SD, 4) <= 1e-4
    assert plan("tcd", NoiseSchedule(), 4).fn.keywords["eta"] == 0.3


@pytest.mark.parametrize("name,eta", [("lcm", None), ("tcd", 0.3), ("tcd", 1.0)])
@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_img2img_strength_matches_diffusers(schedule, name, steps, eta):
    """StableDiffusionImg2ImgPipeline with LCMScheduler / TCDScheduler: the first steps of the
    txt2img schedule are skipped (not LatentConsistencyModelImg2ImgPipeline's rule)."""
    kw = {} if eta is None else {"eta": eta}
    err = compare(name, SCHEDULES[schedule], steps, strength=0.5, **kw)
    assert err <= 1e-4, f"max abs diff {err:.2e}"


EPS_ZERO_SNR = ScheduleConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              steps_offset=0)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_epsilon_on_zero_terminal_snr(monkeypatch, name):
    """Below the last timestep an epsilon model on a zero-SNR schedule matches; at it (alpha 0)
    diffusers' x0 is NaN and ours finite (the documented difference)."""
    config_option(monkeypatch, name, original_inference_steps=30)  # from t = 989
    assert compare(name, EPS_ZERO_SNR, 4, original=30) <= 1e-4
    monkeypatch.undo()
    assert not torch.isfinite(diffusers_loop(name, EPS_ZERO_SNR, 4, SEED)[0]).all()
    assert torch.isfinite(ours(name, EPS_ZERO_SNR, 4, SEED)[0]).all()


@pytest.mark.parametrize("original", [50, 20])
def test_boundary_scalings_are_diffusers(original):
    ref = diffusers.LCMScheduler(original_inference_steps=original)
    p = plan("lcm", NoiseSchedule(), 8, original_inference_steps=original)
    want = torch.tensor([ref.get_scalings_for_boundary_condition_discrete(t)
                         for t in p.timesteps.long()])  # (N, 2) c_skip, c_out
    got = torch.stack([p.fn.keywords["c_skip"], p.fn.keywords["c_out"]], dim=1)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_boundary_scalings_apply_to_the_vp_sample(monkeypatch, schedule):
    """With timestep_scaling 0.01 c_skip is large (0.04 at t = 259, 1 at t = 0), so the loop
    shows how the scalings are applied (at the default 10 they are within 1e-5 of 0 and 1)."""
    config_option(monkeypatch, "lcm", timestep_scaling=0.01)
    cfg = SCHEDULES[schedule]
    ref, _, _ = diffusers_loop("lcm", cfg, 4, SEED)
    sched = diffusers.LCMScheduler(timestep_scaling=0.01)
    schedule = NoiseSchedule(cfg)
    p = plan("lcm", schedule, 4)
    c_skip, c_out = torch.tensor([sched.get_scalings_for_boundary_condition_discrete(t)
                                  for t in p.timesteps.long()]).T
    p.fn = functools.partial(p.fn, c_skip=c_skip, c_out=c_out)
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(test_samplers.SHAPE, generator=g)
    den = Denoiser(toy_model, schedule, cfg.prediction_type, quantize_t=p.quantize_t)
    got = run(p, den, noise, generator=g)
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("config", [EULER_JSON, SD15_JSON, DDIM_JSON],
                         ids=["euler", "sd15", "ddim"])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_foreign_scheduler_config_takes_the_class_defaults(tmp_path, config, name):
    """<LCM|TCD>Scheduler.from_config(pipe.scheduler.config): left-out options take the LCM
    class's defaults (scaled_linear betas), as in diffusers."""
    source = loaded(tmp_path, config)
    cls = diffusers.LCMScheduler if name == "lcm" else diffusers.TCDScheduler
    ref = cls.from_config(source.config)
    cfg = ScheduleConfig.from_diffusers(json.loads((tmp_path / "scheduler_config.json")
                                                   .read_text()))
    mine = plan(name, NoiseSchedule(cfg), 4).schedule
    assert torch.equal(mine.alphas_cumprod[:-1], ref.alphas_cumprod[:-1])
    assert mine.config.prediction_type == ref.config.prediction_type


@pytest.mark.parametrize("call, words", [
    (lambda: plan("lcm", NoiseSchedule(), 60), ["steps=60", "original_inference_steps=50"]),
    (lambda: plan("tcd", NoiseSchedule(), 8, original_inference_steps=4), ["steps=8", "=4"]),
    (lambda: plan("lcm", NoiseSchedule(), 4, original_inference_steps=0), ["[1, 1000]", "0"]),
    (lambda: plan("lcm", NoiseSchedule(), 4, original_inference_steps=1001), ["1001"]),
    (lambda: plan("tcd", NoiseSchedule(), 4, original_inference_steps=2.5), ["2.5"]),
    (lambda: plan("tcd", NoiseSchedule(), 4, eta=1.5), ["gamma", "[0, 1]", "1.5"]),
    (lambda: plan("tcd", NoiseSchedule(), 4, eta=-0.1), ["-0.1"]),
    (lambda: plan("euler", NoiseSchedule(), 4, original_inference_steps=20),
     ["original_inference_steps", "lcm and tcd", "euler"]),
    (lambda: check_eta(1.5, "tcd"), ["eta", "1.5"]),
    (lambda: check_eta(0.3, "lcm"), ["eta", "tcd", "lcm"]),
])
def test_bad_settings_raise_input_errors(call, words):
    with pytest.raises(InputError) as e:
        call()
    assert all(w in str(e.value) for w in words), str(e.value)


def test_eta_option_and_a1111_name():
    check_eta(0.3, "tcd")
    check_eta(0.0, "tcd")
    assert pnginfo.A1111_SAMPLERS["lcm"] == "LCM"
    assert get_sampler({"sampler": "LCM"}) == "lcm" and get_sampler({"sampler": "tcd"}) == "tcd"


# ---- whole pipelines ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_zero(sd_v, tmp_path_factory):
    """sd_v's weights on a zero-terminal-SNR trailing schedule (as the bundled models)."""
    folder = tmp_path_factory.mktemp("zero") / "pipe"
    shutil.copytree(sd_v.folder, folder)
    config = {**sd_v.scheduler_config, "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing", "steps_offset": 0}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return SimpleNamespace(ref=sd_v.ref, scheduler_config=config,
                           ours=nanodiffusion.load(folder))


@pytest.fixture(scope="module")
def lcm_sd(tmp_path_factory):
    """An LCM UNet: the guidance scale embedded (time_cond_proj_dim), no uncond branch."""
    return tiny_sd.build(tmp_path_factory.mktemp("lcm"), time_cond_proj_dim=32)


@pytest.mark.parametrize("model", ["sd", "sd_v", "sd_zero", "lcm_sd"])
def test_lcm_pipeline_matches_diffusers(model, request):
    check_parity(request.getfixturevalue(model), "lcm", width=W, height=H)


@pytest.mark.parametrize("model,eta", [("sd", 0.0), ("sd", 0.3), ("sd", 1.0), ("sd_v", 0.3),
                                       ("sd_zero", 0.3), ("lcm_sd", 0.3)])
def test_tcd_pipeline_matches_diffusers(model, eta, request):
    """eta given to both: StableDiffusionPipeline's own default is eta=0.0, which it passes
    to TCDScheduler.step (whose default, and ours, is 0.3)."""
    check_parity(request.getfixturevalue(model), "tcd", width=W, height=H, eta=eta)


@pytest.mark.parametrize("name,kw", [("lcm", {}), ("tcd", {"eta": 0.3})])
def test_img2img_pipeline_matches_diffusers(sd, img2img_ref, init_image, name, kw):
    check_parity(sd, name, "img2img", img2img_ref, image=init_image, strength=0.5, **kw)
