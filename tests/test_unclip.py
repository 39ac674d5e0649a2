"""unCLIP on tiny models: the prior and decoder parts learn on a tiny clip + vae run, the run
folder gets an assembled model-unclip, every UnCLIPPipeline task returns the right images,
and a saved folder loads back to the same images."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from nanodiffusion.train import loop as T
from nanodiffusion.train import unclip as train_unclip
from nanodiffusion.formats.ours import save_unclip_pipeline
from nanodiffusion.loading import load_pipeline
from nanodiffusion.train import TrainConfig, train
from nanodiffusion.pipelines.unclip import UnCLIPPipeline, slerp

MODELS = {
    "clip": {"text": {"width": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64},
             "vision": {"width": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64,
                        "patch_size": 8, "projection_dim": 16}},
    "vae": {"block_channels": [8, 16], "norm_groups": 8},
    "prior": {"width": 32, "num_layers": 2, "num_heads": 2},
    "decoder": {"block_channels": [16, 32], "attention_levels": [False, True],
                "num_heads": [2, 2], "norm_groups": 8, "context_dim": 32},
}
STEPS = {"clip": 8, "vae": 8, "prior": 30, "decoder": 30}
FAST = dict(steps=2, prior_steps=2)  # sampling settings of the pipeline tests
SIZE = 32


def _fixed_generators(cfg, step, indices):
    """Step 0's draws (noise, timesteps, dropout) at every step: the loss of a fixed problem
    must fall steadily, where fresh timesteps make a 30-step loss curve too noisy to judge."""
    return _SAMPLE_GENERATORS(cfg, 0, indices)


_SAMPLE_GENERATORS = T.sample_generators


@pytest.fixture(scope="module")
def unclip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("unclip")
    records = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "chunk_indices", tiny_sd.fixed_indices)
        mp.setattr(T, "sample_generators", _fixed_generators)
        mp.setattr(train_unclip, "STATS_SAMPLES", 32)
        for part in ("clip", "vae", "prior", "decoder"):
            cfg = TrainConfig(part=part, out=str(out), image_size=SIZE, steps=STEPS[part],
                              batch_size=8, lr=3e-3, warmup=2, log_every=1, ckpt_every=1000,
                              sample_every=0, ema_decay=0.0, model=MODELS[part])
            records[part] = train(cfg, progress=False)
    return out, records


@pytest.fixture(scope="module")
def pipe(unclip_run):
    return load_pipeline(str(unclip_run[0] / "model-unclip"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("part", ["prior", "decoder"])
def test_part_learns(unclip_run, part):
    losses = [r["loss"] for r in unclip_run[1][part]]
    assert len(losses) == STEPS[part] and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses


def test_prior_refuses_settings_that_follow_from_clip(unclip_run):
    out, _ = unclip_run
    cfg = TrainConfig(part="prior", out=str(out), image_size=SIZE, steps=1, batch_size=2,
                      model={**MODELS["prior"], "embed_dim": 8})
    with pytest.raises(ValueError, match="embed_dim"):
        train(cfg, progress=False)


def test_the_run_folder_holds_an_unclip_model(unclip_run, pipe):
    out, _ = unclip_run
    for name in ("prior", "decoder", "vae", "clip"):
        assert (out / "model-unclip" / f"{name}.safetensors").exists()
    assert isinstance(pipe, UnCLIPPipeline)
    assert pipe.prior.config.embed_dim == 16 and pipe.decoder.config.image_embed_dim == 16
    assert pipe.prior.clip_std.ne(1).any()  # statistics of the data, not the init


def _check(images, n):
    assert len(images) == n
    assert all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) for im in images)


def test_generate(pipe):
    images = pipe.generate("a red circle", seed=3, n=2, **FAST)
    _check(images, 2)
    again = pipe.generate("a red circle", seed=3, n=2, **FAST)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]
    assert "Seed: 3" in images[0].info["parameters"]
    _check(pipe.generate("a red circle", "a blue square", seed=3, guidance=1.0, **FAST), 1)
    with pytest.raises(ValueError, match="best_of"):
        pipe.generate("a red circle", best_of=0)


def test_best_of_keeps_the_most_clip_similar(pipe):
    """Each image is the best under CLIP of its candidates, from seeds 3, 4, 5 (more in
    test_cli_unclip.py, on untrained models)."""
    from nanodiffusion.pipelines.rerank import clip_scores

    images = pipe.generate("a red circle", seed=3, n=2, best_of=3, **FAST)
    _check(images, 2)
    batches = [pipe.generate("a red circle", seed=s, n=2, **FAST) for s in (3, 4, 5)]
    for i, im in enumerate(images):
        best = max(clip_scores(pipe, "a red circle", [b[i] for b in batches]))
        assert clip_scores(pipe, "a red circle", [im])[0] == pytest.approx(best)
        # the image carries its own candidate's settings (its seed), as the batch's image does
        k = next(k for k, b in enumerate(batches) if b[i].tobytes() == im.tobytes())
        assert im.info["settings"] == batches[k][i].info["settings"]
        assert im.info["settings"].seed == 3 + k
        assert im.info["settings"].guidance == pipe.defaults.guidance


def test_variations_edit_interpolate(pipe, image):
    _check(pipe.variations(image, n=3, seed=1, steps=2), 3)
    with pytest.raises(ValueError, match="does not read text"):
        pipe.variations(image, n=1, steps=2, caption="a red circle")
    _check(pipe.edit(image, "a red circle", "a blue circle", strength=0.5, steps=2), 1)
    frames = pipe.interpolate(image, "a green star", frames=3, seed=1, steps=2)
    _check(frames, 3)
    with pytest.raises(ValueError, match="strength"):
        pipe.edit(image, "a", "b", strength=2)


def test_describe_ranks_candidates(pipe, image):
    got = pipe.describe(image, top=4)
    assert len(got) == 4 and all(isinstance(c, str) for c, _ in got)
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)
    mine = ["a red circle", "a blue square", "a green star"]
    assert sorted(c for c, _ in pipe.describe(image, mine, top=3)) == sorted(mine)


def test_slerp_ends_and_norm():
    a, b = torch.randn(2, 8), torch.randn(2, 8) * 3
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2)


def test_save_load_round_trip(pipe, tmp_path):
    save_unclip_pipeline(pipe, tmp_path / "copy")
    loaded = load_pipeline(str(tmp_path / "copy"))
    a = pipe.generate("a yellow star", seed=5, **FAST)[0]
    b = loaded.generate("a yellow star", seed=5, **FAST)[0]
    assert a.tobytes() == b.tobytes()


def _decoder_text_setup(unclip_run, tmp_path):
    """tmp_path as a run holding unclip_run's clip, vae and prior: (the TrainConfig settings
    the decoder_text tests share, the decoder's model settings for a unet part)."""
    import shutil

    out, _ = unclip_run
    for part in ("clip", "vae", "prior"):
        shutil.copytree(out / part, tmp_path / part)
    common = dict(out=str(tmp_path), image_size=SIZE, batch_size=4, warmup=1, log_every=1,
                  ckpt_every=1000, sample_every=0, ema_decay=0.0)
    return common, {k: v for k, v in MODELS["decoder"].items() if k != "context_dim"}


