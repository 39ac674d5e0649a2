"""The training loop on tiny models: every part learns, a resumed run is bit-for-bit the
unbroken one, a 2-process run equals one process, a NaN stops the run with the last good
checkpoint kept, and data workers change nothing but speed."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_sd
from nanodiffusion.formats import checkpoint
from nanodiffusion.models import winograd
from nanodiffusion.train import loop as T
from nanodiffusion.train import TrainConfig, load_recipe, train
from nanodiffusion.train.vae import VaePart

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "clip": {"text": {"width": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64},
             "vision": {"width": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64,
                        "patch_size": 8}},
    # lists, as a TOML recipe gives them
    "vae": {"block_channels": [8, 16], "norm_groups": 8},
    "unet": {"block_channels": [16, 32], "attention_levels": [False, True], "num_heads": [2, 2],
             "norm_groups": 8},
}


def tiny(part, out, **kw):
    values = dict(part=part, out=str(out), image_size=32, steps=6, batch_size=4, lr=1e-3,
                  warmup=2, log_every=1, ckpt_every=1000, sample_every=0, ema_decay=0.0,
                  model=MODELS[part])
    values.update(kw)
    return TrainConfig(**values)


def _state(run, part):
    return checkpoint.load_state(Path(run) / part / "state.pt")


def _log(run, part):
    with open(Path(run) / part / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- every part learns

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """clip, vae, then unet trained into one run folder, 30 steps each on a fixed batch."""
    out = tmp_path_factory.mktemp("run")
    records = {}
    settings = {"clip": dict(lr=1e-3, weight_decay=0.0),
                "vae": dict(lr=3e-3, ema_decay=0.9),
                "unet": dict(lr=3e-3)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "chunk_indices", tiny_sd.fixed_indices)
        for part in ("clip", "vae", "unet"):
            records[part] = train(tiny(part, out, steps=30, batch_size=8, **settings[part]),
                                  progress=False)
    return out, records


@pytest.mark.parametrize("part", ["clip", "vae", "unet"])
def test_each_part_learns(shapes_run, part):
    out, records = shapes_run
    losses = [r["loss"] for r in records[part]]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, losses
    assert [r["loss"] for r in _log(out, part)] == losses  # log_every=1: one line a step
    assert _state(out, part)["step"] == 30
    model = checkpoint.load_model(out / part / f"{part}.safetensors")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_run_folder_has_the_assembled_model(shapes_run):
    from nanodiffusion.loading import load_pipeline

    out, _ = shapes_run
    assert (out / "clip" / "tokenizer" / "vocab.json").exists()
    pipe = load_pipeline(str(out / "model"))
    image = pipe.generate("a red circle", seed=0, steps=2)[0]
    assert image.size == (32, 32)


def test_unet_refuses_settings_that_follow_from_the_vae_and_clip(shapes_run):
    out, _ = shapes_run
    with pytest.raises(ValueError, match="context_dim"):
        train(tiny("unet", out, model={**MODELS["unet"], "context_dim": 64}), progress=False)


def test_unknown_model_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        train(tiny("vae", tmp_path, model={"bogus": 1}), progress=False)


# ---------------------------------------------------------------- exact resume, SIGTERM

def _signal_at_call(monkeypatch, part, n):
    """Send this process a real SIGTERM during the n-th loss computation of `part`."""
    calls, loss = [0], part.loss

    def signalling_loss(*args):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)
    monkeypatch.setattr(part, "loss", staticmethod(signalling_loss))


def _stopped_and_resumed(tmp_path, monkeypatch, part, part_cls, settings, stop_call):
    """(records of an unbroken run in a/, records of a run in b/ stopped by SIGTERM during
    the `stop_call`-th loss call then resumed, the number of steps before the stop)."""
    straight = train(tiny(part, tmp_path / "a", **settings), progress=False)
    _signal_at_call(monkeypatch, part_cls, stop_call)
    handler = signal.getsignal(signal.SIGTERM)
    first = train(tiny(part, tmp_path / "b", **settings), progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop gives the signal back
    monkeypatch.undo()
    stopped = len(first)
    assert [r["step"] for r in first] == list(range(1, stopped + 1))
    assert _state(tmp_path / "b", part)["step"] == stopped
    second = train(tiny(part, tmp_path / "b", **settings), progress=False)
    assert [r["step"] for r in second] == list(range(stopped + 1, settings["steps"] + 1))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    return stopped


def test_sigterm_saves_and_resume_is_bitwise_exact(tmp_path, monkeypatch):
    settings = dict(steps=6, ema_decay=0.9, grad_accum=2)
    # grad_accum 2: the 5th loss call is in step 3
    assert _stopped_and_resumed(tmp_path, monkeypatch, "vae", VaePart, settings, 5) == 3
    assert [r["loss"] for r in _log(tmp_path / "b", "vae")] == [
        r["loss"] for r in _log(tmp_path / "a", "vae")]
    a, b = _state(tmp_path / "a", "vae"), _state(tmp_path / "b", "vae")
    assert a["step"] == b["step"] == 6
    _assert_bitwise(a["model"], b["model"])
    _assert_bitwise(a["ema"], b["ema"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_bitwise(pa, pb)
    # the exported files (not byte-compared: safetensors orders metadata keys at random)
    fa, fb = (tmp_path / n / "vae" / "vae.safetensors" for n in "ab")
    assert checkpoint.read_metadata(fa) == checkpoint.read_metadata(fb)
    _assert_bitwise(load_file(fa), load_file(fb))


def test_unet_resume_is_bitwise_exact(shapes_run, tmp_path, monkeypatch):
    """The UNet caches frozen text states per caption, and a resumed run has seen other
    captions before: the cache must not change a bit of the result."""
    from nanodiffusion.train.unet import UnetPart

    out, _ = shapes_run
    for name in ("a", "b"):
        for part in ("clip", "vae"):
            shutil.copytree(out / part, tmp_path / name / part)
    settings = dict(steps=4, lr=3e-3, caption_dropout=0.5)
    assert _stopped_and_resumed(tmp_path, monkeypatch, "unet", UnetPart, settings, 2) == 2
    _assert_bitwise(_state(tmp_path / "a", "unet")["model"],
                    _state(tmp_path / "b", "unet")["model"])


# ---------------------------------------------------------------- NaN

def _poisoned_loss(monkeypatch, n, kind):
    """The n-th loss is NaN, or finite with a NaN gradient."""
    calls, loss = [0], VaePart.loss

    def poisoned(cfg, model, frozen, batch, gens):
        calls[0] += 1
        value, metrics = loss(cfg, model, frozen, batch, gens)
        if calls[0] == n:
            if kind == "loss":
                value = value * float("nan")
            else:  # d sqrt(x)/dx at x = -1 is NaN; where() keeps the forward value finite
                x = sum(p.sum() for p in model.parameters()) * 0 - 1
                value = value + torch.where(x < 0, torch.zeros_like(x), x.sqrt())
        return value, metrics
    monkeypatch.setattr(VaePart, "loss", staticmethod(poisoned))


@pytest.mark.parametrize("kind,message", [("loss", "loss is nan at step 6"),
                                          ("grad", "gradient norm is nan at step 6")])
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, kind, message):
    _poisoned_loss(monkeypatch, 6, kind)  # step 6 would be saved (ckpt_every 2)
    with pytest.raises(FloatingPointError, match=message):
        train(tiny("vae", tmp_path, steps=8, ckpt_every=2), progress=False)
    run = tmp_path / "vae"
    state = _state(tmp_path, "vae")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    model = checkpoint.load_model(run / "vae.safetensors")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert [r["step"] for r in _log(tmp_path, "vae")] == [1, 2, 3, 4, 5]
    assert not list(run.glob(".*.tmp"))


# ---------------------------------------------------------------- data workers

def test_prefetch_workers_change_nothing(tmp_path):
    settings = dict(steps=5, grad_accum=2, batch_size=8)
    plain = train(tiny("vae", tmp_path / "a", **settings), progress=False)
    fetched = train(tiny("vae", tmp_path / "b", num_workers=2, **settings), progress=False)
    assert [r["loss"] for r in fetched] == [r["loss"] for r in plain]
    _assert_bitwise(_state(tmp_path / "a", "vae")["model"],
                    _state(tmp_path / "b", "vae")["model"])


def test_prefetcher_gives_the_source_samples():
    from nanodiffusion.train import common

    cfg = tiny("vae", "unused", steps=3, batch_size=4, num_workers=2)
    source = common.source(cfg)[0]
    pf = T.Prefetcher(cfg, 0, 1)
    try:
        for step in range(3):
            pf.schedule(step)
            assert set(pf.ready) == set(range(step * 4, step * 4 + 4))
            for i in range(step * 4, step * 4 + 4):
                (image, caption), (want, want_caption) = pf(i), source(i)
                assert torch.equal(image, want) and caption == want_caption
    finally:
        pf.close()


# ---------------------------------------------------------------- DDP

RECIPE = """
[common]
data = "shapes"
image_size = 32
log_every = 1
ckpt_every = 1000
sample_every = 0
[vae]
steps = 3
batch_size = 8
lr = 1e-3
warmup = 1
ema_decay = 0.0
model = {block_channels = [8, 16], norm_groups = 8}
"""


def test_two_processes_equal_one(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "nanodiffusion.cli", "train", "vae", "--recipe", str(recipe),
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(load_recipe(recipe, "vae", out=str(tmp_path / "one")), progress=False)

    two = _log(tmp_path / "ddp", "vae")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):  # step 2 on differs where the ranks' gradients are not summed
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5)  # psnr: a log of a chunk mean
    wa, wb = _state(tmp_path / "ddp", "vae")["model"], _state(tmp_path / "one", "vae")["model"]
    # Adam turns rounding noise in a gradient that is zero in exact arithmetic (a bias before
    # a GroupNorm, an attention key bias) into an lr-sized step: those biases may differ.
    for k in wa:
        if not k.endswith(".bias"):
            assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k
    close = sum(int(torch.isclose(wa[k], wb[k], rtol=0, atol=1e-5).sum()) for k in wa)
    assert close / sum(v.numel() for v in wa.values()) > 0.99


# ---------------------------------------------------------------- latent pool, zero SNR

def _copy_frozen(out, dest):
    for part in ("clip", "vae"):
        shutil.copytree(out / part, dest / part)


def test_latent_pool_changes_nothing_on_the_first_pass(shapes_run, tmp_path):
    out, _ = shapes_run
    logs = []
    for name, pool in (("a", 0), ("b", 1000)):
        _copy_frozen(out, tmp_path / name)
        logs.append([r["loss"] for r in train(tiny("unet", tmp_path / name, steps=3,
                                                   latent_pool=pool), progress=False)])
    assert logs[0] == logs[1]


def test_latent_pool_encodes_each_sample_once(shapes_run, tmp_path, monkeypatch):
    from nanodiffusion.train import unet as train_unet

    out, _ = shapes_run
    _copy_frozen(out, tmp_path)
    drawn, draw = [], train_unet.images_and_captions

    def counting(cfg, frozen, indices, device):
        drawn.extend(indices)
        return draw(cfg, frozen, indices, device)
    monkeypatch.setattr(train_unet, "images_and_captions", counting)
    records = train(tiny("unet", tmp_path, steps=5, latent_pool=6), progress=False)
    assert len(records) == 5  # 20 samples drawn from a pool of 6, each encoded once
    assert sorted(drawn) == list(range(6))


def test_zero_terminal_snr_unet_trains_and_generates(shapes_run, tmp_path):
    from nanodiffusion.loading import load_pipeline

    out, _ = shapes_run
    _copy_frozen(out, tmp_path)
    with pytest.raises(ValueError, match="v_prediction"):
        tiny("unet", tmp_path, zero_terminal_snr=True)
    records = train(tiny("unet", tmp_path, steps=2, prediction_type="v_prediction",
                         zero_terminal_snr=True, min_snr_gamma=5.0), progress=False)
    assert all(math.isfinite(r["loss"]) for r in records)
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["schedule"]["rescale_betas_zero_snr"] is True
    assert meta["schedule"]["timestep_spacing"] == "trailing"
    pipe = load_pipeline(str(tmp_path / "model"))
    assert pipe.generate("a red circle", seed=0, steps=3)[0].size == (32, 32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_trains_against_its_own_target(prediction_type):
    """The denoising loss is zero where the model predicts its type's target from x_t: the
    noise for epsilon, v for v_prediction, x0 for sample."""
    from nanodiffusion.diffusion import NoiseSchedule
    from nanodiffusion.train.unet import denoising_loss, schedule_config

    cfg = TrainConfig(part="unet", prediction_type=prediction_type)
    schedule = NoiseSchedule(schedule_config(cfg))
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(4)]

    def own_target(x_t, t):
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
                "sample": x0}[prediction_type]
    assert denoising_loss(cfg, schedule, x0, gens(), own_target) < 1e-8
    assert denoising_loss(cfg, schedule, x0, gens(), lambda x_t, t: 0 * x_t) > 0.1


def test_v_prediction_trains_on_the_inputs_and_targets_it_always_had():
    """The shipped recipe's unet (v prediction, zero terminal SNR): x_t, t and the target bit
    for bit those of the forward process written out by hand, as the bundled models were
    trained (each sample's generator draws its timestep, then its noise)."""
    from nanodiffusion.diffusion import NoiseSchedule
    from nanodiffusion.train.unet import denoising_loss, noised, schedule_config

    cfg = load_recipe(ROOT / "recipes" / "shapes.toml", "unet", out="unused")
    assert cfg.prediction_type == "v_prediction"
    schedule = NoiseSchedule(schedule_config(cfg))
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    draws, n = T.sample_generators(cfg, 7, range(8)), schedule.config.num_train_timesteps
    t = (torch.cat([torch.rand(1, generator=g) for g in draws]) * n).long().clamp(max=n - 1)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in draws])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x_t, v = a.sqrt() * x0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * x0
    got = noised(schedule, x0, T.sample_generators(cfg, 7, range(8)), cfg.prediction_type)
    assert torch.equal(got[0], x_t) and torch.equal(got[1], t) and torch.equal(got[2], v)
    seen = []
    loss = denoising_loss(cfg, schedule, x0, T.sample_generators(cfg, 7, range(8)),
                          lambda x_t, t: seen.append(x_t) or v)
    assert loss == 0 and torch.equal(seen[0], x_t)


