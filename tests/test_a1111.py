"""The AUTOMATIC1111 API (/sdapi/v1) driven by a real client, webuiapi's WebUIApi, over a
socket, on tiny random models (Stable Diffusion with a text encoder only, with a full CLIP,
and unCLIP): generation, per-image seeds, schedulers, options and the model switch, png-info,
interrogate, skip and interrupt, every list route, and errors in the client's field names."""
import base64
import dataclasses
import io
import json
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webuiapi = pytest.importorskip("webuiapi")
from live_server import serve  # noqa: E402

from nanodiffusion import loading  # noqa: E402
from nanodiffusion.data.shapes import enumerate_captions  # noqa: E402
from nanodiffusion.diffusion import ScheduleConfig  # noqa: E402
from nanodiffusion.formats.ours import save_folder, save_unclip_folder  # noqa: E402
from nanodiffusion.models import clip, prior, unet, vae  # noqa: E402
from nanodiffusion.models.tokenizer import CLIPTokenizer  # noqa: E402
from nanodiffusion.pipelines.rerank import clip_scores  # noqa: E402
from nanodiffusion.pipelines.sd import Defaults, Interrupted  # noqa: E402
from nanodiffusion.server import Limits  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402
from nanodiffusion.pipelines.unclip import UnCLIPDefaults  # noqa: E402

