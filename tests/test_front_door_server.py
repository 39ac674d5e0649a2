"""`nanodiffusion serve` started as a user starts it (a subprocess, the bundled models), driven
by the official openai client and plain HTTP: every model kind through every door that claims
it, and a clear 4xx naming what a kind cannot do."""
import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from front_door import run_cli, served
from nanodiffusion.data import shapes

SIDE = 64


@pytest.fixture(scope="module")
def server():
    with served("--max-n", 4) as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def _png(b64):
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.format == "PNG"
    im.load()
    return im


def _file(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _scene():
    """A shapes eval image: a pink star to the left of a cyan square."""
    return shapes.sample(0, split="eval", size=SIDE)[0]


def test_serve_lists_the_bundled_models(client):
    assert sorted(m.id for m in client.models.list()) == ["shapes", "shapes-lcm",
                                                          "shapes-unclip"]


@pytest.mark.parametrize("model", ["shapes", "shapes-lcm", "shapes-unclip"])
def test_openai_generations_on_each_bundled_model(client, model):
    r = client.images.generate(model=model, prompt="a red circle", n=2, size="64x64",
                               response_format="b64_json", extra_body={"seed": 3, "steps": 3})
    ims = [_png(d.b64_json) for d in r.data]
    assert [im.size for im in ims] == [(SIDE, SIDE)] * 2
    assert f"Model: {model}" in ims[0].info["parameters"]
    assert "Seed: 3" in ims[0].info["parameters"] and "Steps: 3" in ims[0].info["parameters"]


def test_openai_edits_img2img_inpaint_and_unclip_text_diff(client):
    image = ("in.png", _file(_scene()), "image/png")
    r = client.images.edit(model="shapes", image=image, prompt="a blue circle",
                           extra_body={"seed": 1, "steps": 4, "strength": 0.7})
    assert "Denoising strength: 0.7" in _png(r.data[0].b64_json).info["parameters"]
    mask = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, SIDE))
    r = client.images.edit(model="shapes", image=image, mask=("m.png", _file(mask)),
                           prompt="a blue square", extra_body={"seed": 1, "steps": 3})
    out = _png(r.data[0].b64_json).convert("RGB")
    keep = (32, 0, SIDE, SIDE)  # opaque in the mask: kept exactly, as OpenAI's edits keep it
    assert out.crop(keep).tobytes() == _scene().crop(keep).tobytes()
    r = client.images.edit(model="shapes", image=image, mask=("m.png", _file(mask)),
                           prompt="a blue square",
                           extra_body={"seed": 1, "steps": 3, "keep_unmasked": "false"})
    assert _png(r.data[0].b64_json).convert("RGB").crop(keep).tobytes() != \
        _scene().crop(keep).tobytes()  # diffusers' decoded pixels
    # unCLIP: DALL·E 2's text diff, from the caption CLIP gives the image to the prompt
    r = client.images.edit(model="shapes-unclip", image=image, prompt="a blue circle", n=2,
                           extra_body={"seed": 1, "steps": 3})
    params = _png(r.data[0].b64_json).info["parameters"]
    assert len(r.data) == 2 and "Task: edit" in params and "Edit from: a" in params
    with pytest.raises(openai.BadRequestError, match="unCLIP model.*leave out the mask"):
        client.images.edit(model="shapes-unclip", image=image, mask=("m.png", _file(mask)),
                           prompt="a blue circle")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # create_variation, in the client
def test_openai_variations(client):
    image = ("in.png", _file(_scene()), "image/png")
    r = client.images.create_variation(model="shapes-unclip", image=image, n=2,
                                       response_format="b64_json",
                                       extra_body={"seed": 5, "steps": 3})
    ims = [_png(d.b64_json) for d in r.data]
    assert len(ims) == 2 and ims[0].tobytes() != ims[1].tobytes()
    assert "Task: variations" in ims[0].info["parameters"]
    r2 = client.images.create_variation(image=image, n=1, extra_body={"seed": 5, "steps": 3})
    assert "Model: shapes-unclip" in _png(r2.data[0].b64_json).info["parameters"]
    with pytest.raises(openai.BadRequestError,
                       match="'shapes' is a Stable Diffusion model.*variations needs an unCLIP"):
        client.images.create_variation(model="shapes", image=image)


def _events(server, job_id):
    events = []
    with httpx.stream("GET", f"{server}/api/jobs/{job_id}/events", timeout=300) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "error"):
                    break
    return events


@pytest.mark.parametrize("model", ["shapes", "shapes-unclip"])
def test_job_api_with_progress_on_each_model(server, model):
    r = httpx.post(server + "/api/jobs", json={"model": model, "prompt": "a green star",
                                               "steps": 6, "seed": 2, "n": 1})
    assert r.status_code == 200, r.text
    events = _events(server, r.json()["id"])
    assert events[-1][0] == "done", events[-1]
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps and steps == sorted(steps), steps
    assert any(d.get("preview") for e, d in events if e == "progress")
    url = events[-1][1]["images"][0]
    assert Image.open(io.BytesIO(httpx.get(server + url).content)).size == (SIDE, SIDE)


