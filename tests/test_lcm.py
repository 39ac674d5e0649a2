"""LCM models (issue 21): UNets that take the guidance scale as an input (diffusers'
time_cond_proj_dim) load from diffusers folders and our exports and generate as diffusers
does, and `train lcm` distils a teacher into one."""
import json
import math

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (  # noqa: E402,E501
    LatentConsistencyModelPipeline)

import nanodiffusion  # noqa: E402
from nanodiffusion.formats.diffusers_config import unet_config_from_diffusers  # noqa: E402
from nanodiffusion.models.layers import guidance_embedding  # noqa: E402
from nanodiffusion.models.unet import UNet  # noqa: E402
from nanodiffusion.train import TrainConfig, train  # noqa: E402
from nanodiffusion.train import loop as T  # noqa: E402

PROMPT, SEED, STEPS = "a red circle on a blue square", 3, 4


@pytest.fixture(scope="module")
def lcm_sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("lcm"), time_cond_proj_dim=32)


def test_guidance_embedding_is_diffusers_bit_for_bit():
    w = torch.tensor([0.0, 1.0, 7.5, 14.0])
    for dim in (256, 33):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, dim)
        assert torch.equal(guidance_embedding(w, dim), want)


def test_lcm_unet_loads_strictly_and_matches_diffusers():
    ref = tiny_sd.unet(time_cond_proj_dim=48)
    config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    ours = UNet(unet_config_from_diffusers(config))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([999, 321])
    emb = guidance_embedding(torch.tensor([7.5, 1.0]), 48)
    with torch.no_grad():
        want = ref(x, t, ctx, timestep_cond=emb).sample
        got = ours(x, t, ctx, timestep_cond=emb)
        plain = ours(x, t, ctx)
    assert (got - want).abs().max() < 1e-5
    assert (got - plain).abs().max() > 1e-3  # the guidance embedding is used


def test_plain_unet_refuses_a_guidance_embedding():
    ours = UNet(unet_config_from_diffusers(
        {k: v for k, v in tiny_sd.unet().config.items() if not k.startswith("_")}))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        ours(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 32),
             timestep_cond=torch.zeros(1, 32))


def _generate_both(model, guidance, sampler="euler", negative=""):
    tiny_sd.use_sampler(model.ref, model.scheduler_config, sampler)
    with tiny_sd.latents_of(model.ref.vae) as want_latents:
        want = model.ref(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance,
                         num_images_per_prompt=2, output_type="np", width=24, height=16,
                         generator=torch.Generator("cpu").manual_seed(SEED)).images
    with tiny_sd.latents_of(model.ours.vae) as got_latents:
        got = model.ours.generate(PROMPT, negative_prompt=negative, seed=SEED, steps=STEPS,
                                  guidance=guidance, sampler=sampler, n=2, width=24,
                                  height=16)
    return got, want, (got_latents, want_latents)


@pytest.mark.parametrize("guidance", [8.5, 1.0])
def test_lcm_folder_generates_as_diffusers(lcm_sd, guidance):
    """diffusers' StableDiffusionPipeline gives an LCM UNet w = guidance - 1 as timestep_cond
    and runs no uncond branch; ours the same, whatever the sampler."""
    got, want, latents = _generate_both(lcm_sd, guidance)
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want, latents)


def test_lcm_model_ignores_the_negative_prompt_as_diffusers_does(lcm_sd):
    a = lcm_sd.ours.generate(PROMPT, seed=1, steps=2, sampler="euler", width=16, height=16)
    b = lcm_sd.ours.generate(PROMPT, negative_prompt="blue", seed=1, steps=2, sampler="euler",
                             width=16, height=16)
    c = lcm_sd.ours.generate(PROMPT, seed=1, steps=2, sampler="euler", guidance=3.0,
                             width=16, height=16)
    assert tiny_sd.as_array(a).tobytes() == tiny_sd.as_array(b).tobytes()
    assert tiny_sd.as_array(a).tobytes() != tiny_sd.as_array(c).tobytes()


