"""Loading and writing whole models: a diffusers folder as an original single file, our
exports read back by diffusers and by us, our own folder format, and the errors of broken
inputs. The reference is a tiny random diffusers pipeline (tiny_sd.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

import nanodiffusion  # noqa: E402
from proc_maps import linux_only, mapping  # noqa: E402
from nanodiffusion.formats import single_file  # noqa: E402
from nanodiffusion.formats.diffusers import save_diffusers_folder  # noqa: E402
from nanodiffusion.formats.ours import save_pipeline  # noqa: E402
from nanodiffusion.formats.single_file import save_single_file  # noqa: E402
from nanodiffusion.models import packing  # noqa: E402

SETTINGS = dict(prompt="a red circle", negative_prompt="green", seed=5, steps=4, n=2,
                width=24, height=16, sampler="dpmpp-2m", guidance=7.5)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def want(sd):
    """Our images from the diffusers folder: what every other route must reproduce."""
    return images(sd.ours)


def images(pipe):
    return tiny_sd.as_array(pipe.generate(**SETTINGS))


def assert_same(got, want, tol=1e-6):
    err = abs(got - want).max()
    assert err <= tol, f"max pixel difference {err * 255:.2f}/255"


@linux_only
@pytest.mark.parametrize("route", ["diffusers", "single-file"])
def test_weights_stay_in_their_files_mapping_until_used(sd, tmp_path, route):
    """The readers leave every weight that needs no cast in its file's private mapping
    (files.read_safetensors' `mapped`; diffusers' weights stay in their files' mappings so):
    not a page read at load, no file descriptor held per tensor; a packed convolution copies
    its weight out at its first call and its pages go; the VAE's encoder, which txt2img never
    runs, stays unread until img2img lays it out (vae.for_encoding); the images are those of
    weights read into memory."""
    if route == "diffusers":
        source = sd.folder
        files = {part: sd.folder / part / name for part, name in (
            ("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
            ("vae", "diffusion_pytorch_model.safetensors"))}
    else:
        source = save_single_file(sd.ours, tmp_path / "tiny.safetensors")
        files = dict.fromkeys(("unet", "text_encoder", "vae"), source)
    fds = len(os.listdir("/proc/self/fd"))
    pipe, read = nanodiffusion.load(source), nanodiffusion.load(source)
    assert len(os.listdir("/proc/self/fd")) == fds  # (Python's mmap held one per tensor)
    for part in (read.unet, read.text_encoder, read.vae):
        for p in part.parameters():
            p.data = p.data.clone()
    conv = pipe.unet.up_blocks[0].resnets[0].conv1  # the largest, packed at its first call
    weights = {"unet": conv.weight.data_ptr(),
               "text_encoder": pipe.text_encoder.embeddings.token_embedding.weight.data_ptr(),
               "vae": pipe.vae.encoder.down_blocks[1].resnets[0].conv2.weight.data_ptr()}
    for part, where in weights.items():
        assert mapping(where) == (os.path.realpath(files[part]), 0), part
    first = pipe.generate(**SETTINGS)
    assert np.array_equal(tiny_sd.as_array(first), tiny_sd.as_array(read.generate(**SETTINGS)))
    init = first[0]
    if packing.available():
        assert (mapping(weights["unet"]) or ("",))[0] != os.path.realpath(files["unet"])
    assert mapping(weights["vae"]) == (os.path.realpath(files["vae"]), 0)  # never run
    kw = dict(prompt="a blue square", image=init, strength=0.5, seed=3, steps=4)
    got, want = tiny_sd.as_array(pipe.img2img(**kw)), tiny_sd.as_array(read.img2img(**kw))
    assert np.array_equal(got, want)
    encoder = pipe.vae.encoder.down_blocks[1].resnets[0].conv2.weight
    assert encoder.is_contiguous(memory_format=torch.channels_last)
    assert (mapping(weights["vae"]) or ("",))[0] != os.path.realpath(files["vae"])  # its pages gone
    bf16 = nanodiffusion.load(source, dtype=torch.bfloat16)  # cast as read: its own memory
    assert mapping(bf16.unet.up_blocks[0].resnets[0].conv1.weight.data_ptr())[0] not in {
        os.path.realpath(f) for f in files.values()}


# ---- single files ---------------------------------------------------------------------------
def test_single_file_from_diffusers_weights_gives_the_same_images(sd, want, tmp_path):
    ref = sd.ref
    sd_ldm = single_file.diffusers_to_ldm(ref.unet.state_dict(), ref.vae.state_dict(),
                                      ref.text_encoder.state_dict(), "v1")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd_ldm.items()}, str(path))
    pipe = nanodiffusion.load(path, hints=single_file.LDMHints(**tiny_sd.HINTS))
    assert_same(images(pipe), want)
    with pytest.raises(ValueError, match="tiny.safetensors.*hints"):  # SD's 32 groups don't fit
        nanodiffusion.load(path)
    with pytest.raises(ValueError, match="single files"):
        nanodiffusion.load(sd.folder, hints=single_file.LDMHints(**tiny_sd.HINTS))


@pytest.mark.parametrize("dtype, tol", [(None, 1e-6), (torch.float16, 2 / 255)])
def test_our_single_file_reloads_without_hints(sd, want, tmp_path, dtype, tol):
    path = save_single_file(sd.ours, tmp_path / "ours.safetensors", dtype=dtype)
    assert_same(images(nanodiffusion.load(path)), want, tol)  # hints are in the metadata


# ---- diffusers folders ----------------------------------------------------------------------
def test_exported_diffusers_folder_loads_in_diffusers_and_ours(sd, want, tmp_path):
    folder = save_diffusers_folder(sd.ours, tmp_path / "export")
    for cls, part in ((CLIPTextModel, "text_encoder"), (UNet2DConditionModel, "unet"),
                      (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(folder / part, output_loading_info=True)
        assert not any(info.values()), (part, info)  # no missing or unexpected keys
    ref = StableDiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, dict(ref.scheduler.config), SETTINGS["sampler"])
    s = SETTINGS
    with tiny_sd.latents_of(ref.vae) as ref_latents:
        got = ref(s["prompt"], negative_prompt=s["negative_prompt"], guidance_scale=s["guidance"],
                  num_inference_steps=s["steps"], num_images_per_prompt=2, width=s["width"],
                  height=s["height"], generator=torch.Generator("cpu").manual_seed(s["seed"]),
                  output_type="np").images
    with tiny_sd.latents_of(sd.ours.vae) as our_latents:
        assert_same(images(sd.ours), want)
    tiny_sd.assert_close_images(got, want, (ref_latents, our_latents))
    assert_same(images(nanodiffusion.load(folder)), want)


# ---- our own folders ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(None, 0.0), (torch.float16, 2 / 255)])
def test_our_folder_round_trip(sd, want, tmp_path, dtype, tol):
    save_pipeline(sd.ours, tmp_path / "ours", dtype=dtype)
    pipe = nanodiffusion.load(tmp_path / "ours")
    assert pipe.defaults == sd.ours.defaults
    assert pipe.schedule_config == sd.ours.schedule_config
    assert_same(images(pipe), want, tol)


# ---- errors ---------------------------------------------------------------------------------
def _remove_unet(folder):
    shutil.rmtree(folder / "unet")
    return "unet", "missing"


def _break_config(folder):
    (folder / "vae" / "config.json").write_text('{"block_out_channels": [16, ')
    return "vae/config.json", "JSON"


def _truncate_weights(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # an interrupted download
    return "diffusion_pytorch_model.safetensors", "safetensors"


def _remove_weights(folder):
    (folder / "text_encoder" / "model.safetensors").unlink()
    return "text_encoder", "no weights"


def _remove_tokenizer_files(folder):
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    return "tokenizer", "vocab.json"


def _something_else(folder):
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    return "pipe", "not a model"


@pytest.mark.parametrize("damage", [_remove_unet, _break_config, _truncate_weights,
                                    _remove_weights, _remove_tokenizer_files, _something_else])
def test_broken_diffusers_folders_name_the_path_and_problem(sd, tmp_path, damage):
    folder = tmp_path / "pipe"
    shutil.copytree(sd.folder, folder)
    where, problem = damage(folder)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        nanodiffusion.load(folder)
    assert where in str(e.value) and problem in str(e.value), str(e.value)


def test_broken_files_and_our_folders(sd, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        nanodiffusion.load(tmp_path / "nowhere")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="bad.safetensors.*safetensors"):
        nanodiffusion.load(bad)
    ours = save_pipeline(sd.ours, tmp_path / "ours")
    (ours / "model.json").write_text("{")
    with pytest.raises(ValueError, match="model.json.*JSON"):
        nanodiffusion.load(ours)
    (ours / "model.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(ValueError, match="model.json.*format"):
        nanodiffusion.load(ours)


def test_hub_id_goes_through_snapshot_download(sd, want, tmp_path, monkeypatch):
    """A hub id ("owner/name") is fetched with huggingface_hub.snapshot_download (replaced here
    by a local diffusers folder: tests never reach a hub), weights as safetensors only."""
    import huggingface_hub  # installed with diffusers, a test dependency
    folder = save_diffusers_folder(sd.ours, tmp_path / "snapshot")
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)  # no local path of that name
    assert_same(images(nanodiffusion.load("someone/tiny-sd")), want)
    (repo, patterns), = calls
    assert repo == "someone/tiny-sd"
    assert "unet/*.safetensors" in patterns and not any(p.endswith((".bin", ".ckpt"))
                                                        for p in patterns)
