"""oneDNN weight prepacking of the UNet's convolutions (issue 23 items 1 and 3,
models/packing.py): the same bfloat16 outputs bit for bit, float32 within rounding; the dense
weights let go while packed and put back as they were (values and layout) whenever anything
asks for them (the weight, state_dict, .to, load_state_dict, a call with gradients) or the
packing block ends or fails; a pipeline's images unchanged, with LoRA fusing and low memory;
a training run that samples trains on dense weights."""
import sys
from pathlib import Path

import pytest
import torch

import nanodiffusion
import tiny_sd
from lora_files import random_layers, unet_targets, write_kohya
from nanodiffusion.models import packing, small_gemm, winograd
from nanodiffusion.models.unet import UNet, UNetConfig, for_inference

pytestmark = pytest.mark.skipif(not packing.available(), reason="this torch has no oneDNN")

PROMPT = "a red circle above a blue square"
# bfloat16 packs only where this CPU's oneDNN takes it (not on AVX2-only CPUs: packing.packs)
DTYPES = [d for d in (torch.bfloat16, torch.float32) if packing.packs(d)]
CFG = UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                 num_heads=(2, 2), context_dim=32, norm_groups=8)


def _unet(dtype):
    torch.manual_seed(0)
    return for_inference(UNet(CFG).to(dtype))


def _inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    return x, torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g).to(dtype)


