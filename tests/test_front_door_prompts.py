"""Prompt syntax and clip skip through the doors users open: the `nanodiffusion` command as a
subprocess (the bundled shapes model), and a served app driven over a socket by A1111's
client (override_settings and /options), the OpenAI route and png-info, each equal to the
Python call with the same settings."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from front_door import run_cli
from nanodiffusion import pnginfo

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webuiapi = pytest.importorskip("webuiapi")
from live_server import serve  # noqa: E402

from nanodiffusion import loading  # noqa: E402
from nanodiffusion.diffusion import ScheduleConfig  # noqa: E402
from nanodiffusion.formats.ours import save_folder  # noqa: E402
from nanodiffusion.models import clip, unet, vae  # noqa: E402
from nanodiffusion.models.tokenizer import CLIPTokenizer  # noqa: E402
from nanodiffusion.pipelines.sd import Defaults  # noqa: E402
from nanodiffusion.server import Limits  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402

WEIGHTED = "a (red:1.3) circle, [blurry]"
SIZE = 32


def _pixels(im):
    return np.asarray(im.convert("RGB"))


def _decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---- the command line -------------------------------------------------------------------
def test_cli_clip_skip_and_weighted_prompt(tmp_path):
    common = ["--steps", "2", "--seed", "5"]
    r = run_cli("generate", WEIGHTED, "--clip-skip", "2", *common, "--out", tmp_path / "s2.png")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", WEIGHTED, "--clip-skip", "1", *common, "--out", tmp_path / "s1.png")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", WEIGHTED, "--no-prompt-syntax", *common, "--out",
                tmp_path / "lit.png")
    assert r.returncode == 0, r.stderr
    s2, s1, lit = (Image.open(tmp_path / f"{n}.png") for n in ("s2", "s1", "lit"))
    text = pnginfo.read_parameters(tmp_path / "s2.png")
    assert text.startswith(WEIGHTED + "\n") and pnginfo.parse_parameters(text)["Clip skip"] == "2"
    assert "Clip skip" not in pnginfo.read_parameters(tmp_path / "s1.png")
    # the literal prompt is recorded escaped: read back with the syntax, the same text
    assert pnginfo.read_parameters(tmp_path / "lit.png").startswith(
        "a \\(red:1.3\\) circle, \\[blurry\\]\n")
    assert not np.array_equal(_pixels(s2), _pixels(s1))
    assert not np.array_equal(_pixels(s1), _pixels(lit))  # the weights act


@pytest.mark.parametrize("args,message", [
    (["a red circle", "--clip-skip", "9"], "clip_skip must be an integer in [1, 4]"),
    (["a (red:1.2.3) circle"], "prompt weight '1.2.3' in '(red:1.2.3)' is not a finite number"),
])
def test_cli_bad_prompt_settings_exit_2(tmp_path, args, message):
    r = run_cli("generate", *args, "--steps", "1", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


# ---- the HTTP APIs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A tiny random SD whose text encoder's final LayerNorm has a bias, as trained ones do:
    with the fresh zero bias every token's states have mean 0, and A1111's rescale of weighted
    states to their mean divides by about 0."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    text = clip.CLIPTextModel(clip.TINY_TEXT)
    torch.nn.init.normal_(text.final_layer_norm.bias, std=0.5)
    save_folder(root / "sd", unet=unet.UNet(unet.TINY), vae=vae.VAE(vae.TINY),
                tokenizer=CLIPTokenizer.default(), text_encoder=text, schedule=ScheduleConfig(),
                defaults=Defaults(steps=2, width=SIZE, height=SIZE), name="sd")
    return root


@pytest.fixture(scope="module")
def pipe(models_dir):
    return loading.load_pipeline(models_dir / "sd")


@pytest.fixture
def server(models_dir):
    with serve(create_app(models_dir, limits=Limits(max_side=256))) as url:
        yield url


def test_a1111_clip_skip_equals_the_python_call(server, pipe):
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    kw = dict(prompt=WEIGHTED, seed=11, steps=3, cfg_scale=5, width=SIZE, height=SIZE,
              sampler_name="Euler")
    want = pipe.generate(WEIGHTED, seed=11, steps=3, guidance=5, sampler="euler", width=SIZE,
                         height=SIZE, clip_skip=2)[0]
    plain = pipe.generate(WEIGHTED, seed=11, steps=3, guidance=5, sampler="euler",
                          width=SIZE, height=SIZE)[0]
    assert not np.array_equal(_pixels(want), _pixels(plain))
    r = api.txt2img(override_settings={"CLIP_stop_at_last_layers": 2}, **kw)
    assert np.array_equal(_pixels(r.image), _pixels(want))
    assert r.info["clip_skip"] == 2 and "Clip skip: 2" in r.info["infotexts"][0]
    assert r.info["infotexts"][0] == want.info["parameters"]
    assert np.array_equal(_pixels(api.txt2img(**kw).image), _pixels(plain))
    # png-info reads it back
    info = httpx.post(server + "/sdapi/v1/png-info", json={"image": r.json["images"][0]},
                      timeout=30).json()
    assert info["parameters"]["Clip skip"] == "2" and info["parameters"]["Prompt"] == WEIGHTED
    # /options sets it for the requests that do not override it
    assert api.set_options({"CLIP_stop_at_last_layers": 2}) is None
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert np.array_equal(_pixels(api.txt2img(**kw).image), _pixels(want))
    r = api.txt2img(override_settings={"CLIP_stop_at_last_layers": 1}, **kw)
    assert np.array_equal(_pixels(r.image), _pixels(plain))
    # out of the model's range (2 layers): a 400 that says the range
    with pytest.raises(RuntimeError) as e:
        api.txt2img(override_settings={"CLIP_stop_at_last_layers": 3}, **kw)
    assert e.value.args[0] == 400 and "clip_skip must be an integer in [1, 2]" in \
        e.value.args[1]
    res = httpx.post(server + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"})
    assert res.status_code == 400 and res.json()["error"]["param"] == "CLIP_stop_at_last_layers"
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2


def test_openai_route_reads_the_syntax(server, pipe):
    def post(**extra):
        r = httpx.post(server + "/v1/images/generations", timeout=60, json={
            "model": "sd", "prompt": WEIGHTED, "size": f"{SIZE}x{SIZE}", "seed": 4, "steps": 2,
            "sampler": "euler", **extra})
        assert r.status_code == 200, r.text
        return _pixels(_decode(r.json()["data"][0]["b64_json"]))

    kw = dict(seed=4, steps=2, sampler="euler", width=SIZE, height=SIZE)
    weighted = post()
    assert np.array_equal(weighted, _pixels(pipe.generate(WEIGHTED, **kw)[0]))
    literal = post(prompt_syntax=False)
    assert np.array_equal(literal, _pixels(pipe.generate(WEIGHTED, prompt_syntax=False,
                                                         **kw)[0]))
    assert not np.array_equal(weighted, literal)
    # parsed, not read as text: weight 1 written out is the plain prompt
    assert np.array_equal(post(prompt="a (red:1.0) circle, (blurry:1)"),
                          post(prompt="a red circle, blurry"))
    skipped = post(clip_skip=2)
    assert np.array_equal(skipped, _pixels(pipe.generate(WEIGHTED, clip_skip=2, **kw)[0]))
    r = httpx.post(server + "/v1/images/generations", timeout=60, json={
        "model": "sd", "prompt": "a (red:1.2.3) circle", "size": f"{SIZE}x{SIZE}", "steps": 1})
    assert r.status_code == 400 and "'(red:1.2.3)'" in r.json()["error"]["message"]