SIZE = 32
GEN = dict(steps=2, cfg_scale=5, width=SIZE, height=SIZE)  # the txt2img settings of the tests


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """sd (text encoder only, the default: first by name), sd-clip (a full CLIP), unclip."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    full_clip, tok = clip.CLIPModel(clip.TINY_TEXT, clip.TINY_VISION), CLIPTokenizer.default()
    autoencoder = vae.VAE(vae.TINY)
    defaults = Defaults(steps=2, width=SIZE, height=SIZE)
    save_folder(root / "sd", unet=unet.UNet(unet.TINY), vae=autoencoder, tokenizer=tok,
                        text_encoder=clip.CLIPTextModel(clip.TINY_TEXT), schedule=ScheduleConfig(),
                        defaults=defaults, name="sd")
    save_folder(root / "sd-clip", unet=unet.UNet(unet.TINY), vae=autoencoder,
                        tokenizer=tok, clip=full_clip, schedule=ScheduleConfig(),
                        defaults=defaults, name="sd-clip")
    save_unclip_folder(root / "unclip", prior=prior.Prior(prior.TINY),
                       decoder=unet.UNet(dataclasses.replace(unet.TINY, image_embed_dim=16)),
                       vae=autoencoder, clip=full_clip, tokenizer=tok, schedule=ScheduleConfig(),
                       defaults=UnCLIPDefaults(steps=2, prior_steps=2, width=SIZE, height=SIZE),
                       name="unclip")
    yield root
    torch.set_num_threads(threads)


def _app(models_dir):
    return create_app(models_dir, limits=Limits(max_side=256, max_n=4, max_steps=150))


def _client(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


@pytest.fixture(scope="module")
def server(models_dir):
    """A server whose A1111 options the tests leave as they are (the default model, sd)."""
    with serve(_app(models_dir)) as url:
        yield url


@pytest.fixture
def api(server):
    return _client(server)


@pytest.fixture
def fresh(models_dir):
    """A server of its own, for a test that switches the model: (url, client, app)."""
    app = _app(models_dir)
    with serve(app) as url:
        yield url, _client(url), app


def _pixels(im):
    return np.asarray(im.convert("RGB"))


def _error(excinfo):
    """webuiapi raises RuntimeError(status, body text) for an answer other than 200."""
    status, text = excinfo.value.args
    return status, json.loads(text)["error"]


def _png_b64(im, **text):
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def _noise_image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


# ---- generation -------------------------------------------------------------------------
def test_txt2img_batch_has_a_seed_per_image(api):
    """A1111 gives image i of a batch seed + i (over batch_size and n_iter), and that image
    is the one a single request with seed + i gives, byte for byte."""
    kw = dict(prompt="a red circle", sampler_name="Euler a", **GEN)
    r = api.txt2img(seed=40, batch_size=2, n_iter=2, **kw)
    assert len(r.images) == 4 and r.info["seed"] == 40
    assert r.info["all_seeds"] == [40, 41, 42, 43]
    assert r.info["all_prompts"] == ["a red circle"] * 4
    assert r.info["sampler_name"] == "Euler a" and r.info["scheduler"] == "Automatic"
    for i, text in enumerate(r.info["infotexts"]):
        assert f"Seed: {40 + i}," in text and "Batch" not in text
    assert len({_pixels(im).tobytes() for im in r.images}) == 4
    for i in range(4):
        assert api.txt2img(seed=40 + i, **kw).json["images"][0] == r.json["images"][i]


def test_img2img_batch_and_mask(api):
    init = _noise_image(1)
    kw = dict(prompt="a blue square", denoising_strength=0.5, **{**GEN, "steps": 4})
    r = api.img2img(images=[init], seed=7, batch_size=2, **kw)
    assert r.info["all_seeds"] == [7, 8] and r.info["denoising_strength"] == 0.5
    assert all("Denoising strength: 0.5" in t for t in r.info["infotexts"])
    assert api.img2img(images=[init], seed=8, **kw).json["images"][0] == r.json["images"][1]
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, 16, 16))
    r = api.img2img(images=[init], mask_image=mask, seed=7, **kw)
    assert len(r.images) == 1 and r.images[0].size == (SIZE, SIZE)
    assert r.json["images"][0] != api.img2img(images=[init], seed=7, **kw).json["images"][0]


def test_scheduler_maps_to_our_samplers(api, server):
    """sampler_name + scheduler (A1111 1.9+) give our sampler of that schedule: the same
    bytes as our name (and as the OpenAI route with it); Karras differs from automatic."""
    base = dict(prompt="a green triangle", seed=3, **{**GEN, "steps": 3})

    def png(**kw):
        return api.txt2img(**base, **kw).json["images"][0]

    karras = png(sampler_name="DPM++ 2M", scheduler="Karras")
    assert karras == png(sampler_name="dpmpp-2m-karras", scheduler="automatic")
    assert karras == png(sampler_name="DPM++ 2M Karras")  # the old name, scheduler automatic
    assert karras == png(sampler_name="DPM++ 2M Karras", scheduler="karras")
    ours = httpx.post(server + "/v1/images/generations", timeout=60, json={
        "model": "sd", "prompt": base["prompt"], "seed": 3, "steps": 3, "guidance": 5,
        "sampler": "dpmpp-2m-karras", "size": f"{SIZE}x{SIZE}"}).json()
    assert ours["data"][0]["b64_json"] == karras
    plain = png(sampler_name="DPM++ 2M", scheduler="Automatic")
    assert plain == png(sampler_name="dpmpp-2m")
    decode = lambda s: _pixels(Image.open(io.BytesIO(base64.b64decode(s))))  # noqa: E731
    assert not np.array_equal(decode(plain), decode(karras))
    expo = png(sampler_name="Euler", scheduler="Exponential")
    assert expo == png(sampler_name="euler-exponential")
    assert not np.array_equal(decode(expo), decode(png(sampler_name="Euler")))
    info = api.txt2img(**base, sampler_name="DPM++ 2M", scheduler="Karras").info
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras", "exponential"]


def test_scheduler_we_lack_is_refused(api):
    for sampler, scheduler, accepted in (("Euler a", "Karras", "['Automatic']"),
                                         ("DPM++ 2M Karras", "Exponential",
                                          "['Automatic', 'Karras']")):
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", sampler_name=sampler, scheduler=scheduler, **GEN)
        status, err = _error(e)
        assert status == 400 and err["param"] == "scheduler"
        assert f"scheduler {scheduler!r} is not available with sampler_name {sampler!r}" in \
            err["message"] and accepted in err["message"]
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", sampler_name="Euler", scheduler="Beta", **GEN)
    status, err = _error(e)
    assert status == 400 and "'Beta'" in err["message"] and "Exponential" in err["message"]


def test_errors_name_the_clients_fields(api):
    """cfg_scale, sampler_name, denoising_strength: never our guidance, sampler, strength."""
    for kw, field in ((dict(cfg_scale=500), "cfg_scale"), (dict(sampler_name="nope"),
                                                           "sampler_name"),
                      (dict(enable_hr=True), "enable_hr")):
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", **{**GEN, **kw})
        status, err = _error(e)
        assert status == 400 and err["param"] == field and err["message"].startswith(field)
        assert not re.search(r"\b(guidance|sampler)\b", err["message"])
    message = _sampler_error(api)
    assert "'Euler a'" in message and "'DPM++ 2M Karras'" in message
    assert "euler-ancestral" not in message and "dpmpp-2m" not in message
    init = _noise_image(2)
    for kw in (dict(denoising_strength=2), dict(denoising_strength=0.5, steps=1)):
        with pytest.raises(RuntimeError) as e:
            api.img2img(images=[init], prompt="x", **{**GEN, **kw})
        status, err = _error(e)
        assert status == 400 and err["param"] == "denoising_strength"
        assert not re.search(r"(?<!denoising_)strength", err["message"])


def _sampler_error(api):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", sampler_name="nope", **GEN)
    return _error(e)[1]["message"]


# ---- png-info, interrogate --------------------------------------------------------------
def test_png_info_reads_our_parameters(api):
    r = api.txt2img(prompt="a red circle", negative_prompt="blur", seed=9,
                    sampler_name="Euler a", **GEN)
    got = api.png_info(r.image)  # webuiapi keeps the PNG's text chunks
    assert got.info == r.info["infotexts"][0]
    p = got.parameters
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"], p["Sampler"]) == (
        "a red circle", "blur", "9", "2", "Euler a")
    assert (p["Size-1"], p["Size-2"], p["Model"], p["CFG scale"]) == ("32", "32", "sd", "5.0")
    assert got.json["items"] == {}
    text = 'a cat\nSteps: 3, Sampler: Euler, Seed: 1, Size: 8x16, Note: "a, b: c"'
    body = {"image": _png_b64(Image.new("RGB", (8, 16)), parameters=text, Software="x")}
    got = httpx.post(api.baseurl + "/png-info", json=body).json()
    assert got["info"] == text and got["items"] == {"Software": "x"}
    assert got["parameters"]["Note"] == "a, b: c" and got["parameters"]["Size-2"] == "16"
    bare = api.png_info(Image.new("RGB", (8, 8)))
    assert (bare.info, bare.parameters) == ("", {})
    r = httpx.post(api.baseurl + "/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_interrogate_ranks_captions_with_clip(fresh, models_dir):
    url, api, app = fresh
    image = _noise_image(3)
    api.util_set_model("unclip")
    r = api.interrogate(image)
    expected = loading.load_pipeline(str(models_dir / "unclip")).describe(image, top=5)
    assert r.info == expected[0][0]  # webuiapi reads `caption`
    assert [c["caption"] for c in r.json["captions"]] == [c for c, _ in expected]
    assert [c["score"] for c in r.json["captions"]] == pytest.approx([s for _, s in expected],
                                                                     abs=1e-5)
    api.util_set_model("sd-clip")  # the same ranking with a Stable Diffusion model's CLIP
    ranked = api.interrogate(image).json["captions"]
    pipe = app.state.registry.pipe("sd-clip")
    others = list(np.random.default_rng(0).choice(enumerate_captions(), 40, replace=False))
    scores = clip_scores(pipe, ranked[0]["caption"], [image])
    assert scores[0] == pytest.approx(ranked[0]["score"], abs=1e-5)
    assert all(scores[0] >= clip_scores(pipe, c, [image])[0] - 1e-6 for c in others)
    assert [c["score"] for c in ranked] == sorted((c["score"] for c in ranked), reverse=True)
    with pytest.raises(RuntimeError) as e:
        api.interrogate(image, model="deepdanbooru")
    assert _error(e)[0] == 400 and _error(e)[1]["param"] == "model"
    api.util_set_model("sd")  # a text encoder only
    with pytest.raises(RuntimeError) as e:
        api.interrogate(image)
    status, err = _error(e)
    assert status == 400 and "'sd'" in err["message"] and "image encoder" in err["message"]


# ---- options and the model switch -------------------------------------------------------
def test_options_switch_the_model(fresh):
    url, api, _ = fresh
    opts = api.get_options()
    assert {"sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "CLIP_stop_at_last_layers",
            "samples_format"} <= opts.keys()
    assert opts["sd_model_checkpoint"] == "sd" == api.util_get_current_model()
    assert re.fullmatch("[0-9a-f]{64}", opts["sd_checkpoint_hash"])
    listed = {m["title"]: m for m in api.get_sd_models()}
    assert listed["sd"]["sha256"] == opts["sd_checkpoint_hash"]
    assert listed["sd"]["hash"] == opts["sd_checkpoint_hash"][:10]
    base = dict(prompt="a cat", seed=5, **GEN)
    default = api.txt2img(**base).json["images"][0]
    other = api.txt2img(override_settings={"sd_model_checkpoint": "sd-clip"}, **base)
    assert other.json["images"][0] != default
    api.util_set_model("sd-clip")
    assert api.util_get_current_model() == "sd-clip"
    assert api.get_options()["sd_checkpoint_hash"] not in (None, opts["sd_checkpoint_hash"])
    r = api.txt2img(**base)
    assert r.json["images"][0] == other.json["images"][0]
    assert r.info["sd_model_name"] == "sd-clip"
    assert api.set_options({"sd_model_checkpoint": "sd.safetensors [0123456789]"}) is None
    assert api.util_get_current_model() == "sd"  # A1111's titles name our models too
    assert api.set_options({"my_ui_setting": [1, 2], "sd_vae": "None"}) is None
    opts = api.get_options()
    assert opts["my_ui_setting"] == [1, 2] and opts["sd_vae"] == "None"
    r = httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope", "x": 1})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "sd_model_checkpoint"
    r = httpx.post(url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "CLIP_stop_at_last_layers"
    opts = api.get_options()
    assert opts["sd_model_checkpoint"] == "sd" and "x" not in opts
    assert opts["CLIP_stop_at_last_layers"] == 1


def test_refresh_checkpoints_lists_a_new_model(tmp_path, models_dir):
    (tmp_path / "sd").symlink_to(models_dir / "sd")
    with serve(_app(tmp_path)) as url:
        api = _client(url)
        assert api.util_get_model_names() == ["sd"]
        (tmp_path / "sd2").symlink_to(models_dir / "sd-clip")
        assert api.refresh_checkpoints() is None
        assert api.util_get_model_names() == ["sd", "sd2"]


def test_list_routes(api, models_dir):
    for call in (api.get_sd_vae, api.get_loras, api.get_upscalers, api.get_latent_upscale_modes,
                 api.get_hypernetworks, api.get_face_restorers, api.get_realesrgan_models,
                 api.get_prompt_styles):
        assert call() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["ckpt_dir"] == str(models_dir)
    mem = api.get_memory()
    assert mem["ram"]["total"] >= mem["ram"]["used"] > 0
    assert "error" in mem["cuda"] or mem["cuda"]["system"]["total"] > 0
    assert api.util_get_model_names() == ["sd", "sd-clip", "unclip"]
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"} <= set(names)
    assert not {"euler-exponential", "euler-ancestral"} & set(names)
    assert api.util_get_scheduler_names() == ["automatic", "exponential", "karras"]
    schedulers = {s["name"]: s for s in api.get_schedulers()}
    assert schedulers["karras"]["label"] == "Karras" and schedulers["karras"]["default_rho"] == 7


# ---- skip and interrupt -----------------------------------------------------------------
def test_skip_and_interrupt(models_dir, monkeypatch):
    """Image 0 of a batch of 3 is held at step 1 of 4: skip ends that image as it is and the
    batch goes on (seeds s+1, s+2 in full); interrupt ends the batch there."""
    app = _app(models_dir)
    pipe = app.state.registry.pipe("sd")
    original, calls = pipe.generate, []
    reached, release = threading.Event(), threading.Event()

    def held(callback, **kw):
        first = not calls
        calls.append(kw["seed"])

        def cb(info):
            if first and info["step"] == 1:
                reached.set()
                assert release.wait(60)
            return callback(info)
        return original(callback=cb, **kw)
    monkeypatch.setattr(pipe, "generate", held)
    kw = dict(prompt="a cat", sampler_name="Euler a", **{**GEN, "steps": 4})

    def stop(info):
        if info["step"] == 1:
            raise Interrupted()

    def partial(seed):
        return _pixels(original(prompt="a cat", negative_prompt="", seed=seed, steps=4,
                                guidance=5.0, sampler="euler-ancestral", width=SIZE,
                                height=SIZE, n=1, callback=stop)[0])

    with serve(app) as url:
        api, out = _client(url), {}
        for action, seed in (("skip", 20), ("interrupt", 30)):
            calls.clear(), reached.clear(), release.clear()
            t = threading.Thread(target=lambda s=seed: out.update(r=_client(url).txt2img(
                seed=s, batch_size=3, **kw)), daemon=True)
            t.start()
            assert reached.wait(60)
            state = api.get_progress()["state"]
            assert (state["sampling_step"], state["sampling_steps"]) == (1, 12)  # the batch's
            assert getattr(api, action)() == ({} if action == "interrupt" else None)
            release.set()
            t.join(60)
            r = out["r"]
            assert np.array_equal(_pixels(r.images[0]), partial(seed))
            if action == "skip":
                assert r.info["all_seeds"] == [20, 21, 22] and not r.info["interrupted"]
                for i in (1, 2):
                    assert api.txt2img(seed=20 + i, **kw).json["images"][0] == \
                        r.json["images"][i]
            else:
                assert r.info["all_seeds"] == [30] and r.info["interrupted"]
                assert len(r.images) == 1