@pytest.mark.parametrize("fmt", ["nanodiffusion", "diffusers", "single-file"])
def test_lcm_model_round_trips_through_our_exports(lcm_sd, tmp_path, fmt):
    from nanodiffusion.cli import main

    out = tmp_path / ("model.safetensors" if fmt == "single-file" else "model")
    assert main(["export", str(lcm_sd.folder), str(out), "--format", fmt]) == 0
    again = nanodiffusion.load(out)
    assert again.unet.config.time_cond_proj_dim == 32
    kw = dict(seed=2, steps=2, sampler="euler", guidance=5.0, width=16, height=16)
    a = lcm_sd.ours.generate(PROMPT, **kw)
    b = again.generate(PROMPT, **kw)
    assert abs(tiny_sd.as_array(a) - tiny_sd.as_array(b)).max() <= 1 / 255


# ---------------------------------------------------------------- distillation

def test_distillation_loss_falls_and_the_model_folder_generates(lcm_sd, tmp_path,
                                                               monkeypatch):
    """A tiny plain SD distilled for 40 steps on one fixed batch: the consistency loss falls,
    the target network (the EMA) is what is exported, and <out>/model-lcm opens with 4-step
    lcm defaults and the teacher's other parts."""
    teacher = tmp_path / "teacher"
    plain = tiny_sd.build(tmp_path / "plain")
    nanodiffusion.formats.ours.save_pipeline(plain.ours, teacher)
    monkeypatch.setattr(T, "chunk_indices", tiny_sd.fixed_indices)
    cfg = TrainConfig(part="lcm", out=str(tmp_path / "run"), teacher=str(teacher),
                      image_size=32, steps=40, batch_size=8, lr=1e-3, warmup=2, log_every=1,
                      ckpt_every=1000, sample_every=0, ema_decay=0.95, solver_steps=10,
                      guidance_range=(2.0, 6.0), model={"time_cond_proj_dim": 16})
    records = train(cfg, progress=False)
    losses = [r["loss"] for r in records]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    assert all(2.0 <= r["guidance"] <= 6.0 for r in records)

    folder = tmp_path / "run" / "model-lcm"
    meta = json.loads((folder / "model.json").read_text())
    assert meta["defaults"]["steps"] == 4 and meta["defaults"]["sampler"] == "lcm"
    student = nanodiffusion.load(folder)
    assert student.unet.config.time_cond_proj_dim == 16
    state = nanodiffusion.formats.checkpoint.load_state(tmp_path / "run" / "lcm" / "state.pt")
    for k, v in student.unet.state_dict().items():
        assert torch.equal(v, state["ema"][k]), k  # the target network is exported
    for k, v in plain.ours.vae.state_dict().items():
        assert torch.equal(v, student.vae.state_dict()[k]), k  # the teacher's VAE


def test_lcm_refuses_model_settings_of_the_teacher(lcm_sd, tmp_path):
    teacher = tmp_path / "teacher"
    nanodiffusion.formats.ours.save_pipeline(tiny_sd.build(tmp_path / "plain").ours, teacher)
    cfg = TrainConfig(part="lcm", out=str(tmp_path / "run"), teacher=str(teacher),
                      image_size=32, steps=1, batch_size=2, model={"block_channels": [8, 8]})
    with pytest.raises(ValueError, match="block_channels"):
        train(cfg, progress=False)


def test_lcm_refuses_an_lcm_teacher(lcm_sd, tmp_path):
    cfg = TrainConfig(part="lcm", out=str(tmp_path / "run"), teacher=str(lcm_sd.folder),
                      image_size=32, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="already embeds the guidance"):
        train(cfg, progress=False)


