"""Winograd's F(4x4, 3x3) convolution, for the wide float32 3x3 convolutions of the UNet and the
VAE decoder on the CPU.

A 3x3 convolution done directly costs 9 multiply-adds per output, input channel and output
channel. Winograd's minimal filtering algorithm (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks") computes each 4x4 block of outputs from a 6x6 tile of input in
36 products per channel pair instead of 144: the tile and the filter are each taken to a
6x6 "transformed" space by fixed matrices (BT d B, G g GT), multiplied elementwise there (36
matrix products over the channels: the work, on oneDNN: `products`), and brought back (AT m A).
That is 4x fewer multiply-adds, paid for with the transforms (memory-bound) and with rounding:
the transformed values are sums of up to 36 terms with weights up to 8, so float32 results
differ from the direct ones by ~1e-5 of the output's scale (the direct convolution's own
rounding is ~1e-6). bfloat16 arithmetic would lose too much; the arithmetic is float32 only
(bfloat16 layers on CPUs without bfloat16 arithmetic compute in float32: computes_in_float32).

The transform matrices are the Toom-Cook ones at the points 0, 1, -1, 2, -2 and infinity,
built exactly from fractions (`_matrices`). The filter transform is done at each call (a 3x3
filter becomes 6x6: kept, it would be 4x the weights' memory). Of the transformed tiles and
filters, the smaller are held whole and the others made a piece at a time (tiles in chunks of
at most CHUNK bytes, filters in blocks of at most SCRATCH_MAX: `conv3x3`), so a call holds
little more than its input and output.

`worth_it(conv, x)` is the one rule of where it is used: stride 1, padding 1, no dilation or
groups, float32 arithmetic on the CPU, at least 256 channels in and out, and at least 32x32
outputs. Single convolutions against the packed direct one, 2 threads of an AMX Xeon (/tmp
script, filter transform included): 320 channels at 32x32 (batch 2) 1.7x, at 64x64 2.3x; 640
at 32x32 1.3x; 512 at 64x64 1.3x, at 128x128 2.1x; 256 at 256x256 1.2x. Below the rule: 640 at
16x16 0.5x and 1280 at 16x16 0.35x (the filter transform, 36 C K floats written at each call,
costs more than the few tiles save); 128 channels at 256x256 0.6x (memory-bound transforms)"""
import threading
from fractions import Fraction
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_attention, small_gemm

M, R = 4, 3          # outputs per tile side, filter side
A = M + R - 1        # tile side: 6
# bytes of transformed tiles per chunk: SD's VAE decoder at 512 px in float32 6.6 s at 16 MB
# against 7.3-8.1 at 4 MB (each of oneDNN's 36 products per chunk has a fixed cost: at 4 MB,
# 256 channels at 256x256 are chunks of 64 tiles)
CHUNK = 16 << 20
MIN_CHANNELS, MIN_SIDE = 256, 32
# bytes of float32 weights (or transformed filters) a call holds at once where it can take
# them a block of output channels at a time (output_blocks): conv3x3's filters when its tiles
# are fewer, and the float32 copies of bfloat16 weights (float32_weight)
SCRATCH_MAX = 32 << 20


def _poly(roots):
    """Coefficients (lowest first) of prod (x - r)."""
    c = [Fraction(1)]
    for r in roots:
        c = [Fraction(0)] + c  # x * c
        for i in range(len(c) - 1):
            c[i] -= r * c[i + 1]
    return c


@lru_cache(maxsize=None)
def _matrices():
    """AT (M, A), G (A, R), BT (A, A) as float64 tensors, exact: Toom-Cook at the points 0,
    +-1, +-2 and infinity (the last row/column of each)."""
    pts = [Fraction(p) for p in (0, 1, -1, 2, -2)]
    at = [[p ** i for p in pts] + [Fraction(int(i == M - 1))] for i in range(M)]
    g, bt = [], []
    for p in pts:
        others = [q for q in pts if q != p]
        scale = 1
        for q in others:
            scale *= p - q
        g.append([p ** k / scale for k in range(R)])
        bt.append(_poly(others) + [Fraction(0)])
    g.append([Fraction(0)] * (R - 1) + [Fraction(1)])
    bt.append(_poly(pts))

    def t(rows):
        return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)
    return t(at), t(g), t(bt)