def test_job_api_refuses_what_a_kind_cannot_do(server):
    image = base64.b64encode(_file(_scene())).decode()
    r = httpx.post(server + "/api/jobs", json={"model": "shapes-unclip", "prompt": "x",
                                               "init_image": image})
    assert r.status_code == 400 and "img2img needs a Stable Diffusion model" in r.text
    r = httpx.post(server + "/api/jobs", json={"model": "shapes-unclip", "prompt": "x",
                                               "guidance_rescale": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_rescale"


def test_bad_text_and_huge_images_are_clear_400s(server):
    r = httpx.post(server + "/v1/images/generations", content=b'{"prompt": "a \\ud800 x"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    big = Image.new("1", (9000, 9000))  # a few KB of PNG, 81 megapixels decoded
    r = httpx.post(server + "/v1/images/edits", data={"prompt": "x", "model": "shapes"},
                   files={"image": ("big.png", _file(big), "image/png")})
    assert r.status_code == 400 and "9000x9000" in r.json()["error"]["message"]


def test_serve_refuses_a_bad_port_clearly():
    r = run_cli("serve", "--port", "99999", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--port" in r.stderr and "99999" in r.stderr and "65535" in r.stderr


def test_webuiapi_on_the_bundled_models(server):
    """AUTOMATIC1111's client, as a user's script calls it: txt2img on the default model,
    the model switch, then unCLIP's txt2img, interrogate and png_info."""
    webuiapi = pytest.importorskip("webuiapi")
    port = int(server.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    r = api.txt2img(prompt="a red circle", seed=4, steps=3, width=SIDE, height=SIDE,
                    batch_size=2, sampler_name="DPM++ 2M", scheduler="Karras")
    assert [im.size for im in r.images] == [(SIDE, SIDE)] * 2
    assert r.info["all_seeds"] == [4, 5] and "Model: shapes" in r.info["infotexts"][0]
    assert api.util_get_current_model().startswith("shapes")
    api.util_set_model("shapes-unclip")
    assert api.util_get_current_model().startswith("shapes-unclip")
    r = api.txt2img(prompt="a blue square", seed=4, steps=3)
    assert "Model: shapes-unclip" in r.info["infotexts"][0]
    caption = api.interrogate(_scene()).info
    assert "pink star" in caption and "cyan square" in caption, caption  # CLIP's best guess
    info = api.png_info(r.image).info
    assert "Seed: 4" in info and "Steps: 3" in info
    api.util_set_model("shapes")


def test_sizes_follow_the_model_not_a_server_rule(client):
    """The bundled models' VAE halves twice (factor 4): 36x36 works through the server as it
    does in Python; 34x34 is refused by the pipeline's one check, naming the model's step."""
    r = client.images.generate(model="shapes", prompt="a red circle", size="36x36",
                               extra_body={"seed": 1, "steps": 2})
    assert _png(r.data[0].b64_json).size == (36, 36)
    with pytest.raises(openai.BadRequestError, match="width must be a multiple of 4.*got 34"):
        client.images.generate(model="shapes", prompt="a red circle", size="34x34")


def test_token_merging_through_webuiapi_and_openai(server, client):
    """Token merging as A1111 users set it (override_settings, or /options for every later
    request; img2img's own ratio) and through openai's extra_body: the images carry
    "Token merging ratio" and differ from the exact path's; a bad ratio is a 400 naming it."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.rsplit(":", 1)[1]))
    args = dict(prompt="a red circle above a blue square", seed=4, steps=6, width=SIDE,
                height=SIDE)
    exact = api.txt2img(**args).image
    r = api.txt2img(**args, override_settings={"token_merging_ratio": 0.5})
    assert "Token merging ratio: 0.5" in r.info["infotexts"][0]
    assert r.image.tobytes() != exact.tobytes()
    api.set_options({"token_merging_ratio": 0.4, "token_merging_ratio_img2img": 0.2})
    try:
        assert api.get_options()["token_merging_ratio"] == 0.4
        assert "Token merging ratio: 0.4" in api.txt2img(**args).info["infotexts"][0]
        r = api.img2img(images=[exact], **args)
        assert "Token merging ratio: 0.2" in r.info["infotexts"][0]
        r = api.txt2img(**args, override_settings={"token_merging_ratio": 0})
        assert "Token merging" not in r.info["infotexts"][0]
        assert r.image.tobytes() == exact.tobytes()
    finally:
        api.set_options({"token_merging_ratio": 0, "token_merging_ratio_img2img": 0})
    bad = httpx.post(server + "/sdapi/v1/txt2img", timeout=60, json={
        **args, "override_settings": {"token_merging_ratio": 2}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "token_merging_ratio"
    assert "got 2" in bad.json()["error"]["message"]
    bad = httpx.post(server + "/sdapi/v1/options", timeout=60, json={"token_merging_ratio": -1})
    assert bad.status_code == 400 and api.get_options()["token_merging_ratio"] == 0.0
    r = client.images.generate(model="shapes", prompt=args["prompt"], size="64x64",
                               extra_body={"seed": 4, "steps": 6, "tome": 0.5})
    assert "Token merging ratio: 0.5" in _png(r.data[0].b64_json).info["parameters"]
    with pytest.raises(openai.BadRequestError, match="tome must be a number"):
        client.images.generate(model="shapes", prompt="x", extra_body={"tome": "lots"})
    with pytest.raises(openai.BadRequestError, match="tome is an option of Stable Diffusion"):
        client.images.generate(model="shapes-unclip", prompt="x", extra_body={"tome": 0.5})
