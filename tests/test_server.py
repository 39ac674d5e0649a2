"""The HTTP server on a tiny random model: the official openai client against a real socket,
the AUTOMATIC1111 routes and the job API over plain HTTP, limits, auth and determinism."""
import base64
import dataclasses
import io
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from live_server import serve  # noqa: E402

from fastapi.testclient import TestClient  # noqa: E402

from nanodiffusion.diffusion import ScheduleConfig  # noqa: E402
from nanodiffusion.formats.ours import save_folder  # noqa: E402
from nanodiffusion.models import clip, unet, vae  # noqa: E402
from nanodiffusion.models.tokenizer import CLIPTokenizer  # noqa: E402
from nanodiffusion.pipelines.sd import Defaults, Interrupted  # noqa: E402
from nanodiffusion.server import Limits, create_app  # noqa: E402

STATIC = Path(__file__).parents[1] / "nanodiffusion" / "server" / "static"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_folder(folder / "tiny", unet=unet.UNet(unet.TINY), vae=vae.VAE(vae.TINY),
                        text_encoder=clip.CLIPTextModel(clip.TINY_TEXT),
                        tokenizer=CLIPTokenizer.default(), schedule=ScheduleConfig(),
                        defaults=Defaults(steps=3, width=32, height=32), name="tiny")
    (folder / "notes.txt").write_text("not a model")
    yield folder
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(models_dir):
    """A real uvicorn server in a thread: the base URL."""
    app = create_app(models_dir, limits=Limits(max_side=256, max_n=4, max_steps=150))
    with serve(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _png(data):
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    im.load()
    return im


def _b64png(size=(32, 32), color=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ---- OpenAI --------------------------------------------------------------------------
def test_openai_generations(client):
    r = client.images.generate(model="tiny", prompt="a red circle", n=2, size="32x32",
                               response_format="b64_json", extra_body={"seed": 1, "steps": 2})
    assert len(r.data) == 2 and r.created > 0
    im = _png(base64.b64decode(r.data[0].b64_json))
    assert im.size == (32, 32)
    assert "Seed: 1" in im.info["parameters"] and "Steps: 2" in im.info["parameters"]
    assert "Rescale CFG" not in im.info["parameters"]
    r = client.images.generate(model="tiny", prompt="a red circle", size="32x32",
                               extra_body={"seed": 1, "steps": 2, "guidance_rescale": 0.7})
    assert "Rescale CFG: 0.7" in _png(base64.b64decode(r.data[0].b64_json)).info["parameters"]
    r = client.images.generate(model="tiny", prompt="a red circle", size="32x32",
                               response_format="url", extra_body={"seed": 1, "steps": 2})
    assert _png(httpx.get(r.data[0].url).content).size == (32, 32)


def test_openai_edits(client):
    image = ("in.png", _b64png(), "image/png")
    r = client.images.edit(model="tiny", image=image, prompt="a blue square",
                           response_format="b64_json", extra_body={"seed": 2, "strength": 0.5})
    im = _png(base64.b64decode(r.data[0].b64_json))
    assert im.size == (32, 32) and "Denoising strength: 0.5" in im.info["parameters"]
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 16))  # transparent: repaint there (OpenAI's masks)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    r = client.images.edit(model="tiny", image=image, mask=("m.png", buf.getvalue()),
                           prompt="a blue square", n=2, response_format="b64_json",
                           extra_body={"seed": 2})
    assert len(r.data) == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # create_variation, in the client