def _call(unet, seed=1, channels_last=False):
    """The UNet's output; `channels_last`: on a channels-last input, as pipelines give it (the
    dense and packed float32 kernels then round alike)."""
    x, t, ctx = _inputs(unet.conv_out.bias.dtype, seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return unet(x, t, context=ctx)


def _convs(unet):
    return [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]


def _packed(unet):
    return [m for m in _convs(unet) if type(m) is packing.PackedConv2d]


def _state(unet):
    return {k: (v.clone(), v.stride()) for k, v in unet.state_dict().items()}


def _same_state(unet, before, layout=True):
    after = unet.state_dict()
    for k, (v, stride) in before.items():
        assert torch.equal(after[k], v) and (after[k].stride() == stride or not layout), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_calls_equal_and_weights_come_back_as_they_were(dtype):
    unet = _unet(dtype)
    before, want = _state(unet), _call(unet, channels_last=True)
    with packing.packed_weights(unet) as n:
        assert n == len(_convs(unet)) == len(_packed(unet)) > 0
        got = [_call(unet, channels_last=True), _call(unet, channels_last=True)]
        # each weight held once: packed (the dense one let go), or dense where the call ran on
        # small_gemm's kernel (bfloat16, few rows, AMX), which reads the dense weight
        held = [(m._packed is not None, m._parameters["weight"].numel() > 0)
                for m in _convs(unet)]
        assert all(packed != dense for packed, dense in held) and any(p for p, _ in held)
        assert any(d for _, d in held) == (dtype == torch.bfloat16
                                           and small_gemm.library() is not None)
        assert _call(unet, seed=2).shape == want.shape
    assert all(torch.equal(g, want) for g in got)
    assert not _packed(unet)
    _same_state(unet, before)
    assert torch.equal(_call(unet, channels_last=True), want)


def test_bfloat16_packs_only_where_onednn_takes_it(monkeypatch):
    """On a CPU whose oneDNN has no bfloat16 path (AVX2 only: AMD Zen 3, most desktop Intel
    before Sapphire Rapids), its packed ops raise "bf16 path needs the cpu support ..."; there
    nothing is packed (a `--dtype bfloat16` run crashed there) and the UNet's calls are the
    dense ones (computed in float32: winograd.computes_in_float32). The rule is oneDNN's own
    answer (packs)."""
    unet = _unet(torch.bfloat16)
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: False)
    want = _call(unet)  # the dense call under the same rule, on any CPU
    assert not packing.packs(torch.bfloat16) and packing.packs(torch.float32)
    with packing.packed_weights(unet) as n:
        assert n == 0 and not _packed(unet)
        assert torch.equal(_call(unet), want)
    assert packing.pack(_unet(torch.float32)) == len(_convs(unet))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_come_back_when_the_block_fails(dtype):
    unet = _unet(dtype)
    before = _state(unet)
    with pytest.raises(KeyboardInterrupt):
        with packing.packed_weights(unet):
            _call(unet)
            raise KeyboardInterrupt
    assert not _packed(unet)
    _same_state(unet, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_what_asks_for_the_weights_gets_the_dense_ones(dtype):
    """Packed for good (pack): the weight read, the state_dict, .to, a call with gradients
    and load_state_dict each see (and restore) the dense weights."""
    unet = _unet(dtype)
    before, want = _state(unet), _call(unet, channels_last=True)
    assert packing.pack(unet) == len(_convs(unet))
    _call(unet)
    _same_state(unet, before, layout=False)  # from the packed weights (they stay packed)
    assert len(_packed(unet)) == len(_convs(unet))
    w = unet.conv_in.weight  # reading the weight unpacks that convolution only
    assert type(unet.conv_in) is winograd.Conv2d  # its own class back
    assert torch.equal(w, before["conv_in.weight"][0])
    assert len(_packed(unet)) == len(_convs(unet)) - 1
    assert torch.equal(_call(unet, channels_last=True), want)

    x, t, ctx = _inputs(dtype)  # a call with gradients (a LoRA training's)
    x.requires_grad_(True)
    unet(x, t, context=ctx).float().sum().backward()
    assert x.grad is not None and not _packed(unet)

    packing.pack(unet)
    _call(unet)
    unet.load_state_dict({k: v for k, (v, _) in before.items()})
    assert not _packed(unet)
    packing.pack(unet)
    _call(unet)
    unet.to(torch.float32)
    assert not _packed(unet) and unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(unet.conv_in.weight, before["conv_in.weight"][0].float())


def test_float32_packs_bit_for_bit_and_disabled_packs_nothing():
    """Float32 too, for a channels-last input as pipelines give it (a contiguous one only
    within rounding: the dense kernel for that layout rounds differently); its weights come
    back bit for bit. Float16 is not packed."""
    unet = _unet(torch.float32)
    before, want, contiguous = _state(unet), _call(unet, channels_last=True), _call(unet)
    with packing.packed_weights(unet) as n:
        assert n == len(_convs(unet)) == len(_packed(unet)) > 0
        got = _call(unet, channels_last=True)
        assert all(m._parameters["weight"].numel() == 0 for m in _convs(unet))
        torch.testing.assert_close(_call(unet), contiguous, rtol=1e-5,
                                   atol=1e-5 * contiguous.abs().max().item())
    assert torch.equal(got, want)
    _same_state(unet, before)
    assert torch.equal(_call(unet, channels_last=True), want)
    half = _unet(torch.float16)
    with packing.packed_weights(half) as n:
        assert n == 0 and not _packed(half)
    bf = _unet(torch.bfloat16)
    with packing.packed_weights(bf, enabled=False) as n:
        assert n == 0 and not _packed(bf)


def _status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, clear_refs")
def test_packing_holds_one_copy_beside_the_weight_at_most():
    """oneDNN's reorder of a plain (contiguous) weight holds two copies beside it at its peak
    (SD 1.5's 2560 -> 1280 convolutions: +236 MB at a float32 UNet's first call), of a
    channels-last one the packed copy only: a packed convolution reorders from channels-last.
    Its results are unchanged."""
    conv = torch.nn.Conv2d(1024, 1024, 3, padding=1)  # 36 MiB float32, plain
    mb = conv.weight.numel() * 4 / 2 ** 20
    x = torch.randn(1, 1024, 4, 4).contiguous(memory_format=torch.channels_last)
    assert not winograd.worth_it(conv, x)
    with torch.no_grad():
        want = conv(x)
        packing.pack(conv)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
        before = _status_mb("VmRSS")
        got = conv(x)
        peak = _status_mb("VmHWM") - before
    assert type(conv) is packing.PackedConv2d and conv._packed is not None
    assert peak < 1.5 * mb, f"packing peaked at +{peak:.0f} MB for a {mb:.0f} MB weight"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_new_input_size_lays_the_weight_out_again_once(capfd, dtype):
    """oneDNN's layout of a weight depends on the input's size (a 1280-channel 3x3 weight on a
    Zen 3: 32 output channels a block for 2x2 inputs, 24 for 8x8), and a convolution handed a
    weight laid out for another size reorders it at every call (a UNet run at 128 px, then at
    256, ran 5x slower at 256 px for good): at a new size the weight is laid out again, once,
    so oneDNN's log (its verbose mode) shows no reorder in the calls after; the outputs are
    the dense convolution's."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dtype)
    sizes = (2, 2, 8, 8, 8, 2, 2)
    xs = [torch.randn(2, 256, s, s).to(dtype).contiguous(memory_format=torch.channels_last)
          for s in sizes]
    with torch.no_grad():
        want = [conv(x) for x in xs]
        packing.pack(conv)
        capfd.readouterr()
        logs = []
        for x in xs:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                got = conv(x)
            logs.append(capfd.readouterr().out)
            torch.testing.assert_close(got, want[len(logs) - 1], rtol=1e-5, atol=1e-5)
    assert all(",convolution," in log for log in logs), "oneDNN's verbose mode logs nothing"
    reorders = [log.count(",reorder,") for log in logs]
    again = [i for i in range(1, len(sizes)) if sizes[i] == sizes[i - 1]]
    assert [reorders[i] for i in again] == [0] * len(again), (sizes, reorders)


def test_a_training_run_that_samples_trains_on_dense_weights(tmp_path, monkeypatch):
    """The loop's samples go through a pipeline, which packs the UNet it is given (float32
    too): the loop unpacks it after sampling, so the model it goes on training, its EMA and
    its checkpoints hold dense weights, and the run's loss stays finite."""
    from nanodiffusion.train import TrainConfig, train

    cfg = TrainConfig(part="lcm", teacher="shapes", out=str(tmp_path / "run"), image_size=64,
                      steps=4, batch_size=4, log_every=1, ckpt_every=2, sample_every=2,
                      warmup=1, solver_steps=10)
    seen = []
    real = packing.unpack

    def spy(module):
        seen.append(len(_packed(module)))
        real(module)
        assert not _packed(module)

    monkeypatch.setattr(packing, "unpack", spy)  # the loop calls packing.unpack
    records = train(cfg, progress=False)
    assert seen and all(n > 0 for n in seen)  # it was packed, then unpacked
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.fixture(scope="module")
def bf16():
    return nanodiffusion.load("shapes", dtype=torch.bfloat16)