def test_adam_betas_is_a_setting(tmp_path):
    """AdamW's betas come from the config (default (0.9, 0.99)); a recipe's list becomes a
    tuple, and the optimiser (as the checkpoint saves it) runs with them."""
    assert TrainConfig().adam_betas == (0.9, 0.99)
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE + "adam_betas = [0.8, 0.95]\n")
    cfg = load_recipe(recipe, "vae", out=str(tmp_path / "run"))
    assert cfg.adam_betas == (0.8, 0.95)
    train(cfg, progress=False)
    betas = _state(tmp_path / "run", "vae")["optimizer"]["param_groups"][0]["betas"]
    assert tuple(betas) == (0.8, 0.95)
    for bad in ((0.9, 1.0), (0.9,), 0.9):
        with pytest.raises(ValueError, match="adam_betas must be two numbers"):
            TrainConfig(adam_betas=bad)


def test_pooled_text_unet_trains_and_its_folder_generates(shapes_run, tmp_path):
    """pooled_text: the UNet also gets the pooled text state in its time embedding; the
    model folder keeps it, and the pipeline feeds it (the caption changes the image)."""
    from nanodiffusion.loading import load_pipeline

    out, _ = shapes_run
    _copy_frozen(out, tmp_path)
    with pytest.raises(ValueError, match="pooled_text_dim"):  # it follows from the clip
        train(tiny("unet", tmp_path, model={**MODELS["unet"], "pooled_text_dim": 8}),
              progress=False)
    records = train(tiny("unet", tmp_path, steps=2, pooled_text=True), progress=False)
    assert all(math.isfinite(r["loss"]) for r in records)
    pipe = load_pipeline(str(tmp_path / "model"))
    width = pipe.text_encoder.config.width
    assert pipe.unet.config.pooled_text_dim == width
    assert pipe.unet.class_embedding.linear_1.in_features == width
    a = pipe.generate("a red circle", seed=0, steps=3)[0].tobytes()
    with torch.no_grad():  # the pipeline's images go through the pooled-text embedding
        pipe.unet.class_embedding.linear_2.bias.add_(1.0)
    assert pipe.generate("a red circle", seed=0, steps=3)[0].tobytes() != a