@lru_cache(maxsize=None)
def _kron():
    """The 2-D transforms as matrices on flattened tiles, float32: kron(BT, BT) (A², A²) for
    the input, kron(AT, AT) (M², A²) for the output, kron(G, G) (A², R²) for the filter."""
    at, g, bt = _matrices()
    return torch.kron(bt, bt).float(), torch.kron(at, at).float(), torch.kron(g, g).float()


def same_3x3(conv):
    """Whether `conv` (an nn.Conv2d) is a 3x3 convolution of stride 1 and zero padding 1, without
    dilation or groups: the ones Winograd's F(4x4, 3x3) (worth_it) and the upsampling's phase
    filters (models/upsample.py) compute."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def worth_it(conv, x):
    """Whether `conv` (an nn.Conv2d) on input `x` runs as Winograd here: see the module's doc."""
    return (same_3x3(conv) and (x.dtype == torch.float32 or computes_in_float32(x))
            and x.device.type == "cpu" and x.dim() == 4
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
            and min(x.shape[-2:]) >= MIN_SIDE)


def filter_transform(weight):
    """(K, C, 3, 3) -> (A², C, K): G g GT for each filter, as the matrix products take it (a
    transposed view of (A², K, C): one matrix product, no copy). Where on_mkl and it takes at
    most SCRATCH_MAX bytes, into a buffer this thread keeps for its next call (_thread_buffer:
    the result is valid until then), not a fresh tensor whose pages are faulted in at every call:
    SD 1.5's UNet at 256 px in float32, 2-core Intel Xeon with AMX, its 640 -> 640 and 960 ->
    320 filters 21.4 and 15.7 ms fresh against 4.7 and 3.7 into the buffer."""
    k, c = weight.shape[:2]
    g = weight.float().reshape(k * c, R * R).T
    if on_mkl() and A * A * k * c * 4 <= SCRATCH_MAX:
        u = torch.mm(_kron()[2], g, out=_thread_buffer("filters", A * A * k * c).view(A * A, k * c))
    else:
        u = _mm(_kron()[2], g)
    return u.view(A * A, k, c).transpose(1, 2)