def _no_packing(monkeypatch):
    monkeypatch.setattr(packing, "available", lambda: False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pipeline_packs_and_images_are_unchanged(monkeypatch, bf16, dtype):
    """A pipeline's UNet and VAE decoder stay packed from one call to the next (not the VAE
    encoder), and its images are the ones it makes unpacked: bit for bit in bfloat16; in
    float32 within one level on at most 0.1% of the bytes (on an AMD Zen 4, oneDNN's dense and
    packed kernels round the shapes VAE's 64-channel 3x3 convolutions at batch 1 differently,
    by up to 6e-6: one level in one byte of the image)."""
    pipe = bf16 if dtype == "bfloat16" else nanodiffusion.load("shapes")
    a = pipe.generate(PROMPT, seed=4, steps=5, n=2)
    if packing.packs(getattr(torch, dtype)):
        assert len(_packed(pipe.unet)) == len(_convs(pipe.unet))
        assert len(_packed(pipe.vae.decoder)) == len(_convs(pipe.vae.decoder))
    else:  # bfloat16 on an AVX2-only CPU: made on torch's own kernels
        assert not _packed(pipe.unet) and not _packed(pipe.vae.decoder)
    assert not _packed(pipe.vae.encoder)
    b = pipe.generate(PROMPT, seed=4, steps=2)
    packing.unpack(pipe.unet)
    packing.unpack(pipe.vae)
    with monkeypatch.context() as m:
        _no_packing(m)
        _same_image(a, pipe.generate(PROMPT, seed=4, steps=5, n=2), dtype)
        _same_image(b, pipe.generate(PROMPT, seed=4, steps=2), dtype)
        assert not _packed(pipe.unet) and not _packed(pipe.vae)


def _same_image(packed, dense, dtype):
    if dtype == "float32":
        return tiny_sd.assert_float32_rounding_apart(packed, dense)
    assert [x.tobytes() for x in packed] == [x.tobytes() for x in dense]


def test_lora_fused_into_a_packed_unet(monkeypatch, tmp_path, bf16):
    """(bfloat16, or float32 where this CPU packs no bfloat16.)"""
    dtype = DTYPES[0]
    pipe = bf16 if dtype == torch.bfloat16 else nanodiffusion.load("shapes")
    path = write_kohya(tmp_path / "locon.safetensors",
                       random_layers(unet_targets(pipe.unet), seed=3, std=0.05))
    pipe.generate(PROMPT, seed=1, steps=3)
    assert _packed(pipe.unet)
    pipe.load_lora(path, 0.8)
    got = pipe.generate(PROMPT, seed=6, steps=4)
    pipe.unload_loras()
    plain = nanodiffusion.load("shapes", dtype=dtype)
    _no_packing(monkeypatch)
    plain.load_lora(path, 0.8)
    want = plain.generate(PROMPT, seed=6, steps=4)
    _same_image(got, want, str(dtype).removeprefix("torch."))


def test_low_memory_packs_every_loop(monkeypatch, bf16):
    """Low memory: the UNet goes to disk after each loop, so it is packed for each loop and
    unpacked at its end; the images are the default's."""
    low = nanodiffusion.load("shapes", dtype=torch.bfloat16, low_memory=True)
    counts, real = [], packing.packed_weights

    def spy(module, enabled=True):
        counts.append(enabled)
        return real(module, enabled)

    monkeypatch.setattr("nanodiffusion.pipelines.sd.packed_weights", spy)
    for steps in (5, 3):
        img = low.generate(PROMPT, seed=2, steps=steps)[0]
        assert img.tobytes() == bf16.generate(PROMPT, seed=2, steps=steps)[0].tobytes()
    assert counts == [True, True] and not _packed(low.unet)


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_memory_unpacks_to_the_files_own_weights(monkeypatch, dtype):
    """Unpacking low memory's UNet after its loop gives each convolution back the dense weight
    it had, its mapped file's bytes (PackedConv2d._file_weight: the file is clean), not a copy
    reordered back from the packed one (about 0.4 s of each SD 1.5 call at 512 px); the image
    is the default's, and so is the next one's."""
    low = nanodiffusion.load("shapes", dtype=dtype, low_memory=True)
    plain = nanodiffusion.load("shapes", dtype=dtype)
    reorders = []
    real = torch.Tensor.to_dense
    monkeypatch.setattr(torch.Tensor, "to_dense", lambda t, *a, **k: reorders.append(1) or real(t, *a, **k))
    with low.resident(low.unet) as held:  # kept in memory past the loop, to look at
        img = low.generate(PROMPT, seed=2, steps=5)[0]
        start, size = held.mapping.data_ptr(), held.mapping.nbytes()
        convs = _convs(low.unet)
        assert convs and not _packed(low.unet) and not held.dirty
        for m in convs:
            w = m._parameters["weight"].data
            assert start <= w.data_ptr() < start + size, "a copy, not the file's weight"
    assert not reorders
    assert img.tobytes() == plain.generate(PROMPT, seed=2, steps=5)[0].tobytes()
    assert (low.generate(PROMPT, seed=3, steps=6)[0].tobytes()
            == plain.generate(PROMPT, seed=3, steps=6)[0].tobytes())


def _linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_float32_linears_run_on_onednn_and_images_stay_within_rounding():
    """A float32 pipeline's linear layers (UNet, text encoder, VAE) are OneDNNLinear and its
    calls reach oneDNN's product; its images are those of torch's own linear within float32
    rounding (tiny_sd.assert_float32_rounding_apart)."""
    pipe = nanodiffusion.load("shapes")
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        assert _linears(part) and all(type(m) is packing.OneDNNLinear for m in _linears(part))
    with torch.profiler.profile() as prof:
        fast = pipe.generate(PROMPT, seed=3, steps=3, n=2)
    assert "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        for m in _linears(part):
            m.__class__ = torch.nn.Linear
    pipe._prompt_cache.clear()
    tiny_sd.assert_float32_rounding_apart(fast, pipe.generate(PROMPT, seed=3, steps=3, n=2))


def test_onednn_linear_keeps_nn_linear_where_it_should():
    """OneDNNLinear: float32 without gradients within rounding of nn.Linear; with gradients and
    below ONEDNN_LINEAR_MIN_MACS it is nn.Linear's own call, bit for bit, and gradients flow as
    they do there; bfloat16 on oneDNN gives nn.Linear's values (whose bfloat16 product is
    oneDNN's too), and where oneDNN has no bfloat16 it computes in float32: test_winograd."""
    torch.manual_seed(0)
    fast, plain = packing.OneDNNLinear(96, 160), torch.nn.Linear(96, 160)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 40, 96)  # 3 x 40 x 96 x 160 multiply-adds: over the floor
    assert x.numel() * 160 >= packing.ONEDNN_LINEAR_MIN_MACS
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        small = x[:1, :2]
        assert torch.equal(fast(small), plain(small))
        got, want = fast.to(torch.bfloat16)(x.bfloat16()), plain.to(torch.bfloat16)(x.bfloat16())
        if winograd.onednn_bfloat16():
            assert torch.equal(got, want)
        else:  # computed in float32 (winograd.computes_in_float32): bfloat16 rounding apart
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7)
    fast.float(), plain.float()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), plain(xb)
    assert torch.equal(ya, yb)
    ya.square().sum().backward(), yb.square().sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(fast.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_packed_convolution_adds_into_the_residual(dtype):
    """PackedConv2d.add_into: other += conv(x) in other's own memory, within the output's
    rounding of conv(x) + other (one rounding where there were two), for a 1x1 too, and the
    same bits as packing.add_into on the unpacked layer (so packing changes no image); None,
    other untouched, with gradients, with another dtype, layout or shape of other, and for a
    float32 call Winograd runs. layers.conv_residual falls back to residual() there."""
    import copy

    from nanodiffusion.models import layers

    torch.manual_seed(0)
    cl = torch.channels_last
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    for conv, shape in ((torch.nn.Conv2d(16, 32, 3, padding=1), (2, 16, 9, 7)),
                        (torch.nn.Conv2d(16, 32, 1), (1, 16, 5, 5))):
        conv = conv.to(dtype).to(memory_format=cl)
        dense = copy.deepcopy(conv)
        packing.pack(conv)
        assert type(conv) is packing.PackedConv2d
        x = torch.randn(shape).to(dtype).contiguous(memory_format=cl)
        other = torch.randn(shape[0], 32, *shape[2:]).to(dtype).contiguous(memory_format=cl)
        with torch.no_grad():
            want = conv(x).float() + other.float()
            into = other.clone(memory_format=cl)
            got = conv.add_into(x, into)
            assert got is not None and got.data_ptr() == into.data_ptr()
            assert torch.equal(packing.add_into(dense, x, other.clone(memory_format=cl)), got)
            assert (got.float() - want).abs().max() <= tol * want.abs().max()
            for bad in (other.contiguous(), other.to(torch.float16), other[:, :16]):
                kept = bad.clone()
                assert conv.add_into(x, bad) is None and torch.equal(bad, kept)
            assert torch.equal(layers.conv_residual(conv, x, other.contiguous()).float(),
                               (conv(x) + other).float())
        xg = x.clone().requires_grad_()
        assert conv.add_into(xg, other.clone(memory_format=cl)) is None
    if dtype == torch.float32:  # a wide 3x3 at 32x32: Winograd's, not the packed kernel's
        wide = torch.nn.Conv2d(256, 256, 3, padding=1).to(memory_format=cl)
        packing.pack(wide)
        x = torch.randn(1, 256, 32, 32).contiguous(memory_format=cl)
        assert winograd.worth_it(wide, x)
        with torch.no_grad():
            assert wide.add_into(x, torch.zeros(1, 256, 32, 32).contiguous(memory_format=cl)) is None


def test_vae_resblocks_add_their_residual_in_the_kernel(monkeypatch):
    """A packed VAE decoder's ResBlocks add their residual in conv2's epilogue
    (layers.conv_residual), with the image of the separate addition within rounding."""
    from nanodiffusion.models import vae

    torch.manual_seed(0)
    cfg = vae.VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=16)
    for dtype, tol in [(d, 1e-4 if d == torch.float32 else 0.05) for d in DTYPES]:
        model = vae.for_inference(vae.VAE(cfg).eval()).to(dtype)
        z = packing.cpu_input(torch.randn(1, 4, 12, 12).to(dtype))
        calls = []
        real = packing.PackedConv2d.add_into
        monkeypatch.setattr(packing.PackedConv2d, "add_into",
                            lambda self, x, o: calls.append(1) or real(self, x, o))
        with torch.no_grad(), packing.packed_weights(model.decoder):
            fused = model.decode(z).float()
            assert len(calls) == 6  # the mid block's two ResBlocks, the two up blocks' two each
            monkeypatch.setattr(packing.PackedConv2d, "add_into", lambda self, x, o: None)
            apart = model.decode(z).float()
        monkeypatch.undo()
        assert (fused - apart).abs().max() <= tol, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [64, 256])