def test_openai_errors_and_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError, match="variations needs an unCLIP"):
        client.images.create_variation(model="tiny", image=("in.png", _b64png()))
    with pytest.raises(openai.BadRequestError,  # the model's size step (tiny VAE: 2)
                       match="width must be a multiple of 2 between 2 and 4096, got 31"):
        client.images.generate(model="tiny", prompt="x", size="31x31")
    with pytest.raises(openai.BadRequestError, match=r"size must be between 1 and 256 \(this"):
        client.images.generate(model="tiny", prompt="x", size="512x512")
    with pytest.raises(openai.BadRequestError, match="steps"):
        client.images.generate(model="tiny", prompt="x", extra_body={"steps": 151})
    with pytest.raises(openai.BadRequestError, match="sampler"):
        client.images.generate(model="tiny", prompt="x", extra_body={"sampler": "nope"})
    with pytest.raises(openai.BadRequestError,
                       match=r"guidance_rescale must be a number in \[0, 1\], got 2"):
        client.images.generate(model="tiny", prompt="x", extra_body={"guidance_rescale": 2})
    with pytest.raises(openai.BadRequestError, match="not a decodable image"):
        client.images.edit(model="tiny", image=("in.png", b"not a png"), prompt="x")
    for bad in ("../tiny", "/etc/passwd", "a/b", ".."):
        with pytest.raises(openai.BadRequestError, match="invalid model name"):
            client.images.generate(model=bad, prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="missing", prompt="x")


