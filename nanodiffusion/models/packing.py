"""oneDNN weight prepacking of a module's bfloat16 and float32 convolutions.

A convolution on the CPU (oneDNN) reorders its weight into the blocked layout its kernel reads
on every call: a fixed cost per call, whatever the input's size (bfloat16: about 7 ms for a
1280 x 1280 3x3 weight on one core of an AMX Xeon, as much as the 8x8 convolution itself;
float32: a 1280-channel 4x4 convolution 53 ms dense, 20 ms packed), so at SD 1.5's 4x4 and 8x8
levels the wide convolutions spend most of their time reordering.
`pack(module)` makes each such convolution pack its weight once, at its next call (for that
input's shape: oneDNN's reorder for a known shape is ~3x faster than for an unknown one, and
costs about what the dense call's own reorder does), and run on the packed weight from then on
(torch.ops.mkldnn's pointwise convolution: dense input, channels-last out; for channels-last
input, as pipelines give the UNet, the same results bit for bit, but for float32 on some CPUs:
on an AMD Zen 4 the shapes VAE's 64-channel 3x3 convolutions at batch 1 round differently, by up
to 6e-6; a contiguous float32 input's dense kernel rounds differently, ~4e-6 of the scale of an
SD 1.5 UNet call's output). A call at another height and width lays the weight out again for
it, once: oneDNN's layout depends on the size, and a weight laid out for another is reordered
at every call (PackedConv2d._pack_for). The dense weight is let go (and its memory given back
to the system: glibc would keep it in its heap), so memory does not grow.

A packed convolution turns back into a plain one, its dense weight restored in its layout,
whenever anything asks for its weight (`conv.weight`: LoRA fusing, low memory's files), calls
it with gradients, moves or casts it (`.to`), or loads a state dict into it; its state_dict
holds the dense weight. `unpack(module)` turns them all back (about 3.5 calls' reorders: the
packed layout to the dense one, then to channels-last; none where the dense weight it packed
was a low-memory file's, still clean: that one is given back, its pages read from the file
again as they are used: `_file_weight`), and `packed_weights` packs for a `with` block only
(low memory, whose parts go to disk after each run).

A float32 call that Winograd's F(4x4, 3x3) is to run (models/winograd.py's rule, the one the
plain layer asks too) runs it on the dense weight, which a packed weight gives back for it; so
does a call of few output pixels on an AMX CPU (models/small_gemm.py's rule, asked by the plain
layer too: one product of its columns, bfloat16 on small_gemm's kernel, float32 with a large
weight on its float32 kernel or, past F32_ROWS rows, oneDNN's product), which reads the dense
weight as it lies in small_gemm.weight_layout (bfloat16 channels-last, float32 as a file holds
it, so a float32 file's weight is read in its mapping, never copied): at SD 1.5's 4x4 and 8x8
levels the weight's read from memory is the call's time, which a product makes faster.

Other dtypes are left as they are (bfloat16 too where this CPU's oneDNN lacks it: `packs`), and
so is anything that is not a plain zero-padded Conv2d on the CPU, or a torch without the mkldnn
ops."""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..malloc import in_clean_mapping, let_go, trim
from . import small_gemm, winograd


