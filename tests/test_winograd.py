"""Winograd F(4x4, 3x3) for the wide float32 convolutions (issue 23 item 3, models/winograd.py):
exact transforms, the direct convolution's results within float32 rounding at any size, chunk
and layout; one rule of where it runs; the plain, packed and low-memory paths making the same
choice, so their images stay equal (bit for bit but for oneDNN's own packed-against-dense
rounding on some CPUs: tiny_sd.assert_float32_rounding_apart)."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nanodiffusion
import tiny_sd
from nanodiffusion.models import fused_attention, packing, winograd

PROMPT = "a red circle above a blue square"


def test_the_transforms_are_exact():
    """One dimension: AT ((G g) * (BT d)) is the correlation of d (6) with g (3), in float64."""
    at, g, bt = winograd._matrices()
    torch.manual_seed(0)
    for _ in range(5):
        d, f = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        want = torch.stack([d[i:i + 3] @ f for i in range(4)])
        assert torch.allclose(at @ ((g @ f) * (bt @ d)), want, rtol=0, atol=1e-12)


def _relative_error(got, x, w, b):
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("n, c, k, h, w, bias, chunk, block", [
    (2, 8, 5, 13, 10, False, None, None),   # sides not a multiple of 4
    (1, 16, 16, 32, 32, True, None, None),
    (2, 8, 3, 9, 7, True, 1, None),          # one tile row per chunk
    (1, 3, 4, 1, 1, True, None, None),       # smaller than a tile
    (2, 8, 70, 9, 10, True, None, 16),       # fewer tiles than filters: filters in blocks
    (1, 8, 64, 7, 5, False, None, 64),       # ... that fit one block
    (2, 8, 20, 16, 16, True, None, 4),       # more tiles than filters: filters whole
])
def test_conv3x3_is_the_direct_convolution(monkeypatch, n, c, k, h, w, bias, chunk, block):
    """... at any size, chunk and layout; where its tiles (A² N T C floats) are fewer than its
    transformed filters' (A² C K), all tiles are held and the filters transformed a block of
    output channels at a time (at most SCRATCH_MAX bytes: SD 1.5's 1280-channel 3x3 at 32x32
    held a 236 MB transformed filter), else the filters whole."""
    if chunk is not None:
        monkeypatch.setattr(winograd, "CHUNK", chunk)
    if block is not None:
        monkeypatch.setattr(winograd, "SCRATCH_MAX", 36 * c * 4 * block)
    transformed = []
    real = winograd.filter_transform
    monkeypatch.setattr(winograd, "filter_transform",
                        lambda wt: transformed.append(wt.shape[0]) or real(wt))
    g = torch.Generator().manual_seed(n * h + w)
    x = torch.randn(n, c, h, w, generator=g)
    wt, b = torch.randn(k, c, 3, 3, generator=g), torch.randn(k, generator=g) if bias else None
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        transformed.clear()
        got = winograd.conv3x3(inp, wt, b)
        assert got.shape == (n, k, h, w) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert _relative_error(got, x, wt, b) < 5e-6
        tiles = n * -(-h // 4) * -(-w // 4)
        if block is None or tiles >= k:
            assert transformed == [k]
        else:
            assert sum(transformed) == k and max(transformed) <= block, transformed


def test_where_it_runs(monkeypatch):
    wide = torch.nn.Conv2d(256, 256, 3, padding=1)
    x = torch.zeros(1, 256, 32, 32)
    assert winograd.worth_it(wide, x)
    assert not winograd.worth_it(wide, x[..., :31, :])                        # too small
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: True)
    assert not winograd.worth_it(wide, x.bfloat16())           # float32 arithmetic only
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: False)
    assert winograd.worth_it(wide, x.bfloat16())               # computed in float32 there
    monkeypatch.setattr(winograd, "float16_tiles", lambda: True)
    assert not winograd.worth_it(wide, x.half())               # float16 on its tiles
    monkeypatch.setattr(winograd, "float16_tiles", lambda: False)
    assert winograd.worth_it(wide, x.half())                   # else in float32
    assert not winograd.worth_it(torch.nn.Conv2d(255, 256, 3, padding=1), x[:, :255])
    for other in (dict(stride=2, padding=1), dict(padding=2, dilation=2),
                  dict(padding=1, groups=2), dict(padding=1, padding_mode="reflect"),
                  dict(padding=0)):
        assert not winograd.worth_it(torch.nn.Conv2d(256, 256, 3, **other), x), other
    assert not winograd.worth_it(torch.nn.Conv2d(256, 256, 1), x)


def _wide(seed=0):
    torch.manual_seed(seed)
    return winograd.Conv2d(256, 256, 3, padding=1)


def test_the_module_packed_or_not_makes_the_same_choice():
    """Without gradients a wide convolution is Winograd's, bit for bit, before and after
    packing (a packed one gives its dense weight back for it), and the direct kernel below the
    rule's size; with gradients, always the direct kernel."""
    conv = _wide()
    g = torch.Generator().manual_seed(1)
    big = torch.randn(1, 256, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    small = big[..., :16, :16].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = winograd.conv3x3(big, conv.weight, conv.bias)
        direct = F.conv2d(big, conv.weight, conv.bias, padding=1)
        assert not torch.equal(want, direct)
        assert ((want - direct).abs().max() / direct.abs().max()) < 5e-5
        assert torch.equal(conv(big), want)
        seq = torch.nn.Sequential(conv)
        packing.pack(seq)
        small_want = F.conv2d(small, seq[0]._parameters["weight"], conv.bias, padding=1)
        if packing.available():
            assert type(seq[0]) is packing.PackedConv2d
            assert torch.equal(seq[0](small), small_want)  # packs its weight
            assert seq[0]._packed is not None
        assert torch.equal(seq[0](big), want)
    grad = seq[0](big)  # with gradients: unpacked, the direct kernel
    assert type(seq[0]) is winograd.Conv2d and torch.equal(grad.detach(), direct)


@pytest.fixture
def everywhere(monkeypatch):
    """The rule widened to every 3x3 convolution of the bundled model (its widths and latent
    sizes are below SD's), so its pipelines run Winograd throughout."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_SIDE", 1)


def test_pipelines_run_it_and_low_memory_still_gives_the_default_bytes(everywhere, monkeypatch):
    calls = []
    real = winograd.conv3x3

    def spy(x, weight, bias=None, dtype=torch.float32):
        calls.append(x.shape)
        return real(x, weight, bias, dtype)

    monkeypatch.setattr(winograd, "conv3x3", spy)
    pipe = nanodiffusion.load("shapes")
    low = nanodiffusion.load("shapes", low_memory=True)
    for steps in (3, 5):
        calls.clear()
        a = pipe.generate(PROMPT, seed=3, steps=steps)[0]
        assert calls  # the UNet's and the VAE decoder's convolutions
        b = low.generate(PROMPT, seed=3, steps=steps)[0]
        tiny_sd.assert_float32_rounding_apart([a], [b])
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 10 ** 9)  # the direct kernels alone
    c = nanodiffusion.load("shapes").generate(PROMPT, seed=3, steps=5)[0]
    diff = (torch.tensor(list(a.tobytes())) - torch.tensor(list(c.tobytes()))).abs()
    assert diff.max() <= 2


@pytest.mark.parametrize("on_mkl", [False, True])
def test_the_products_run_on_the_kernel_of_the_rule_and_equal_bmm(monkeypatch, on_mkl):
    """The 36 products of the transformed tiles and filter (winograd.products) are torch.bmm's
    within float32 rounding, and a convolution's run as one torch.bmm where on_mkl
    (Intel CPUs: MKL's AVX-512 code), else on oneDNN's kernel (torch.bmm's float32 is MKL's,
    which runs AVX2 code on AMD CPUs); its transforms (winograd._mm) on the same."""
    monkeypatch.setattr(winograd, "on_mkl", lambda: on_mkl)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(36, 50, 24, generator=g)
    u = winograd.filter_transform(torch.randn(16, 24, 3, 3, generator=g))
    assert u.shape == (36, 24, 16)
    torch.testing.assert_close(winograd.products(v, u), torch.bmm(v, u), rtol=1e-5, atol=1e-5)
    x, w = torch.randn(1, 24, 12, 12, generator=g), torch.randn(16, 24, 3, 3, generator=g)
    with torch.profiler.profile() as prof:
        got = winograd.conv3x3(x, w)
    counts = {e.key: e.count for e in prof.key_averages()}
    if on_mkl:  # the filter's, the tiles' and the output's transforms, and the products
        assert counts.get("aten::bmm") == 1 and counts.get("aten::mm") == 3
        assert "mkldnn::_linear_pointwise" not in counts
    else:
        assert counts.get("aten::bmm", 0) == 0 and "aten::mm" not in counts
        assert counts.get("mkldnn::_linear_pointwise") == 36 + 3
    assert _relative_error(got, x, w, None) < 5e-6


def test_the_products_are_on_mkl_on_intel_cpus_only(monkeypatch):
    """on_mkl: where MKL is in this torch and the CPU is Intel's, not AMD's."""
    for vendor, expected in [("GenuineIntel", torch.backends.mkl.is_available()),
                             ("AuthenticAMD", False), ("", False)]:
        monkeypatch.setattr(fused_attention, "cpu_vendor", lambda v=vendor: v)
        winograd.on_mkl.cache_clear()
        assert winograd.on_mkl() is expected
    winograd.on_mkl.cache_clear()


class _Dtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtypes of the tensors each convolution and matrix product is called on
    (`seen`), and the shapes of the convolutions' inputs (`inputs`)."""

    PRODUCTS = ("convolution", "addmm", "mm", "bmm", "linear", "_linear_pointwise",
                "_convolution_pointwise", "mkldnn_convolution", "_slow_conv2d_forward",
                "small_linear")  # models/small_gemm.py's

    CONVOLUTIONS = ("convolution", "mkldnn_convolution", "_slow_conv2d_forward",
                    "_convolution_pointwise")

    def __init__(self):
        super().__init__()
        self.seen, self.inputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.PRODUCTS:
            self.seen.append((func.__name__, {a.dtype for a in args
                                              if isinstance(a, torch.Tensor)}))
        if name in self.CONVOLUTIONS:
            self.inputs.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


# (dtype, the check that says whether the CPU computes it, its relative rounding step)
LOW_PRECISION = [(torch.bfloat16, "onednn_bfloat16", 2 ** -8),
                 (torch.float16, "float16_tiles", 2 ** -11)]


@pytest.mark.parametrize("dtype, check, step", LOW_PRECISION)
def test_low_precision_computes_in_float32_where_the_cpu_has_none(monkeypatch, dtype, check,
                                                                   step):
    """On a CPU whose oneDNN has no bfloat16 (AVX2 only: AMD Zen 3), torch's bfloat16
    convolutions and products ran at 1-20 GFLOP/s (SD 1.5's UNet call at 256 px 17 s against
    float32's 2.4 s, its VAE decode past 10 minutes); float16 is as slow there, and on CPUs
    without float16 tiles (AMX-FP16) it runs at float32's speed at best. There a bfloat16 or
    float16 layer reads its weights and input into float32, computes in float32 and rounds its
    output to its dtype: every product runs on float32 tensors, and the result is the rounding
    of the exact one."""
    monkeypatch.setattr(winograd, check, lambda: False)
    torch.manual_seed(0)
    cases = [(winograd.Conv2d(256, 256, 3, padding=1), (1, 256, 32, 32)),  # Winograd's
             (winograd.Conv2d(64, 32, 3, padding=1), (2, 64, 8, 8)),
             (winograd.Conv2d(64, 32, 1), (2, 64, 8, 8)),
             (winograd.Conv2d(32, 32, 3, stride=2, padding=1), (2, 32, 16, 16)),
             (winograd.Conv2d(32, 16, 3, stride=2, padding=1), (2, 32, 7, 7)),  # im2col
             (packing.OneDNNLinear(96, 160), (3, 40, 96)),
             (packing.OneDNNLinear(8, 8), (1, 2, 8))]  # below ONEDNN_LINEAR_MIN_MACS
    for layer, shape in cases:
        layer = layer.to(dtype)
        x = torch.randn(shape).to(dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # as pipelines give it
        with torch.no_grad(), _Dtypes() as mode:
            got = layer(x)
        assert got.dtype == dtype and mode.seen, (layer, mode.seen)
        assert all(d == {torch.float32} for _, d in mode.seen), (layer, mode.seen)
        ref = (F.linear(x.double(), layer.weight.double(), layer.bias.double())
               if x.dim() == 3 else F.conv2d(x.double(), layer.weight.double(),
                                              layer.bias.double(), layer.stride, layer.padding))
        err = (got.double() - ref).abs()
        assert (err <= step * ref.abs() + 1e-4 * ref.abs().max()).all(), layer
    monkeypatch.setattr(winograd, check, lambda: True)  # elsewhere: in its own dtype
    layer, x = cases[-2][0], torch.randn(3, 40, 96).to(dtype)
    with torch.no_grad(), _Dtypes() as mode:
        layer(x)
    assert mode.seen and all(d == {dtype} for _, d in mode.seen), mode.seen


@pytest.mark.parametrize("tiles", [False, True])
def test_a_float16_pipeline_computes_in_float32_without_float16_tiles(monkeypatch, tiles):
    """`--dtype float16` on a CPU without AMX-FP16: the bundled model's text encoder, UNet and
    VAE decoder hold float16 weights and run every product in float32 (its image a float16
    rounding or so from float32's); with float16 tiles, on oneDNN's float16 kernels."""
    monkeypatch.setattr(winograd, "float16_tiles", lambda: tiles)
    pipe = nanodiffusion.load("shapes", dtype=torch.float16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float16}
    with torch.no_grad(), _Dtypes() as mode:
        got = pipe.generate(PROMPT, seed=3, steps=4)[0]
    kinds = {frozenset(d) for _, d in mode.seen}
    assert kinds == ({frozenset({torch.float16})} if tiles else {frozenset({torch.float32})}), kinds
    want = nanodiffusion.load("shapes").generate(PROMPT, seed=3, steps=4)[0]
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int))
    assert diff.mean() < 0.5 and diff.max() <= 16, (diff.mean(), diff.max())


def test_float32_copies_of_bfloat16_weights_are_made_a_block_at_a_time(monkeypatch):
    """Computed in float32, a bfloat16 layer reads its weight into float32 a block of output
    channels at a time (winograd.in_float32: at most SCRATCH_MAX bytes, the size its thread's
    buffer grows to; SD 1.5's 2560 -> 1280 3x3 held 118 MB), with the results of the whole
    call: bfloat16 rounding of the same float32 sums (to their last bits), in the whole call's
    layout."""
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: False)
    torch.manual_seed(0)
    cases = [(winograd.Conv2d(64, 200, 3, padding=1), (2, 64, 16, 16)),  # direct
             (winograd.Conv2d(64, 200, 3, padding=1), (2, 64, 4, 4)),    # im2col
             (winograd.Conv2d(64, 200, 3, stride=2, padding=1), (1, 64, 9, 9)),
             (winograd.Conv2d(576, 200, 1), (2, 576, 8, 8)),
             (packing.OneDNNLinear(576, 200), (2, 40, 576))]
    results = {}

    def run(scratch):
        monkeypatch.setattr(winograd, "SCRATCH_MAX", scratch)
        for i, (layer, shape) in enumerate(cases):
            layer = layer.bfloat16()
            x = torch.randn(shape, generator=torch.Generator().manual_seed(i)).bfloat16()
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                results.setdefault(scratch, []).append(layer(x))
        results[scratch, "buffer"] = winograd._SCRATCH.buf.numel() * 4

    for scratch in (1 << 30, 576 * 4 * 70):  # whole; blocks of 64 output channels (and 8)
        t = threading.Thread(target=run, args=(scratch,))  # its own buffer
        t.start()
        t.join()
    whole, blocks = results[1 << 30], results[576 * 4 * 70]
    assert results[576 * 4 * 70, "buffer"] <= 576 * 4 * 70 < results[1 << 30, "buffer"]
    for (layer, _), a, b in zip(cases, whole, blocks):
        assert a.dtype == b.dtype == torch.bfloat16
        assert a.shape == b.shape and a.stride() == b.stride()
        # one bfloat16 step at most: the float32 sums of a block may differ in their last bits
        # from the whole call's where oneDNN picks another kernel for the narrower product (an
        # Intel Xeon with AMX: 1.2e-4 at 0.03), and bfloat16's rounding may then step apart
        err = (a.float() - b.float()).abs()
        assert (err <= 2 ** -7 * a.float().abs() + 1e-6).all(), layer