def test_cpu_bf16_autocast_is_opt_in_and_trains(shapes_run, tmp_path, monkeypatch):
    """autocast=None keeps a CPU run in float32; autocast=True runs the forward pass in
    bfloat16 there (the losses differ, and stay close) and the weights stay float32. (As on a
    CPU with bfloat16 arithmetic: test_cpu_autocast_needs_bfloat16_arithmetic.)"""
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: True)
    out, _ = shapes_run
    monkeypatch.setattr(T, "chunk_indices", tiny_sd.fixed_indices)
    logs = {}
    for name, autocast in (("fp32", None), ("bf16", True)):
        _copy_frozen(out, tmp_path / name)
        logs[name] = [r["loss"] for r in train(tiny("unet", tmp_path / name, steps=3,
                                                    autocast=autocast), progress=False)]
    assert logs["fp32"] != logs["bf16"]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(logs["fp32"], logs["bf16"])), logs
    weights = load_file(tmp_path / "bf16" / "unet" / "unet.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_clip_trains_with_hard_negatives(tmp_path):
    records = train(tiny("clip", tmp_path, steps=3, hard_negatives=True), progress=False)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    import tomllib

    parts = [t for t in tomllib.loads(recipe.read_text()) if t != "common"]
    assert parts
    for part in parts:  # every table of the recipe (finetune.toml: lora and unet)
        cfg = load_recipe(recipe, part, out="runs/x")
        assert cfg.part == part and cfg.steps >= 1


def test_clip_hard_negative_twins_join_the_batch(tmp_path):
    from nanodiffusion.train.clip import ClipPart

    cfg = tiny("clip", tmp_path, steps=1, hard_negatives=True)
    model, frozen = ClipPart.build(cfg, torch.device("cpu"))
    indices = list(range(16))
    images, ids, negatives = ClipPart.batch(cfg, frozen, indices, torch.device("cpu"))
    twins = [frozen["twin"](i) for i in indices]
    n = sum(len(t) for t in twins)
    assert 0 < n < 16 and negatives is None and all(len(t) <= 1 for t in twins)
    assert images.shape[0] == ids.shape[0] == 16 + n
    first = next(t for t in twins if t)
    assert torch.equal(images[16], first[0][0])
    assert torch.isfinite(ClipPart.loss(cfg, model, frozen, (images, ids, None), None)[0])


def test_clip_swap_negatives_bring_the_colour_swapped_pair(tmp_path):
    """swap_negatives: each pair of two colours (with no held-out object once swapped) brings
    the same scene with its colours exchanged, captioned so, after the mirrored twin."""
    from nanodiffusion.data import shapes
    from nanodiffusion.train.clip import ClipPart

    cfg = tiny("clip", tmp_path, steps=1, hard_negatives=True, swap_negatives=True)
    _, frozen = ClipPart.build(cfg, torch.device("cpu"))
    seen = 0
    for i in range(40):
        _, caption, attributes = shapes.sample(i, "train", cfg.seed, cfg.image_size)
        twins = frozen["twin"](i)
        swapped = shapes.colour_swapped(attributes)
        assert len(twins) == (shapes.mirrored_caption(caption) != caption) + (swapped is not None)
        if swapped is None:
            continue
        seen += 1
        a, b = attributes["objects"]
        rel = attributes["relation"]
        assert twins[-1][1] == (f"{shapes.noun_phrase(b['colour'], a['shape'])} {rel} "
                                f"{shapes.noun_phrase(a['colour'], b['shape'])}")
        assert not torch.equal(twins[-1][0], shapes.to_tensor(shapes.sample(
            i, "train", cfg.seed, cfg.image_size)[0]))
    assert seen >= 5
    with pytest.raises(ValueError, match="swap_negatives needs data = 'shapes'"):
        tiny("clip", tmp_path / "f", data=str(tmp_path), swap_negatives=True)


def test_colour_swap_never_makes_a_held_out_object():
    from nanodiffusion.data import shapes

    scene = dict(relation="above", objects=[dict(colour="blue", shape="star"),
                                            dict(colour="red", shape="circle")])
    assert shapes.colour_swapped(scene) is None  # a red star and a blue circle are held out
    assert shapes.colour_swapped(scene, include_held_out=True)[0] == (
        "a red star above a blue circle")
    same = dict(scene, objects=[dict(colour="red", shape="star"), dict(colour="red",
                                                                       shape="circle")])
    assert shapes.colour_swapped(same) is None


def test_sigterm_to_the_process_group_saves_with_data_workers(tmp_path):
    """`timeout` and Ctrl-C signal the whole process group. The data workers must not die of
    it (the main process then waited minutes for their samples instead of saving)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[common]\ndata = "shapes"\nimage_size = 32\n[vae]\nsteps = 5000\n'
                      'batch_size = 4\nlog_every = 1\nckpt_every = 100000\nsample_every = 0\n'
                      '[vae.model]\nblock_channels = [8, 16]\nlatent_channels = 4\n'
                      'norm_groups = 4\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanodiffusion.cli", "train", "vae",
                             "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                             "--workers", "2"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "run" / "vae" / "log.jsonl"
    try:
        for _ in range(600):
            if log.exists() and log.read_text().count("\n") >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 128 + signal.SIGTERM, proc.stderr.read().decode()  # 143, after saving
    saved = _state(tmp_path / "run", "vae")["step"]
    assert 3 <= saved < 5000


def test_restarts_give_the_schedule_of_resumed_runs():
    """restarts=[a, b] with steps=c is the schedule of a run trained to a, resumed with
    --steps b, then with --steps c: each stage's cosine ends at the stage's end."""
    base = dict(part="unet", lr=1e-3, warmup=20, min_lr_ratio=0.1)
    staged = TrainConfig(steps=500, restarts=[200, 360], **base)
    for stage_end, steps in ((200, range(0, 200)), (360, range(200, 360)),
                             (500, range(360, 500))):
        resumed = TrainConfig(steps=stage_end, **base)
        assert all(T.lr_at(staged, s) == T.lr_at(resumed, s) for s in steps)
    assert T.lr_at(staged, 199) == pytest.approx(1e-4, rel=1e-3)
    assert T.lr_at(staged, 200) > 5e-4  # the restart


@pytest.mark.parametrize("restarts", [[300, 200], [10], [500], [200, 600]])
def test_bad_restarts_are_refused(restarts):
    with pytest.raises(ValueError, match=r"restarts must be increasing .*got"):
        TrainConfig(part="unet", steps=500, warmup=20, restarts=restarts)


def test_cpu_autocast_takes_the_math_attention_kernel(monkeypatch):
    """With bf16 autocast on a CPU the forward pass runs under the math attention kernel
    (flash's bf16 backward is the slow one there); without it, the default choice stays."""
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: True)
    dev = torch.device("cpu")
    with T._precision(TrainConfig(part="unet", autocast=True), dev):
        assert torch.is_autocast_enabled("cpu")
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    with T._precision(TrainConfig(part="unet", autocast=None), dev):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()


def test_cpu_autocast_needs_bfloat16_arithmetic(tmp_path, monkeypatch, capsys):
    """On a CPU without bfloat16 arithmetic (oneDNN has none: AVX2 only), autocast = true (the
    shipped recipe's) trains in float32, with one note: torch's bfloat16 kernels there ran the
    shapes UNet's step 21x slower than float32."""
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: False)
    dev = torch.device("cpu")
    with T._precision(TrainConfig(part="unet", autocast=True), dev):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.flash_sdp_enabled()
    records = train(tiny("clip", tmp_path, steps=2, autocast=True), progress=False)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert capsys.readouterr().err.count("no bfloat16 arithmetic") == 1
