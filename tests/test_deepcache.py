"""DeepCache (pipelines/deepcache.py, UNet.forward_deepcache): the split forward gives the
UNet's own output when its deep features are the current step's; off (None or 1) the images
are the exact path's, bit for bit, and the split forward never runs; on, the deep blocks run
on every N-th UNet call only, the images stay near the exact ones, and the option goes through
every door (Python, the CLI, the PNG parameters, the HTTP APIs)."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import nanodiffusion
from nanodiffusion import cli
from nanodiffusion.data import shapes
from nanodiffusion.errors import InputError
from nanodiffusion.models import unet
from nanodiffusion.pipelines.deepcache import CachedUNet, check_deepcache
from nanodiffusion.pnginfo import parse_parameters, read_parameters

PROMPTS = ["a red circle above a blue square", "a green star", "a pink triangle left of a "
           "yellow circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield nanodiffusion.load("shapes")
    torch.set_num_threads(threads)


def _pixels(images):
    return np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images])


class Counter:
    """Forward hooks counting the calls of the UNet (conv_in), of its deep blocks (full calls
    only: the mid block, the second level's first down ResBlock, the first up ResBlock) and of
    the first down ResBlock (shallow: every call)."""

    def __init__(self, model):
        self.counts = {"unet": 0, "mid": 0, "down1": 0, "up0": 0, "shallow": 0}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in (
            ("unet", model.conv_in), ("mid", model.mid_block),
            ("down1", model.down_blocks[1].resnets[0]), ("up0", model.up_blocks[0].resnets[0]),
            ("shallow", model.down_blocks[0].resnets[0]))]

    def _hook(self, key):
        def hook(module, args, out):
            self.counts[key] += 1
        return hook

    def __enter__(self):
        return self.counts

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---- the split forward --------------------------------------------------------------------
LCM_TINY = dataclasses.replace(unet.TINY, time_cond_proj_dim=8)
POOLED_TINY = dataclasses.replace(unet.TINY, pooled_text_dim=16)


@pytest.mark.parametrize("cfg", [unet.TINY, unet.SHAPES, LCM_TINY, POOLED_TINY],
                         ids=["tiny", "shapes", "lcm", "pooled"])
def test_shallow_forward_with_the_current_deep_features_is_the_full_forward(cfg):
    """At every branch: the full run of the split forward is forward(), bit for bit, and the
    shallow run on features kept from the same inputs gives it too; features from other
    inputs change the output (the shallow run reads them), and the shallow run skips the mid
    block."""
    torch.manual_seed(0)
    model = unet.UNet(cfg).eval()
    x, t = torch.randn(2, cfg.in_channels, 16, 12), torch.tensor([700.0, 31.5])
    kw = {"context": torch.randn(2, 5, cfg.context_dim)}
    if cfg.time_cond_proj_dim:
        kw["timestep_cond"] = torch.randn(2, cfg.time_cond_proj_dim)
    if cfg.pooled_text_dim:
        kw["text_embeds"] = torch.randn(2, cfg.pooled_text_dim)
    branches = len(model._sublayers()[0])
    assert branches == len(cfg.block_channels) * (cfg.layers_per_block + 1) - 1
    with torch.no_grad():
        ref = model(x, t, **kw)
        for b in range(branches):
            full, deep = model.forward_deepcache(x, t, **kw, branch=b)
            assert torch.equal(full, ref)
            with Counter(model) as n:
                shallow, kept = model.forward_deepcache(x, t, **kw, deep=deep, branch=b)
            assert kept is deep and n["mid"] == 0 and n["shallow"] == 1
            assert (shallow - ref).abs().max() <= 1e-5
            _, other = model.forward_deepcache(x + 1, t * 0.5, **kw, branch=b)
            moved, _ = model.forward_deepcache(x, t, **kw, deep=other, branch=b)
            assert (moved - ref).abs().max() > 1e-3
        with pytest.raises(ValueError, match="branch must be an integer in"):
            model.forward_deepcache(x, t, **kw, branch=branches)


def test_the_default_branch_is_the_papers_for_stable_diffusion():
    """Branch 0 on SD 1.5 (DeepCache's layer 0, block 0): the shallow run keeps conv_in, the
    first ResBlock + transformer down and the last two of the last up block; the kept features
    are what the last up block's first ResBlock + transformer make (320 channels at the full
    latent size). Built on the meta device: shapes only."""
    with torch.device("meta"):
        model = unet.UNet(unet.SD15)
    down, up = model._sublayers()
    assert unet.DEEPCACHE_BRANCH == 0 and len(down) == 11 and len(up) == 15
    assert down[0] == (model.down_blocks[0].resnets[0], model.down_blocks[0].attentions[0])
    last = model.up_blocks[-1]
    assert up[-2:] == [(last.resnets[1], last.attentions[1]), (last.resnets[2], last.attentions[2])]


# ---- the option's rule ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, 2.5, 3.0, True, "3", 1001])
def test_bad_intervals_are_input_errors_naming_the_value(pipe, bad):
    with pytest.raises(InputError, match=f"deepcache must be an integer in .*got {bad!r}"):
        check_deepcache(bad)
    with pytest.raises(InputError, match="deepcache"):
        pipe.generate("a red circle", seed=0, steps=2, deepcache=bad)


def test_off_is_the_exact_path_bit_for_bit(pipe, monkeypatch):
    """None and 1 are the exact path: the same bytes as a call without the option, the UNet's
    forward() only (the split forward is never called), and no DeepCache field."""
    ref = pipe.generate(PROMPTS[0], seed=3, n=2)
    monkeypatch.setattr(unet.UNet, "forward_deepcache", None)  # a call would raise TypeError
    for off in (None, 1):
        images = pipe.generate(PROMPTS[0], seed=3, n=2, deepcache=off)
        assert _pixels(images).tobytes() == _pixels(ref).tobytes()
        assert images[0].info["parameters"] == ref[0].info["parameters"]
        assert "DeepCache" not in images[0].info["parameters"]


# ---- sampling with it ----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler", "unipc", "plms", "heun", "ddim"])
def test_the_deep_blocks_run_on_every_nth_call_only(pipe, sampler):
    """Uniform schedule over UNet calls, multistep and two-call samplers included: the mid
    block runs on calls 0, N, 2N, ..., the first ResBlock on every call, under CFG (batch 2)."""
    for interval in (2, 3, 5):
        with Counter(pipe.unet) as n:
            pipe.generate(PROMPTS[1], seed=1, sampler=sampler, deepcache=interval)
        assert n["shallow"] == n["unet"] >= 15
        assert n["mid"] == n["down1"] == n["up0"] == math.ceil(n["unet"] / interval)


def _mean_diff(pipe, interval, **kw):
    exact = _pixels([pipe.generate(p, seed=i, **kw)[0] for i, p in enumerate(PROMPTS)])
    fast = _pixels([pipe.generate(p, seed=i, deepcache=interval, **kw)[0]
                    for i, p in enumerate(PROMPTS)])
    return float(np.abs(fast - exact).mean())


def test_images_stay_close_to_the_exact_path(pipe):
    """Mean absolute pixel difference from the exact images (0..255), on the bundled model:
    small at N = 2 and 3, not zero (the cache is used), and larger with fewer full calls; a
    run with the deep blocks at the first call only is past the bound."""
    d2, d3, once = (_mean_diff(pipe, n) for n in (2, 3, 15))  # measured: 3.4, 4.2, 12.6
    assert 0 < d2 < 5.0 and 0 < d3 < 6.0
    assert d2 < once and d3 < once and once > 8.0


def test_guidance_one_and_img2img_and_inpaint(pipe):
    """Without CFG (batch 1), img2img (fewer calls: 9 of 15 steps at strength 0.6) and
    inpaint: the deep blocks on every N-th call, the PNG field, near the exact images."""
    scene = shapes.sample(3, split="eval")[0]
    mask = Image.new("L", scene.size, 0)
    mask.paste(255, (0, 0, 32, 64))
    runs = [("generate", lambda **k: pipe.generate(PROMPTS[2], seed=5, guidance=1.0, **k), 15),
            ("img2img", lambda **k: pipe.img2img(PROMPTS[3], scene, seed=6, **k), 9),
            ("inpaint", lambda **k: pipe.inpaint(PROMPTS[1], scene, mask, seed=7, **k), 15)]
    for name, run, calls in runs:
        exact = run()
        with Counter(pipe.unet) as n:
            fast = run(deepcache=3)
        assert n["unet"] == calls and n["mid"] == math.ceil(calls / 3), name
        assert "DeepCache: 3" in fast[0].info["parameters"], name
        diff = np.abs(_pixels(fast) - _pixels(exact))
        assert 0 < diff.mean() < 5.0, name


def test_lcm_model():
    """The bundled LCM (the guidance scale embedded: timestep_cond; no CFG batch) at its 4
    steps, interval 2: calls 0 and 2 full, and the images nearer the exact ones than the
    exact images of other seeds are (measured: 2.8 against 21 levels)."""
    lcm = nanodiffusion.load("shapes-lcm")
    assert lcm.unet.config.time_cond_proj_dim is not None and lcm.defaults.steps == 4
    with Counter(lcm.unet) as n:
        lcm.generate(PROMPTS[0], seed=2, deepcache=2)
    assert n["unet"] == 4 and n["mid"] == 2
    seeds = range(len(PROMPTS))
    exact = _pixels([lcm.generate(p, seed=i)[0] for i, p in zip(seeds, PROMPTS)])
    other = _pixels([lcm.generate(p, seed=i + 10)[0] for i, p in zip(seeds, PROMPTS)])
    fast = _pixels([lcm.generate(p, seed=i, deepcache=2)[0] for i, p in zip(seeds, PROMPTS)])
    near = np.abs(fast - exact).mean()
    assert 0 < near < 0.3 * np.abs(other - exact).mean()


def test_fused_lora_weights(pipe, tmp_path):
    """With a LoRA fused into the UNet the cached path runs the fused weights: its image is
    nearer the exact image with the LoRA than the exact image without it."""
    import lora_files as lf

    layers = lf.random_layers(lf.unet_targets(pipe.unet, locon=False), 5, std=0.2)
    path = lf.write_kohya(tmp_path / "style.safetensors", layers)
    plain = _pixels(pipe.generate(PROMPTS[0], seed=4))
    pipe.load_lora(path, 1.0)
    try:
        exact = _pixels(pipe.generate(PROMPTS[0], seed=4))
        fast = _pixels(pipe.generate(PROMPTS[0], seed=4, deepcache=2))
    finally:
        pipe.unload_loras()
    assert np.abs(exact - plain).mean() > 3 * np.abs(fast - exact).mean() > 0


def test_a_run_keeps_its_own_features(pipe):
    """The kept features belong to one run (a CachedUNet per call): two calls with the same
    seed give the same bytes, and a batch that no longer fits them gets a full call."""
    a = pipe.generate(PROMPTS[0], seed=9, deepcache=3)
    pipe.generate(PROMPTS[1], seed=1, deepcache=3)
    b = pipe.generate(PROMPTS[0], seed=9, deepcache=3)
    assert _pixels(a).tobytes() == _pixels(b).tobytes()
    cached = CachedUNet(pipe.unet, 4)
    ctx = torch.zeros(2, 77, pipe.unet.config.context_dim)
    with torch.no_grad(), Counter(pipe.unet) as n:
        cached(torch.zeros(2, 4, 16, 16), 500, context=ctx)
        cached(torch.zeros(1, 4, 16, 16), 400, context=ctx[:1])
    assert n["mid"] == 2 and cached.full_calls == 2


# ---- the doors -----------------------------------------------------------------------------
def test_cli_flag_png_field_and_info(pipe, tmp_path, capsys):
    from front_door import run_cli

    out = tmp_path / "dc.png"
    done = run_cli("generate", PROMPTS[0], "--seed", 3, "--deepcache", 3, "--out", out,
                   env={"OMP_NUM_THREADS": "1"})  # as `pipe`: the same bytes
    assert done.returncode == 0, done.stderr
    text = read_parameters(out)
    assert "DeepCache: 3" in text
    exact = pipe.generate(PROMPTS[0], seed=3, deepcache=3)[0]
    assert _pixels([Image.open(out)]).tobytes() == _pixels([exact]).tobytes()
    capsys.readouterr()
    assert cli.main(["info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["DeepCache"] == "3"
    assert parse_parameters(text)["DeepCache"] == "3"
    assert cli.main(["generate", "a red circle", "--deepcache", "0", "--out",
                     str(tmp_path / "x.png")]) == 2
    assert "deepcache must be an integer in [1, 1000]" in capsys.readouterr().err
    assert cli.main(["generate", "a red circle", "--pipeline", "unclip", "--deepcache", "2",
                     "--out", str(tmp_path / "u.png")]) == 2
    assert "--deepcache is for Stable Diffusion models" in capsys.readouterr().err


def test_cli_eval_passes_the_approximate_paths(monkeypatch):
    """DeepCache's interval and token merging's ratio (tests/test_tome.py) reach the report."""
    import nanodiffusion.eval.report as report

    seen = {}
    monkeypatch.setattr(report, "report", lambda path, **kw: seen.update(kw, path=path))
    assert cli.main(["eval", "shapes", "--n", "4", "--deepcache", "3", "--steps", "15",
                     "--tome", "0.5", "--out", "/dev/null"]) == 0
    assert seen["deepcache"] == 3 and seen["steps"] == 15 and seen["path"] == "shapes"
    assert seen["tome"] == 0.5


def test_http_apis(pipe):
    """A1111 (override_settings or the body), OpenAI's extra fields and the job API, over a
    socket: the images carry "DeepCache: N" and are the Python call's; a bad interval is a
    400 naming the field; an unCLIP model refuses the option."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import base64
    import io
    import time

    from live_server import serve

    from nanodiffusion.server import Limits, create_app

    def png(data):
        return Image.open(io.BytesIO(base64.b64decode(data)))

    want = _pixels(pipe.generate(PROMPTS[0], seed=3, deepcache=3)).tobytes()
    app = create_app(None, limits=Limits(max_side=256, max_n=4, max_steps=150))
    with serve(app) as url:
        post = lambda path, body: httpx.post(url + path, json=body, timeout=300)  # noqa: E731
        a1111 = dict(prompt=PROMPTS[0], seed=3, override_settings={"deepcache": 3})
        for body in (a1111, {**a1111, "override_settings": {}, "deepcache": 3}):
            r = post("/sdapi/v1/txt2img", body)
            assert r.status_code == 200, r.text
            assert "DeepCache: 3" in json.loads(r.json()["info"])["infotexts"][0]
            assert _pixels([png(r.json()["images"][0])]).tobytes() == want
        r = post("/sdapi/v1/txt2img", {**a1111, "override_settings": {"deepcache": 0}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "deepcache"
        assert "got 0" in r.json()["error"]["message"]
        r = post("/v1/images/generations", dict(model="shapes", prompt=PROMPTS[0], seed=3,
                                                deepcache=3, response_format="b64_json"))
        assert r.status_code == 200, r.text
        im = png(r.json()["data"][0]["b64_json"])
        assert "DeepCache: 3" in im.info["parameters"] and _pixels([im]).tobytes() == want
        r = post("/v1/images/generations", dict(model="shapes", prompt="x", deepcache=2.5))
        assert r.status_code == 400 and "got 2.5" in r.json()["error"]["message"]
        job = post("/api/jobs", dict(model="shapes", prompt=PROMPTS[0], seed=3,
                                     deepcache=2)).json()
        for _ in range(600):
            status = httpx.get(f"{url}/api/jobs/{job['id']}").json()
            if status["status"] in ("done", "error"):
                break
            time.sleep(0.1)
        assert status["status"] == "done" and status["parameters"]["deepcache"] == 2
        made = httpx.get(url + status["result"]["images"][0]).content
        assert "DeepCache: 2" in Image.open(io.BytesIO(made)).info["parameters"]
        r = post("/api/jobs", dict(model="shapes-unclip", prompt="x", deepcache=2))
        assert r.status_code == 400 and r.json()["error"]["param"] == "deepcache"
