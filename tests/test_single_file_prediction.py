"""What a single (LDM) file's model predicts, which the file does not store: diffusers' guess
(SD 2.x v, but the 512-base files (global_step 875000) and inpainting models, and SD 1.x,
noise), an AUTOMATIC1111-style `<stem>.yaml` beside the file, and the caller's override."""
import dataclasses
import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from nanodiffusion.formats import single_file
from nanodiffusion.loading import load_pipeline
from nanodiffusion.models import clip, unet, vae

TEXT = clip.CLIPTextConfig(width=32, num_layers=2, num_heads=2, mlp_dim=64)
HINTS = single_file.LDMHints(unet_num_heads=unet.TINY.num_heads, text_num_heads=2, norm_groups=8)
V2_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    parameterization: "v"  # v-prediction (SD 2.x 768)
    unet_config:
      params:
        use_linear_in_transformer: True
"""
BASE_YAML = V2_YAML.replace('    parameterization: "v"  # v-prediction (SD 2.x 768)\n', "")


def ldm_weights(version, in_channels=4):
    """A tiny whole checkpoint in the LDM single-file layout; v2: OpenCLIP text keys."""
    v2 = version == "v2"
    cfg = dataclasses.replace(unet.TINY, in_channels=in_channels, linear_projection=v2,
                              upcast_attention=v2)
    text = dataclasses.replace(TEXT, activation="gelu", pad_token_id=0) if v2 else TEXT
    torch.manual_seed(0)
    parts = (unet.UNet(cfg), vae.VAE(vae.TINY), clip.CLIPTextModel(text))
    return single_file.diffusers_to_ldm(*(m.state_dict() for m in parts), version)


def write(path, sd, global_step=None):
    """As the published files are: a .ckpt holds {"state_dict", "global_step"}; a converted
    .safetensors may keep the step as a tensor among the weights."""
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd, **({} if global_step is None else
                                         {"global_step": global_step})}, path)
    else:
        extra = {} if global_step is None else {"global_step": torch.tensor(global_step)}
        save_file({**sd, **extra}, str(path))
    return path


def prediction(path, **kw):
    return load_pipeline(path, hints=HINTS, **kw).schedule_config.prediction_type


@pytest.mark.parametrize("version, in_channels, suffix, step, want", [
    ("v1", 4, ".safetensors", None, "epsilon"),
    ("v1", 9, ".ckpt", 470000, "epsilon"),
    ("v2", 4, ".safetensors", None, "v_prediction"),       # SD 2.x 768-v
    ("v2", 4, ".ckpt", 110000, "v_prediction"),
    ("v2", 4, ".ckpt", 875000, "epsilon"),                 # SD 2.x 512-base
    ("v2", 4, ".safetensors", 875000, "epsilon"),
    ("v2", 9, ".safetensors", None, "epsilon"),            # SD 2.x inpainting
    ("v2", 9, ".ckpt", 200000, "epsilon"),
])
def test_prediction_type_follows_diffusers_rule(tmp_path, version, in_channels, suffix, step,
                                                want):
    path = write(tmp_path / f"model{suffix}", ldm_weights(version, in_channels), step)
    pipe = load_pipeline(path, hints=HINTS)
    assert pipe.schedule_config.prediction_type == want
    assert pipe.defaults.width == (768 if want == "v_prediction" else 512)


def test_rule_is_diffusers_legacy_scheduler_rule():
    """diffusers (single_file_utils._legacy_load_scheduler) on the keys it reads: v2 when the
    cross-attention context is 1024 wide, inpainting when conv_in takes 9 channels."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import DDIMScheduler

    for version, channels, step in itertools.product(("v1", "v2"), (4, 9), (None, 875000, 1)):
        width = 1024 if version == "v2" else 768  # of the cross-attention context
        fake = {sfu.CHECKPOINT_KEY_NAMES["inpainting"]: torch.zeros(8, channels, 1, 1),
                sfu.CHECKPOINT_KEY_NAMES["v2"]: torch.zeros(8, width)}
        if step is not None:
            fake["global_step"] = step
        want = sfu._legacy_load_scheduler(DDIMScheduler, fake, "scheduler").config.prediction_type
        info = {"version": version, "inpainting": channels == 9}
        assert single_file.ldm_prediction_type(info, step) == want, (version, channels, step)


def test_sidecar_yaml_and_explicit_override(tmp_path):
    v1 = write(tmp_path / "v1.safetensors", ldm_weights("v1"))
    v2 = write(tmp_path / "v2.ckpt", ldm_weights("v2"))
    assert prediction(v1) == "epsilon"
    (tmp_path / "v1.yaml").write_text(V2_YAML)  # A1111: <stem>.yaml is the model's config
    assert prediction(v1) == "v_prediction"
    (tmp_path / "v2.yaml").write_text(BASE_YAML)  # no parameterization: ldm's default, eps
    assert prediction(v2) == "epsilon"
    assert prediction(v2, prediction_type="v_prediction") == "v_prediction"
    assert prediction(v1, prediction_type="epsilon") == "epsilon"
    (tmp_path / "v2.yaml").write_text(V2_YAML.replace('"v"', "x0"))
    assert prediction(v2) == "sample"
    (tmp_path / "v2.yaml").write_text(V2_YAML.replace('"v"', '"velocity"'))
    with pytest.raises(ValueError, match=r"v2.yaml: parameterization='velocity'.*eps, v, x0"):
        prediction(v2)
    with pytest.raises(ValueError, match="prediction_type='v'.*v_prediction"):
        prediction(v1, prediction_type="v")


def test_our_own_file_keeps_its_prediction_unless_told(tmp_path):
    """A file we wrote records its schedule; a sidecar or the caller still overrides it."""
    from nanodiffusion.formats.single_file import save_single_file

    pipe = load_pipeline(write(tmp_path / "src.safetensors", ldm_weights("v2"), 875000),
                         hints=HINTS)
    path = save_single_file(pipe, tmp_path / "ours.safetensors")
    assert load_pipeline(path).schedule_config.prediction_type == "epsilon"
    assert load_pipeline(path, prediction_type="v_prediction").schedule_config \
        .prediction_type == "v_prediction"
    (tmp_path / "ours.yaml").write_text(V2_YAML)
    assert load_pipeline(path).schedule_config.prediction_type == "v_prediction"


def test_files_written_with_hints_metadata_still_load(tmp_path):
    """Single files we wrote before the full record carried only LDMHints in their metadata."""
    path = tmp_path / "old.safetensors"
    hints = dataclasses.asdict(HINTS)
    save_file({k: v.contiguous() for k, v in ldm_weights("v1").items()}, str(path),
              metadata={single_file.HINTS_KEY: json.dumps(hints)})
    pipe = load_pipeline(path)  # no hints given: the file's are used
    assert pipe.unet.config.num_heads == HINTS.unet_num_heads
    assert pipe.vae.config.norm_groups == 8
