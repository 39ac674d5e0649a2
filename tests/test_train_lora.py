"""Fine-tuning the weights a user has (issue 22, item 5): `train lora` on a tiny diffusers
model and a tiny folder of captioned images (its loss falls, only the LoRA trains, the file is
kohya's and diffusers' load_lora_weights gives our pixels, a resumed run is the unbroken one),
`train unet --base` (starts from the base's UNet, the assembled model generates), and the bad
inputs refused with their names."""
import hashlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")
import tiny_sd  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

import nanodiffusion  # noqa: E402
from nanodiffusion.cli import main  # noqa: E402
from nanodiffusion.formats import checkpoint  # noqa: E402
from nanodiffusion.formats.lora import LoraLayer, read_lora, save_kohya  # noqa: E402
from nanodiffusion.train import TrainConfig, train  # noqa: E402
from nanodiffusion.train import loop as T  # noqa: E402
from nanodiffusion.train.lora import LoraPart  # noqa: E402
from nanodiffusion.train.unet import UnetPart  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SEED, STEPS, SIZE = "a zorb red circle", 3, 4, 32
COLOURS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four 32 px images of a circle with a thick black ring (the "zorb"), img.png + img.txt."""
    root = tmp_path_factory.mktemp("zorbs")
    for i, colour in enumerate(COLOURS):
        im = Image.new("RGB", (SIZE, SIZE), "white")
        ImageDraw.Draw(im).ellipse((3 + i, 3, 28, 28 - i), fill=colour, outline="black",
                                   width=4)
        im.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a zorb {colour} circle")
    return root


def lora_cfg(sd, folder, out, **kw):
    values = dict(part="lora", base=str(sd.folder), data=str(folder), out=str(out),
                  image_size=SIZE, steps=6, batch_size=4, lr=1e-2, warmup=0, log_every=1,
                  ckpt_every=1000, sample_every=0, ema_decay=0.0, lora_rank=4)
    return TrainConfig(**{**values, **kw})


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def file_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def same_per_step(cfg, step, indices):
    """sample_generators without the step: every step draws the same timesteps and noise."""
    return [torch.Generator().manual_seed(1000 + int(i)) for i in indices]


# ---- the part -------------------------------------------------------------------------------
def test_lora_loss_falls_and_only_the_lora_trains(sd, folder, tmp_path, monkeypatch):
    """On the same batch, timesteps and noise every step, the loss falls; the checkpoint holds
    kohya-named LoRA tensors alone, every lora_up has left zero, and neither the base's modules
    nor its files have changed."""
    before, files = weights(sd.ours.unet), file_digest(sd.folder)
    monkeypatch.setattr(T, "sample_generators", same_per_step)
    records = train(lora_cfg(sd, folder, tmp_path, steps=25, lora_text_encoder_rank=2),
                    progress=False)
    losses = [r["loss"] for r in records]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses
    state = checkpoint.load_state(tmp_path / "lora" / "state.pt")["model"]
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in state)
    assert any(k.startswith("lora_te_") for k in state)
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().max() > 0 for v in ups)
    base = nanodiffusion.load(sd.folder)
    for k, v in before.items():
        assert torch.equal(base.unet.state_dict()[k], v), k
    assert file_digest(sd.folder) == files


def test_lora_targets(sd, folder, tmp_path):
    """kohya's default: every Linear and 1x1 conv of the transformer blocks; "attention": the
    attention projections alone; the text encoder's attention and MLP with its own rank."""
    net, _ = LoraPart.build(lora_cfg(sd, folder, tmp_path / "a", lora_text_encoder_rank=2),
                            "cpu")
    names = set(net.layers())
    unet = {n.split(".", 1)[1] for n in names if n.startswith("unet.")}
    tails = {n.split("transformer_blocks.0.")[-1] for n in unet}
    assert tails == {"down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out",
                     "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                     "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                     "up_blocks.1.attentions.0.proj_in", "up_blocks.1.attentions.0.proj_out",
                     "up_blocks.1.attentions.1.proj_in", "up_blocks.1.attentions.1.proj_out",
                     "mid_block.attentions.0.proj_in", "mid_block.attentions.0.proj_out"}
    text = {n for n in names if n.startswith("text_encoder.")}
    assert len(text) == 2 * 6 and all(net.layers()[n].rank == 2 for n in text)
    net, _ = LoraPart.build(lora_cfg(sd, folder, tmp_path / "b", lora_targets="attention"),
                            "cpu")
    assert {n.rsplit(".", 1)[-1] for n in net.layers()} == {"to_q", "to_k", "to_v", "0"}
    assert all(layer.rank == 4 and layer.alpha == 4 for layer in net.layers().values())


