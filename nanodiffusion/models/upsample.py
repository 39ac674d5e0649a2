"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution (the VAE decoder's Upsample,
diffusers' Upsample2D; the tiny decoder's upsamplings and the convs after them), computed on
the small input: `upsample_conv`.

Each output pixel (2i + a, 2j + b) of conv(upsample(x)) sees a 3x3 window of the upsampled
image, which holds only 2x2 distinct pixels of x: rows i - 1 and i for a = 0 (the filter's
rows 1 and 2 fall on the same row of x, so they are summed), rows i and i + 1 for a = 1 (rows 0
and 1 summed), and the same for columns. So each of the four phases (a, b) is a 2x2
convolution of x with a filter whose taps are sums of the 3x3 one's (`phase_filters`), and the
four stacked as 4 K output channels are one 2x2 convolution of x, padded by one: its output at
position (p, q) holds phase (a, b)'s pixel (p - a, q - b). That is 4 multiply-adds per output
pixel and channel pair instead of 9 (2.25x fewer), and the 4x larger upsampled input is never
made: the output is written from that convolution's result a band of rows at a time
(BAND_BYTES of it), so a call holds its input, its output and one band.

The results are rounding apart from the direct ones: the summed taps are rounded once to the
weight's dtype (float32 sums of float32 or bfloat16 taps), and each output sums 4 C products
instead of 9 C. Against float64 on the same weights and input, SD 1.5's decoder shapes (/tmp
script, random weights, outputs of scale ~8) gave max errors 0.019-0.021 in bfloat16 against
the direct convolution's 0.016 (its output's rounding alone), and in float32 below the
direct's (a 64-channel one: 2.0e-6 against 4.3e-6). On SD 1.5's shapes in bfloat16, 2-core
Intel Xeon with AMX: 512 channels 64 -> 128 px 26 -> 29 ms, 128 -> 256 px 155 -> 90 ms,
256 channels 256 -> 512 px 190 -> 135 ms. The tiny decoder (TAESD, 64 channels) at 512 px:
bfloat16 204-228 -> 176-211 ms, float32 646-733 -> 598-645 ms (two interleaved pairs).

`takes(conv, x)` is the one rule of where it is used: inference (no gradient), the CPU, a
channels-last input, a zero-padded 3x3 convolution of stride 1 and padding 1, a dtype oneDNN
computes (packing.packs: float32, and bfloat16 where the CPU has it), and not where Winograd
takes the direct call (float32 with wide channels: winograd.worth_it on the upsampled input,
4x fewer multiply-adds than direct against these 2.25x)."""
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import packing, winograd

BAND_BYTES = 16 << 20  # the 2x2 convolution's output a band of rows holds (all images)


def takes(conv, x):
    """Whether `upsample_conv` computes conv(upsample(x)) here: see the module's text."""
    if not (x.dim() == 4 and x.device.type == "cpu" and winograd.same_3x3(conv)
            and x.is_contiguous(memory_format=torch.channels_last)
            and packing.packs(x.dtype) and not winograd.needs_grad(conv, x)):
        return False
    n, c, h, w = x.shape
    return not winograd.worth_it(conv, x.new_empty(()).expand(n, c, 2 * h, 2 * w))


def phase_filters(weight):
    """(K, C, 3, 3) -> (4 K, C, 2, 2) channels-last: the four phases' filters, phase (a, b) the
    output channels (2 a + b) K to (2 a + b + 1) K, each tap a float32 sum of the 3x3 taps that
    fall on it, rounded once to the weight's dtype."""
    k, c = weight.shape[:2]
    f = _taps() @ weight.float().reshape(k * c, 9).T  # (16, K C): (a, b, y, x) by (k, c)
    out = torch.empty(2, 2, k, 2, 2, c, dtype=weight.dtype)  # (a, b, k, y, x, c)
    out.copy_(f.view(2, 2, 2, 2, k, c).permute(0, 1, 4, 2, 3, 5))
    return out.view(4 * k, 2, 2, c).permute(0, 3, 1, 2)


@lru_cache(maxsize=None)
def _taps():
    """(16, 9) float32 of 0s and 1s: which of the 3x3 taps (i, j) sum into phase (a, b)'s 2x2
    tap (y, x). Along one side, phase 0's taps are [0], [1, 2] and phase 1's [0, 1], [2]."""
    s = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float32)
    return torch.einsum("ayi,bxj->abyxij", s, s).reshape(16, 9)


def upsample_conv(conv, x):
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a call `takes` takes, as the
    four phases' 2x2 convolution of x, a band of x's rows at a time: -> (N, K, 2H, 2W),
    channels-last."""
    n, c, h, w = x.shape
    weight = packing.dense_weight(conv)
    k = weight.shape[0]
    w4 = phase_filters(weight)
    b4 = None if conv.bias is None else conv.bias.detach().repeat(4)
    most = max(1, BAND_BYTES // (n * (w + 1) * 4 * k * x.element_size()) - 1)
    rows = -(-h // -(-h // most))  # bands of even heights, at most `most` rows each
    # a band's input: its rows of x with the one above and the one below (zeros past the
    # edges and past the last row), so that every band has the same shape, laid out once
    band = torch.zeros(n, rows + 2, w, c, dtype=x.dtype).permute(0, 3, 1, 2)  # channels-last
    run = _runner(w4, b4, band)
    out = x.new_empty(n, 2 * h, 2 * w, k)  # NHWC: channels-last (N, K, 2H, 2W) when permuted
    phases = out.view(n, h, 2, w, 2, k)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
        if r0 == 0 or r1 + 1 > h:  # the edges' zero rows (and a short last band's)
            band.zero_()
        band[:, :, lo - (r0 - 1):hi - (r0 - 1)].copy_(x[:, :, lo:hi])
        y = run(band).permute(0, 2, 3, 1)  # (N, rows + 1, W + 1, 4 K): position (p, q)
        for a in range(2):
            for b in range(2):
                ph = 2 * a + b
                phases[:, r0:r1, a, :, b].copy_(y[:, a:a + r1 - r0, b:b + w, ph * k:(ph + 1) * k])
    return out.permute(0, 3, 1, 2)


def _runner(w4, b4, band):
    """band -> its 2x2 convolution with w4 (padded by one column each side): on oneDNN's
    kernel with the filter laid out once for the band's shape where this torch has it
    (packing.available), else torch's."""
    if not packing.available():
        return lambda xb: F.conv2d(xb, w4, b4, padding=(0, 1))
    packed = torch.ops.mkldnn._reorder_convolution_weight(w4, [0, 1], [1, 1], [1, 1], 1,
                                                          list(band.shape))
    return lambda xb: torch.ops.mkldnn._convolution_pointwise(
        xb, packed, b4, [0, 1], [1, 1], [1, 1], 1, "none", [], "")
