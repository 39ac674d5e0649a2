"""Products of few rows: y = x w^T + bias for Linear layers and, through their columns (im2col),
convolutions, where the weight is read once from memory for few rows and the time is that
read. SD 1.5's UNet at 256 px runs its 1280-channel levels at 4x4 and 8x8 (32 and 128 rows at
batch 2), and its text encoder 154 rows: oneDNN's kernels read those weights at 7-10 GB/s where
the two cores of an Intel Xeon with AMX read 26 (bfloat16, a 1280-channel 3x3 convolution at
4x4 as a product, 32 x 11520 -> 1280, its weight not in cache: 1.4 ms here, 2.2 on oneDNN's
product; oneDNN's convolution took 2.9 ms in the UNet's call).

bfloat16 runs on AMX's tiles (small_gemm.cpp); float32 convolutions with large weights run as
one product of their columns (oneDNN's convolution kernel is the slow one there): up to
F32_ROWS rows on small_gemm.cpp's float32 kernel (sums of outer products on AVX-512), more on
oneDNN's product.
`linear(x, weight, bias)` and `conv2d(conv, x, weight, size)` are the calls; `takes(x, n, k,
rows)` and `takes_conv(conv, x, dtype, size)` say which products they run: on the CPU (callers
route gradients elsewhere), at most MAX_ROWS[dtype] rows, where the CPU has AMX (the only kind
measured) and NANODIFFUSION_SMALL_GEMM is not 0; bfloat16 with K (the inputs per row) and N
(outputs) multiples of 32, where Linux grants the tiles and the build succeeds
(fused_attention's "amx" level and loader); float32 with N x K at least FLOAT32_MIN_WEIGHT.
Elsewhere oneDNN's kernels run as before. The kernel's sums are in float32 with one rounding,
as oneDNN's, in another order: the results differ in the last bfloat16 bit here and there (mean
error against float64 1.6e-3 of the output's scale, oneDNN's 2.0e-3); float32's differ from the
convolution's by float32 roundings.

Linear layers' bfloat16 products of more rows run on the same library's kernel of many rows
(`linear_takes`; nd_gemm_bf16), with the same epilogues, and GEGLU's two halves as one product
(`gated_gelu`): oneDNN's product spent as long on its GELU and gate epilogues as on the
product (8192 x 320 -> 1280 at 512 px: 2.3 ms plain, 5.3 with GELU), where the kernel runs
its epilogue between the next block's tile products. SD 1.5's bfloat16 UNet call, 2 threads of
an AMX Xeon, oneDNN's against these in one process, interleaved: 431 -> 408 ms at 256 px, 1631
-> 1544 ms at 512 px (its feed-forwards 236 -> 181 ms).
"""
import ctypes
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import fused_attention