def available():
    """Whether this torch has oneDNN and the ops used here."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops, "_reorder_convolution_weight"))


class PackedConv2d(nn.Conv2d):
    """A Conv2d inside `pack`: `_packed` is None until its first call, `_dense` the dense
    weight's (shape, strides) to restore, `_packed_for` the input's height and width that
    `_packed` was laid out for."""

    def forward(self, x):
        if winograd.needs_grad(self, x):
            return _unpack(self).forward(x)  # no gradient through the packed kernel
        if winograd.worth_it(self, x):  # the dense weight, given back by the packed one's
            return winograd.conv3x3(x, dense_weight(self), self.bias)
        size = winograd.output_size(self, x)
        if self._few_rows(x, size):
            return small_gemm.conv2d(self, x, self._dense_for_rows(), size)
        self._pack_for(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "")

    def add_into(self, x, other):
        """`add_into(self, x, other)` on the packed weight (packed for x's size first)."""
        if not _adds_into(self, x, other):
            return None
        self._pack_for(x)
        return _conv_add(self, x, other, self._packed)

    def _pack_for(self, x):
        """The weight packed for x's height and width (at its first call, or again at a new
        size)."""
        if self._packed is not None and self._packed_for != tuple(x.shape[-2:]):
            # oneDNN's layout for one size may not be its layout for another, and a call on
            # a weight laid out for another reorders it at every call (SD 1.5's 1280-channel
            # 3x3 convolutions on a Zen 3: packed for 2x2 inputs, 520 ms a call at 8x8
            # against 22; packed for 8x8, 485 ms at 2x2 against 4.5), so the weight is laid
            # out again for the new size, once: a UNet run at 128 px, then at 256, ran 5x
            # slower at 256 px for good
            self._put(dense_weight(self))  # plain, then channels-last, then packed
            self._packed = None
        if self._packed is None:  # for the input's shape: ~3x faster than for an unknown one
            # oneDNN's reorder of a plain weight holds two copies beside it at once, of a
            # channels-last one only the packed one: the weight goes channels-last first
            self._put(self._parameters["weight"].data.contiguous(memory_format=torch.channels_last))
            w = self._parameters["weight"].data
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            self._packed_for = tuple(x.shape[-2:])
            del w
            self._put(torch.empty(0, dtype=self._packed.dtype))  # the packed one holds it

    def _few_rows(self, x, size):
        """Whether this call runs as small_gemm's product, on the dense weight (_dense_for_rows):
        where the plain layer's would (winograd.Conv2d's rule; torch's nn.Conv2d has none), so
        packing changes no bits."""
        dtype = (self._parameters["weight"] if self._packed is None else self._packed).dtype
        return self._plain is winograd.Conv2d and small_gemm.takes_conv(self, x, dtype, size)

    def _dense_for_rows(self):
        """The dense weight in the layout small_gemm.conv2d reads as it lies (weight_layout:
        float32 as its file holds it, bfloat16 channels-last), laid out so once where it is
        not; a packed one given back, once: the call after at another size packs it again, as
        `_pack_for` does between sizes."""
        if self._packed is not None:
            self._put(dense_weight(self))
            self._packed = None
        w = self._parameters["weight"].data
        layout = small_gemm.weight_layout(w.dtype)
        if not w.is_contiguous(memory_format=layout):
            self._put(w.contiguous(memory_format=layout))
        return self._parameters["weight"].data

    def _put(self, w):
        """`w` the weight's data in place of the one held, which is let go at once (its
        memory back to the system: glibc would keep it in its heap; low memory's: its pages
        in its file's mapping dropped, the tensor kept as `_file_weight`); nothing where `w`
        is that one."""
        old = self._parameters["weight"].data
        if w.data_ptr() == old.data_ptr():
            return
        if self._file_weight is None and in_clean_mapping(old):
            self._file_weight = old
        self._parameters["weight"].data = w
        let_go(old)
        del old
        trim()

    def __getattr__(self, name):
        if name == "weight":  # anyone who reads the weight gets the dense one
            return _unpack(self).weight
        return super().__getattr__(name)

    def _apply(self, fn, *args, **kwargs):
        return _unpack(self)._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self._packed.to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        _unpack(self)._load_from_state_dict(*args, **kwargs)


def add_into(conv, x, other):
    """other += conv(x) for a CPU Conv2d at inference, in other's memory, the sum in oneDNN's
    epilogue (one pass, one rounding, no new output: SD 1.5's VAE decoder at 512 px, bfloat16,
    a 128-channel 3x3 and its residual 65.8 -> 36.4 ms, most of it the new output's page
    faults), on the packed weight where `conv` is packed, else on its dense one (the same
    kernel: the same bits either way, so packing changes no image); -> other. None, other
    untouched, where the call would not run on oneDNN's kernel (gradients, Winograd's float32,
    bfloat16 computed in float32, a dtype oneDNN does not take) or `other` is not the output's
    shape, dtype and channels-last layout."""
    if type(conv) is PackedConv2d:
        return conv.add_into(x, other)
    if not (type(conv) in (nn.Conv2d, winograd.Conv2d) and _packable(conv) and _adds()
            and _adds_into(conv, x, other)):
        return None
    return _conv_add(conv, x, other, conv._parameters["weight"])


def _adds():
    """Whether this torch has oneDNN's in-place binary convolution (add_into's; not asked
    through `available`, which says whether weights may be packed)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise_"))


def _adds_into(conv, x, other):
    if (winograd.needs_grad(conv, x) or other.requires_grad or winograd.worth_it(conv, x)
            or winograd.computes_in_float32(x) or x.device.type != "cpu"):
        return False
    shape = (x.shape[0], conv.out_channels, *winograd.output_size(conv, x))
    return (other.dtype == x.dtype and tuple(other.shape) == shape
            and other.is_contiguous(memory_format=torch.channels_last))


def _conv_add(conv, x, other, weight):
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        other, x, weight, conv.bias, list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, "add", None, None, [], None)


def channels_last(module):
    """`module`'s 4-d weights and buffers laid out channels-last, as `module.to(memory_format=
    torch.channels_last)` lays them out, but each in its own memory where torch allocated it:
    copied to a scratch tensor (one, reused, as large as the largest) and back in the new
    order, so that no new memory is faulted in. A tensor in a file's mapping (the readers'
    weights that needed no cast: formats.files.read_safetensors), or a view of part of its
    storage, is copied to new memory, as `.to` does. SD 1.5's bfloat16 UNet loaded from a
    float32 folder (2-core AMX Xeon): `.to` took 1.14 s, 1.13 s of it the kernel's 285
    thousand page faults for the new 1.1 GB. The one rule of the UNet's, the VAE's and the
    tiny decoder's for_inference. -> module."""
    scratch = {}
    with torch.no_grad():
        for m in module.modules():
            for group in (m._parameters, m._buffers):
                for name, t in group.items():
                    if t is None or t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last):
                        continue
                    t = t.data
                    storage = t.untyped_storage()
                    if not (t.is_contiguous() and t.storage_offset() == 0 and storage.resizable()
                            and storage.nbytes() == t.numel() * t.element_size()):
                        group[name].data = t.contiguous(memory_format=torch.channels_last)
                        continue
                    buf = scratch.get(t.dtype)
                    if buf is None or buf.numel() < t.numel():
                        scratch[t.dtype] = None  # the smaller one let go first
                        buf = scratch[t.dtype] = torch.empty(t.numel(), dtype=t.dtype)
                    copy = buf[:t.numel()].view(t.shape).copy_(t)
                    n, c, h, w = t.shape  # the storage as NHWC, seen as NCHW: channels-last
                    out = t.new_empty(0).set_(storage, 0, (n, h, w, c)).permute(0, 3, 1, 2)
                    group[name].data = out.copy_(copy)
    return module


def packs(dtype):
    """Whether this CPU's oneDNN takes `dtype`'s convolutions: float32 always, bfloat16 only
    with AVX512-BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only CPU, such as AMD's Zen 3, raises
    "bf16 path needs the cpu support ..." on the packed ops; torch's own bfloat16
    convolution runs there)."""
    if dtype == torch.bfloat16:
        return winograd.onednn_bfloat16()
    return dtype == torch.float32


def cpu_input(x, dtype=None):
    """`x` (in `dtype`) as a packed convolution module wants its input: channels-last on the
    CPU (oneDNN's layout: no reorders between layers, and a dense call on it gives the packed
    call's results bit for bit), as it is elsewhere. The one rule for the UNet's and the VAE
    decoder's inputs."""
    fmt = torch.channels_last if x.device.type == "cpu" else torch.preserve_format
    return x.to(dtype or x.dtype, memory_format=fmt)


# Linear layers are not packed: torch.ops.mkldnn's packed linear was 1.3-1.7x faster on SD
# 1.5's products alone but did not give the dense results bit for bit (2-3 bfloat16 ulps on a
# UNet call's output), and gained 2-4% of a call. Their float32 products run on oneDNN's dense
# kernel, though (OneDNNLinear, below).
def _packable(m):
    w = m._parameters.get("weight") if type(m) in (nn.Conv2d, winograd.Conv2d) else None
    return (w is not None and packs(w.dtype) and w.device.type == "cpu"
            and w.numel() > 0 and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def dense_weight(conv):
    """conv's dense weight, a packed convolution (PackedConv2d) left packed: the low-memory
    file's weight it packed (`_file_weight`) where that is still the file's bytes and in the
    layout to give back (nothing to copy or reorder: low memory unpacks the UNet after every
    loop), else made from its packed one (about a call's reorder) where it has it, else its
    weight parameter as it is."""
    kept = getattr(conv, "_file_weight", None)
    if kept is not None and kept.stride() == conv._dense[1] and in_clean_mapping(kept):
        return kept
    packed = getattr(conv, "_packed", None)
    return conv._parameters["weight"] if packed is None else packed.to_dense()


def _unpack(m):
    """`m` (a PackedConv2d) a plain Conv2d again with its dense weight; -> m."""
    shape, stride = m._dense
    w = m._parameters["weight"].data
    if m._packed is not None or w.stride() != stride:  # packed, or laid out channels-last
        with torch.no_grad():  # for small_gemm (_dense_for_rows)
            dense = dense_weight(m)
            if dense.stride() != stride:
                dense = torch.empty_strided(shape, stride, dtype=dense.dtype).copy_(dense)
            m._parameters["weight"].data = dense
    m.__class__ = m._plain
    del m._packed, m._dense, m._plain, m._packed_for, m._file_weight
    return m


def pack(module):
    """Make `module`'s bfloat16 and float32 CPU Conv2d layers pack their weights at their next
    call (those packed already stay); -> how many are packed or will be. Nothing where this
    torch lacks the ops (available())."""
    if not available():
        return 0
    for m in module.modules():
        if _packable(m):
            w = m._parameters["weight"]
            m._packed, m._dense, m._plain = None, (w.shape, w.stride()), type(m)
            m._packed_for, m._file_weight = None, None
            m.__class__ = PackedConv2d
    return sum(type(m) is PackedConv2d for m in module.modules())


def unpack(module):
    """Every packed convolution of `module` a plain one again, dense weights restored."""
    done = [_unpack(m) for m in module.modules() if type(m) is PackedConv2d]
    if done:
        trim()  # the packed weights' memory back to the system


@contextlib.contextmanager
def packed_weights(module, enabled=True):
    """A context in which `module`'s CPU convolutions run on packed weights (pack),
    unpacked when it ends, however it ends; nothing where `enabled` is false. Yields how
    many are packed."""
    try:
        yield pack(module) if enabled else 0
    finally:
        unpack(module)


# A product smaller than this many multiply-adds stays with torch's own kernel: oneDNN's call
# costs ~12 us more (float32, 8 x 128 -> 128: 8 us against 21 us; 128 x 128 -> 128 ties).
ONEDNN_LINEAR_MIN_MACS = 2 ** 19
ONEDNN_LINEAR_DTYPES = (torch.float32, torch.bfloat16)


class OneDNNLinear(nn.Linear):
    """An nn.Linear whose float32 and bfloat16 CPU calls without gradients run on oneDNN's
    matrix product (torch.ops.mkldnn._linear_pointwise on the dense weight), the bias added in
    the product's epilogue, instead of torch's default:
    - float32: MKL's sgemm, which on AMD CPUs runs its AVX2 code: on a 2-core AMD EPYC with
      AVX-512, SD 1.5's products at 120-200 GFLOP/s against oneDNN's 390-450 (torch.mm
      2048^3: 191 against 431);
    - bfloat16: torch's addmm, which copies the bias into the output before its product (on
      oneDNN too): a pass over the output (SD 1.5's 8192 x 1280 at 512 px: 2.8 ms of a 5.4 ms
      product, 2-core Intel Xeon with AMX).
    Nothing else changes: the weight stays the dense parameter (LoRA fusing, low memory's files
    and state dicts see a plain Linear), and other dtypes, devices, gradients and products under
    ONEDNN_LINEAR_MIN_MACS take nn.Linear's own path. The results are rounding apart from it
    (float32 ~1e-6 relative; bfloat16 the output's rounding)."""

    def forward(self, x):
        return self.product(x, self.weight, self.bias)

    def on_onednn(self, x, weight):
        """Whether a call on `x` with `weight` (the layer's or a part of it) runs on oneDNN."""
        return (x.dtype in ONEDNN_LINEAR_DTYPES and x.device.type == "cpu"
                and x.numel() * weight.shape[0] >= ONEDNN_LINEAR_MIN_MACS
                and not winograd.needs_grad(self, x) and not winograd.computes_in_float32(x))

    def few_rows(self, x, weight):
        """Whether a call on oneDNN (on_onednn) runs on small_gemm's kernel instead (bfloat16,
        few rows: SD 1.5's text encoder, the UNet's 8x8 level at 256 px)."""
        return (weight.dtype == torch.bfloat16 and weight.stride(-1) == 1
                and small_gemm.linear_takes(x, *weight.shape, x.numel() // x.shape[-1]))

    def product(self, x, weight, bias):
        """x @ weight.T + bias by this layer's rule (layers.GEGLU passes halves of the weight);
        bfloat16 where oneDNN has none in float32 (winograd.computes_in_float32)."""
        if winograd.computes_in_float32(x) and not winograd.needs_grad(self, x):
            return winograd.in_float32(x, weight, bias, self.product, -1)
        if self.on_onednn(x, weight):
            if self.few_rows(x, weight):
                return small_gemm.linear(x, weight, bias)
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def gated_gelu(self, x):
        """h * GELU(gate) of x's product with this layer's two halves (h: the weight's first
        rows, gate: the rest; layers.GEGLU's inference) in bfloat16 on oneDNN, the GELU in the
        gate's product's epilogue and the multiply in h's: the float32 sums go through both
        before the one rounding to bfloat16, and no pass over the output is left. None where the
        call is not bfloat16 on oneDNN (on_onednn). SD 1.5's widest (8192 x 320 -> 2 x 1280, at
        512 px), 2-core Intel Xeon with AMX: 23.0 -> 6.8 ms, the mean error against float64
        9.1e-4 -> 6.1e-4. (float32 gained nothing there: its products' time is most of it.)"""
        n = self.out_features // 2
        w, b = self.weight, self.bias
        if x.dtype != torch.bfloat16 or not self.on_onednn(x, w[n:]):
            return None
        if self.few_rows(x, w[n:]):  # the same on small_gemm's kernels, in their epilogues
            return small_gemm.gated_gelu(x, w, b)
        op = torch.ops.mkldnn._linear_pointwise
        gate = op(x, w[n:], None if b is None else b[n:], "gelu", [], "none")
        return op.binary(x, gate, w[:n], None if b is None else b[:n], "mul")


def fused_linear(layer, x, act="none", other=None, op="none"):
    """act(layer(x)) op other (small_gemm.ACTS, OPS: an activation, then a residual added or a
    gate multiplied) as one product whose epilogue does the rest, in float32 before the one
    rounding, where small_gemm's kernel runs `layer`'s call (an OneDNNLinear without hooks,
    bfloat16, few rows, no gradient: few_rows); None elsewhere, where the caller runs the steps.
    CLIP's text encoder at 2 x 77 tokens spent 6.5 of its 38 ms on quick GELU's three passes
    and 1 ms on its residual adds (2-core Intel Xeon with AMX)."""
    if (not _unhooked_on_onednn(layer, x) or x.dtype != torch.bfloat16
            or not layer.few_rows(x, layer.weight)):
        return None
    return small_gemm.linear(x, layer.weight, layer.bias, act=act, other=other, op=op)


def linear_add(layer, x, skip):
    """skip + layer(x) as one product whose epilogue adds `skip` (a residual of the output's
    shape and dtype): small_gemm's for few rows (fused_linear), else oneDNN's binary add
    post-op where the call runs on oneDNN (OneDNNLinear.on_onednn: bfloat16 and float32, no
    hooks); None elsewhere, where the caller adds."""
    out = fused_linear(layer, x, other=skip, op="add")
    if (out is not None or not _unhooked_on_onednn(layer, x) or skip.dtype != x.dtype
            or not skip.is_contiguous() or skip.shape != (*x.shape[:-1], layer.out_features)):
        return out
    return torch.ops.mkldnn._linear_pointwise.binary(x, skip, layer.weight, layer.bias, "add")


def hooked(module):
    """Whether hooks wait on `module`'s calls (forward or pre-forward: LoRA training's, a
    user's): a fused path that would run its work without calling it (fused_linear, GEGLU's,
    the cross-attention's kept projections, the VAE's ResBlock.run) calls it instead."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _unhooked_on_onednn(layer, x):
    """Whether `layer`'s call on x is OneDNNLinear's on oneDNN (on_onednn) with no hooks to
    see it: fused_linear's and linear_add's common ground."""
    return type(layer) is OneDNNLinear and not hooked(layer) and layer.on_onednn(x, layer.weight)


def onednn_linears(*modules):
    """The plain nn.Linear layers of `modules` (None skipped) made OneDNNLinear, for inference
    (pipelines call it on every part they run); nothing where this torch lacks the op. -> how
    many there are."""
    if winograd.onednn_product() is None:
        return 0
    n = 0
    for module in modules:
        for m in module.modules() if module is not None else ():
            if type(m) is nn.Linear:
                m.__class__ = OneDNNLinear
            n += type(m) is OneDNNLinear
    return n
