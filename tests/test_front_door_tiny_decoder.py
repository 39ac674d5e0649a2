"""The tiny decoder (TAESD) through the doors users open: `nanodiffusion generate
--vae-decoder tiny` (the bundled model's own tiny decoder, or one attached with --tiny-decoder
from madebyollin's file) and --save-steps as subprocesses; `nanodiffusion serve` as one, whose
live previews come from the bundled model's tiny decoder, and whose OpenAI, job and
AUTOMATIC1111 APIs take the final image's decoder (vae_decoder; A1111's
sd_vae_decode_method)."""
import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from front_door import run_cli, served
from nanodiffusion import load, pnginfo


def _params(path):
    return pnginfo.read_parameters(path)


def test_generate_with_the_bundled_tiny_decoder(tmp_path):
    common = ("generate", "a red circle", "--seed", 1, "--steps", 3)
    r = run_cli(*common, "--vae-decoder", "tiny", "--out", tmp_path / "tiny.png")
    assert r.returncode == 0, r.stderr
    assert "VAE Decoder: TAESD" in _params(tmp_path / "tiny.png")
    r = run_cli(*common, "--out", tmp_path / "full.png")
    assert r.returncode == 0, r.stderr
    assert "VAE Decoder" not in _params(tmp_path / "full.png")
    tiny, full = (Image.open(tmp_path / f"{n}.png") for n in ("tiny", "full"))
    assert tiny.size == full.size == (64, 64) and tiny.tobytes() != full.tobytes()


def test_tiny_decoder_attached_from_madebyollins_file(tmp_path):
    """A diffusers model folder plus a taesd_decoder.safetensors given with --tiny-decoder:
    the final image and the --save-steps frames from it; a broken file is named."""
    pytest.importorskip("diffusers")
    import tiny_sd
    from diffusers import AutoencoderTiny

    model = tiny_sd.build(tmp_path / "sd").folder  # VAE factor 2
    torch.manual_seed(0)
    ref = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(2, 1))
    decoder = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous()
               for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(decoder, path)
    r = run_cli("generate", "a cat", "--model", model, "--tiny-decoder", path, "--vae-decoder",
                "tiny", "--width", 32, "--height", 32, "--steps", 2, "--seed", 3,
                "--save-steps", 1, "--out", tmp_path / "cat.png")
    assert r.returncode == 0, r.stderr
    assert "VAE Decoder: TAESD" in _params(tmp_path / "cat.png")
    assert (tmp_path / "cat-steps.png").is_file()
    pipe = load(model, tiny_decoder=path)
    want = pipe.generate("a cat", seed=3, steps=2, width=32, height=32, vae_decoder="tiny")[0]
    assert np.abs(np.asarray(Image.open(tmp_path / "cat.png"), np.float32)
                  - np.asarray(want, np.float32)).max() <= 1
    save_file({k: v for k, v in decoder.items() if k != "3.conv.0.weight"}, path)
    r = run_cli("generate", "a cat", "--model", model, "--tiny-decoder", path, "--steps", 1,
                "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(path) in r.stderr and "3.conv.0.weight" not in r.stderr  # ours: layers.2
    assert "decoder.layers.2.conv.0.weight" in r.stderr


@pytest.fixture(scope="module")
def server():
    with served() as (url, _):
        yield url


def _events(server, job_id):
    events, name = [], None
    with httpx.stream("GET", f"{server}/api/jobs/{job_id}/events", timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "error"):
                    break
    return events


def _pixels(image):
    return np.asarray(image.convert("RGB"), np.float32)


@torch.no_grad()
def test_server_previews_come_from_the_tiny_decoder(server):
    r = httpx.post(server + "/api/jobs", json={"model": "shapes", "prompt": "a green star",
                                               "steps": 6, "seed": 2, "n": 1})
    assert r.status_code == 200, r.text
    events = _events(server, r.json()["id"])
    assert events[-1][0] == "done", events[-1]
    first = next(d for e, d in events if e == "progress" and d["step"] == 1)
    got = _pixels(Image.open(io.BytesIO(base64.b64decode(first["preview"]))))
    # the same run here: the estimate after the first of 6 steps, through each decoder
    pipe, seen = load("shapes"), []
    pipe.generate("a green star", seed=2, steps=6, callback=seen.append)
    denoised = seen[0]["denoised"][:1]
    tiny = _pixels(pipe.decode_latents(denoised, "tiny")[0])
    full = _pixels(pipe.decode_latents(denoised)[0])
    assert np.abs(got - tiny).max() <= 2  # float rounding across thread counts only
    assert np.abs(got - full).max() > 8


def test_openai_and_job_apis_take_the_final_decoder(server):
    body = {"model": "shapes", "prompt": "a red circle", "size": "64x64", "seed": 1,
            "steps": 2, "response_format": "b64_json"}
    r = httpx.post(server + "/v1/images/generations", json={**body, "vae_decoder": "tiny"},
                   timeout=300)
    assert r.status_code == 200, r.text
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert "VAE Decoder: TAESD" in png.info["parameters"]
    r = httpx.post(server + "/v1/images/generations", json={**body, "vae_decoder": "small"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "vae_decoder"
    r = httpx.post(server + "/v1/images/generations",
                   json={**body, "model": "shapes-unclip", "vae_decoder": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "vae_decoder"
    r = httpx.post(server + "/api/jobs", json={"model": "shapes", "prompt": "a red circle",
                                               "steps": 2, "vae_decoder": "tiny"})
    done = _events(server, r.json()["id"])[-1]
    assert done[0] == "done" and "VAE Decoder: TAESD" in done[1]["infotexts"][0]


def test_a1111_sd_vae_decode_method(server):
    url = server + "/sdapi/v1"
    body = {"prompt": "a red circle", "seed": 4, "steps": 2, "width": 64, "height": 64}
    r = httpx.post(url + "/txt2img", timeout=300, json={
        **body, "override_settings": {"sd_vae_decode_method": "TAESD"}})
    assert r.status_code == 200, r.text
    assert "VAE Decoder: TAESD" in json.loads(r.json()["info"])["infotexts"][0]
    r = httpx.post(url + "/options", json={"sd_vae_decode_method": "Tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sd_vae_decode_method"
    assert httpx.post(url + "/options", json={"sd_vae_decode_method": "TAESD"}).is_success
    try:
        assert httpx.get(url + "/options").json()["sd_vae_decode_method"] == "TAESD"
        r = httpx.post(url + "/txt2img", json=body, timeout=300)
        assert "VAE Decoder: TAESD" in json.loads(r.json()["info"])["infotexts"][0]
    finally:
        httpx.post(url + "/options", json={"sd_vae_decode_method": "Full"})
    r = httpx.post(url + "/txt2img", json=body, timeout=300)
    assert "VAE Decoder" not in json.loads(r.json()["info"])["infotexts"][0]
