"""VAE swap (issue 22, items 4 and 6): a second random VAE, written as people download VAEs (an
LDM single file with and without first_stage_model., as .safetensors and as a .ckpt; the same
under diffusers' names; a diffusers folder), put in place of a tiny random model's own with
`pipe.load_vae` against diffusers' StableDiffusionPipeline given that VAE
(AutoencoderKL.from_single_file / from_pretrained); the way back; bad files refused with their
names and nothing changed; "VAE hash" / "VAE" in the PNG parameters, read back; `--vae` as a
subprocess; the A1111 API's /sd-vae, sd_vae option and override_settings, and serve's VAE."""
import base64
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import (AutoencoderKL, StableDiffusionImg2ImgPipeline,  # noqa: E402
                       StableDiffusionPipeline)

from nanodiffusion import pnginfo  # noqa: E402
from nanodiffusion.errors import InputError  # noqa: E402
from nanodiffusion.formats import ldm_keys  # noqa: E402

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red circle on a blue square", "green", 3, 3, 16


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd"))


def ldm_layout(vae):
    """A diffusers AutoencoderKL's weights under the original (LDM) names, without the
    first_stage_model. prefix, as vae-ft-mse-840000-ema-pruned.safetensors has them
    (test_ldm_file_is_read_by_diffusers_as_that_vae checks the file with diffusers' reader)."""
    return {k.removeprefix(ldm_keys.VAE_PREFIX): v.contiguous()
            for k, v in ldm_keys.vae_to_ldm(vae.state_dict()).items()}


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """Another random VAE of the model's latent space in every layout, and one of 8 latent
    channels."""
    root = tmp_path_factory.mktemp("vaes")
    other = tiny_sd.vae(seed=7)
    other.save_pretrained(root / "folder")
    ldm = ldm_layout(other)
    save_file(ldm, str(root / "vae.safetensors"))
    # a training checkpoint's layout: under first_stage_model., in Lightning's state_dict,
    # with the loss's tensors and EMA bookkeeping beside (A1111 drops both)
    extra = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
             torch.zeros(2, 3, 4, 4), "model_ema.decay": torch.tensor(0.999),
             "model_ema.num_updates": torch.tensor(10)}
    torch.save({"state_dict": {**{ldm_keys.VAE_PREFIX + k: v for k, v in ldm.items()},
                               **extra}, "global_step": 840000}, root / "prefixed.ckpt")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(root / "diffusers-names.safetensors"))
    torch.manual_seed(8)
    wide = AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8, latent_channels=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)
    save_file(ldm_layout(wide), str(root / "wide.safetensors"))
    return dict(root=root, other=other, ldm=root / "vae.safetensors", folder=root / "folder",
                ckpt=root / "prefixed.ckpt", names=root / "diffusers-names.safetensors",
                wide=root / "wide.safetensors")


def ours(pipe, **kw):
    images = pipe.generate(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS,
                           sampler="euler", width=SIZE, height=SIZE, **kw)
    return tiny_sd.as_array(images)


def reference_vae(vaes, kind):
    """diffusers' own reading of the file or folder."""
    if kind == "folder":
        return AutoencoderKL.from_pretrained(str(vaes["folder"]))
    return AutoencoderKL.from_single_file(str(vaes["ldm"]), config=str(vaes["folder"]),
                                          local_files_only=True)


def diffusers_images(sd, vae, cls=StableDiffusionPipeline, **kw):
    """diffusers' pipeline over the model's parts with `vae` in place of its own."""
    ref = cls(**{**sd.ref.components, "vae": vae})
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, sd.scheduler_config, "euler")
    return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator("cpu").manual_seed(SEED), **kw).images


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ: {differ[:5]}"