def test_writer_and_reader_share_the_names(sd, tmp_path):
    """save_kohya's keys are kohya's, and read_lora maps them back to the same modules and
    tensors."""
    stack = sd.ours._loras
    g = torch.Generator().manual_seed(0)
    layers = {}
    for ours in ("unet.down_blocks.0.attentions.0.proj_in",
                 "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
                 "text_encoder.encoder.layers.1.mlp.fc2"):
        part, name = ours.split(".", 1)
        shape = stack.targets()[part][name]
        layers[ours] = LoraLayer(torch.randn(2, *shape[1:], generator=g),
                                 torch.randn(shape[0], 2, *([1, 1] if len(shape) == 4 else []),
                                             generator=g), 1.5)
    path = save_kohya(tmp_path / "x.safetensors", layers, {"ss_network_dim": 2})
    assert sorted(load_file(path)) == sorted(
        f"{stem}.{role}" for stem in ("lora_unet_down_blocks_0_attentions_0_proj_in",
                                      "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_"
                                      "attn2_to_k", "lora_te_text_model_encoder_layers_1_mlp_fc2")
        for role in ("alpha", "lora_down.weight", "lora_up.weight"))
    back = read_lora(path, stack.targets())
    assert back.layout == "kohya" and back.metadata == {"ss_network_dim": "2"}
    assert back.layers.keys() == layers.keys()
    for ours, layer in layers.items():
        got = back.layers[ours]
        assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
        assert got.alpha == 1.5


def _signal_at_call(monkeypatch, n):
    """A real SIGTERM to this process during the n-th loss computation of the lora part."""
    calls, loss = [0], LoraPart.loss

    def signalling(*args):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)
    monkeypatch.setattr(LoraPart, "loss", staticmethod(signalling))


@pytest.mark.parametrize("te_rank", [0, 2])
def test_resume_is_bitwise_exact(sd, folder, tmp_path, monkeypatch, te_rank):
    """Stopped by SIGTERM in step 3 of 5 and run again: the same losses, LoRA, optimizer state
    and file as a run never stopped (EMA on: the file is the EMA's)."""
    def cfg(out):
        return lora_cfg(sd, folder, tmp_path / out, steps=5, batch_size=2, ema_decay=0.9,
                        caption_dropout=0.5, lora_text_encoder_rank=te_rank)
    straight = train(cfg("a"), progress=False)
    _signal_at_call(monkeypatch, 3)
    first = train(cfg("b"), progress=False)
    monkeypatch.undo()
    assert len(first) == 3 and first.stopped_by == signal.SIGTERM
    second = train(cfg("b"), progress=False)
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    a, b = (checkpoint.load_state(tmp_path / n / "lora" / "state.pt") for n in "ab")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    fa, fb = (load_file(tmp_path / n / "lora" / f"{n}.safetensors") for n in "ab")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert all(torch.equal(fa[k], a["ema"][k]) for k in fa)  # the EMA is what is written


# ---- the command line, and the file in diffusers and here ----------------------------------
def diffusers_images(sd, path):
    ref = StableDiffusionPipeline(**sd.ref.components)
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, sd.scheduler_config, "euler")
    ref.load_lora_weights(str(path))
    try:
        return ref(PROMPT, negative_prompt="blue", num_inference_steps=STEPS, width=SIZE,
                   height=SIZE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(SEED)).images
    finally:
        ref.unload_lora_weights()


def ours_images(pipe):
    return tiny_sd.as_array(pipe.generate(PROMPT, negative_prompt="blue", seed=SEED,
                                          steps=STEPS, sampler="euler", width=SIZE,
                                          height=SIZE))


@pytest.mark.parametrize("te_rank", [0, 2])
def test_cli_lora_loads_in_diffusers_with_our_pixels(sd, folder, tmp_path, te_rank):
    """`nanodiffusion train lora` (a subprocess, the shipped fine-tuning recipe) from a
    diffusers folder: a kohya file with sd-scripts' metadata, that diffusers' load_lora_weights
    and our load_lora and --lora turn into the same image, far from the base's."""
    out = tmp_path / "zorb"
    cmd = [sys.executable, "-m", "nanodiffusion.cli", "train", "lora", "--recipe",
           str(ROOT / "recipes" / "finetune.toml"), "--base", str(sd.folder), "--data",
           str(folder), "--out", str(out), "--size", str(SIZE), "--steps", "4",
           "--batch-size", "2", "--lr", "3e-2", "--rank", "4", "--alpha", "8",
           "--text-encoder-rank", str(te_rank)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / "lora" / "zorb.safetensors"
    tensors = load_file(path)
    assert any(k.startswith("lora_te_") for k in tensors) == bool(te_rank)
    ups = [v for k, v in tensors.items() if k.endswith(".lora_up.weight")]
    assert ups and all(v.abs().max() > 0 for v in ups)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "networks.lora", "4", "8.0")
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_num_train_images"] == "4"
    assert meta["ss_output_name"] == "zorb"

    want = diffusers_images(sd, path)
    pipe = nanodiffusion.load(sd.folder)
    plain = ours_images(pipe)
    pipe.load_lora(path)
    got = ours_images(pipe)
    tiny_sd.assert_close_images(got, want)
    assert np.abs(got - plain).max() > 10 / 255, "the LoRA hardly changes the image"
    png = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--negative", "blue", "--model", str(sd.folder),
                 "--lora", str(path), "--seed", str(SEED), "--steps", str(STEPS), "--sampler",
                 "euler", "--width", str(SIZE), "--height", str(SIZE), "--out", str(png)]) == 0
    assert np.array_equal(tiny_sd.as_array([Image.open(png)]), got)


