"""--low-memory (issue 23 item 2): the text encoder's, the UNet's and the VAE's weights stay on
disk except while they run, and every image is the one the default makes: txt2img, img2img, inpainting,
a text-encoder LoRA fused and taken off, through Python, the CLI and `serve --low-memory`."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import nanodiffusion
from front_door import run_cli, served

PROMPT = "a red circle above a blue square"


def held(module):
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def pair():
    return nanodiffusion.load("shapes"), nanodiffusion.load("shapes").set_low_memory(True)


def test_the_parts_are_on_disk_between_calls_and_the_images_are_the_same(pair):
    plain, low = pair
    assert low.low_memory and not plain.low_memory
    assert held(low.text_encoder) == 0 and held(low.vae) == 0 and held(low.unet) == 0
    assert held(plain.unet) > 0
    a = plain.generate(PROMPT, seed=3, n=2)
    b = low.generate(PROMPT, seed=3, n=2)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert held(low.text_encoder) == 0 and held(low.vae) == 0 and held(low.unet) == 0
    mask = Image.new("L", a[0].size, 0)
    mask.paste(255, (0, 0, a[0].size[0] // 2, a[0].size[1]))
    for call in (lambda p: p.img2img("a green star", a[0], strength=0.6, seed=4),
                 lambda p: p.inpaint("a green star", a[0], mask, seed=5)):
        assert call(plain)[0].tobytes() == call(low)[0].tobytes()
    assert held(low.text_encoder) == 0 and held(low.vae) == 0


def test_turned_off_the_weights_come_back(tmp_path):
    pipe = nanodiffusion.load("shapes")
    want = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    pipe.set_low_memory(True).set_low_memory(False)
    assert not pipe.low_memory and held(pipe.vae) > 0
    got = pipe.vae.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_lora_is_fused_on_disk_too(tmp_path):
    """A LoRA on the text encoder and the UNet (LoCon) fused while both are on disk: the images
    of the default, and after it is taken off those before it."""
    pytest.importorskip("diffusers")
    import lora_files as lf
    import tiny_sd

    sd = tiny_sd.build(tmp_path / "sd")
    text = lf.random_layers(lf.text_targets(sd.ref.text_encoder), 3, alphas=(4.0,), std=0.6)
    unet = lf.random_layers(lf.unet_targets(sd.ref.unet), 2, alphas=(2.0,))
    path = lf.write_kohya(tmp_path / "text.safetensors", unet, text_layers=text)
    low = nanodiffusion.load(sd.folder).set_low_memory(True)
    plain = nanodiffusion.load(sd.folder)
    kw = dict(seed=1, steps=2, sampler="euler", width=16, height=16)
    before = np.asarray(low.generate(PROMPT, **kw)[0])
    for p in (plain, low):
        p.load_lora(path, 1.0)
    fused = np.asarray(low.generate(PROMPT, **kw)[0])
    assert np.array_equal(fused, np.asarray(plain.generate(PROMPT, **kw)[0]))
    assert np.abs(fused.astype(int) - before).max() > 10, "the LoRA hardly changes the image"
    low.unload_loras()
    assert np.array_equal(np.asarray(low.generate(PROMPT, **kw)[0]), before)


def test_cli_and_serve_low_memory(tmp_path):
    args = (PROMPT, "--seed", 7, "--steps", 4)
    r1 = run_cli("generate", *args, "--out", tmp_path / "a.png")
    r2 = run_cli("generate", *args, "--low-memory", "--out", tmp_path / "b.png")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    want = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(want, np.asarray(Image.open(tmp_path / "b.png")))
    import httpx

    with served("--low-memory") as (url, _):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=120, json={
            "prompt": PROMPT, "seed": 7, "steps": 4, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 3.0})
        assert r.status_code == 200, r.text
    import base64

    served_image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    plain = nanodiffusion.load("shapes").generate(PROMPT, seed=7, steps=4, sampler="euler",
                                                  guidance=3.0)[0]
    assert np.array_equal(np.asarray(served_image.convert("RGB")), np.asarray(plain))


def test_batched_requests_in_low_memory(pair):
    """The server's batches (pipelines/batch.py) run the UNet loaded for their loop too."""
    from nanodiffusion.pipelines.batch import generate_batch

    plain, low = pair
    reqs = [dict(prompt=PROMPT, seed=1), dict(prompt="a green star", seed=2, n=2)]
    a, b = generate_batch(plain, reqs), generate_batch(low, reqs)
    assert not any(isinstance(x, Exception) for x in a + b), (a, b)
    assert [[i.tobytes() for i in x] for x in a] == [[i.tobytes() for i in x] for x in b]
    assert held(low.unet) == 0