def sha10(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


# ---- parity with diffusers ------------------------------------------------------------------
def test_ldm_file_is_read_by_diffusers_as_that_vae(vaes):
    """The test's LDM file is the other VAE as diffusers' single-file reader sees it."""
    assert_same_state(state(reference_vae(vaes, "ldm")), state(vaes["other"]))


@pytest.mark.parametrize("kind", ["ldm", "folder"])
def test_vae_matches_diffusers_given_that_vae(sd, vaes, kind):
    """An LDM single file, a diffusers folder: the images diffusers makes with that VAE, far
    from those of the model's own."""
    plain = ours(sd.ours)
    want = diffusers_images(sd, reference_vae(vaes, kind), width=SIZE, height=SIZE)
    name = sd.ours.load_vae(vaes[kind])
    try:
        got = ours(sd.ours)
    finally:
        sd.ours.load_vae(None)
    tiny_sd.assert_close_images(got, want)
    print(f"{kind}: max difference {np.abs(got - want).max() * 255:.3f}/255")
    assert np.abs(plain - want).max() > 10 / 255, "the VAE hardly changes the image"
    assert name == vaes[kind].name


def test_img2img_encodes_with_the_vae_as_diffusers_does(sd, vaes):
    """img2img: the init image encoded (and the result decoded) by the swapped VAE."""
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    want = diffusers_images(sd, reference_vae(vaes, "folder"), StableDiffusionImg2ImgPipeline,
                            image=init, strength=0.6)
    sd.ours.load_vae(vaes["folder"])
    try:
        got = sd.ours.img2img(PROMPT, init, strength=0.6, negative_prompt=NEGATIVE, seed=SEED,
                              steps=STEPS, sampler="euler")
    finally:
        sd.ours.load_vae(None)
    got = tiny_sd.as_array(got)
    tiny_sd.assert_close_images(got, want)
    print(f"img2img: max difference {np.abs(got - want).max() * 255:.3f}/255")


def test_every_layout_reads_as_the_same_vae(sd, vaes):
    """With first_stage_model. in a .ckpt (loss and EMA keys beside), under diffusers' names,
    a folder: the same weights as the LDM .safetensors."""
    sd.ours.load_vae(vaes["ldm"])
    want = state(sd.ours.vae)
    try:
        for kind in ("ckpt", "names", "folder"):
            assert sd.ours.load_vae(vaes[kind]) == vaes[kind].name
            assert sd.ours.vae_file == vaes[kind]
            assert_same_state(state(sd.ours.vae), want)
    finally:
        sd.ours.load_vae(None)


def test_the_models_own_vae_comes_back_unchanged(sd, vaes):
    """load_vae(None): the model's own VAE module, its weights untouched, the same bytes."""
    own, weights, plain = sd.ours.vae, state(sd.ours.vae), ours(sd.ours)
    sd.ours.load_vae(vaes["ldm"])
    assert sd.ours.vae is not own and not np.array_equal(ours(sd.ours), plain)
    sd.ours.load_vae(vaes["folder"])
    assert sd.ours.load_vae(None) is None
    assert sd.ours.vae is own and sd.ours.vae_file is None
    assert_same_state(state(own), weights)
    assert np.array_equal(ours(sd.ours), plain)


# ---- bad files ------------------------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch ran-code",))


def bad_files(sd, vaes, tmp_path):
    """(path, words the error must hold) for each way a VAE can be wrong."""
    from nanodiffusion.formats.single_file import save_single_file

    data = vaes["ldm"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    torch.save({"state_dict": {"x": RunsCode()}}, tmp_path / "evil.ckpt")
    save_single_file(sd.ours, tmp_path / "whole.safetensors")
    unet = sd.folder / "unet"
    return [(vaes["wide"], ["does not fit", "8 latent channels", "4 latent channels"]),
            (unet / "diffusion_pytorch_model.safetensors", ["not a VAE", "conv_in.weight"]),
            (unet, ["UNet2DConditionModel", "AutoencoderKL"]),
            (tmp_path / "whole.safetensors", ["not a VAE file", "cond_stage_model."]),
            (tmp_path / "cut.safetensors", ["not a readable safetensors"]),
            (tmp_path / "evil.ckpt", ["pickled code"]),
            (tmp_path / "nothing.safetensors", ["no such VAE file"])]


def test_bad_files_are_refused_naming_them_and_change_nothing(sd, vaes, tmp_path,
                                                             monkeypatch):
    """Each an InputError naming the file; the pipeline keeps the VAE it had (the model's own,
    or a file's) and the model's weights."""
    monkeypatch.chdir(tmp_path)
    own, weights, plain = sd.ours.vae, state(sd.ours.vae), ours(sd.ours)
    for loaded in (None, vaes["ldm"]):
        sd.ours.load_vae(loaded)
        before = sd.ours.vae
        for path, words in bad_files(sd, vaes, tmp_path):
            with pytest.raises(InputError) as e:
                sd.ours.load_vae(path)
            for w in [str(path), *words]:
                assert w in str(e.value), (w, str(e.value))
            assert sd.ours.vae is before and sd.ours.vae_file == loaded
    sd.ours.load_vae(None)
    assert sd.ours.vae is own and not (tmp_path / "ran-code").exists()
    assert_same_state(state(own), weights)
    assert np.array_equal(ours(sd.ours), plain)


# ---- the PNG parameters and the command line ------------------------------------------------
def test_png_parameters_name_the_vae_as_a1111_writes_them(sd, vaes):
    """`VAE hash: <sha256[:10]>, VAE: <file name>` right after Model (a folder: its weights
    file's hash, its name); nothing for the model's own."""
    sd.ours.load_vae(vaes["ldm"])
    try:
        text = sd.ours.generate(PROMPT, steps=1, width=SIZE, height=SIZE)[0].info["parameters"]
        assert f"Model: pipe, VAE hash: {sha10(vaes['ldm'])}, VAE: vae.safetensors" in text
        sd.ours.load_vae(vaes["folder"])
        p = pnginfo.parse_parameters(
            sd.ours.generate(PROMPT, steps=1, width=SIZE, height=SIZE)[0].info["parameters"])
        weights = vaes["folder"] / "diffusion_pytorch_model.safetensors"
        assert (p["VAE hash"], p["VAE"]) == (sha10(weights), "folder")
    finally:
        sd.ours.load_vae(None)
    text = sd.ours.generate(PROMPT, steps=1, width=SIZE, height=SIZE)[0].info["parameters"]
    assert "VAE" not in text


def test_cli_vae_option(sd, vaes, tmp_path, capsys):
    """`generate --vae FILE` as a subprocess: the image pipe.load_vae gives, its PNG naming
    the VAE, which `nanodiffusion info --json` reads back; a VAE of other latents: exit 2
    naming the file, no image."""
    from front_door import run_cli

    from nanodiffusion.cli import main

    out = tmp_path / "out.png"
    common = ["--model", sd.folder, "--negative", NEGATIVE, "--seed", SEED, "--steps", STEPS,
              "--sampler", "euler", "--width", SIZE, "--height", SIZE]
    r = run_cli("generate", PROMPT, *common, "--vae", vaes["ldm"], "--out", out)
    assert r.returncode == 0, r.stderr
    sd.ours.load_vae(vaes["ldm"])
    try:
        want = ours(sd.ours)
    finally:
        sd.ours.load_vae(None)
    with Image.open(out) as im:
        tiny_sd.assert_close_images(tiny_sd.as_array([im.convert("RGB")]), want)
    assert main(["info", "--json", str(out)]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert (found["VAE hash"], found["VAE"]) == (sha10(vaes["ldm"]), "vae.safetensors")
    bad = tmp_path / "bad.png"
    r = run_cli("generate", PROMPT, *common, "--vae", vaes["wide"], "--out", bad)
    assert r.returncode == 2 and str(vaes["wide"]) in r.stderr
    assert "8 latent channels" in r.stderr and not bad.exists()


# ---- the A1111 API and serve's VAE ----------------------------------------------------------
def models_dir(sd, vaes, root):
    """A1111's layout: the model beside VAE/ (files anywhere below it, a diffusers folder, a
    file that is no VAE, which is not listed)."""
    (root / "sd").symlink_to(sd.folder)
    (root / "VAE" / "sub").mkdir(parents=True)
    for name in ("ldm", "wide"):
        shutil.copy(vaes[name], root / "VAE" / vaes[name].name)
    shutil.copy(vaes["ckpt"], root / "VAE" / "sub" / "prefixed.ckpt")
    shutil.copytree(vaes["folder"], root / "VAE" / "folder")
    (root / "VAE" / "notes.txt").write_text("not a VAE")
    return root


def test_a1111_sd_vae_list_option_and_override(sd, vaes, tmp_path):
    """/sd-vae lists VAE/ in A1111's shape; override_settings.sd_vae changes that request
    only; the sd_vae option the requests after it; "None" and "Automatic" the model's own;
    names that are not listed and VAEs of other latents are 400s naming them."""
    pytest.importorskip("fastapi")
    webuiapi = pytest.importorskip("webuiapi")
    httpx = pytest.importorskip("httpx")
    from live_server import serve

    from nanodiffusion.server import Limits
    from nanodiffusion.server.app import create_app

    root = models_dir(sd, vaes, tmp_path)
    app = create_app(root, limits=Limits(max_side=64, max_n=2, max_steps=10))
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=7.5,
                width=SIZE, height=SIZE, sampler_name="Euler")
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        vae = root / "VAE"
        assert api.get_sd_vae() == [
            {"model_name": "folder", "filename": str(vae / "folder")},
            {"model_name": "prefixed.ckpt", "filename": str(vae / "sub" / "prefixed.ckpt")},
            {"model_name": "vae.safetensors", "filename": str(vae / "vae.safetensors")},
            {"model_name": "wide.safetensors", "filename": str(vae / "wide.safetensors")}]

        def pixels(**kw):
            res = api.txt2img(**base, **kw)
            return tiny_sd.as_array([res.image.convert("RGB")]), res

        default, _ = pixels()
        swapped, res = pixels(override_settings={"sd_vae": "vae.safetensors"})
        after, _ = pixels()
        png_info = httpx.post(url + "/sdapi/v1/png-info", json={"image": res.json["images"][0]},
                              timeout=60).json()["parameters"]
        assert api.get_options()["sd_vae"] == "Automatic"
        assert api.set_options({"sd_vae": "folder"}) is None
        assert api.get_options()["sd_vae"] == "folder"
        folder, _ = pixels()
        own, _ = pixels(override_settings={"sd_vae": "None"})
        assert api.set_options({"sd_vae": "Automatic"}) is None
        automatic, _ = pixels()
        errors = [httpx.post(url + "/sdapi/v1/options", json={"sd_vae": "nope"}),
                  httpx.post(url + "/sdapi/v1/txt2img", json={
                      **base, "override_settings": {"sd_vae": "nope"}}, timeout=60),
                  httpx.post(url + "/sdapi/v1/txt2img", json={
                      **base, "override_settings": {"sd_vae": "wide.safetensors"}}, timeout=60)]
        after_bad, _ = pixels()
        assert api.get_options()["sd_vae"] == "Automatic"
    assert np.array_equal(default, ours(sd.ours))
    for got in (after, own, automatic, after_bad):
        assert np.array_equal(got, default)
    for got, kind in ((swapped, "ldm"), (folder, "folder")):
        sd.ours.load_vae(vaes[kind])
        try:
            assert np.array_equal(got, ours(sd.ours))
        finally:
            sd.ours.load_vae(None)
    assert not np.array_equal(swapped, default)
    assert f"VAE hash: {sha10(vaes['ldm'])}, VAE: vae.safetensors" in res.info["infotexts"][0]
    assert (png_info["VAE hash"], png_info["VAE"]) == (sha10(vaes["ldm"]), "vae.safetensors")
    for r, param in zip(errors, ("sd_vae", "override_settings.sd_vae")):
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, err
        assert "'nope'" in err["message"] and "'vae.safetensors'" in err["message"]
        assert "'Automatic', 'None'" in err["message"]
    err = errors[2].json()["error"]
    assert errors[2].status_code == 400 and "wide.safetensors" in err["message"]
    assert "8 latent channels" in err["message"]


def test_serve_vae_is_every_requests_default(sd, vaes, tmp_path):
    """create_app(vae=...) (serve --vae): the VAE of every API's requests that name none;
    sd_vae "None" the model's own."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from live_server import serve

    from nanodiffusion.server import Limits
    from nanodiffusion.server.app import create_app

    (tmp_path / "sd").symlink_to(sd.folder)
    app = create_app(tmp_path, limits=Limits(max_side=64, max_n=2, max_steps=10),
                     vae=vaes["ldm"])
    a1111 = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS,
                 cfg_scale=7.5, width=SIZE, height=SIZE, sampler_name="Euler")
    with serve(app) as url:
        def png(route, body):
            r = httpx.post(url + route, json=body, timeout=60)
            assert r.status_code == 200, r.text
            data = r.json()
            b64 = data["images"][0] if "images" in data else data["data"][0]["b64_json"]
            return Image.open(io.BytesIO(base64.b64decode(b64)))
        served = png("/sdapi/v1/txt2img", a1111)
        own = png("/sdapi/v1/txt2img", {**a1111, "override_settings": {"sd_vae": "None"}})
        openai = png("/v1/images/generations", {
            "model": "sd", "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED,
            "steps": STEPS, "guidance": 7.5, "sampler": "euler", "size": f"{SIZE}x{SIZE}"})
    sd.ours.load_vae(vaes["ldm"])
    try:
        want = ours(sd.ours)
    finally:
        sd.ours.load_vae(None)
    for im in (served, openai):
        assert np.array_equal(tiny_sd.as_array([im.convert("RGB")]), want)
        assert "VAE: vae.safetensors" in im.info["parameters"]
    assert np.array_equal(tiny_sd.as_array([own.convert("RGB")]), ours(sd.ours))
    assert "VAE" not in own.info["parameters"]


def test_unclip_models_take_no_other_vae(tmp_path):
    from nanodiffusion.server.models import check_task
    from nanodiffusion.server.params import APIError, Task

    with pytest.raises(APIError) as e:
        check_task(Task("u", "generate", vae=tmp_path / "x.safetensors"), "unclip")
    assert e.value.status == 400 and e.value.param == "sd_vae"
    assert "'x.safetensors'" in e.value.message
    check_task(Task("u", "generate", vae=None), "unclip")