def test_decoder_text_starts_from_the_unet_and_reads_the_caption(unclip_run, tmp_path):
    """DALL·E 2's decoder: the run's text-to-image UNet (here with the pooled text state too)
    plus the image-embedding pathway, starting from the UNet's weights; generate() passes it
    the prompt, and the folder remembers that it reads one."""
    from nanodiffusion.formats import checkpoint

    common, unet_model = _decoder_text_setup(unclip_run, tmp_path)
    train(TrainConfig(part="unet", steps=2, lr=1e-3, model=unet_model, pooled_text=True,
                      **common), progress=False)
    with pytest.raises(ValueError, match="decoder model settings"):
        train(TrainConfig(part="decoder", steps=1, decoder_text=True, model=unet_model,
                          **common), progress=False)
    records = train(TrainConfig(part="decoder", steps=2, lr=1e-7, decoder_text=True, **common),
                    progress=False)
    assert all(math.isfinite(r["loss"]) for r in records)
    unet = checkpoint.load_model(tmp_path / "unet" / "unet.safetensors")
    pipe = load_pipeline(str(tmp_path / "model-unclip"))
    assert pipe.decoder_text and pipe.decoder.config.pooled_text_dim == 32
    assert pipe.decoder.config.image_embed_dim == 16
    for name in ("conv_in.weight", "class_embedding.linear_1.weight"):
        assert torch.allclose(pipe.decoder.state_dict()[name], unet.state_dict()[name],
                              atol=1e-4)
    a = pipe.generate("a red circle", seed=3, **FAST)[0]
    assert a.size == (SIZE, SIZE)
    embeds = pipe.encode_image([a])
    a2, b = (pipe.decode(embeds, torch.Generator().manual_seed(0), 2, 4.0, "ddim", SIZE, SIZE,
                         prompt=p)[0] for p in ("a red circle", "a blue square"))
    assert a2.tobytes() != b.tobytes()  # one image embedding, two captions
    auto = pipe.variations(a, n=2, seed=1, steps=2)  # told the caption CLIP ranks first
    _check(auto, 2)
    top = pipe.describe(a, top=1)[0][0]
    assert auto[0].info["parameters"].startswith(top + "\n")
    told = pipe.variations(a, n=2, seed=1, steps=2, caption=top)
    alone = pipe.variations(a, n=2, seed=1, steps=2, caption="")
    assert [im.tobytes() for im in told] == [im.tobytes() for im in auto]
    assert alone[0].tobytes() != auto[0].tobytes()


@pytest.mark.parametrize("text_dropout, empty", [(0.0, 0), (1.0, 8)])
def test_decoder_text_dropout_is_the_share_of_captionless_samples(unclip_run, tmp_path,
                                                                  monkeypatch, text_dropout,
                                                                  empty):
    """text_dropout: the share of decoder samples whose caption is dropped ("" given to the
    frozen text encoder); 0 keeps every caption, 1 drops all; outside [0, 1] is refused."""
    from nanodiffusion.train import unclip as train_unclip

    common, unet_model = _decoder_text_setup(unclip_run, tmp_path)
    train(TrainConfig(part="unet", steps=1, model=unet_model, **common), progress=False)
    seen, frozen_text = [], train_unclip.frozen_text

    def recording(frozen, captions):
        seen.extend(captions)
        return frozen_text(frozen, captions)
    monkeypatch.setattr(train_unclip, "frozen_text", recording)
    train(TrainConfig(part="decoder", steps=2, decoder_text=True, text_dropout=text_dropout,
                      **common), progress=False)
    assert len(seen) == 8 and sum(c == "" for c in seen) == empty
    with pytest.raises(ValueError, match="text_dropout.*1.5"):
        TrainConfig(part="decoder", decoder_text=True, text_dropout=1.5, **common)