# ---- train unet --base ----------------------------------------------------------------------
def test_unet_from_base_starts_from_its_weights_and_generates(sd, folder, tmp_path):
    """The UNet starts as the base's, bit for bit; after two steps the assembled model has the
    trained UNet with the base's VAE, text encoder, schedule and defaults, and generates."""
    cfg = TrainConfig(part="unet", base=str(sd.folder), data=str(folder), out=str(tmp_path),
                      image_size=SIZE, steps=2, batch_size=2, lr=1e-3, warmup=0,
                      ckpt_every=1000, sample_every=0, ema_decay=0.0)
    base = nanodiffusion.load(sd.folder)
    model, _ = UnetPart.build(cfg, "cpu")
    start = model.state_dict()
    assert start.keys() == base.unet.state_dict().keys()
    assert all(torch.equal(v, start[k]) for k, v in base.unet.state_dict().items())
    assert any(p.requires_grad for p in model.parameters())

    records = train(cfg, progress=False)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    tuned = nanodiffusion.load(tmp_path / "model")
    trained = checkpoint.load_state(tmp_path / "unet" / "state.pt")["model"]
    assert all(torch.equal(v, trained[k]) for k, v in tuned.unet.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in trained.items())
    for part in ("vae", "text_encoder"):
        mine, theirs = getattr(tuned, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), part
    assert tuned.schedule_config == base.schedule_config and tuned.defaults == base.defaults
    png = tmp_path / "tuned.png"
    assert main(["generate", PROMPT, "--model", str(tmp_path / "model"), "--seed", "1",
                 "--steps", "2", "--width", str(SIZE), "--height", str(SIZE), "--out",
                 str(png)]) == 0
    assert Image.open(png).size == (SIZE, SIZE)


@pytest.mark.parametrize("part,message", [("unet", "follow from the UNet of base"),
                                          ("lora", "the LoRA's are lora_rank")])
def test_model_settings_are_refused_with_a_base(sd, folder, tmp_path, part, message):
    cfg = TrainConfig(part=part, base=str(sd.folder), data=str(folder), out=str(tmp_path),
                      image_size=SIZE, steps=1, batch_size=2, model={"block_channels": [8, 8]})
    with pytest.raises(ValueError, match=f"block_channels.*{message}"):
        train(cfg, progress=False)


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("part,case", [
    (part, case) for part in ("lora", "unet")
    for case in ("unclip", "missing", "no images", "bad size")] + [("lora", "no base")])
def test_bad_input_is_a_clear_error(sd, folder, tmp_path, capsys, part, case):
    """An unCLIP or missing base, no base for a LoRA, a folder without images, a size the
    base's VAE cannot take: exit 2 and an error naming it, before any step."""
    empty = tmp_path / "empty"
    empty.mkdir()
    base, data, size = str(sd.folder), str(folder), str(SIZE)
    expect = {"unclip": "'shapes-unclip' is an unCLIP model",
              "missing": f"no model at '{tmp_path / 'nowhere'}'",
              "no base": "needs the model to start from: --base",
              "no images": f"no images (.png, .jpg, .jpeg, .webp) found in {empty}",
              "bad size": "image_size 33 is not a multiple of the VAE factor 2"}[case]
    if case == "unclip":
        base = "shapes-unclip"
    elif case == "missing":
        base = str(tmp_path / "nowhere")
    elif case == "no images":
        data = str(empty)
    elif case == "bad size":
        size = "33"
    args = ["train", part, "--data", data, "--out", str(tmp_path / "run"), "--size", size,
            "--steps", "1", "--batch-size", "2"]
    if case != "no base":
        args += ["--base", base]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "run" / part / "state.pt").exists()