def onednn_product():
    """oneDNN's matrix product, torch.ops.mkldnn._linear_pointwise (x @ w.T + b), or None where
    this torch lacks it: the one check, for these products and packing.OneDNNLinear."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


def _mm(a, b):
    """a @ b (a small transform matrix times long operands): torch's own where on_mkl, else on
    oneDNN where this torch has it (as `products`: on the 2-core AMD EPYC 2x faster than MKL's,
    the same values there)."""
    op = onednn_product()
    return a @ b if op is None or on_mkl() else op(a, b.T, None, "none", [], "")


@lru_cache(maxsize=None)
def on_mkl():
    """Whether Winograd's matrix products (`products`, `_mm`) run on torch's own, MKL's sgemm:
    on Intel CPUs, where MKL runs its AVX-512 code. On a 2-core Intel Xeon with AMX, against
    oneDNN's kernel (/tmp scripts, float32):
    - `products`, (A², T, C) tiles times (A², C, K): 64 x 320 -> 320 3.6 -> 1.8 ms, 128 x 320
      -> 320 5.2 -> 3.2, 896 x 128 -> 128 5.9 -> 3.4, 1024 x 512 -> 512 95 -> 89, 512 x 1280
      -> 1280 227 -> 225: never slower;
    - `_mm`: the filter transform of 204800 filters 5.0 -> 1.3 ms, the output transform of
      327680 columns 3.5 -> 1.8.
    Elsewhere (AMD) oneDNN's: MKL's sgemm runs its AVX2 code there (`products`)."""
    return torch.backends.mkl.is_available() and fused_attention.cpu_vendor() == "GenuineIntel"


def products(v, u):
    """torch.bmm(v, u) of the tiles (A², T, C) and the transformed filter (A², C, K, as
    filter_transform gives it): torch.bmm itself where on_mkl, else each of the A²
    products on oneDNN's kernel where this torch has it (torch.bmm's float32 is MKL's sgemm,
    which runs its AVX2 code on AMD CPUs: on a 2-core AMD EPYC with AVX-512 these products ran
    1.4-2x faster on oneDNN: 320 channels, 64 tiles 5.0 -> 2.5 ms; 512 channels, 1024 tiles
    119 -> 73 ms). The same products within float32 rounding."""
    op = onednn_product()
    if op is None or on_mkl():
        return torch.bmm(v, u)
    w = u.transpose(1, 2)  # (A², K, C): filter_transform's own layout, no copy
    out = v.new_empty(v.shape[0], v.shape[1], u.shape[2])
    for i in range(v.shape[0]):
        out[i] = op(v[i], w[i], None, "none", [], "")
    return out


def output_blocks(k, row_bytes):
    """Ranges (k0, k1) of `k` output channels, each of whose float32 rows of `row_bytes` take
    at most SCRATCH_MAX bytes, a multiple of 64 channels where a block holds that many: one
    range where all fit."""
    kc = max(1, SCRATCH_MAX // row_bytes)
    if kc >= k:
        return [(0, k)]
    kc -= kc % 64 if kc >= 64 else 0
    return [(k0, min(k, k0 + kc)) for k0 in range(0, k, kc)]


def _tiles(xh, b, r0, r):
    """The transformed 6x6 tiles (A², r tw, C) float32 of tile rows r0 ... r0 + r of image b of
    the NHWC `xh` (any float dtype: read into float32 here)."""
    h, w, c = xh.shape[1:]
    tw = -(-w // M)
    # the chunk's input rows r0 M - 1 ... (r0 + r) M, zero outside the image
    part = xh.new_zeros(r * M + 2, tw * M + 2, c, dtype=torch.float32)
    lo, hi = max(r0 * M - 1, 0), min((r0 + r) * M + 1, h)
    part[lo - (r0 * M - 1):hi - (r0 * M - 1), 1:w + 1] = xh[b, lo:hi]
    s = part.stride()  # its 6x6 tiles, 4 apart: (A, A, r, tw, c)
    tiles = part.as_strided((A, A, r, tw, c), (s[0], s[1], s[0] * M, s[1] * M, s[2]))
    return _mm(_kron()[0], tiles.reshape(A * A, -1)).view(A * A, r * tw, c)


def conv3x3(x, weight, bias=None, dtype=torch.float32):
    """The convolution of x (N, C, H, W) with weight (K, C, 3, 3), stride 1, zero padding 1,
    as Winograd F(4x4, 3x3): (N, K, H, W) in `dtype`, channels-last. The arithmetic is float32
    whatever the dtypes of x and the weight (bfloat16 ones are read into float32 a piece at a
    time, and a bfloat16 output rounded as each piece is written: computes_in_float32).
    Of the transformed tiles (A² N T C floats) and the transformed filter (A² C K), the smaller
    is held whole and the other made a piece at a time: tiles a chunk of at most CHUNK bytes of
    tile rows, filters a block of output channels of at most SCRATCH_MAX. So beyond its input
    and output a call holds ~4 CHUNKs or the tiles and ~2 SCRATCH_MAX: SD 1.5's 1280-channel
    3x3 at 32x32 (a 512 px UNet's) held its whole 236 MB transformed filter, now 24 MB of tiles
    and a 24 MB filter block."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    ka = _kron()[1]
    th, tw = -(-h // M), -(-w // M)  # tiles per side
    xh = x.permute(0, 2, 3, 1)  # NHWC: a view of a channels-last x
    out = torch.empty(n, th * M, tw * M, k, dtype=dtype)
    b32 = None if bias is None else bias.float()
    blocks = output_blocks(k, A * A * c * 4)
    whole_filter = len(blocks) == 1 or n * th * tw >= k  # the tiles take more than the filter
    if whole_filter:
        u = filter_transform(weight)
        rows = max(1, CHUNK // (A * A * tw * c * 4))  # tile rows per chunk
        for b in range(n):
            for r0 in range(0, th, rows):
                r = min(rows, th - r0)
                y = _mm(ka, products(_tiles(xh, b, r0, r), u).view(A * A, -1))
                y = y.view(M, M, r, tw, k)
                if b32 is not None:
                    y += b32
                out[b, r0 * M:(r0 + r) * M].view(r, M, tw, M, k).copy_(y.permute(2, 0, 3, 1, 4))
    else:  # all the tiles, the filter a block of output channels at a time
        v = torch.empty(A * A, n, th * tw, c)
        for b in range(n):
            v[:, b] = _tiles(xh, b, 0, th)
        v = v.view(A * A, n * th * tw, c)
        for k0, k1 in blocks:
            y = _mm(ka, products(v, filter_transform(weight[k0:k1])).view(A * A, -1))
            y = y.view(M, M, n, th, tw, k1 - k0)
            if b32 is not None:
                y += b32[k0:k1]
            out.view(n, th, M, tw, M, k)[..., k0:k1].copy_(y.permute(2, 3, 0, 4, 1, 5))
    if (th * M, tw * M) != (h, w):
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


@lru_cache(maxsize=None)
def onednn_bfloat16():
    """Whether this CPU's oneDNN computes bfloat16 (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT):
    oneDNN's own answer, asked once. Where it does not (AVX2 only: AMD Zen 3, desktop Intel
    before Sapphire Rapids) its bfloat16 ops raise and torch falls back to kernels of 1-20
    GFLOP/s (`computes_in_float32`)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (ops is not None and torch.backends.mkldnn.is_available()
            and bool(ops._is_mkldnn_bf16_supported()))


@lru_cache(maxsize=None)
def float16_tiles():
    """Whether this CPU multiplies float16 matrices on AMX's tiles (AMX-FP16: Intel's Granite
    Rapids), where oneDNN's float16 kernels run there. Elsewhere torch's and oneDNN's float16
    products are float32's speed at best: on a 2-core Xeon with AMX-BF16 and AVX512-FP16 but
    no AMX-FP16, a 2048^3 product 386 GFLOP/s (float32 373, bfloat16 2628) and a 3x3
    convolution (320 channels, 32x32) 240 (float32 410); AVX2-only CPUs have no float16
    arithmetic at all (a 2-core AMD EPYC Zen 3: that convolution at 1.3 GFLOP/s,
    MEASUREMENTS). Asked once: computes_in_float32 asks it at every float16 layer's call."""
    return "amx_fp16" in fused_attention.cpu_flags()


def computes_in_float32(x):
    """Whether a bfloat16 or float16 layer (Conv2d here, packing.OneDNNLinear) computes its
    call on `x` in float32 (when it needs no gradient: needs_grad): on the CPU, bfloat16 where
    oneDNN has none (onednn_bfloat16), float16 where the CPU has no float16 tiles
    (float16_tiles). Its weights stay in their dtype in memory and are read into float32 for
    the call, its input too, and its output is rounded to x's dtype: the products of bfloat16
    or float16 values are exact in float32, so this is their arithmetic summed in float32, as
    their kernels sum. On a 2-core AMD EPYC
    (Zen 3), SD 1.5's UNet call at 256 px (batch 2) in bfloat16: 17.2 s on torch's bfloat16
    kernels, 3.7-4.1 s so, float32 2.4-2.8 s. (Attention is not among them: float16 heads in
    float32 on the fused kernel were no faster than torch's float16 kernel on an AVX512-FP16
    Xeon, 177 against 175 ms for 2 x 8 heads of 4096 x 40.)"""
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return not onednn_bfloat16()
    return x.dtype == torch.float16 and not float16_tiles()


_SCRATCH = threading.local()
GEMM_MAX_SIDE = 8  # float32-computed convolutions on inputs this small run as im2col + product


def float32_weight(w):
    """`w` read into float32 (computes_in_float32), into a buffer this thread keeps for its next
    call: a fresh tensor that large is mapped anew by glibc at every call and paged in (SD
    1.5's 1280-channel 3x3 weight, 59 MB: 27 ms of page faults against ~3 ms of copying). The
    buffer grows to the largest weight read, at most SCRATCH_MAX bytes where weights are read a
    block at a time (in_float32), and lives as long as its thread; the result is valid until
    this thread's next call."""
    return _thread_buffer("buf", w.numel()).view(w.shape).copy_(w)


def _thread_buffer(name, n):
    """The first `n` floats of the float32 buffer `name` that this thread keeps (on _SCRATCH)
    for its next call, grown to the largest asked (the old buffer goes before the larger one is
    made): float32_weight's ("buf") and filter_transform's ("filters")."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < n:
        setattr(_SCRATCH, name, None)
        buf = torch.empty(n, dtype=torch.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:n]


def in_float32(x, weight, bias, call, dim, prepare=None):
    """A bfloat16 layer's call computed in float32 (computes_in_float32): call(x, w, b) on `x`,
    `weight` and `bias` read into float32, a block of the weight's output channels (its first
    dimension) at a time (output_blocks: at most SCRATCH_MAX bytes of float32 weights), each
    block's result rounded to x's dtype into its place along the output's dimension `dim`.
    `prepare`, if given, makes what `call` takes of the float32 input, once for all blocks.
    A block's products are those of the whole call's, so the blocks change no value; they keep
    the float32 copies of SD 1.5's widest weights (the UNet's 2560 -> 1280 3x3, 118 MB; its
    1280 -> 10240 feed-forward, 52 MB) out of memory."""
    x32, k = x.float(), weight.shape[0]
    if prepare is not None:
        x32 = prepare(x32)
    blocks = output_blocks(k, weight[0].numel() * 4)
    out = None
    for k0, k1 in blocks:
        y = call(x32, float32_weight(weight[k0:k1]),
                 None if bias is None else bias[k0:k1].float())
        if len(blocks) == 1:
            return y.to(x.dtype)
        if out is None:
            shape = list(y.shape)
            shape[dim] = k
            fmt = (torch.channels_last if y.dim() == 4
                   and y.is_contiguous(memory_format=torch.channels_last)
                   else torch.contiguous_format)
            out = torch.empty(shape, dtype=x.dtype, memory_format=fmt)
        out.narrow(dim, k0, k1 - k0).copy_(y)
    return out


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state dict) that runs as Winograd where `worth_it`
    says, without gradients: the UNet's and the VAE's stride-1 3x3 convolutions. Its packed
    form (models/packing.py) makes the same choice, so packing changes no bits. A bfloat16 call
    where oneDNN has no bfloat16 computes in float32 (`computes_in_float32`: Winograd's too,
    where worth_it says), and one of few output pixels on an AMX CPU runs as one product of its
    columns (`small_gemm.takes_conv`, which the packed form asks too: bfloat16 on small_gemm's
    kernel, float32 with a large weight on its float32 kernel up to small_gemm.F32_ROWS rows,
    on oneDNN's product past them); the UNet and the VAE build all
    their convolutions from this class."""

    def forward(self, x):
        if needs_grad(self, x):
            return super().forward(x)
        if worth_it(self, x):
            return conv3x3(x, self.weight, self.bias, dtype=x.dtype)
        if not computes_in_float32(x):
            size = output_size(self, x)
            if small_gemm.takes_conv(self, x, self.weight.dtype, size):  # few rows, AMX CPU
                return small_gemm.conv2d(self, x, self.weight, size)
            return super().forward(x)
        plain = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if (plain and onednn_product() is not None and self.groups == 1
                and self.kernel_size != (1, 1) and max(x.shape[-2:]) <= GEMM_MAX_SIDE):
            return in_float32(x, self.weight, self.bias, self._product, 1, self._columns)
        if (plain and self.stride == (1, 1) and self.dilation == (1, 1)
                and x.numel() * 4 > 2 * CHUNK):
            return self._in_bands(x)
        return in_float32(x, self.weight, self.bias, self._conv_forward, 1)

    # A call computed in float32 (computes_in_float32) that Winograd does not take runs the
    # direct kernel (F.conv2d: oneDNN's) on float32 weights, but on inputs of at most
    # GEMM_MAX_SIDE per side as im2col and one oneDNN product per block of output channels
    # (_columns, then _product). The direct kernel reorders a dense weight at each call (a
    # packed one is not kept here: it would be float32), which on small inputs costs more than
    # the convolution (SD 1.5's 1280-channel 3x3 at 4x4, batch 2, 2 threads of a Zen 3: 100 ms
    # direct, 38 as a product; at 16x16 and above the direct kernel is as fast or faster).
    def _columns(self, x):
        """x's im2col columns (N, L, C R R), contiguous, and the output's (N, Ho, Wo)."""
        ho, wo = output_size(self, x)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        return cols.transpose(1, 2).contiguous(), (x.shape[0], ho, wo)

    def _in_bands(self, x):
        """A stride-1 call computed in float32 on a large input, a band of output rows at a
        time: each band's input rows (and the rows of zero padding it needs) read into float32,
        at most ~CHUNK bytes, and its output rounded into place as it is made. SD 1.5's VAE
        decoder at 512 px in bfloat16 held its 256-channel 512x512 input in float32 (268 MB)
        and the 128-channel output (134 MB) beside the bfloat16 ones."""
        n, c, h, w = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
        out = torch.empty(n, self.out_channels, ho, wo, dtype=x.dtype,
                          memory_format=torch.channels_last)
        rows = max(1, CHUNK // (n * c * w * 4))  # output rows per band

        def conv(band, wt, b):  # the rows' padding is in the band
            return F.conv2d(band, wt, b, 1, (0, pw), 1, self.groups)
        for o0 in range(0, ho, rows):
            o1 = min(ho, o0 + rows)
            i0, i1 = o0 - ph, o1 - ph + kh - 1  # the input rows it needs, zero outside
            band = torch.empty(n, c, i1 - i0, w, memory_format=torch.channels_last)
            lo, hi = max(i0, 0), min(i1, h)
            band[:, :, :lo - i0].zero_()
            band[:, :, hi - i0:].zero_()
            band[:, :, lo - i0:hi - i0] = x[:, :, lo:hi]
            out[:, :, o0:o1] = in_float32(band, self.weight, self.bias, conv, 1)
        return out

    def _product(self, columns, w, b):
        """The convolution of _columns' input with float32 weights `w`, `b`: channels-last."""
        cols, (n, ho, wo) = columns
        k = w.shape[0]
        y = onednn_product()(cols, w.reshape(k, -1), b, "none", [], "")  # (n, L, k)
        return y.view(n, ho, wo, k).permute(0, 3, 1, 2)


def output_size(conv, x):
    """The (height, width) of a Conv2d `conv`'s output on `x` (its padding, dilation, kernel
    and stride: torch's formula)."""
    return tuple((s + 2 * p - d * (r - 1) - 1) // st + 1 for s, p, d, r, st in zip(
        x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def needs_grad(conv, x):
    """Whether a call of `conv` (or any layer with a weight: packing.OneDNNLinear) on `x` is to
    be differentiated (the direct kernel then)."""
    return torch.is_grad_enabled() and (x.requires_grad
                                        or conv._parameters["weight"].requires_grad)