@pytest.mark.parametrize("original", [None, 20])
def test_latent_consistency_pipeline_folder_opens_with_its_defaults(tmp_path, original):
    """A folder saved by diffusers' LatentConsistencyModelPipeline (an LCM UNet with
    LCMScheduler) opens with 4 lcm steps at guidance 8.5, that pipeline's defaults, and gives
    its images; with the scheduler's original_inference_steps too (timesteps of another grid),
    which our diffusers export writes back."""
    from diffusers import LCMScheduler

    extra = {} if original is None else {"original_inference_steps": original}
    ref = LatentConsistencyModelPipeline(
        vae=tiny_sd.vae(), text_encoder=tiny_sd.text_encoder(),
        tokenizer=tiny_sd.tokenizer(tmp_path / "tok"), unet=tiny_sd.unet(time_cond_proj_dim=32),
        scheduler=LCMScheduler.from_config(tiny_sd.scheduler().config, **extra),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "lcm")
    ours = nanodiffusion.load(tmp_path / "lcm")
    d = ours.defaults
    assert (d.steps, d.sampler, d.guidance) == (4, "lcm", 8.5)
    want = ref(PROMPT, num_inference_steps=4, guidance_scale=8.5, num_images_per_prompt=2,
               output_type="np", width=24, height=16,
               generator=torch.Generator("cpu").manual_seed(SEED)).images
    got = ours.generate(PROMPT, seed=SEED, n=2, width=24, height=16)
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want)
    assert ours.schedule_config.original_inference_steps == (original or 50)
    if original is not None:
        from nanodiffusion.cli import main

        assert main(["export", str(tmp_path / "lcm"), str(tmp_path / "again")]) == 0
        again = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "again")
        assert again.scheduler.config.original_inference_steps == original


# ---------------------------------------------------------------- LCM-LoRA

def test_lcm_lora_on_a_plain_model_runs_as_diffusers(tmp_path):
    """An LCM-LoRA (a LoRA on the UNet's attention and convolutions, as latent-consistency's
    lcm-lora-sdv1-5 is) on an ordinary model, run as its model card says: LCMScheduler, 4
    steps, guidance 1 (no CFG batch). diffusers' load_lora_weights + LCMScheduler against our
    `--lora FILE --sampler lcm` through the CLI: the same pixels, far from the plain model's."""
    pytest.importorskip("peft")
    import lora_files as lf
    import numpy as np
    from front_door import run_cli
    from PIL import Image

    sd = tiny_sd.build(tmp_path / "sd")
    layers = lf.random_layers(lf.unet_targets(sd.ref.unet), 5, alphas=(4.0,))
    path = lf.write_kohya(tmp_path / "lcm-lora.safetensors", layers)
    ref = sd.ref
    tiny_sd.use_sampler(ref, sd.scheduler_config, "lcm")
    kw = dict(num_inference_steps=4, guidance_scale=1.0, width=16, height=16,
              output_type="np")
    plain = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images
    ref.load_lora_weights(str(path))
    try:
        want = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images
    finally:
        ref.unload_lora_weights()
    out = tmp_path / "out.png"
    r = run_cli("generate", PROMPT, "--model", sd.folder, "--lora", path, "--sampler", "lcm",
                "--steps", 4, "--guidance", 1, "--seed", SEED, "--width", 16, "--height", 16,
                "--out", out)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        got = tiny_sd.as_array([im.convert("RGB")])
    tiny_sd.assert_close_images(got, want)
    assert np.abs(plain - want).max() > 10 / 255, "the LoRA hardly changes the image"


# ---------------------------------------------------------------- multistep consistency

def test_segment_ends_are_the_next_timesteps_of_the_schedule():
    """Each grid point maps to the timestep an N-step lcm/tcd schedule on the grid goes to
    next from the point's interval: 4 steps of 20 are 999, 749, 499, 249, then 0."""
    from nanodiffusion.samplers import consistency_timesteps
    from nanodiffusion.train.lcm import segment_ends

    assert consistency_timesteps(1000, 4, 20) == [999, 749, 499, 249]
    ends = segment_ends(1000, (4, 2, 1), 20)
    points = torch.arange(1, 21) * 50 - 1
    for row, n in zip(ends, (4, 2, 1)):
        bounds = [0] + consistency_timesteps(1000, n, 20)[1:][::-1]  # ascending
        for p, e in zip(points.tolist(), row.tolist()):
            assert e == max(b for b in bounds if b < p), (n, p, e)
    assert ends[0, 4] == 0 and ends[0, 5] == 249 and ends[1, 15] == 499