def test_same_request_gives_same_bytes_under_concurrency(server):
    body = {"model": "tiny", "prompt": "a green triangle", "seed": 7, "steps": 3,
            "size": "32x32"}
    other = {**body, "prompt": "something else", "seed": 8}
    out = {}

    def post(key, b):
        out[key] = httpx.post(server + "/v1/images/generations", json=b, timeout=60).json()
    threads = [threading.Thread(target=post, args=(k, b))
               for k, b in (("a", body), ("x", other), ("b", body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["a"]["data"][0]["b64_json"] == out["b"]["data"][0]["b64_json"]
    assert out["a"]["data"][0]["b64_json"] != out["x"]["data"][0]["b64_json"]


# ---- AUTOMATIC1111 -------------------------------------------------------------------
def test_a1111_routes(server):
    body = {"prompt": "a cat", "seed": -1, "steps": 2, "cfg_scale": 5, "width": 32,
            "height": 32, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 1}
    r = httpx.post(server + "/sdapi/v1/txt2img", json=body, timeout=60).json()
    assert len(r["images"]) == 2 and r["parameters"]["prompt"] == "a cat"
    info = json.loads(r["info"])
    im = _png(base64.b64decode(r["images"][0]))
    assert f"Seed: {info['seed']}" in im.info["parameters"]
    assert "Sampler: Euler a" in im.info["parameters"] and info["sampler_name"] == "Euler a"
    r = httpx.post(server + "/sdapi/v1/img2img", timeout=60, json={
        "prompt": "a dog", "seed": 3, "steps": 4, "denoising_strength": 0.5,
        "init_images": [base64.b64encode(_b64png()).decode()],
        "mask": base64.b64encode(_b64png(color=(255, 255, 255))).decode()})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    names = [s["name"] for s in httpx.get(server + "/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names
    assert httpx.get(server + "/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    p = httpx.get(server + "/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state", "current_image"} <= set(p)
    r = httpx.post(server + "/sdapi/v1/txt2img", json={**body, "guidance_rescale": 0.5})
    assert "Rescale CFG: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
    r = httpx.post(server + "/sdapi/v1/txt2img", json={**body, "width": 33})
    assert r.status_code == 400 and r.json()["error"]["param"] == "width"
    r = httpx.post(server + "/sdapi/v1/txt2img",
                   json={**body, "override_settings": {"sd_model_checkpoint": "../x"}})
    assert r.status_code == 400


def test_a1111_interrupt_answers_the_partial_images(models_dir, monkeypatch):
    """As in AUTOMATIC1111, an interrupted txt2img answers 200 with the images as they are at
    the step it stopped (here held at step 2 of 8 until the interrupt arrives)."""
    app = create_app(models_dir)
    pipe, reached = app.state.registry.pipe("tiny"), threading.Event()
    original = pipe.generate

    def held(callback, **kw):
        def cb(info):
            if info["step"] == 2:
                reached.set()
                for _ in range(3000):
                    if any(j.interrupt_requested.is_set() for j in app.state.registry.running()):
                        break
                    time.sleep(0.01)
            return callback(info)
        return original(callback=cb, **kw)
    monkeypatch.setattr(pipe, "generate", held)
    body = {"prompt": "a cat", "seed": 11, "steps": 8, "width": 32, "height": 32}
    out = {}
    with TestClient(app) as c:
        t = threading.Thread(target=lambda: out.update(r=c.post("/sdapi/v1/txt2img", json=body)),
                             daemon=True)
        t.start()
        assert reached.wait(60)
        assert c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 2  # 2 done
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        t.join(60)
    assert out["r"].status_code == 200
    im = _png(base64.b64decode(out["r"].json()["images"][0]))
    assert im.size == (32, 32) and "Seed: 11" in im.info["parameters"]

    def stop(info):
        if info["step"] == 2:
            raise Interrupted()
    kw = dict(prompt="a cat", seed=11, steps=8, width=32, height=32)
    partial, full = original(callback=stop, **kw)[0], original(**kw)[0]
    assert im.tobytes() == partial.convert(im.mode).tobytes()
    assert im.tobytes() != full.convert(im.mode).tobytes()


# ---- job API -------------------------------------------------------------------------
def _events(server, job_id, until=None):
    with httpx.stream("GET", f"{server}/api/jobs/{job_id}/events", timeout=60) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                yield name, json.loads(line[5:])
                if name in ("done", "error"):
                    return


def test_job_events_in_order(server):
    job = httpx.post(server + "/api/jobs", json={"model": "tiny", "prompt": "x", "seed": 4,
                                                 "steps": 6}).json()
    events = list(_events(server, job["id"]))
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "done"
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    assert any(d["preview"] for n, d in events if n == "progress")
    url = events[-1][1]["images"][0]
    assert _png(httpx.get(server + url).content).size == (32, 32)
    status = httpx.get(f"{server}/api/jobs/{job['id']}").json()
    assert status["status"] == "done" and status["result"]["images"] == [url]
    vary = httpx.post(server + "/api/jobs", json={"prompt": "x", "init_file": url,
                                                  "strength": 0.5}).json()
    assert list(_events(server, vary["id"]))[-1][0] == "done"


def test_job_cancel(server):
    job = httpx.post(server + "/api/jobs", json={"model": "tiny", "prompt": "x",
                                                 "steps": 150}).json()
    for name, data in _events(server, job["id"]):
        if name == "progress":
            httpx.post(f"{server}/api/jobs/{job['id']}/cancel")
        last = (name, data)
    assert last[0] == "error" and last[1]["code"] == "cancelled"
    assert httpx.get(f"{server}/api/jobs/{job['id']}").json()["status"] == "cancelled"
    r = httpx.post(server + "/api/jobs", json={"model": "../../etc", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# ---- limits, auth, page --------------------------------------------------------------
def test_full_queue_answers_429(models_dir, monkeypatch):
    app = create_app(models_dir, limits=Limits(max_queue=1))
    reg = app.state.registry
    pipe, release = reg.pipe("tiny"), threading.Event()
    original = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda **kw: release.wait(30) and original(**kw))
    with TestClient(app) as c:
        body = {"prompt": "x", "steps": 1}
        first = c.post("/api/jobs", json=body).json()["id"]
        for _ in range(200):
            if reg.job(first).status == "running":
                break
            time.sleep(0.01)
        assert c.post("/api/jobs", json=body).status_code == 200  # waits in the queue
        r = c.post("/api/jobs", json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        release.set()


def test_api_key(models_dir):
    with TestClient(create_app(models_dir, api_key="sekrit")) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200


def test_page_and_assets(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "nanodiffusion" in page.text
    for asset in ("app.js", "style.css"):
        r = httpx.get(f"{server}/static/{asset}")
        assert r.status_code == 200 and f"/static/{asset}" in page.text
    if shutil.which("node"):
        subprocess.run(["node", "--check", str(STATIC / "app.js")], check=True)


def test_serve_arguments():
    from nanodiffusion.cli import _parser

    args = _parser().parse_args(["serve", "--models-dir", "m", "--port", "9000",
                                 "--max-queue", "2"])
    assert (args.models_dir, args.port, args.max_queue, args.host) == ("m", 9000, 2, "127.0.0.1")
    assert args.dtype == "float32"


def test_registry_dtype(models_dir):
    """--dtype bfloat16 loads Stable Diffusion models in bfloat16, and they serve."""
    from nanodiffusion.server.models import Registry

    reg = Registry(models_dir, dtype="bfloat16")
    pipe = reg.pipe("tiny")
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    assert pipe.generate("a red circle", seed=1, steps=2)[0].size == (32, 32)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        Registry(models_dir, dtype="int8")
    bundled = Registry(dtype="bfloat16")  # unCLIP models stay float32
    assert next(bundled.pipe("shapes-unclip").decoder.parameters()).dtype == torch.float32


def test_a_client_that_disconnects_frees_its_slot(models_dir, monkeypatch):
    """A client that gives up (closes its connection) mid-run cancels its job: the worker stops
    at the next step instead of finishing a result nobody will read."""
    app = create_app(models_dir, limits=Limits(max_steps=1000))
    reg = app.state.registry
    with serve(app) as url:
        unet_forward = reg.pipe("tiny").unet.forward
        monkeypatch.setattr(reg.pipe("tiny").unet, "forward",  # 1000 steps: >= 10 s
                            lambda *a, **k: time.sleep(0.01) or unet_forward(*a, **k))
        body = {"model": "tiny", "prompt": "x", "steps": 1000, "seed": 1}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            httpx.post(url + "/v1/images/generations", json=body, timeout=1.5)
        running = reg.running()
        job = running[0] if running else None
        deadline = time.time() + 20
        while job is not None and job.status not in ("cancelled", "done", "error") \
                and time.time() < deadline:
            time.sleep(0.05)
        assert job is not None, "the job should still be running when the client hangs up"
        assert job.status == "cancelled" and job.step < 1000
        # the slot is free: the next request is served at once
        r = httpx.post(url + "/v1/images/generations", json={**body, "steps": 2}, timeout=30)
        assert r.status_code == 200


def test_internal_errors_are_500s_and_user_errors_400s(models_dir, monkeypatch, capfd):
    """A bug inside a pipeline (here a TypeError, which the server used to answer as "bad
    request") is a 500 with its traceback in the server's log; a setting the model refuses
    (an InputError from the pipeline's checks) is a 400 naming it."""
    app = create_app(models_dir)
    pipe = app.state.registry.pipe("tiny")

    def broken(**kw):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")
    monkeypatch.setattr(pipe, "generate", broken)
    body = {"model": "tiny", "prompt": "a cat", "size": "32x32", "steps": 2}
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "TypeError" in capfd.readouterr().err  # the traceback, in the log
        monkeypatch.undo()
        real = pipe._run
        monkeypatch.setattr(pipe, "_run", lambda prompt, negative, req, **kw: real(
            prompt, negative, dataclasses.replace(req, eta=2.0), **kw))  # eta 2
        r = c.post("/v1/images/generations", json={**body, "sampler": "ddim"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "eta must be a number in [0, 1], got 2.0"


def test_an_image_too_large_is_refused_from_its_header(monkeypatch):
    """A 9000x9000 PNG is a few KB on the wire and 243 MB decoded: its size is read from the
    header and refused before a pixel is decoded."""
    from PIL import ImageFile

    from nanodiffusion.server.params import APIError, decode_image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")

    def no_decode(self):
        raise AssertionError("the pixels were decoded before the size was checked")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(APIError, match="image is 9000x9000; at most 4096 pixels a side"):
        decode_image(buf.getvalue(), "image", Limits())


def test_the_models_folder_is_read_once_and_on_refresh(tmp_path, models_dir, monkeypatch):
    from nanodiffusion.server import models

    (tmp_path / "tiny").symlink_to(models_dir / "tiny")
    app = create_app(tmp_path)
    reads = []
    real = models.scan
    monkeypatch.setattr(models, "scan", lambda d: reads.append(d) or real(d))
    with TestClient(app) as c:
        for _ in range(3):
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
        (tmp_path / "tiny2").symlink_to(models_dir / "tiny")
        assert c.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
        assert len(reads) == 1  # not once per request
        assert c.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny", "tiny2"]
