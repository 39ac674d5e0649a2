"""A tiny decoder (TAESD) in the pipelines: a whole txt2img against diffusers' pipeline with an
AutoencoderTiny as its VAE (its latent scaling included), previews from the tiny decoder
whenever the model has one, vae_decoder="tiny" for the final images and their PNG parameters,
a model folder that carries one, and the tiny-decoder training part on tiny models."""
import base64
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import AutoencoderTiny, StableDiffusionPipeline  # noqa: E402

from nanodiffusion import load  # noqa: E402
from nanodiffusion.errors import InputError  # noqa: E402
from nanodiffusion.eval.report import tiny_decoder_psnr  # noqa: E402
from nanodiffusion.formats import checkpoint  # noqa: E402
from nanodiffusion.formats.ours import save_pipeline  # noqa: E402
from nanodiffusion.loading import attach_tiny_decoder  # noqa: E402
from nanodiffusion.models.taesd import TAESD, TAESDConfig  # noqa: E402
from nanodiffusion.models.vae import VAE, VAEConfig  # noqa: E402
from nanodiffusion.pnginfo import parse_parameters  # noqa: E402
from nanodiffusion.train import TrainConfig, train  # noqa: E402
from nanodiffusion.train import loop as T  # noqa: E402

PROMPT, SEED, STEPS, W, H = "a red circle", 3, 4, 24, 16


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """tiny_sd's pipeline (VAE factor 2), and a random AutoencoderTiny of the same factor
    whose latents are divided by 1.5 before decoding (its scaling_factor)."""
    model = tiny_sd.build(tmp_path_factory.mktemp("sd"))
    torch.manual_seed(5)
    model.tiny_ref = AutoencoderTiny(encoder_block_out_channels=(8, 8),
                                     decoder_block_out_channels=(8, 8),
                                     num_encoder_blocks=(1, 1), num_decoder_blocks=(2, 1),
                                     scaling_factor=1.5).eval()
    return model


@pytest.fixture(scope="module")
def with_tiny(sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd_folder")
    sd.tiny_ref.save_pretrained(folder)
    return attach_tiny_decoder(load(sd.folder), folder)


def test_txt2img_with_the_tiny_decoder_matches_diffusers(sd, with_tiny):
    """diffusers' StableDiffusionPipeline with an AutoencoderTiny as its vae decodes
    latents / vae.config.scaling_factor with it: our vae_decoder="tiny" does the same."""
    r = sd.ref
    ref = StableDiffusionPipeline(vae=sd.tiny_ref, text_encoder=r.text_encoder,
                                  tokenizer=r.tokenizer, unet=r.unet, scheduler=r.scheduler,
                                  safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, sd.scheduler_config, "euler")
    want = ref(PROMPT, num_inference_steps=STEPS, width=W, height=H, num_images_per_prompt=2,
               output_type="np", generator=torch.Generator("cpu").manual_seed(SEED)).images
    got = with_tiny.generate(PROMPT, seed=SEED, steps=STEPS, width=W, height=H, n=2,
                             sampler="euler", vae_decoder="tiny")
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want)
    full = with_tiny.generate(PROMPT, seed=SEED, steps=STEPS, width=W, height=H, n=2,
                              sampler="euler")
    assert np.abs(tiny_sd.as_array(full) - want).max() > 0.1  # the VAE's images differ


def test_png_parameters_say_which_decoder_made_the_image(with_tiny):
    tiny = with_tiny.generate(PROMPT, seed=1, steps=2, width=W, height=H, vae_decoder="tiny")
    assert "VAE Decoder: TAESD" in tiny[0].info["parameters"]
    assert parse_parameters(tiny[0].info["parameters"])["VAE Decoder"] == "TAESD"
    full = with_tiny.generate(PROMPT, seed=1, steps=2, width=W, height=H)
    assert "VAE Decoder" not in full[0].info["parameters"]
    mask = Image.new("L", (W, H), 255)
    for images in (with_tiny.img2img(PROMPT, full[0], seed=1, steps=2, vae_decoder="tiny"),
                   with_tiny.inpaint(PROMPT, full[0], mask, seed=1, steps=2,
                                     vae_decoder="tiny")):
        assert "VAE Decoder: TAESD" in images[0].info["parameters"]
        assert images[0].size == (W, H)


@torch.no_grad()
def test_previews_come_from_the_tiny_decoder(sd, with_tiny):
    seen = []
    with_tiny.generate(PROMPT, seed=1, steps=3, width=W, height=H, callback=seen.append,
                       preview=True)
    for info in seen:
        tiny = with_tiny.decode_latents(info["denoised"], "tiny")
        full = with_tiny.decode_latents(info["denoised"])
        assert [p.tobytes() for p in info["preview"]] == [p.tobytes() for p in tiny]
        assert [p.tobytes() for p in info["preview"]] != [p.tobytes() for p in full]
    seen = []
    plain = load(sd.folder)  # no tiny decoder: previews from the VAE, as before
    plain.generate(PROMPT, seed=1, steps=2, width=W, height=H, callback=seen.append,
                   preview=True)
    full = plain.decode_latents(seen[0]["denoised"])
    assert [p.tobytes() for p in seen[0]["preview"]] == [p.tobytes() for p in full]