def test_ddim_map_is_the_identity_at_its_own_timestep():
    """The multistep consistency function at t = end is x itself (scaled by 1 / sqrt(a)),
    whatever the network says: the boundary condition needs no c_skip."""
    from nanodiffusion.diffusion import NoiseSchedule, ScheduleConfig
    from nanodiffusion.train.lcm import _ddim_to

    sched = NoiseSchedule(ScheduleConfig())
    x, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([249, 499, 0])
    for kind in ("epsilon", "v_prediction"):
        got = _ddim_to(sched, out, x, t, t, kind)
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(got, x / a**0.5, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("segments", [[0], [11], ["4"]])
def test_segments_must_be_step_counts_of_the_grid(segments):
    with pytest.raises(ValueError, match="segments must be a list of step counts in"):
        TrainConfig(part="lcm", solver_steps=10, segments=segments)


@pytest.mark.parametrize("segments, eta, match", [
    ([2, 4], 1.5, "eta must be a number in"), ([2, 4], "0.5", "eta must be a number in"),
    ((), 0.3, "an LCM student samples with lcm")])
def test_eta_is_a_multistep_students_tcd_default(segments, eta, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(part="lcm", solver_steps=10, segments=segments, eta=eta)
    assert TrainConfig(part="lcm", solver_steps=10, segments=[2, 4], eta=0.5).eta == 0.5


def test_multistep_distillation_falls_and_its_folder_samples_tcd_at_its_eta(lcm_sd, tmp_path,
                                                                            monkeypatch):
    """segments = [2, 4], eta = 0.5: the loss falls; <out>/model-lcm defaults to 4 tcd steps
    at the recipe's eta, which generate() and the CLI use when given none, a user's other eta
    or sampler overriding it (the model's eta never reaches another sampler)."""
    from front_door import run_cli

    teacher = tmp_path / "teacher"
    nanodiffusion.formats.ours.save_pipeline(tiny_sd.build(tmp_path / "plain").ours, teacher)
    monkeypatch.setattr(T, "chunk_indices", tiny_sd.fixed_indices)
    cfg = TrainConfig(part="lcm", out=str(tmp_path / "run"), teacher=str(teacher),
                      image_size=32, steps=40, batch_size=8, lr=1e-3, warmup=2, log_every=1,
                      ckpt_every=1000, sample_every=0, ema_decay=0.95, solver_steps=10,
                      segments=[2, 4], eta=0.5, model={"time_cond_proj_dim": 16})
    losses = [r["loss"] for r in train(cfg, progress=False)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses

    folder = tmp_path / "run" / "model-lcm"
    student = nanodiffusion.load(folder)
    d = student.defaults
    assert (d.steps, d.sampler, d.eta) == (4, "tcd", 0.5)
    kw = dict(seed=SEED, width=16, height=16)
    default = tiny_sd.as_array(student.generate(PROMPT, **kw))
    given = tiny_sd.as_array(student.generate(PROMPT, sampler="tcd", eta=0.5, steps=4, **kw))
    assert (default == given).all()
    ddim = tiny_sd.as_array(student.generate(PROMPT, eta=0.0, **kw))
    gamma = tiny_sd.as_array(student.generate(PROMPT, eta=0.3, **kw))  # tcd's own default
    assert not (default == gamma).all() and not (default == ddim).all()
    student.generate(PROMPT, sampler="euler", **kw)  # no eta for euler: no error

    out = tmp_path / "cli.png"
    r = run_cli("generate", PROMPT, "--model", folder, "--seed", SEED, "--width", 16,
                "--height", 16, "--eta", "0.3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert abs(tiny_sd.as_array([Image.open(out).convert("RGB")]) - gamma).max() <= 1 / 255
    r = run_cli("generate", PROMPT, "--model", folder, "--sampler", "euler", "--eta", "0.3",
                "--out", tmp_path / "bad.png")
    assert r.returncode == 2 and "eta is an option of the" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad.png").exists()

    from nanodiffusion import cli  # eval with another guidance and eta: what the report used
    assert cli.main(["eval", str(folder), "--n", "1", "--guidance", "2", "--eta", "0.3",
                     "--seed", "7", "--out", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    settings = rep["settings"]
    assert rep["seed"] == 7
    assert (settings["guidance"], settings["eta"], settings["sampler"]) == (2.0, 0.3, "tcd")
