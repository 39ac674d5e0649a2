"""The few-row products of models/small_gemm.cpp, bfloat16 on AMX's tiles and float32 on
AVX-512: built where the CPU has AMX and Linux grants the tiles, within rounding of float64
(no more error than oneDNN's product), and the paths that take them at inference: Linear layers (packing.OneDNNLinear,
GEGLU) and packed convolutions (their columns), which give the weight back as it was."""
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.models import fused_attention, layers, packing, small_gemm, winograd

CL = torch.channels_last
BF = torch.bfloat16


def _here():
    return "amx" in fused_attention.cpu_levels() and shutil.which("g++") is not None


def test_built_wherever_the_cpu_and_a_compiler_allow():
    assert (small_gemm.library() is not None) == _here()
    x = torch.randn(4, 64, dtype=BF)
    assert small_gemm.takes(x, 64, 64, 4) == _here()
    # float32 needs no build of ours (oneDNN's product is its fallback), where measured
    # faster: AMX CPUs
    assert small_gemm.takes(x.float(), 2048, 2048, 4) == fused_attention.amx()


def test_turned_off_by_its_environment_variable():
    code = ("from nanodiffusion.models import small_gemm as s; import torch; "
            "x = torch.randn(4, 64, dtype=torch.bfloat16); "
            "print(s.library() is None, s.takes(x, 64, 64, 4), s.takes(x.float(), 4096, 4096, 4))")
    env = {"NANODIFFUSION_SMALL_GEMM": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_what_it_takes():
    """bfloat16 (K and N multiples of 32) and float32 (weights of FLOAT32_MIN_WEIGHT elements
    or more) only, at most MAX_ROWS of the dtype."""
    x = torch.randn(4, 64, dtype=BF)
    assert not small_gemm.takes(x.half(), 64, 64, 4)
    if _here():
        assert small_gemm.takes(x, 64, 64, small_gemm.MAX_ROWS[BF])
        assert not small_gemm.takes(x, 64, 64, small_gemm.MAX_ROWS[BF] + 1)
        assert not small_gemm.takes(x, 48, 64, 4) and not small_gemm.takes(x, 64, 36, 4)
    else:
        assert not small_gemm.takes(x, 64, 64, 4)
    # a Linear layer's bfloat16 product of any number of rows (the kernel of many rows past
    # MAX_ROWS); convolutions' columns and float32 as `takes`
    many = small_gemm.MAX_ROWS[BF] + 1
    assert small_gemm.linear_takes(x, 64, 64, many) == _here()
    assert small_gemm.linear_takes(x, 64, 64, 8192) == _here()
    assert not small_gemm.linear_takes(x, 48, 64, many)
    assert not small_gemm.linear_takes(x, 64, 36, many)
    f32, big = small_gemm.MAX_ROWS[torch.float32], small_gemm.FLOAT32_MIN_WEIGHT
    assert small_gemm.takes(x.float(), -(-big // 1000), 1000, f32) == fused_attention.amx()
    assert not small_gemm.takes(x.float(), big // 1000, 1000, f32)  # 304 elements short
    assert not small_gemm.takes(x.float(), -(-big // 1000), 1000, f32 + 1)


def test_values_within_bfloat16_rounding_of_float64():
    """Row counts off the kernel's blocks (1, 17, 33, 160), a row stride past K, with and
    without bias, K in one chunk and in several (small_gemm.cpp's X_CHUNK of x's tiles: at
    160 rows 100 k tiles a chunk, at 128 rows 128, at 33 rows 256; the last chunk whole or
    short); and the kernel of many rows (past MAX_ROWS): its threads sharing the rows (more
    rows than columns) or the columns, x's last block short of 32 rows or not, w in one chunk
    of W_CHUNK bytes or several: the mean error against float64 at most oneDNN's (the sums in
    float32, one rounding), and no element off by more than two of the output's bfloat16
    steps."""
    if not _here():
        return
    torch.manual_seed(0)
    for M, K, N, bias in ((1, 32, 32, True), (17, 320, 64, False), (33, 1280, 96, True),
                          (160, 768, 128, True), (32, 2880, 320, True), (160, 6432, 96, True),
                          (128, 8192, 64, False), (33, 8224, 32, True),
                          (161, 64, 32, True), (200, 320, 1280, True), (1000, 320, 64, False),
                          (1031, 2560, 640, True), (300, 5120, 1280, True), (4096, 96, 96, True)):
        base = torch.randn(M, K + 32, dtype=BF)
        x = base[:, 16:16 + K]  # rows K apart in a wider tensor
        w = (torch.randn(N, K) / K ** 0.5).to(BF)
        b = torch.randn(N, dtype=BF) if bias else None
        with torch.no_grad():
            y = small_gemm.linear(x, w, b)
            ref = x.double() @ w.double().T + (0 if b is None else b.double())
            one = torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
        assert y.dtype == BF and y.shape == (M, N)
        err, err_onednn = (y.double() - ref).abs(), (one.double() - ref).abs()
        assert err.mean() <= err_onednn.mean() * 1.1, (M, K, N)
        assert (err <= 2 * 2.0 ** -8 * ref.abs() + 1e-3).all(), (M, K, N)


def test_many_rows_whatever_the_threads():
    """The kernel of many rows shares out x's rows or w's among however many threads torch
    has (1, 3: blocks that do not divide evenly, a thread with none): the same values as with
    two, within rounding of float64."""
    if not _here():
        return
    torch.manual_seed(0)
    before = torch.get_num_threads()
    try:
        for M, K, N in ((1000, 320, 64), (200, 64, 1280), (161, 64, 32)):
            x = torch.randn(M, K, dtype=BF)
            w = (torch.randn(N, K) / K ** 0.5).to(BF)
            ref = x.double() @ w.double().T
            got = []
            for threads in (2, 1, 3, 7):
                torch.set_num_threads(threads)
                with torch.no_grad():
                    got.append(small_gemm.linear(x, w))
            for y in got:
                assert torch.equal(y, got[0]), (M, K, N)  # each sum over all of K, in order
            assert ((got[0].double() - ref).abs() <= 2 * 2.0 ** -8 * ref.abs() + 1e-3).all()
    finally:
        torch.set_num_threads(before)


def _unfused(x, w, b, act, other, op):
    """torch's bfloat16 steps, each rounded: the product, the activation, the residual or gate"""
    y = F.linear(x, w, b)
    y = {"none": y, "quick_gelu": y * torch.sigmoid(1.702 * y), "gelu": F.gelu(y)}[act]
    return {"none": y, "add": y + other if other is not None else y,
            "mul": y * other if other is not None else y}[op]


@pytest.mark.parametrize("act", ["none", "quick_gelu", "gelu"])
@pytest.mark.parametrize("op", ["none", "add", "mul"])
def test_the_epilogue_within_bfloat16_rounding_of_float64(act, op):
    """act(x w^T + b) op other in the kernel's epilogue (CLIP's quick GELU and residuals,
    GEGLU's GELU and gate): against float64, each element within two of the output's bfloat16
    steps and the mean error below torch's unfused bfloat16 steps' (one rounding, not three);
    a float32 bias as a bfloat16 one is (the kernel reads either); large inputs saturate the
    activations (no inf or NaN)."""
    if not _here():
        return
    torch.manual_seed(0)
    for M, K, N in ((154, 768, 3072), (17, 320, 64), (32, 1280, 1280), (200, 320, 96),
                    (1030, 64, 640)):
        x = torch.randn(M, K, dtype=BF)
        w = (torch.randn(N, K) * 3 / K ** 0.5).to(BF)  # outputs to +-12: the activations' tails
        b = torch.randn(N, dtype=BF)
        other = torch.randn(M, N, dtype=BF) if op != "none" else None
        with torch.no_grad():
            y = small_gemm.linear(x, w, b, act=act, other=other, op=op)
            y32 = small_gemm.linear(x, w, b.float(), act=act, other=other, op=op)
            ref = _unfused(*(t if t is None else t.double() for t in (x, w, b)), act,
                           None if other is None else other.double(), op)
            torch_bf16 = _unfused(x, w, b, act, other, op)
        assert torch.equal(y, y32), (M, K, N)
        err = (y.double() - ref).abs()
        assert torch.isfinite(y).all()
        assert (err <= 2 * 2.0 ** -8 * ref.abs() + 2e-3 * ref.abs().max()).all(), (M, K, N)
        assert err.mean() <= (torch_bf16.double() - ref).abs().mean() * 1.05, (M, K, N)


def test_geglu_in_one_product_of_many_rows():
    """GEGLU's h * GELU(gate) past MAX_ROWS rows as one product (gated_gelu: h's and the gate's
    tiles side by side, one rounding): within two bfloat16 steps of float64 and below the
    two products' error (the gate rounded before its multiply), whatever splits the threads
    and the chunks make; the two products at MAX_ROWS rows and below."""
    if not _here():
        return
    torch.manual_seed(0)
    for M, K, N in ((161, 64, 32), (1000, 320, 1280), (300, 2560, 640), (8200, 64, 32)):
        x = torch.randn(M, K, dtype=BF)
        w = (torch.randn(2 * N, K) * 3 / K ** 0.5).to(BF)
        b = torch.randn(2 * N, dtype=BF)
        with torch.no_grad():
            y = small_gemm.gated_gelu(x, w, b)
            two = small_gemm.linear(x, w[:N], b[:N], op="mul",
                                    other=small_gemm.linear(x, w[N:], b[N:], act="gelu"))
            h, g = (x.double() @ w.double().T + b.double()).chunk(2, dim=-1)
        ref = h * F.gelu(g)
        assert y.shape == (M, N) and y.dtype == BF
        err = (y.double() - ref).abs()
        assert (err <= 2 * 2.0 ** -8 * ref.abs() + 2e-3 * ref.abs().max()).all(), (M, K, N)
        assert err.mean() < (two.double() - ref).abs().mean(), (M, K, N)
    calls = []
    real = small_gemm.linear
    with pytest.MonkeyPatch.context() as m:
        m.setattr(small_gemm, "linear", lambda *a, **k: calls.append(k.get("act")) or real(*a, **k))
        small_gemm.gated_gelu(torch.randn(small_gemm.MAX_ROWS[BF], 64, dtype=BF), w[:64], b[:64])
    assert calls == ["gelu", None]  # the gate's product, then h's with it multiplied in


def test_the_epilogue_refuses_what_it_does_not_know():
    x, w = torch.randn(4, 64, dtype=BF), torch.randn(64, 64, dtype=BF)
    if _here():
        with pytest.raises(ValueError, match="act must be one of"):
            small_gemm.linear(x, w, act="relu")
        with pytest.raises(ValueError, match="other is given exactly where op is not 'none'"):
            small_gemm.linear(x, w, op="add")
        with pytest.raises(ValueError, match="act='geglu' takes more than 160 rows and no op"):
            small_gemm.linear(x, w, act="geglu")
    with pytest.raises(ValueError, match="bfloat16 products only"):
        small_gemm.linear(torch.randn(4, 4096), torch.randn(4096, 4096), act="gelu")


def _ops(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def test_float32_values_within_rounding_of_float64():
    """float32 up to F32_ROWS rows (N a multiple of 4) on the kernel, more on oneDNN's product:
    row counts of one and two vectors and off them (1, 5, 16, 17, 32), K of any size, a row
    stride past K, with and without bias; no element further from float64 than twice oneDNN's
    worst (the kernel's sums in chunks of 128 k)."""
    torch.manual_seed(0)
    for M, K, N, bias in ((1, 37, 4, True), (5, 300, 100, False), (16, 1000, 64, True),
                          (17, 2880, 320, True), (32, 11520, 128, True), (33, 640, 64, True),
                          (8, 640, 66, False)):
        base = torch.randn(M, K + 16)
        x = base[:, 8:8 + K]  # rows K + 16 apart
        w = torch.randn(N, K) / K ** 0.5
        b = torch.randn(N) if bias else None
        with torch.no_grad():
            y, ops = _ops(lambda: small_gemm.linear(x, w, b))
            ref = x.double() @ w.double().T + (0 if b is None else b.double())
            one = torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
        kernel = M <= small_gemm.F32_ROWS and N % 4 == 0 and _here()
        assert ("nanodiffusion::small_linear" in ops) == kernel, (M, K, N, ops)
        assert ("mkldnn::_linear_pointwise" in ops) != kernel, (M, K, N, ops)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        err, err_onednn = (y.double() - ref).abs(), (one.double() - ref).abs()
        assert err.max() <= 2 * err_onednn.max() + 1e-7, (M, K, N, err.max(), err_onednn.max())


def test_linear_layers_take_it(monkeypatch):
    """OneDNNLinear (and GEGLU through it) runs its bfloat16 products on the kernels, few rows
    and many (GEGLU's as one product there); the results within bfloat16 rounding of
    float64."""
    calls = []
    real = small_gemm.linear
    monkeypatch.setattr(small_gemm, "linear",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    torch.manual_seed(0)
    lin = nn.Linear(320, 640).to(BF)
    packing.onednn_linears(lin)
    geglu = layers.GEGLU(320, 640).to(BF)
    packing.onednn_linears(geglu)
    for rows in (8, 2 * small_gemm.MAX_ROWS[BF]):
        x = torch.randn(2, rows // 2, 320, dtype=BF)
        calls.clear()
        with torch.no_grad():
            y, g = lin(x), geglu(x)
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        h, gate = F.linear(x.double(), geglu.proj.weight.double(),
                           geglu.proj.bias.double()).chunk(2, dim=-1)
        assert (y.double() - ref).abs().max() <= 2.0 ** -7 * ref.abs().max()
        gref = h * F.gelu(gate)
        assert (g.double() - gref).abs().max() <= 2.0 ** -6 * gref.abs().max()
        few = rows <= small_gemm.MAX_ROWS[BF]
        assert len(calls) == ((3 if few else 2) if _here() else 0)


def _oihw_columns(x, size, stride):
    """The reference: x's 3x3 columns (padding 1) in a dense weight's row order (c, kh, kw)."""
    n, c = x.shape[:2]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    s = xp.stride()
    return xp.as_strided((n, *size, c, 3, 3), (s[0], s[1] * stride, s[2] * stride, s[3], s[1],
                                               s[2])).reshape(n * size[0] * size[1], 9 * c)


def test_float32_few_row_convolutions_read_the_weight_where_it_lies(monkeypatch):
    """Float32 convolutions of few output pixels (AMX CPUs) read the dense weight as a file
    holds it (OIHW), x's columns in its row order (small_gemm.columns, dense: the library's
    nd_columns_f32 where it runs, a strided copy elsewhere, the same values): packed, the first
    call lays no weight out anew, so a weight still in its file's mapping stays there."""
    torch.manual_seed(0)
    for c, stride, side in ((64, 1, 4), (64, 2, 8), (40, 1, 4)):  # 40: no multiple of 16
        conv = nn.Conv2d(c, 32, 3, stride=stride, padding=1)
        x = torch.randn(2, c, side, side).contiguous(memory_format=CL)
        size = winograd.output_size(conv, x)
        want = _oihw_columns(x, size, stride)
        assert torch.equal(small_gemm.columns(conv, x, size, dense=True), want)
        with monkeypatch.context() as m:
            m.setattr(small_gemm, "library", lambda: None)
            assert torch.equal(small_gemm.columns(conv, x, size, dense=True), want)
    conv = winograd.Conv2d(768, 640, 3, padding=1)  # a weight past FLOAT32_MIN_WEIGHT
    x = torch.randn(2, 768, 4, 4).contiguous(memory_format=CL)
    few = small_gemm.takes_conv(conv, x, torch.float32, (4, 4))
    assert few == fused_attention.amx()
    weight = conv.weight.detach()
    packing.pack(conv)
    with torch.no_grad():
        y = conv(x)
    ref = F.conv2d(x.double(), weight.double(), conv.bias.double(), 1, 1)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if few:
        assert conv._parameters["weight"].data_ptr() == weight.data_ptr()
        assert conv._parameters["weight"].is_contiguous()


@pytest.mark.parametrize("dtype", [BF, torch.float32])
@pytest.mark.parametrize("kernel,stride,padding,layout", [(3, 1, 1, CL), (3, 2, 1, CL),
                                                          (1, 1, 0, CL),
                                                          (3, 1, 1, torch.contiguous_format)])
def test_packed_convolutions_take_it_at_small_sizes(kernel, stride, padding, layout, dtype,
                                                    monkeypatch):
    """A packed convolution (winograd.Conv2d's, as the UNet and the VAE build them) runs few
    output pixels as one product of its columns against the dense weight (channels-last for
    bfloat16, as a file holds it for float32: small_gemm.weight_layout; bfloat16 on the
    kernel; float32, for a large weight, on the float32 kernel up to F32_ROWS rows, else
    oneDNN's product) and many on
    oneDNN's packed weight, both within rounding of float64, bit for bit the plain layer's
    (whose weight need not be channels-last), and moving between the two sizes leaves its
    weight as it was: state_dict's values, and unpacked its values and layout."""
    calls = []
    real = small_gemm.conv2d
    monkeypatch.setattr(small_gemm, "conv2d", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cin, cout = (64, 96) if dtype == BF else (768, 640) if kernel == 3 else (2048, 2048)
    conv = winograd.Conv2d(cin, cout, kernel, stride=stride, padding=padding).to(dtype)
    conv.weight.data.mul_(8 / cin ** 0.5)  # outputs of a similar scale whatever the width
    conv.to(memory_format=layout)
    before = conv.weight.detach().clone()
    stride_before = conv.weight.stride()
    xs = [torch.randn(2, cin, s, s, dtype=dtype).contiguous(memory_format=CL)
          for s in (4, 32, 5, 4)]
    with torch.no_grad():
        plain = [conv(x) for x in xs]
    packing.pack(conv)
    bound = 2.0 ** -7 if dtype == BF else 1e-4  # float32: sums of up to 6912 products
    for x, want in zip(xs, plain):
        side = x.shape[-1]
        calls.clear()
        with torch.no_grad():
            y = conv(x)
        ref = F.conv2d(x.double(), before.double(), conv.bias.double(), stride, padding)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
        assert (y.double() - ref).abs().max() <= bound * ref.abs().max(), side
        rows = 2 * ref.shape[2] * ref.shape[3]
        small = (rows <= small_gemm.MAX_ROWS[dtype] and fused_attention.amx()
                 and (dtype != BF or _here()))
        assert len(calls) == small, side
        # the plain layer's bits where the same product ran, and where oneDNN's packed
        # convolution ran in bfloat16 (packing's contract; float32 within rounding there)
        if small or dtype == BF:
            assert torch.equal(y, want), side
    assert torch.equal(conv.state_dict()["weight"], before)
    packing.unpack(conv)
    assert torch.equal(conv.weight, before) and conv.weight.stride() == stride_before
