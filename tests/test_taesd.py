"""The tiny autoencoder (TAESD): parity with diffusers' AutoencoderTiny on random weights
(encode, decode, its 8-bit latent round trip and latent scaling), and its readers: diffusers
folders, madebyollin's taesd_encoder / taesd_decoder files, our own files; strict loading
whose errors name the file."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodiffusion.formats import checkpoint
from nanodiffusion.formats.taesd import (check_fits, config_from_diffusers,
                                         config_to_diffusers, read_taesd, to_taesd_files)
from nanodiffusion.models.taesd import SHAPES, TAESD, TAESDConfig

diffusers = pytest.importorskip("diffusers")

# (width, encoder blocks, decoder blocks): SD's TAESD (factor 8) narrowed; factor 4, as the
# bundled shapes models' VAE (one upsampling fewer: one stage fewer)
CONFIGS = [(16, (1, 3, 3, 3), (3, 3, 3, 1)), (8, (1, 2, 2), (2, 2, 1))]


def _reference(width, enc, dec, seed=0, **kw):
    torch.manual_seed(seed)
    return diffusers.AutoencoderTiny(
        encoder_block_out_channels=(width,) * len(enc), num_encoder_blocks=enc,
        decoder_block_out_channels=(width,) * len(dec), num_decoder_blocks=dec, **kw).eval()


def _ours(ref):
    """Ours built from the reference's config.json, its weights loaded strictly."""
    model = TAESD(config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("width,enc,dec", CONFIGS)
@torch.no_grad()
def test_matches_diffusers(width, enc, dec):
    ref = _reference(width, enc, dec)
    ours = _ours(ref)
    f = 2 ** (len(dec) - 1)
    assert ours.downscale == f
    x = torch.rand(2, 3, 8 * f, 6 * f) * 2 - 1
    z = ours.encode(x)
    assert z.shape == (2, 4, 8, 6) and _maxdiff(z, ref.encode(x).latents) <= 1e-5
    z = torch.randn(2, 4, 5, 7) * 2  # some beyond TAESD's clamp at 3
    out = ours.decode(z)
    assert out.shape == (2, 3, 5 * f, 7 * f) and _maxdiff(out, ref.decode(z).sample) <= 1e-5
    # the 8-bit latent round trip of AutoencoderTiny.forward, and its scalings
    assert _maxdiff(ours(x), ref(x).sample) <= 1e-5
    assert _maxdiff(ours.scale_latents(z), ref.scale_latents(z)) == 0
    assert _maxdiff(ours.unscale_latents(z), ref.unscale_latents(z)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_inference_decoder_upsamples_the_small_input(monkeypatch, dtype):
    """As pipelines run it (channels-last: pipelines.decoders.for_inference), each upsampling
    and the conv after it run as one convolution of the small input (models/upsample.py; no
    upsampled copy): diffusers' image within float32's rounding, and in bfloat16 about the
    direct upsampling's error."""
    from nanodiffusion.models import packing, upsample
    from nanodiffusion.pipelines.decoders import for_inference

    if not packing.packs(dtype):
        pytest.skip(f"this CPU's oneDNN has no {dtype} convolutions: the direct path runs")
    ref = _reference(16, (1, 3, 3, 3), (3, 3, 3, 1))
    ours = for_inference(_ours(ref).to(dtype))
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = ref.decode(z).sample
    with torch.inference_mode(), monkeypatch.context() as m:
        m.setattr(upsample, "takes", lambda conv, x: False)
        direct = ours.decode(z.to(dtype)).float()

    def no_upsampling(*args, **kwargs):
        raise AssertionError("the decoder made an upsampled copy")
    monkeypatch.setattr(torch.nn.Upsample, "forward", no_upsampling)
    with torch.inference_mode():
        got = ours.decode(z.to(dtype)).float()
    err, err_direct = _maxdiff(got, want), _maxdiff(direct, want)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        assert err <= 1.25 * err_direct, (err, err_direct)


def test_latent_conventions_follow_the_config():
    ref = _reference(8, (1, 2), (2, 1), latent_magnitude=2, latent_shift=0.25,
                     scaling_factor=1.5, shift_factor=0.1)
    ours = _ours(ref)
    c = ours.config
    assert (c.latent_magnitude, c.latent_shift, c.scaling_factor, c.shift_factor) == \
        (2.0, 0.25, 1.5, 0.1)
    z = torch.randn(1, 4, 3, 3) * 3
    assert torch.equal(ours.scale_latents(z), ref.scale_latents(z))
    assert torch.equal(ours.unscale_latents(z), ref.unscale_latents(z))
    again = diffusers.AutoencoderTiny(**{k: v for k, v in config_to_diffusers(c).items()
                                         if k != "_class_name"})
    keys = [k for k in ref.config if not k.startswith("_")]
    plain = lambda cfg: json.loads(json.dumps({k: cfg[k] for k in keys}))  # noqa: E731
    assert plain(again.config) == plain(ref.config)  # 2 == 2.0


def test_diffusers_options_we_do_not_build_are_refused():
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        config_from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="not all equal"):
        config_from_diffusers({"decoder_block_out_channels": [64, 32, 32, 32]})
    with pytest.raises(ValueError, match="unknown options"):
        config_from_diffusers({"use_midblock_gn": True})


def _read(path):
    return load_file(str(path))


def _madebyollin(ref, folder, prefix="taesd"):
    """ref's halves written as madebyollin's files: encoder `N.*`, decoder `N+1.*` (its clamp
    at 0), the inverse of diffusers' convert_tiny_autoencoder_to_diffusers, done here by hand."""
    paths = {}
    for half, shift in (("encoder", 0), ("decoder", 1)):
        sd = {}
        for k, v in ref.state_dict().items():
            if k.startswith(f"{half}.layers."):
                i, rest = k[len(half) + 8:].split(".", 1)
                sd[f"{int(i) + shift}.{rest}"] = v.contiguous()
        paths[half] = folder / f"{prefix}_{half}.safetensors"
        save_file(sd, paths[half])
    return paths


@pytest.mark.parametrize("width,enc,dec", CONFIGS)
@torch.no_grad()
def test_every_layout_reads_to_the_same_model(tmp_path, width, enc, dec):
    ref = _reference(width, enc, dec)
    ref.save_pretrained(tmp_path / "diffusers")
    files = _madebyollin(ref, tmp_path)
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4)
    want_z, want_x = ref.encode(x).latents, ref.decode(z).sample
    both = [read_taesd(tmp_path / "diffusers"),  # the folder
            read_taesd(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"),
            read_taesd(tmp_path)]  # madebyollin's two files in one folder
    for m in both:
        assert m.config.encoder_blocks == enc and m.config.decoder_blocks == dec
        assert _maxdiff(m.encode(x), want_z) == 0 and _maxdiff(m.decode(z), want_x) == 0
    decoder = read_taesd(files["decoder"])  # the blocks per stage read off the keys
    assert decoder.encoder is None and decoder.config.decoder_blocks == dec
    assert _maxdiff(decoder.decode(z), want_x) == 0
    encoder = read_taesd(files["encoder"])
    assert encoder.decoder is None and _maxdiff(encoder.encode(x), want_z) == 0
    assert to_taesd_files(both[0])["decoder"].keys() == _read(files["decoder"]).keys()
    checkpoint.save_model(decoder, tmp_path / "ours.safetensors")  # our own file
    assert _maxdiff(read_taesd(tmp_path / "ours.safetensors").decode(z), want_x) == 0


def test_strict_loading_errors_name_the_file(tmp_path):
    ref = _reference(8, (1, 2), (2, 1))
    files = _madebyollin(ref, tmp_path)
    sd = _read(files["decoder"])
    for name, broken in {
            "missing_decoder": {k: v for k, v in sd.items() if k != "3.conv.2.weight"},
            "extra_decoder": {**sd, "3.conv.6.weight": torch.zeros(8, 8, 3, 3)},
            "shape_decoder": {**sd, "3.conv.0.weight": torch.zeros(8, 4, 3, 3)}}.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, path)
        with pytest.raises(ValueError, match="conv") as e:
            read_taesd(path)
        assert str(path) in str(e.value)
    path = tmp_path / "unet_decoder.safetensors"
    save_file({"down.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a TAESD") as e:
        read_taesd(path)
    assert str(path) in str(e.value)
    folder = tmp_path / "diffusers"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_decoder_blocks": [3, 1]}))
    weights = folder / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="missing") as e:
        read_taesd(folder)
    assert str(weights) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nothing"):
        read_taesd(tmp_path / "nothing")


def test_a_tiny_decoder_must_fit_the_vae():
    tiny = TAESD(SHAPES)
    assert check_fits(tiny, 4, 4, "x") is tiny
    with pytest.raises(ValueError, match=r"where: .*4 pixels per latent.* at 8"):
        check_fits(tiny, 4, 8, "where")
    with pytest.raises(ValueError, match="no decoder"):
        check_fits(TAESD(TAESDConfig(decoder_blocks=())), 4, 8, "where")
