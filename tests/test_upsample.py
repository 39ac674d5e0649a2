"""The VAE decoder's upsampling (models/upsample.py): nearest 2x then a 3x3 convolution,
computed as four 2x2 convolutions of the small input, banded; its rule; and the decoder that
uses it against diffusers' at inference, as pipelines run it (channels-last)."""
import pytest
import torch
import torch.nn.functional as F

from nanodiffusion.models import packing, upsample, vae as vae_module, winograd
from nanodiffusion.models.vae import VAE, VAEConfig, for_inference

DTYPES = [torch.float32] + ([torch.bfloat16] if packing.packs(torch.bfloat16) else [])


def _conv(c, k, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0, 1 / (3 * c ** 0.5))
        if bias:
            conv.bias.normal_()
    return conv.to(dtype).to(memory_format=torch.channels_last)


def _cl(*shape, dtype, seed=1):
    torch.manual_seed(seed)
    return torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,k,h,w,bias,band_bytes", [
    (1, 16, 16, 8, 8, True, upsample.BAND_BYTES),   # one band
    (2, 16, 24, 7, 5, True, 16384),                # batch 2, odd sides, short last band
    (1, 32, 16, 9, 6, False, 1),                   # one row a band, no bias
])
def test_upsample_conv_equals_the_direct_convolution(monkeypatch, dtype, n, c, k, h, w, bias,
                                                     band_bytes):
    """Within the direct convolution's rounding of the exact result (float64 arithmetic on
    the same weights and input), in bands of any height, channels-last out."""
    monkeypatch.setattr(upsample, "BAND_BYTES", band_bytes)
    bands, runner = [], upsample._runner
    monkeypatch.setattr(upsample, "_runner", lambda w4, b4, band: bands.append(band.shape)
                        or runner(w4, b4, band))
    conv, x = _conv(c, k, dtype, bias), _cl(n, c, h, w, dtype=dtype)
    with torch.no_grad():
        assert upsample.takes(conv, x)
        got = upsample.upsample_conv(conv, x)
        direct = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"),
                         conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                         padding=1)
    assert got.shape == (n, k, 2 * h, 2 * w) and got.dtype == dtype
    (_, _, rows, _), = bands  # the band's input: its rows and one above and below
    out_bytes = n * (rows - 1) * (w + 1) * 4 * k * got.element_size()  # all images' output
    assert rows - 2 == 1 or out_bytes <= band_bytes, (rows, out_bytes)
    assert got.is_contiguous(memory_format=torch.channels_last)
    err, err_direct = ((t.double() - exact).abs().max().item() for t in (got, direct))
    # float32: each output sums 4 C products, not 9 C; bfloat16: the summed taps are rounded
    # once more (measured 1.2-1.4x the direct error on SD's shapes)
    bound = 2 * err_direct + (1e-6 if dtype == torch.float32 else 0.0)
    assert err <= bound, (err, err_direct)


def test_phase_filters_sum_the_taps_that_fall_together():
    """Phase (a, b)'s 2x2 filter: along each side phase 0 takes taps [0] and [1, 2], phase 1
    [0, 1] and [2], so that each 2x2 tap is the sum of the 3x3 taps it stands for."""
    w = torch.arange(9.0).view(1, 1, 3, 3)
    got = upsample.phase_filters(w).view(2, 2, 2, 2)
    assert got[0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert got[0, 1].tolist() == [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]]
    assert got[1, 0].tolist() == [[0 + 3, 1 + 2 + 4 + 5], [6, 7 + 8]]
    assert got[1, 1].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_the_rule():
    """Inference on a channels-last CPU input of a zero-padded 3x3 convolution, in a dtype
    oneDNN takes, where Winograd does not take the direct call."""
    conv, x = _conv(8, 8, torch.float32), _cl(1, 8, 4, 4, dtype=torch.float32)
    with torch.no_grad():
        assert upsample.takes(conv, x)
        assert not upsample.takes(conv, x.contiguous())  # not channels-last
        assert not upsample.takes(conv, x.to(torch.float64).contiguous(
            memory_format=torch.channels_last))
        stride2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        assert not upsample.takes(stride2, x)
    assert not upsample.takes(conv, x)  # gradients: the weights ask for them
    wide = _conv(winograd.MIN_CHANNELS, winograd.MIN_CHANNELS, torch.float32)
    small = winograd.MIN_SIDE // 2
    xw = _cl(1, winograd.MIN_CHANNELS, small, small, dtype=torch.float32)
    with torch.no_grad():
        # the upsampled call is Winograd's (4x fewer multiply-adds than direct, not 2.25x)
        assert winograd.worth_it(wide, F.interpolate(xw, scale_factor=2.0))
        assert not upsample.takes(wide, xw)
        if packing.packs(torch.bfloat16):
            assert upsample.takes(wide.to(torch.bfloat16),
                                  xw.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))


def _decoders(dtype):
    """Ours (for_inference, packed as pipelines decode) and diffusers' AutoencoderKL from the
    same random weights: its last up block's first ResBlock narrows, so it has a shortcut."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    channels = (16, 32, 32)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2, norm_num_groups=8).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = VAE(VAEConfig(block_channels=channels, layers_per_block=2, norm_groups=8))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = for_inference(ours.to(dtype))
    packing.pack(ours.decoder)
    return ours, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_decoder_upsamples_the_small_input_and_matches_diffusers(monkeypatch, dtype):
    """At inference on channels-last latents no upsampled copy is made (F.interpolate never
    runs), each upsampling block whose output is TRIM_ABOVE bytes or more gives the heap's
    free pages back after it (malloc.trim; never below), and
    the image is diffusers' within float32's rounding (bfloat16's: within its rounding of the
    float32 image, as the direct upsampling's error or nearly)."""
    ours, ref = _decoders(dtype)
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.decode(z).sample

    zc = z.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), monkeypatch.context() as m:
        m.setattr(upsample, "takes", lambda conv, x: False)  # the upsampled copy, convolved
        direct = ours.decode(zc).float()

    trims = []
    monkeypatch.setattr(vae_module, "trim", lambda: trims.append(1))
    with torch.inference_mode():  # outputs below TRIM_ABOVE: the heap is kept
        ours.decode(zc)
    assert trims == []
    monkeypatch.setattr(vae_module, "TRIM_ABOVE", 0)  # as if every output were that large

    def no_interpolate(*args, **kwargs):
        raise AssertionError("the decoder made an upsampled copy")
    monkeypatch.setattr(vae_module.F, "interpolate", no_interpolate)
    with torch.inference_mode():
        got = ours.decode(zc).float()
    assert len(trims) == sum(b.up for b in ours.decoder.up_blocks) == 2
    err, err_direct = (got - want).abs().max().item(), (direct - want).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-4, err
    else:  # measured 0.053 against 0.051
        assert err <= 1.25 * err_direct, (err, err_direct)


def test_training_upsamples_as_before(monkeypatch):
    """With gradients the decoder upsamples as diffusers does (the upsampled copy, then the
    convolution) and never trims the heap."""
    called = []
    real = F.interpolate
    monkeypatch.setattr(vae_module.F, "interpolate",
                        lambda *a, **k: called.append(1) or real(*a, **k))
    monkeypatch.setattr(vae_module, "trim", lambda: called.append("trim"))
    vae = VAE(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4))
    z = torch.randn(1, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    vae.decode(z).sum().backward()
    assert called == [1]
    assert vae.decoder.up_blocks[0].upsamplers[0].conv.weight.grad is not None
