"""Low memory (`--low-memory`, `pipe.set_low_memory(True)`): the text encoder, the UNet and the
VAE of a Stable Diffusion pipeline keep their weights in a file while they are not running, so
that only one of them is in memory at a time: while the UNet denoises (most of a call's time)
the others are on disk, and the UNet is while the VAE decodes. Each part is read back from the
page cache when it runs and let go after (memory returned to the system: malloc_trim where the
C library has it); prompts already encoded come from the prompt cache without the encoder.

The file is written once when low memory is turned on, and again only after the part's weights
were changed in place (LoRA fusing into the text encoder sets `dirty` on the DiskWeights that
`resident` yields).
The files live in a temporary folder removed with the pipeline.
"""
import contextlib
import ctypes
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..formats.files import read_safetensors


class DiskWeights:
    """The parameters and buffers of `module` kept in `path` while the module is not in use;
    `resident()` has them in memory for the time of a `with` block (nested blocks read once)."""

    def __init__(self, module, path):
        self.module, self.path, self.depth, self.dirty = module, Path(path), 0, True
        self.slots = {}  # full name -> (owning module, attribute, is a parameter)
        self.layouts = {}  # full name -> (shape, strides): channels-last weights stay so
        for kind, named in ((True, module.named_parameters()), (False, module.named_buffers())):
            for name, t in named:
                owner, _, attr = name.rpartition(".")
                self.slots[name] = (module.get_submodule(owner), attr, kind)
                self.layouts[name] = (t.shape, t.stride())
        self._release()

    def _get(self, owner, attr, is_param):
        return getattr(owner, attr).data if is_param else owner._buffers[attr]

    def _set(self, owner, attr, is_param, tensor):
        if is_param:
            getattr(owner, attr).data = tensor  # the Parameter object stays (LoRA keeps it)
        else:
            owner._buffers[attr] = tensor

    def _release(self):
        if self.dirty:
            save_file({k: self._get(*s).contiguous() for k, s in self.slots.items()},
                      str(self.path))
            self.dirty = False
        for s in self.slots.values():
            t = self._get(*s)
            self._set(*s, torch.empty(0, dtype=t.dtype, device=t.device))
        _trim()

    def _load(self):
        tensors = read_safetensors(self.path)
        for k, s in self.slots.items():
            t = tensors.pop(k)
            if t.stride() != self.layouts[k][1]:  # the layout it had (the same kernels run)
                t = torch.empty_strided(*self.layouts[k], dtype=t.dtype).copy_(t)
            self._set(*s, t.to(self._get(*s).device))

    @contextlib.contextmanager
    def resident(self):
        """-> self; set `dirty` inside the block if it changes the weights in place."""
        if self.depth == 0:
            self._load()
        self.depth += 1
        try:
            yield self
        finally:
            self.depth -= 1
            if self.depth == 0:
                self._release()

    def restore(self):
        """The weights back in memory for good (low memory turned off)."""
        self._load()


def _trim():
    """Give the freed memory back to the system (glibc keeps freed blocks below its mmap
    threshold in its heap, where they still count in the process's resident size)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class OffloadMixin:
    """Pipeline's low-memory methods (pipelines/sd.py)."""

    @property
    def low_memory(self):
        return bool(self.__dict__.get("_offloaded"))

    def set_low_memory(self, on=True):
        """Keep the text encoder's and the VAE's weights on disk except while they run (on),
        or in memory (off). Images are the same either way. Returns self."""
        if not isinstance(on, bool):
            raise TypeError(f"low memory must be True or False, got {on!r}")
        offloaded = self.__dict__.setdefault("_offloaded", {})
        if on and not offloaded:
            folder = Path(tempfile.mkdtemp(prefix="nanodiffusion-offload-"))
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
            for i, module in enumerate((self.text_encoder, self.unet, self.vae)):
                offloaded[id(module)] = DiskWeights(module, folder / f"{i}.safetensors")
        elif not on:
            for w in offloaded.values():
                w.restore()
            offloaded.clear()
        return self

    def resident(self, module):
        """A context in which `module`'s weights are in memory; it yields the DiskWeights
        that holds them on disk, or None (and does nothing) unless low memory is on."""
        w = self.__dict__.get("_offloaded", {}).get(id(module))
        return w.resident() if w is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def resident_parts(self):
        """The text encoder and the UNet in memory (LoRA files are checked and fused into
        them); yields {"text_encoder": held, "unet": held} (DiskWeights or None)."""
        with self.resident(self.text_encoder) as te, self.resident(self.unet) as unet:
            yield {"text_encoder": te, "unet": unet}