def test_bfloat16_on_large_inputs_computes_in_float32_a_band_of_rows_at_a_time(monkeypatch):
    """Computed in float32 on a large input, a stride-1 convolution reads its input into
    float32 a band of output rows at a time (with the rows of padding each band needs: SD 1.5's
    VAE decoder at 512 px held a 268 MB float32 copy of its 256-channel input beside the
    bfloat16 one), and gives the whole call's results, in its layout."""
    monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: False)
    torch.manual_seed(0)
    cases = [winograd.Conv2d(16, 8, 3, padding=1), winograd.Conv2d(16, 8, 1),
             winograd.Conv2d(16, 8, 3, padding=0), winograd.Conv2d(16, 8, (3, 5), padding=(2, 1))]
    x = torch.randn(2, 16, 37, 21).bfloat16().contiguous(memory_format=torch.channels_last)
    for layer in cases:
        layer = layer.bfloat16()
        with torch.no_grad():
            whole = layer(x)  # 2 * 16 * 37 * 21 * 4 bytes: below 2 CHUNKs
            monkeypatch.setattr(winograd, "CHUNK", 2 * 16 * 21 * 4 * 5)  # 5 rows a band
            with _Dtypes() as mode:
                got = layer(x)
            monkeypatch.undo()
            monkeypatch.setattr(winograd, "onednn_bfloat16", lambda: False)
        assert len(mode.inputs) > 3 and max(s[2] for s in mode.inputs) <= 5 + 4, mode.inputs
        assert all(d == {torch.float32} for _, d in mode.seen), mode.seen
        assert got.dtype == torch.bfloat16 and got.shape == whole.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        err = (got.float() - whole.float()).abs()
        assert (err <= 2 ** -8 * whole.float().abs() + 1e-6).all(), layer
        ref = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), 1, layer.padding)
        assert ((got.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-4 * ref.abs().max()).all()


@pytest.mark.parametrize("on_mkl", [True, False])
def test_the_filter_transform_writes_into_this_threads_buffer(monkeypatch, on_mkl):
    """Where the transform runs on MKL (on_mkl) and fits SCRATCH_MAX, it writes into a buffer
    its thread keeps, not a fresh tensor paged in at every call: two calls, the second's filter
    smaller, return views of one storage, each the transform of its own filter (G g G^T, as
    _kron's exact matrices make it); a filter past SCRATCH_MAX, or oneDNN's transform, gets a
    tensor of its own."""
    monkeypatch.setattr(winograd, "on_mkl", lambda: on_mkl)
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(32, 24, 3, 3, generator=g), torch.randn(16, 8, 3, 3, generator=g)

    def reference(w):  # (A², C, K), each filter's G g G^T in float64
        G = winograd._matrices()[1]
        t = torch.einsum("ai,kcij,bj->abck", G, w.double(), G)
        return t.reshape(36, w.shape[1], w.shape[0])

    def run():
        kept = []  # both alive, so that a fresh second cannot take the first's freed memory
        for w in (w1, w2):
            kept.append(winograd.filter_transform(w))
            torch.testing.assert_close(kept[-1].double(), reference(w), rtol=1e-5, atol=1e-5)
        return [u.untyped_storage().data_ptr() for u in kept]

    first, second = [], []
    t = threading.Thread(target=lambda: first.extend(run()))  # a thread of its own: no buffer yet
    t.start(), t.join()
    assert (first[0] == first[1]) == on_mkl
    monkeypatch.setattr(winograd, "SCRATCH_MAX", 36 * 16 * 8 * 4 - 4)  # w2's transform past it
    t = threading.Thread(target=lambda: second.extend(run()))
    t.start(), t.join()
    assert second[0] != second[1]
