"""Options a scheduler_config.json leaves out take the defaults of the diffusers class of the
sampler chosen, as `<Class>.from_config(pipe.scheduler.config)` gives them (diffusers records
the left-out keys in `_use_default_values`): an Euler config read by DDIM clips x0 and ends at
alpha 1, SD 1.5's PNDM config read by Euler spaces its timesteps `linspace`."""
import inspect
import json

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402
import tiny_sd  # noqa: E402
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402

import nanodiffusion  # noqa: E402
from nanodiffusion import diffusion, samplers  # noqa: E402
from nanodiffusion.diffusion import ScheduleConfig  # noqa: E402

PROMPT, SEED, STEPS = "a red circle on a blue square", 3, 6
EULER_JSON = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "steps_offset": 1,
              "timestep_spacing": "leading"}  # + every other Euler option, once saved
SD15_JSON = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None, "clip_sample": False}
DDIM_JSON = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
             "clip_sample": False, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}


def loaded(tmp_path, config):
    """A scheduler of the class `config` names, read from a file as pipelines read it."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    return getattr(diffusers, config["_class_name"]).from_pretrained(tmp_path)


@pytest.mark.parametrize("config", [EULER_JSON, SD15_JSON, DDIM_JSON],
                         ids=["euler", "sd15", "ddim"])
def test_resolved_options_match_diffusers_from_config(tmp_path, config):
    """Our config per class == diffusers' <class>.from_config(loaded.config), every option of
    that class's that we model."""
    source = loaded(tmp_path, config)
    ours = ScheduleConfig.from_diffusers(json.loads((tmp_path / "scheduler_config.json")
                                                    .read_text()))
    for cls in diffusion.SCHEDULER_DEFAULTS:
        ref = getattr(diffusers, cls).from_config(source.config)
        mine = ours.for_scheduler(cls)
        options = inspect.signature(getattr(diffusers, cls).__init__).parameters
        for name in ScheduleConfig.__dataclass_fields__:
            if name in options:
                assert getattr(mine, name) == ref.config[name], (cls, name)


def test_defaulted_options_round_trip_through_an_export():
    cfg = ScheduleConfig.from_diffusers(EULER_JSON)
    assert set(cfg.defaulted) >= {"set_alpha_to_one", "clip_sample", "clip_sample_range"}
    assert "set_alpha_to_one" not in cfg.to_diffusers()
    ddim = cfg.for_scheduler("DDIMScheduler")
    assert (ddim.set_alpha_to_one, ddim.clip_sample, ddim.timestep_spacing) == (
        True, True, "leading")
    assert cfg.for_scheduler("EulerDiscreteScheduler") is cfg  # nothing changes: no copy
    assert ScheduleConfig.from_diffusers({**cfg.to_diffusers(), "_class_name":
                                          "EulerDiscreteScheduler"}) == cfg
    with pytest.raises(ValueError, match="'NoScheduler'.*DDIMScheduler"):
        cfg.for_scheduler("NoScheduler")
    with pytest.raises(ValueError, match=r"defaulted=\['eta'\].*beta_start"):
        ScheduleConfig(defaulted=("eta",))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD saved with a plain EulerDiscreteScheduler (its file has no DDIM options); the
    same with SD 1.5's own scheduler file (no timestep_spacing, no prediction_type); and with
    DDPMScheduler's defaults (clip_sample true, steps_offset 0: StableDiffusionPipeline turns
    them into false and 1 when it loads the folder, and so do we)."""
    root = tmp_path_factory.mktemp("defaults")
    pipe = StableDiffusionPipeline(
        vae=tiny_sd.vae(), text_encoder=tiny_sd.text_encoder(),
        tokenizer=tiny_sd.tokenizer(root / "tok"), unet=tiny_sd.unet(),
        scheduler=EulerDiscreteScheduler.from_config(EULER_JSON), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "euler")
    pipe.save_pretrained(root / "sd15")
    pipe.scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear")
    pipe.save_pretrained(root / "ddpm")
    (root / "sd15" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_JSON))
    index = json.loads((root / "sd15" / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (root / "sd15" / "model_index.json").write_text(json.dumps(index))
    out = {}
    for name in ("euler", "sd15", "ddpm"):
        ref = StableDiffusionPipeline.from_pretrained(root / name)
        ref.set_progress_bar_config(disable=True)
        out[name] = (ref, dict(ref.scheduler.config), nanodiffusion.load(root / name))
    return out


@pytest.mark.parametrize("folder", ["euler", "sd15", "ddpm"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun", "euler", "pndm", "dpmpp-2m"])
def test_sampler_on_a_foreign_scheduler_config_matches_diffusers(folders, folder, sampler):
    """pipe.scheduler = <Class>.from_config(pipe.scheduler.config): the idiom of every
    diffusers user. (On the Euler folder, DDIM's clip_sample=True default moved pixels by
    255/255 before ours honoured it.)"""
    ref, config, ours = folders[folder]
    cls, extra = samplers.diffusers_scheduler_for(sampler)
    ref.scheduler = getattr(diffusers, cls).from_config(config, **extra)
    with tiny_sd.latents_of(ref.vae) as want_latents:
        want = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, width=24, height=16,
                   generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    with tiny_sd.latents_of(ours.vae) as got_latents:
        got = ours.generate(PROMPT, seed=SEED, steps=STEPS, guidance=7.5, sampler=sampler,
                            width=24, height=16)
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want)
    # at least 1e-3: x0 clipped to [-1, 1] makes the final latents small beside the float32
    # error of the unclipped intermediate ones (|x| ~ 100 on these random weights)
    scale = want_latents[0].abs().max().item()
    assert (got_latents[0] - want_latents[0]).abs().max().item() <= max(1e-3, 2e-5 * scale)