def test_transformer_blocks_add_their_residuals_in_the_products(monkeypatch, dtype, tokens):
    """A UNet transformer block at inference adds its three residuals (after attn1's and attn2's
    to_out and the feed-forward's last linear) in those products' epilogues
    (packing.linear_add: oneDNN's binary add, or small_gemm's for few bfloat16 rows), where
    the call runs on oneDNN; its output is within rounding of the steps apart (float32) and no
    further from float64 than they are (bfloat16)."""
    from nanodiffusion.models.unet import TransformerBlock
    torch.manual_seed(0)
    block = TransformerBlock(320, 8, 64, upcast=False).eval()
    exact = TransformerBlock(320, 8, 64, upcast=False).double().eval()
    exact.load_state_dict(block.state_dict())
    block.to(dtype)
    packing.onednn_linears(block)
    x = torch.randn(2, tokens, 320).to(dtype)
    context = torch.randn(2, 77, 64).to(dtype)
    fused = []
    real = packing.linear_add
    monkeypatch.setattr(packing, "linear_add",
                        lambda *a: fused.append(real(*a)) or fused[-1])
    with torch.no_grad():
        got = block(x, context).double()
        monkeypatch.setattr(packing, "linear_add", lambda *a: None)  # the steps apart
        apart = block(x, context).double()
        want = exact(x.double(), context.double())
        out = block.ff.net[2]
        takes = out.on_onednn(torch.empty(2, tokens, 1280, dtype=dtype), out.weight)
    assert len(fused) == 3 and all((f is not None) == takes for f in fused)
    if dtype == torch.float32:
        torch.testing.assert_close(got, apart, rtol=1e-5, atol=1e-5)
    else:
        assert (got - want).abs().mean() <= (apart - want).abs().mean() * 1.1