SOURCE = Path(__file__).with_name("small_gemm.cpp")
LEVEL = "amx"
ENV = "NANODIFFUSION_SMALL_GEMM"
FUNCTIONS = {torch.bfloat16: "nd_small_gemm_bf16", torch.float32: "nd_small_gemm_f32"}
MANY_ROWS = "nd_gemm_bf16"  # bfloat16 past MAX_ROWS (linear_takes)
_i64, _p = ctypes.c_int64, ctypes.c_void_p
_int = ctypes.c_int
ARGTYPES = [_p, _i64, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, _p, _int, _int, _int, _int, _p, _i64]
# nd_columns_f32's: x, N, H, W, C, OH, OW, sh, sw, ph, pw, out, threads
COLUMNS_ARGTYPES = [_p] + [_i64] * 10 + [_p, _int]
# The bfloat16 kernel's epilogue (small_gemm.cpp's Act and Op): y = act(x w^T + bias) op other,
# in float32 before the one rounding, so that no pass over y is left to torch.
ACTS = {"none": 0, "quick_gelu": 1, "gelu": 2, "geglu": 3}  # geglu: gated_gelu's, many rows only
OPS = {"none": 0, "add": 1, "mul": 2}
# Rows taken, by dtype. bfloat16: up to here the weight's read from memory is the product's
# time and the kernel beats oneDNN's (2 threads, AMX Xeon, weights not in cache: 32 x 11520 ->
# 1280 1.4 against 2.2 ms, 154 x 768 -> 3072 0.9 against 1.3, 128 x 11520 -> 1280 both 3.7,
# before the kernel took K in chunks (small_gemm.cpp's X_CHUNK), which made the last 1.7-2.1
# ms with its weight in cache). Past it oneDNN's blocking for cache won (512 x 11520 -> 1280:
# 9.0 against 11.4 ms, before the chunks); since, the two ran about even there, and the UNet
# call at 256 px, whose 16x16 level is 512 rows, was no faster with 256 or 512 here.
# float32: a convolution of few output pixels with a weight of at least FLOAT32_MIN_WEIGHT
# elements runs as one product of its columns (oneDNN's, or up to F32_ROWS the kernel's: an
# AVX-512 kernel of dot products ran at 0.14 TFLOP/s at 128 rows, below oneDNN's product; the
# kernel's outer products beat it at 32 rows only), which beats oneDNN's convolution: SD
# 1.5's UNet call at 256 px 1.49 -> 1.37 s (every small convolution so, without the weight's
# floor: 1.52 -> 1.41 s at 128 rows, 1.35 at 512, noise apart), 512 px unchanged. Smaller
# weights keep the convolution, whose bits diffusers' match (TAESD, the VAE's layers, up to
# its 512-channel 3x3's 2.4M); the product's are float32 roundings apart (3e-8).
MAX_ROWS = {torch.bfloat16: 160, torch.float32: 128}
FLOAT32_MIN_WEIGHT = 1 << 22  # elements: SD 1.5's 1280-channel 3x3 convolutions (14.7M)
# float32 rows up to which those products run on the kernel (small_gemm.cpp's F32_ROWS), past
# it on oneDNN's. 2 threads, AMX Xeon, weights not in cache (/tmp script), against oneDNN's
# product: 32 x 11520 -> 1280 4.6 against 5.9 ms, 32 x 23040 -> 1280 9.3 against 11.3, 16 x
# 11520 -> 1280 3.8 against 4.3; in SD 1.5's UNet call at 256 px (the 4x4 level) 4.5 against
# 5.5 and 8.9 against 10.4 ms. Its sums in chunks of 128 k: the max error against float64
# 1.5-2.6e-6 of the output's scale, oneDNN's 2.7-3.1e-6 (one running sum: 1.8e-5).
F32_ROWS = 32


def _enabled():
    return os.environ.get(ENV, "1") != "0"


def library():
    """The loaded library, or None where it does not run here (see the module's text)."""
    if not _enabled() or LEVEL not in fused_attention.cpu_levels():
        return None
    return fused_attention.load(LEVEL, SOURCE, [*FUNCTIONS.values(), MANY_ROWS], ARGTYPES,
                                "small-product kernel not built, oneDNN's runs")


