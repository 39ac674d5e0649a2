"""oneDNN weight prepacking of a module's bfloat16 convolutions, for a loop of calls.

A bfloat16 convolution on the CPU (oneDNN) reorders its weight into the blocked layout its
kernel reads on every call: a fixed cost per call, whatever the input's size (about 15 ms for
a 1280 x 1280 3x3 weight on one core), so at SD 1.5's 4x4 and 8x8 levels the wide convolutions
spend most of their time reordering. `packed_convs(module)` reorders each such weight once, for
the time of a `with` block (a sampling loop), and runs the convolutions on the packed weights
(torch.ops.mkldnn's pointwise convolution: dense input, channels-last kept, the same results
bit for bit). The dense weights are let go while packed (memory does not grow) and put back,
in their layout, when the block ends, so outside it the module is as it was: its state_dict,
LoRA fusing and low memory's files see ordinary tensors. Packing and unpacking cost about one
call's reorders each, so a loop of n calls saves n - 2 of them.

Float32 is left as it is (packing its weights measured no gain) and so is anything that is
not a plain zero-padded Conv2d on the CPU, or a torch without the mkldnn ops."""
import contextlib

import torch
from torch import nn


def available():
    """Whether this torch has oneDNN and the ops used here."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_convolution_pointwise")
            and hasattr(ops, "_reorder_convolution_weight"))


def _packable(m):
    return (type(m) is nn.Conv2d and m.weight.dtype == torch.bfloat16
            and m.weight.device.type == "cpu" and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and m.weight.numel() > 0)


class PackedConv2d(nn.Conv2d):
    """A Conv2d whose weight is in `_packed` (oneDNN's layout) for the time of packed_convs."""

    def forward(self, x):
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "")


def _pack(m):
    w = m.weight.data
    m._packed = torch.ops.mkldnn._reorder_convolution_weight(
        w, list(m.padding), list(m.stride), list(m.dilation), m.groups)
    m._dense_layout = (w.shape, w.stride())
    m.weight.data = torch.empty(0, dtype=w.dtype)  # the packed copy holds it now
    m.__class__ = PackedConv2d


def _unpack(m):
    shape, stride = m._dense_layout
    m.weight.data = torch.empty_strided(shape, stride, dtype=m._packed.dtype).copy_(
        m._packed.to_dense())
    del m._packed, m._dense_layout
    m.__class__ = nn.Conv2d


@contextlib.contextmanager
def packed_convs(module, enabled=True):
    """A context in which `module`'s bfloat16 CPU convolutions run on prepacked weights;
    nothing where `enabled` is false or there is nothing to pack. Yields how many it packed."""
    convs = [m for m in module.modules() if _packable(m)] if enabled and available() else []
    done = []
    try:
        with torch.no_grad():
            for m in convs:
                _pack(m)
                done.append(m)
        yield len(done)
    finally:
        with torch.no_grad():
            for m in done:
                _unpack(m)