@torch.no_grad()
def test_server_previews_decode_the_latents_averaged_down_to_their_size(sd, with_tiny):
    """The server's live previews (PREVIEW_SIDE px): the VAE decodes the latents averaged over
    k x k blocks, the largest k that keeps its image at least that size (a 512 px SD image's
    64 x 64 latents to 16 x 16: 1/16 of a whole decode), not the whole latents; the tiny
    decoder, which costs little, decodes them whole."""
    from nanodiffusion.server.jobs import PREVIEW_SIDE, preview_png

    plain = load(sd.folder)
    f = plain.vae_factor
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 150, 100)  # a 300 x 200 px image at f = 2, two of them
    for pipe, decoder, shape in ((plain, plain.vae.decoder, (1, 4, 75, 50)),
                                 (with_tiny, with_tiny.tiny_decoder.decoder, (1, 4, 150, 100))):
        seen = []
        hook = decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        try:
            png = Image.open(io.BytesIO(base64.b64decode(preview_png(pipe, latents))))
        finally:
            hook.remove()
        assert [tuple(s) for s in seen] == [shape]
        assert max(png.size) == PREVIEW_SIDE and png.size[0] < png.size[1]
    k = 150 * f // PREVIEW_SIDE
    assert k == 2
    z = torch.nn.functional.adaptive_avg_pool2d(latents[:1], (75, 50))
    want = plain.decode_latents(z)[0]
    want.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    got = Image.open(io.BytesIO(base64.b64decode(preview_png(plain, latents))))
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_vae_decoder_is_checked(sd, with_tiny):
    with pytest.raises(InputError, match="vae_decoder must be one of .*'small'"):
        with_tiny.generate(PROMPT, steps=1, width=W, height=H, vae_decoder="small")
    with pytest.raises(InputError, match="no tiny decoder"):
        load(sd.folder).generate(PROMPT, steps=1, width=W, height=H, vae_decoder="tiny")


@torch.no_grad()
def test_a_model_folder_carries_its_tiny_decoder(sd, with_tiny, tmp_path):
    save_pipeline(with_tiny, tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "model.json").read_text())
    assert meta["files"]["tiny_decoder"] == "tiny_decoder.safetensors"
    again = load(tmp_path / "ours")
    z = torch.randn(1, 4, 8, 12)
    assert again.decode_latents(z, "tiny")[0].tobytes() == \
        with_tiny.decode_latents(z, "tiny")[0].tobytes()
    wrong = TAESD(TAESDConfig(encoder_blocks=(), decoder_blocks=(1, 1, 1)))  # factor 4
    with pytest.raises(ValueError, match="4 pixels per latent.*at 2"):
        attach_tiny_decoder(load(sd.folder), wrong)


def test_tiny_decoder_psnr_measures_against_the_vae_decoder(monkeypatch):
    """The eval's measure: a random tiny decoder scores low; one that decodes as the VAE does
    (the VAE itself in its place) scores as identical images do."""
    import nanodiffusion.pipelines.decoders as decoders

    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)).eval()
    tiny = TAESD(TAESDConfig(decoder_channels=8, encoder_blocks=(), decoder_blocks=(1, 1)))
    assert tiny_decoder_psnr(vae, tiny.eval(), n=8, size=32) < 20
    monkeypatch.setattr(decoders, "tiny_decode",
                        lambda _, z: vae.decode(z / vae.config.scaling_factor))
    assert tiny_decoder_psnr(vae, tiny, n=8, size=32) > 100


# ---------------------------------------------------------------- the training part

def _tiny_run(out, steps=30, **kw):
    values = dict(part="tiny-decoder", out=str(out), image_size=32, steps=steps,
                  batch_size=8, lr=3e-3, warmup=2, log_every=1, ckpt_every=1000,
                  sample_every=0, ema_decay=0.0, ink_weight=10.0,
                  model={"decoder_channels": 8, "decoder_blocks": [1, 1]})
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A run folder whose vae part is a random tiny VAE (factor 2) and whose assembled model
    (<out>/model) is tiny_sd's pipeline with that VAE."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    vae = VAE(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4))
    checkpoint.save_model(vae, out / "vae" / "vae.safetensors")
    return out, vae


def test_the_distillation_loss_falls_and_the_decoder_ships(vae_run, tmp_path, monkeypatch):
    out, vae = vae_run
    pipe = tiny_sd.build(tmp_path / "sd").ours
    pipe.vae = vae.eval()
    save_pipeline(pipe, out / "model")
    monkeypatch.setattr(T, "chunk_indices", tiny_sd.fixed_indices)
    records = train(_tiny_run(out), progress=False)
    losses = [r["loss"] for r in records]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert records[-1]["psnr"] > records[0]["psnr"] + 3
    tiny = checkpoint.load_model(out / "tiny-decoder" / "tiny_decoder.safetensors")
    assert isinstance(tiny, TAESD) and tiny.encoder is None and tiny.downscale == 2
    model = load(out / "model")  # the run's assembled model got it: previews use it
    assert model.tiny_decoder is not None
    assert json.loads((out / "model" / "model.json").read_text())["files"]["tiny_decoder"]