def takes(x, n, k, rows):
    """Whether `linear` runs `rows` rows of `x` (K = `k` each) against a weight of `n` rows in
    x's dtype (the caller checks the weight's dtype and that no gradient is wanted): bfloat16 on
    the kernel (n and k multiples of 32); float32, for a weight of at least FLOAT32_MIN_WEIGHT
    elements (`conv2d`'s columns; measured faster on an AMX CPU only), on the float32 kernel or
    oneDNN's product (`linear` chooses by the rows; oneDNN's is the fallback, so it must be
    there)."""
    if x.device.type != "cpu" or not 0 < rows <= MAX_ROWS.get(x.dtype, 0):
        return False
    if x.dtype == torch.float32:
        # oneDNN's product: winograd.onednn_product's check, written here because winograd
        # imports this module
        return (n * k >= FLOAT32_MIN_WEIGHT and fused_attention.amx() and _enabled()
                and torch.backends.mkldnn.is_available()
                and hasattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise"))
    return n % 32 == 0 and k % 32 == 0 and library() is not None


def linear_takes(x, n, k, rows):
    """Whether `linear` runs a Linear layer's product of `rows` rows: as `takes`, and bfloat16
    of any number of rows (past MAX_ROWS on the kernel of many rows, nd_gemm_bf16)."""
    if x.dtype == torch.bfloat16 and rows > MAX_ROWS[torch.bfloat16] and x.device.type == "cpu":
        return n % 32 == 0 and k % 32 == 0 and library() is not None
    return takes(x, n, k, rows)


def linear(x, weight, bias=None, act="none", other=None, op="none"):
    """x @ weight.T + bias (x: (..., K); weight: (N, K), its rows contiguous) on the kernel
    (float32: up to F32_ROWS rows, N a multiple of 4, where it is built; else oneDNN's
    product), as `takes` takes it. bfloat16 only: `act` ("quick_gelu", "gelu") applied to it
    and `other` (x's shape but N last) added or multiplied in (`op` "add", "mul"), all in the
    kernel's epilogue (ACTS, OPS)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    b = None if bias is None else bias.detach()
    if x.dtype == torch.float32 and (act != "none" or op != "none"):
        raise ValueError(f"small_gemm: act={act!r}, op={op!r} are for bfloat16 products only")
    if x.dtype == torch.float32 and not (rows.shape[0] <= F32_ROWS and weight.shape[0] % 4 == 0
                                         and library() is not None):
        y = torch.ops.mkldnn._linear_pointwise(rows, weight.detach(), b, "none", [], "")
    else:
        o = None if other is None else other.reshape(-1, weight.shape[0])
        y = torch.ops.nanodiffusion.small_linear(rows, weight.detach(), b, act, o, op)
    return y.view(*x.shape[:-1], y.shape[-1])


def gated_gelu(x, weight, bias=None):
    """GEGLU's h * GELU(gate) of x's product with `weight`'s halves (h: its first rows, gate: the
    rest), bfloat16, as `linear_takes` takes x with one half: past MAX_ROWS rows as one product
    whose epilogue does it all, each block's h and gate side by side on the tiles (nd_gemm_bf16's
    ACT_GEGLU: the gates are never stored and read back), else as two (the gate's GELU in its
    product's epilogue, then h's product with the gate multiplied in)."""
    n = weight.shape[0] // 2
    if x.numel() // x.shape[-1] > MAX_ROWS[torch.bfloat16]:
        return linear(x, weight, bias, act="geglu")
    gate = linear(x, weight[n:], None if bias is None else bias[n:], act="gelu")
    return linear(x, weight[:n], None if bias is None else bias[:n], other=gate, op="mul")


def columns(conv, x, size, dense=False):
    """x's columns for `conv` (zero padding, no dilation, one group; `size` its output's height
    and width: winograd.output_size): (N * OH * OW, kh * kw * C) in the order of a
    channels-last weight's rows (kh, kw, c), a view where the convolution is 1x1 and x
    channels-last; `dense`: in the order of a dense (OIHW) weight's rows, (c, kh, kw), on
    small_gemm.cpp's nd_columns_f32 for float32 3x3 convolutions of channels a multiple of 16
    where the library runs (as fast as the other order's copy), else the same strided copy
    (6-8x slower in that order)."""
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    oh, ow = size
    xl = x.permute(0, 2, 3, 1)  # N, H, W, C: channels-last memory as it lies
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):  # one tap: the two orders are one
        return xl.reshape(n * oh * ow, c)
    lib = library() if dense and x.dtype == torch.float32 and (kh, kw) == (3, 3) and c % 16 == 0 \
        else None
    if lib is not None:
        out = x.new_empty(n * oh * ow, 9 * c)
        fn = lib.nd_columns_f32
        if fn.argtypes is None:  # the loader declares the products' arguments only
            fn.argtypes = COLUMNS_ARGTYPES
        xc = x.contiguous(memory_format=torch.channels_last)
        if fn(xc.data_ptr(), n, x.shape[2], x.shape[3], c, oh, ow, sh, sw, ph, pw,
              out.data_ptr(), torch.get_num_threads()) == 0:
            return out
    xp = F.pad(xl, (0, 0, pw, pw, ph, ph)) if ph or pw else xl
    # every tap at once, a view (N, OH, OW, kh, kw, C) (dense: (N, OH, OW, C, kh, kw)) of the
    # padded input, copied once by the reshape (9 slices and their cat took 140 against 87 us
    # at 1280 channels, 8x8)
    s_n, s_h, s_w, s_c = xp.stride()
    shape, strides = (n, oh, ow, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h, s_w, s_c)
    if dense:
        shape, strides = (n, oh, ow, c, kh, kw), (s_n, s_h * sh, s_w * sw, s_c, s_h, s_w)
    return xp.as_strided(shape, strides).reshape(n * oh * ow, kh * kw * c)


def takes_conv(conv, x, dtype, size):
    """Whether `conv2d` runs `conv` (its weight in `dtype`) on x (`size`: the output's height
    and width, winograd.output_size): a plain convolution (zero padding, no dilation, one
    group) whose product `takes`. winograd.Conv2d and its packed form (packing.PackedConv2d)
    ask alike, so packing changes no bits."""
    if (dtype != x.dtype or x.dim() != 4 or conv.groups != 1
            or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)):
        return False
    kh, kw = conv.kernel_size
    return takes(x, conv.out_channels, conv.in_channels * kh * kw, x.shape[0] * size[0] * size[1])


def weight_layout(dtype):
    """The memory format in which `conv2d` reads a weight of `dtype` as it lies (another is
    copied to it, every call): float32 the dense one a file holds (OIHW), so that a float32
    weight still in its file's mapping is read there, not copied channels-last at its first
    call (SD 1.5 at 256 px: 1.85 GB of them, 0.6-3.8 s of page faults on a 2-core AMX Xeon);
    bfloat16 channels-last, as the pipelines lay bfloat16 weights out at load
    (packing.channels_last). packing.PackedConv2d asks it too, so packing changes no bits."""
    return torch.contiguous_format if dtype == torch.float32 else torch.channels_last


def conv2d(conv, x, weight, size):
    """conv(x) with `weight` as `linear` runs it, channels-last out, as `takes_conv` takes it: x's
    columns against the weight's rows, the columns in the order of the weight's layout for its
    dtype (weight_layout: its memory is that matrix as it lies; a weight in another layout is
    copied to it, every call): float32 against the dense weight, bfloat16 against the
    channels-last one."""
    o = weight.shape[0]
    dense = weight_layout(weight.dtype) == torch.contiguous_format
    w = weight.reshape(o, -1) if dense else weight.permute(0, 2, 3, 1).reshape(o, -1)
    y = linear(columns(conv, x, size, dense), w, conv.bias)
    return y.view(x.shape[0], *size, -1).permute(0, 3, 1, 2)


def _run(x, w, b, act="none", other=None, op="none"):
    M, K = x.shape
    N = w.shape[0]
    if act not in ACTS or op not in OPS:
        raise ValueError(f"small_gemm: act must be one of {sorted(ACTS)} and op one of "
                         f"{sorted(OPS)}, got act={act!r}, op={op!r}")
    if (op == "none") != (other is None):
        raise ValueError(f"small_gemm: op={op!r} with other={'a tensor' if other is not None else None}:"
                         " other is given exactly where op is not 'none'")
    if other is not None and (other.shape != (M, N) or other.dtype != x.dtype
                              or other.stride(-1) != 1):
        other = other.to(x.dtype).expand(M, N).contiguous()
    if act == "geglu" and (M <= MAX_ROWS[x.dtype] or op != "none"):
        raise ValueError(f"small_gemm: act='geglu' takes more than {MAX_ROWS[x.dtype]} rows and "
                         f"no op, got {M} rows and op={op!r}")
    y = x.new_empty(M, N // 2 if act == "geglu" else N)
    fn = FUNCTIONS[x.dtype]
    if x.dtype == torch.float32:
        packed = x.new_empty(K * F32_ROWS)  # x^T
    elif M > MAX_ROWS[x.dtype]:
        fn, packed = MANY_ROWS, None  # it keeps its own scratch
    else:
        packed = x.new_empty((M + 31) // 32 * 32 * K)  # the kernel's B tiles (an even block count)
    # bfloat16's bias as it lies (the kernel widens it); else float32, added to the float32 sums
    b16 = b is not None and b.dtype == torch.bfloat16 and x.dtype == torch.bfloat16
    if b is not None:
        b = b.contiguous() if b16 else b.float().contiguous()
    err = getattr(library(), fn)(
        x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None if b is None else b.data_ptr(),
        y.data_ptr(), y.shape[1], M, N, K, None if packed is None else packed.data_ptr(),
        torch.get_num_threads(), int(b16),
        ACTS[act], OPS[op], None if other is None else other.data_ptr(),
        0 if other is None else other.stride(0))
    if err:
        raise RuntimeError(f"small_gemm: the kernel refused {M} x {K} -> {N} "
                           f"(act {act!r}, op {op!r}; code {err})")
    return y


# The op, registered with torch's dispatcher directly (fused_attention's library, defined
# there first), so that profilers and FLOP counters see it.
_OPS = torch.library.Library("nanodiffusion", "FRAGMENT")
_OPS.define("small_linear(Tensor x, Tensor weight, Tensor? bias, str act='none', "
            "Tensor? other=None, str op='none') -> Tensor")
_OPS.impl("small_linear", _run, "CPU")
_OPS.impl("small_linear", lambda x, w, b, act="none", other=None, op="none":
          x.new_empty(x.shape[0], w.shape[0] // (2 if act == "geglu" else 1)), "Meta")