def test_channels_last_lays_weights_out_in_their_own_memory():
    """packing.channels_last (the UNet's, the VAE's and the tiny decoder's for_inference) lays
    4-d weights out as `.to(memory_format=torch.channels_last)` does, the same values, but in
    the memory each already has: only one scratch tensor's pages are new (`.to` faults in a
    whole new copy of the weights: SD 1.5's bfloat16 UNet, 1.1 GB, 1.1 s of its load). A
    weight in a buffer torch did not allocate (a file's mapping) is copied, its buffer left as
    it was; 1-d and 2-d weights are untouched."""
    import ctypes
    import resource

    torch.manual_seed(0)
    convs = torch.nn.Sequential(*(torch.nn.Conv2d(512, 512, 3) for _ in range(4)),
                                torch.nn.Linear(8, 8))
    want = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v.clone()
            for k, v in convs.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in convs.state_dict().items()}
    raw = (ctypes.c_float * (8 * 8 * 3 * 3))()  # as files.read_safetensors's mapped tensors
    mapped = torch.frombuffer(raw, dtype=torch.float32).view(8, 8, 3, 3)
    mapped.copy_(torch.randn(8, 8, 3, 3))
    as_read = mapped.clone()
    extra = torch.nn.Conv2d(8, 8, 3)
    extra.weight.data = mapped
    pages = convs[0].weight.numel() * 4 // 4096  # one weight's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert packing.channels_last(convs) is convs
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    packing.channels_last(extra)
    for k, v in convs.state_dict().items():
        assert torch.equal(v, want[k]) and v.stride() == want[k].stride(), k
        assert v.data_ptr() == ptrs[k], f"{k} moved to new memory"
    assert faults < 2 * pages, f"{faults} page faults for 4 weights of {pages} pages each"
    assert extra.weight.is_contiguous(memory_format=torch.channels_last)
    assert extra.weight.data_ptr() != mapped.data_ptr() and torch.equal(mapped, as_read)
    assert torch.equal(extra.weight, as_read)


def test_bfloat16_for_inference_keeps_the_weights_where_they_are():
    """The UNet's and the VAE's for_inference lay a bfloat16 model's convolutions out
    channels-last in the memory the weights have (packing.channels_last), not in a new copy."""
    from nanodiffusion.models import vae

    torch.manual_seed(0)
    unet = UNet(CFG).to(torch.bfloat16)
    model = vae.VAE(vae.TINY).to(torch.bfloat16)
    for m, prepare, laid in ((unet, for_inference, unet), (model, vae.for_inference, model.decoder)):
        ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
        prepare(m)
        convs = [c for c in laid.modules() if isinstance(c, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                             for c in convs)
        moved = [k for k, v in m.state_dict().items() if v.data_ptr() != ptrs[k]]
        assert not moved, f"for_inference copied {moved[:3]}"