def test_the_student_must_upsample_as_the_vae_does(vae_run):
    out, _ = vae_run
    with pytest.raises(ValueError, match=r"upsample by 4, the VAE by 2; give 2 stages"):
        train(_tiny_run(out, steps=1, model={"decoder_blocks": [1, 1, 1]}), progress=False)
    with pytest.raises(ValueError, match="latent_channels"):
        train(_tiny_run(out, steps=1, model={"latent_channels": 8}), progress=False)


def test_generated_samples_are_the_models_own_latents_and_their_vae_images(vae_run, tmp_path):
    """generated_share 0.5: every second sample is the run's model's own sample (generate's
    output_type="latent" for data sample g's caption, seed g, generated_steps cycled), its
    target the VAE's image of it in 8 bits; the others are the data's, as without it."""
    from nanodiffusion.train.tiny_decoder import TinyDecoderPart
    vae, out = vae_run[1], tmp_path / "run"  # a run of its own: it trains twice below
    checkpoint.save_model(vae, out / "vae" / "vae.safetensors")
    pipe = tiny_sd.build(tmp_path / "sd").ours
    pipe.vae = vae.eval()
    save_pipeline(pipe, out / "model")
    cpu = torch.device("cpu")
    cfg = _tiny_run(out, generated_share=0.5, generated_pool=3, generated_steps=[2, 3])
    _, frozen = TinyDecoderPart.build(cfg, cpu)
    batch = TinyDecoderPart.batch(cfg, frozen, list(range(8)), cpu)
    plain_cfg = _tiny_run(out)
    _, plain = TinyDecoderPart.build(plain_cfg, cpu)
    data = TinyDecoderPart.batch(plain_cfg, plain, [0, 1, 2, 3], cpu)  # numbered apart
    for k in ("mean", "logvar", "target"):
        assert torch.equal(batch[k][0::2], data[k])
    model, sf = load(out / "model"), vae.config.scaling_factor
    for i, g, steps in ((1, 0, 2), (3, 1, 3), (5, 2, 2)):
        caption = frozen["source"](g)[1]
        z = model.generate(caption, seed=g, steps=steps, width=32, height=32,
                           output_type="latent")
        torch.testing.assert_close(batch["mean"][i] * sf, z[0], rtol=0, atol=1e-6)
        assert torch.isneginf(batch["logvar"][i]).all()
        with torch.no_grad():
            image = vae.decode(batch["mean"][i][None]).clamp(-1, 1)[0]
        assert torch.equal(batch["target"][i], ((image + 1) * 127.5).round().to(torch.uint8))
    assert torch.equal(batch["mean"][7], batch["mean"][1])  # g = 3 % 3: the pool's first again
    assert not torch.equal(batch["mean"][3], batch["mean"][1])
    elsewhere = tmp_path / "elsewhere"
    save_pipeline(pipe, elsewhere)
    before = (elsewhere / "model.json").read_text()
    for teacher in (out / "model", elsewhere):  # the run's own folder gets it; others never
        records = train(_tiny_run(out, steps=3, generated_share=0.5, generated_pool=3,
                                  teacher=str(teacher)), progress=False)
        assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
        shutil.rmtree(out / "tiny-decoder")  # the next one from zero, not resumed
    assert json.loads((out / "model" / "model.json").read_text())["files"]["tiny_decoder"]
    assert load(out / "model").tiny_decoder is not None
    assert (elsewhere / "model.json").read_text() == before
    assert not (elsewhere / "tiny_decoder.safetensors").exists()


def test_generated_samples_need_a_model_that_generates(vae_run):
    out, _ = vae_run
    with pytest.raises(ValueError, match=r"vae.safetensors is a VAE file, which generates"):
        train(_tiny_run(out, steps=1, generated_share=0.5,
                        teacher=str(out / "vae" / "vae.safetensors")), progress=False)
    with pytest.raises(ValueError, match="generated_share is for the tiny-decoder part"):
        TrainConfig(part="unet", generated_share=0.5)
    with pytest.raises(ValueError, match=r"generated_share must be in \[0, 1\), got 1.0"):
        _tiny_run(out, generated_share=1.0)


def test_output_type_latent_gives_the_latents_the_images_are_decoded_from(tmp_path):
    pipe = tiny_sd.build(tmp_path / "sd").ours
    kw = dict(seed=SEED, steps=2, width=W, height=H, n=2)
    z = pipe.generate(PROMPT, output_type="latent", **kw)
    assert z.shape == (2, 4, H // pipe.vae_factor, W // pipe.vae_factor)
    images = pipe.generate(PROMPT, **kw)
    for got, want in zip(pipe.decode_latents(z), images, strict=True):
        assert got.tobytes() == want.tobytes()
    with pytest.raises(InputError, match=r"output_type must be one of \('pil', 'latent'\), "
                                         r"got 'png'"):
        pipe.generate(PROMPT, output_type="png", **kw)
