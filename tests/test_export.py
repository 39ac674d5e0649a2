"""Exports that other programs open: the bundled `shapes` model and tiny Stable Diffusions
written as diffusers folders (by the real CLI too) and as single files, opened by diffusers'
StableDiffusionPipeline (from_pretrained, from_single_file) and by us, with the same pixels;
and the files' permissions."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import (AutoencoderKL, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

import nanodiffusion  # noqa: E402
from nanodiffusion.formats.diffusers import save_diffusers_folder  # noqa: E402
from nanodiffusion.formats.ours import save_pipeline  # noqa: E402
from nanodiffusion.formats.single_file import save_single_file  # noqa: E402

PROMPT, SEED = "a red circle above a blue square", 5


@pytest.fixture(scope="module")
def shapes():
    return nanodiffusion.load("shapes")


def standard_sd(folder, positions=77):
    """A tiny diffusers SD 1.x of the single-file (LDM) defaults: 8 heads per UNet level,
    32 GroupNorm groups, 64 channels per text head; saved to `folder`, loaded by us."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        norm_num_groups=32, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=positions, vocab_size=49408, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    ref = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tiny_sd.tokenizer(folder / "tok"), unet=unet,
        scheduler=tiny_sd.scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.save_pretrained(folder / "pipe")
    return nanodiffusion.load(folder / "pipe")


def diffusers_images(ref, sampler, steps, guidance, width, height):
    """Run a diffusers pipeline with the scheduler of our `sampler`, from its own config."""
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, dict(ref.scheduler.config), sampler)
    return ref(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=width,
               height=height, generator=torch.Generator("cpu").manual_seed(SEED),
               output_type="np").images


def check_same(ref, ours, sampler=None, steps=None, guidance=None, size=None):
    d = ours.defaults
    settings = dict(sampler=sampler or d.sampler, steps=steps or d.steps,
                    guidance=guidance or d.guidance, width=size or d.width,
                    height=size or d.height)
    want = diffusers_images(ref, **settings)
    got = ours.generate(PROMPT, seed=SEED, **settings)
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want)


# ---- diffusers folders ----------------------------------------------------------------------
def test_cli_exports_shapes_as_a_diffusers_folder_diffusers_runs(shapes, tmp_path):
    """The text encoder of shapes has 16 positions: the tokenizer's model_max_length must say
    so, or diffusers' pipeline fails (max_position_embeddings)."""
    out = tmp_path / "shapes-diffusers"
    subprocess.run([sys.executable, "-m", "nanodiffusion.cli", "export", "shapes", str(out),
                    "--format", "diffusers"], check=True, capture_output=True, timeout=120)
    config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == shapes.text_encoder.config.max_positions == 16
    check_same(StableDiffusionPipeline.from_pretrained(out), shapes)


def test_tiny_sd_with_short_text_encoder_exports_as_a_diffusers_folder(tmp_path):
    ours = standard_sd(tmp_path, positions=20)
    folder = save_diffusers_folder(ours, tmp_path / "export")
    check_same(StableDiffusionPipeline.from_pretrained(folder), ours, "euler", 6, 7.5, 16)


# ---- single files ---------------------------------------------------------------------------
def test_shapes_single_file_reloads_and_opens_in_diffusers(shapes, tmp_path):
    """norm_groups 16 in the UNet and 4 in the VAE, a 598-token vocabulary, v prediction on a
    zero-SNR schedule: none of it is in the LDM tensors; the file's metadata records it."""
    path = save_single_file(shapes, tmp_path / "shapes.safetensors")
    again = nanodiffusion.load(path)
    assert (again.name, again.defaults, again.schedule_config) == (
        shapes.name, shapes.defaults, shapes.schedule_config)
    assert again.tokenizer.encoder == shapes.tokenizer.encoder
    a, b = shapes.generate(PROMPT, seed=SEED)[0], again.generate(PROMPT, seed=SEED)[0]
    assert a.tobytes() == b.tobytes()
    folder = save_diffusers_folder(shapes, tmp_path / "config")
    for part in ("unet", "vae", "text_encoder"):  # the weights must come from the single file
        for weights in (folder / part).glob("*.safetensors"):
            weights.unlink()
    ref = StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
                                                   local_files_only=True)
    check_same(ref, shapes)


def hub_cache(root, repo_id, folder):
    """A huggingface cache in `root` holding `folder`'s configs as the snapshot of `repo_id`:
    where diffusers' from_single_file reads a model type's configs (offline here)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    return root


def test_standard_shaped_single_file_opens_in_diffusers_as_users_call_it(tmp_path):
    ours = standard_sd(tmp_path)
    path = save_single_file(ours, tmp_path / "tiny.safetensors")
    cache = hub_cache(tmp_path / "hub", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                      save_diffusers_folder(ours, tmp_path / "configs"))
    ref = StableDiffusionPipeline.from_single_file(str(path), cache_dir=str(cache),
                                                   local_files_only=True)
    check_same(ref, ours, "dpmpp-2m", 6, 7.5, 16)
    # without our metadata, as another program would write it: Stable Diffusion's defaults fit
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))
    settings = dict(seed=SEED, steps=4, sampler="euler", width=16, height=16)
    want = ours.generate(PROMPT, **settings)[0].tobytes()
    assert nanodiffusion.load(bare).generate(PROMPT, **settings)[0].tobytes() == want
    assert nanodiffusion.load(path).generate(PROMPT, **settings)[0].tobytes() == want


# ---- permissions ----------------------------------------------------------------------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_written_files_get_the_usual_mode(shapes, tmp_path, umask_027):
    """0666 less the umask, as open() gives, not the 0600 of a temporary file."""
    save_diffusers_folder(shapes, tmp_path / "folder")
    save_pipeline(shapes, tmp_path / "ours")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    # diffusers': unet, vae, text_encoder; ours: unet, vae, clip and the tiny decoder
    assert len([p for p in files if p.suffix == ".safetensors"]) == 7
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(umask_027)}, modes
    assert not [p for p in files if p.name.startswith(".")]  # no temporary file left


def test_atomic_write_mode_for_any_writer(tmp_path, umask_027):
    from nanodiffusion.formats.checkpoint import atomic_write

    def replace_file(tmp):  # a writer that makes a new file, as safetensors' save_file does
        Path(tmp).unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)

    atomic_write(tmp_path / "a.bin", replace_file)
    atomic_write(tmp_path / "b.pt", lambda tmp: torch.save({"w": torch.ones(1)}, tmp))
    for name in ("a.bin", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == umask_027, name
    assert np.array_equal(torch.load(tmp_path / "b.pt")["w"].numpy(), [1.0])
