"""Low memory (`--low-memory`, `load(..., low_memory=True)`, `pipe.set_low_memory(True)`): the
text encoder, the UNet and the VAE of a Stable Diffusion pipeline keep their weights in a file
while they are not running, so that only one of them is in memory at a time: while the UNet
denoises (most of a call's time) the others are on disk, and the UNet is while the VAE decodes.
Each part is mapped back from its file when it runs (`resident(module)`: its weights are the
page cache's pages, no copy made) and let go after; prompts already encoded come from the
prompt cache without the encoder. Images are the same as
without low memory, but for those whose latents are larger than TILE per side (`decode`).

Where the memory goes (SD 1.5, bfloat16, 512 px; benchmarks/bench_cpu.py --system
ours-bf16-lowmem): the UNet's weights (1.72 GB) and torch itself are most of the peak, which
is the UNet's run; its activations are a small part (torch's CPU attention is tiled, never a
4096 x 4096 score matrix). So three rules keep the rest small:
- loading (`loading.load_pipeline(low_memory=True)`) puts each part on disk as soon as it is
  built, before the next part is read (`formats.files.on_build`): the parts are never all in
  memory, as they are when low memory is turned on after a load;
- glibc's malloc maps every block of malloc.MMAP_THRESHOLD or more on its own and unmaps it
  when it is freed (`malloc.malloc_returns_big_blocks`; for the whole process, once low memory
  is on): by default it raises that threshold to the size of the largest block freed (up to
  32 MiB), so after the weights are let go the activations would come from its heap, whose
  freed pages stay resident; that cost 0.4 GB of peak at 512 px;
- latents larger than TILE per side (above 512 px at SD's factor 8) are decoded in tiles.
And three keep its time near the default's: the text encoder's and the VAE's runs, whose
peaks are far below the UNet's, take their blocks from the heap again (`Pipeline.running`:
malloc.blocks_from_heap, trimmed after), and the CLI has torch ask for transparent huge pages
(malloc.torch_huge_pages), so that blocks mapped apart are faulted in 2 MiB at a time. SD 1.5
at 512 px in bfloat16 on a 2-core Zen 3 (two txt2img calls of 4 steps): 85-88 s a call with
neither, 62-63 s with both, against 54 s without low memory; peak 2.20-2.25 GB. And the UNet's
run takes its big blocks from a pool of those it freed (malloc.pooled_blocks, Pipeline.unet_loop),
whose pages stay resident for the next call, instead of each block's being faulted in anew:
on a 2-core Xeon with AMX, 1.36x -> 1.18x the default's time at 2.15 -> 2.19 GB; and so do
the text encoder's and the VAE's runs (`Pipeline.running`).

The file of a part holds each tensor's bytes in their memory order (a channels-last weight as
it is: no copy to write it or to read it back in its layout). It is written when the part first
goes to disk, and again only after its weights were changed in place (LoRA fusing sets `dirty`
on the DiskWeights that `resident` yields) or laid out anew (a low-memory load lays the UNet
and the VAE out for inference before they first go there: built_to_disk; a pipeline turned to
low memory after a whole load has laid them out already). The files are temporary, in tempfile's
folder ($TMPDIR, /tmp) or, where that is a RAM disk, in the user's cache folder
(`offload_dir`). On Linux a file's name is removed as soon as it is written and the part keeps
an open descriptor (mapped back through /proc/self/fd), so the space comes back however the
process ends: a server stopped by SIGTERM (uvicorn re-raises it after its shutdown, past
atexit) or killed (SIGKILL, the OOM killer) leaves nothing behind. Elsewhere the file is
removed with its module or at exit.
"""
import contextlib
import os
import re
import tempfile
import weakref
from pathlib import Path

import torch

from ..formats.files import on_build
from ..malloc import (PAGE, blocks_from_heap, file_mapped, file_unmapped,
                      malloc_returns_big_blocks, pooled_blocks)
from ..malloc import trim as _trim
from ..models.packing import cpu_input, pack
from ..models.unet import UNet
from ..models.unet import for_inference as unet_for_inference
from ..models.vae import VAE
from ..models.vae import for_inference as vae_for_inference

PARTS = ("text_encoder", "unet", "vae")  # the pipeline's attributes (and Parts' modules)
TILE, TILE_OVERLAP = 64, 16  # tiled decoding: latents per side above which, and the overlap
_ATTR = "_nanodiffusion_disk_weights"  # a module's DiskWeights while its weights are on disk


class DiskWeights:
    """The parameters and buffers of `module` kept in a temporary file while the module is
    not in use; `resident()` has them in memory for the time of a `with` block (nested blocks
    read once), in the layouts (strides) they had when they were last let go."""

    def __init__(self, module):
        self.file, self.depth, self.dirty, self.mapping = _File(), 0, True, None
        weakref.finalize(self, self.file.close)
        self.slots = {}  # full name -> (owning module, attribute, is a parameter)
        for kind, named in ((True, module.named_parameters()), (False, module.named_buffers())):
            for name, _ in named:
                owner, _, attr = name.rpartition(".")
                self.slots[name] = (module.get_submodule(owner), attr, kind)
        self.layouts = {}  # full name -> (strides, dims outermost first): as written
        self._release()

    def _get(self, owner, attr, is_param):
        return getattr(owner, attr).data if is_param else owner._buffers[attr]

    def _set(self, owner, attr, is_param, tensor):
        if is_param:
            getattr(owner, attr).data = tensor  # the Parameter object stays (LoRA keeps it)
        else:
            owner._buffers[attr] = tensor

    def _release(self):
        layouts = {}
        for k, s in self.slots.items():
            t = self._get(*s)
            order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost in memory first
            layouts[k] = (t.stride(), order)
        if layouts != self.layouts:  # new, or laid out anew (the VAE made channels-last)
            self.layouts, self.dirty = layouts, True
        if self.dirty:  # each tensor in its memory order: the bytes as they are, no copy
            self.file.write({k: self._get(*s).permute(self.layouts[k][1]).contiguous()
                             for k, s in self.slots.items()})
            self.dirty = False
        for s in self.slots.values():
            t = self._get(*s)
            self._set(*s, torch.empty(0, dtype=t.dtype, device=t.device))
        self._unmap()
        _trim()

    def _load(self, mapped=True):
        """The weights back from the file, in the layouts they had: `mapped`, the file's pages
        themselves (a private mapping: `_File.read`); else copies of their own (to_memory)."""
        self.mapping, tensors = self.file.read()
        if mapped:  # let_go may drop its pages while it is clean
            file_mapped(self.mapping, lambda: not self.dirty)
        for k, s in self.slots.items():
            strides, order = self.layouts[k]
            t = tensors.pop(k).permute(sorted(range(len(order)), key=order.__getitem__))
            if t.stride() != strides or not mapped:  # the layout it had (the same kernels run)
                t = torch.empty_strided(t.shape, strides, dtype=t.dtype).copy_(t)
            self._set(*s, t.to(self._get(*s).device))
        if not mapped:
            self._unmap()

    def _unmap(self):
        """The mapping of `_load` let go (it goes with the last tensor over it)."""
        if self.mapping is not None:
            file_unmapped(self.mapping)
            self.mapping = None

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


class _File:
    """A temporary file of tensors that nothing outlives: `write` puts tensors in a new file
    and, where /proc/self/fd exists (Linux), removes its name at once and keeps a descriptor;
    `read` maps it back; `close` lets it go (the file too, where it still has a name).

    The file is the tensors' bytes as they lie in memory, each from an offset that is a
    multiple of PAGE (its pages its own), the index of names, dtypes, shapes and offsets
    kept here; nothing else reads it. `read` gives tensors over one private mapping of the
    file (torch.UntypedStorage.from_file, not shared: a write to them copies the page it
    touches, never the file), so that the weights in memory are the page cache's pages: no
    copy to make at each run, and no second copy of the weights beside the page cache's,
    which on a small machine pushed the files out of the cache so that each run read them
    from disk again (SD 1.5 in bfloat16 at 512 px, txt2img in a 3 GB cgroup: 1.9-2.1 GB read
    from disk at every call). The pages count in the resident size while they are mapped;
    the mapping goes when the last tensor over it does (DiskWeights._release), and is
    registered with malloc.file_mapped meanwhile, so that a tensor let go before then
    (a packed convolution's dense weight) can give its pages back (malloc.let_go)."""

    def __init__(self):
        self.fd, self.name, self.index, self.size = None, None, {}, 0

    @property
    def path(self):
        return self.name or f"/proc/self/fd/{self.fd}"

    def write(self, tensors):
        """A new file of `tensors` (contiguous ones: their bytes as they are, no copy)."""
        fd, name = tempfile.mkstemp(prefix="nanodiffusion-offload-", dir=offload_dir())
        index, size = {}, 0
        try:
            with open(fd, "wb") as f:
                for k, t in tensors.items():
                    offset = -(-size // PAGE) * PAGE
                    index[k] = (offset, t.dtype, tuple(t.shape))
                    size = offset + t.numel() * t.element_size()
                    if t.numel():
                        f.seek(offset)
                        f.write(t.detach().reshape(-1).view(torch.uint8).numpy())
                f.truncate(size)
            fd = os.open(name, os.O_RDONLY)
        except BaseException:
            os.unlink(name)
            raise
        self.close()
        self.index, self.size = index, size
        if os.path.exists(f"/proc/self/fd/{fd}"):
            os.unlink(name)
            self.fd = fd
        else:
            os.close(fd)
            self.name = name

    def read(self):
        """{name: tensor} over one private mapping of the file (see the class)."""
        storage = (torch.UntypedStorage.from_file(self.path, False, self.size) if self.size
                   else torch.UntypedStorage(0))
        return storage, {k: torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize,
                                                             shape)
                         for k, (offset, dtype, shape) in self.index.items()}

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
        if self.name is not None:
            Path(self.name).unlink(missing_ok=True)
        self.fd, self.name = None, None


RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def offload_dir():
    """The folder of the parts' files: tempfile's ($TMPDIR, else /tmp), unless it is a RAM disk
    (tmpfs: /tmp on Debian 13, Fedora, Arch), where a part "on disk" still takes memory, and
    which on a 4 GB machine holds 2 GB at most (SD 1.5's parts in bfloat16 take 2.1 GB); then
    the user's cache folder, $XDG_CACHE_HOME (else ~/.cache)/nanodiffusion/offload, where it
    can be made and is not a RAM disk too."""
    tmp = tempfile.gettempdir()
    if filesystem_of(tmp) not in RAM_FILESYSTEMS:
        return tmp
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = cache / "nanodiffusion" / "offload"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return tmp
    return tmp if filesystem_of(cache) in RAM_FILESYSTEMS else str(cache)


def filesystem_of(path):
    """The type of the filesystem that holds `path` ("ext4", "tmpfs", ...), from Linux's
    /proc/self/mountinfo (the deepest mount point above it); None where that is not readable."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    path, best, kind = os.path.realpath(path), None, None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best)) and rest:
            best, kind = mount, rest.split()[0]
    return kind


def to_disk(module):
    """Put `module`'s weights on disk until `to_memory` (a module already there stays)."""
    if vars(module).get(_ATTR) is None:
        malloc_returns_big_blocks()
        vars(module)[_ATTR] = DiskWeights(module)


def to_memory(module):
    """`module`'s weights back in memory for good (nothing if they are there)."""
    w = vars(module).pop(_ATTR, None)
    if w is not None:
        w._load(mapped=False)  # the file goes with `w`: its pages are not kept


def on_disk(module):
    """Whether `module`'s weights are kept on disk."""
    return vars(module).get(_ATTR) is not None


def resident(module):
    """A context in which `module`'s weights are in memory; it yields the DiskWeights that
    holds them on disk, or None (and does nothing) where they are not kept there."""
    w = vars(module).get(_ATTR)
    return w.resident() if w is not None else contextlib.nullcontext()


def built_to_disk():
    """A context in which every module a reader builds goes to disk at once (to_disk), before
    the reader reads the next part (low-memory loading: loading.load_pipeline), a UNet or a
    VAE laid out for inference first (its for_inference: channels-last convolution weights
    where that says), so that the pipeline need not read it back to lay it out and write it
    again. SD 1.5 in bfloat16 on a 2-core Zen 3: the load 13.5-13.8 -> 7.6-8.3 s."""
    malloc_returns_big_blocks()  # before the first part is read
    return on_build(lambda module: to_disk(_for_inference(module)))


def _for_inference(module):
    if isinstance(module, UNet):
        return unet_for_inference(module)
    return vae_for_inference(module) if isinstance(module, VAE) else module


class OffloadMixin:
    """Pipeline's low-memory methods (pipelines/sd.py)."""

    def _offloadable(self):
        """The parts that low memory keeps on disk: the text encoder, the UNet, the VAE (and
        the model's own VAE while another is in use, pipelines/vae_swap.py)."""
        parts = [getattr(self, k) for k in PARTS] + [self.__dict__.get("_own_vae")]
        return list({id(m): m for m in parts if m is not None}.values())

    @property
    def low_memory(self):
        return on_disk(self.unet)

    def set_low_memory(self, on=True):
        """Keep the text encoder's, the UNet's and the VAE's weights on disk except while they
        run (on), or in memory (off). Images are the same either way (but see `decode`).
        Returns self."""
        if not isinstance(on, bool):
            raise TypeError(f"low memory must be True or False, got {on!r}")
        for module in self._offloadable():
            to_disk(module) if on else to_memory(module)
        return self

    def resident(self, module):
        """A context in which `module`'s weights are in memory (offload.resident)."""
        return resident(module)

    @contextlib.contextmanager
    def running(self, module):
        """A context in which `module` (the text encoder or the VAE: not the UNet) runs: its
        weights in memory, and with low memory its activations' blocks from glibc's heap
        (malloc.blocks_from_heap) and torch's big ones from the block pool (malloc.pooled_blocks:
        the VAE decoder's of 67-134 MB at 512 px), their pages given back when it ends: its
        run's peak is far below the UNet's, which sets the process's, and blocks each mapped
        apart cost their page faults at every use (the decode at 512 px in bfloat16, 2-core
        Xeon with AMX: 1.61-1.71 -> 1.40-1.46 s with the pool, the same peak)."""
        with self.resident(module):
            if not self.low_memory:
                yield
                return
            with blocks_from_heap(), pooled_blocks():
                yield

    @contextlib.contextmanager
    def resident_parts(self):
        """The text encoder and the UNet in memory (LoRA files are checked and fused into
        them); yields {"text_encoder": held, "unet": held} (DiskWeights or None)."""
        with self.resident(self.text_encoder) as te, self.resident(self.unet) as unet:
            yield {"text_encoder": te, "unet": unet}

    def _decode(self, z):
        """The VAE's decode of unscaled latents `z` (B, C, h, w), with its weights in memory
        for it. With low memory, latents larger than TILE per side are decoded in tiles of
        TILE overlapping by TILE_OVERLAP (VAE.tiled_decode; the tiles cross-faded), so that
        the decoder's activations are those of a 512 px image (SD's factor 8) at any size;
        such an image differs slightly from the whole decode's (the mid-block attention sees
        one tile). At most TILE per side, low memory or not, it is the whole decode.
        On the CPU the decoder gets channels-last latents, so that its activations stay
        channels-last (oneDNN's layout: SD 1.5's decode at 512 px 1.17x faster in float32,
        2.1x in bfloat16), and outside low memory its convolutions run on packed weights
        (models/packing.py), kept between calls; a dense call on channels-last input gives
        the packed one's results bit for bit."""
        with self.running(self.vae):
            z = cpu_input(z)
            if not self.low_memory:  # kept weights only: packing costs a call's reorders
                pack(self.vae.decoder)
            if self.low_memory and max(z.shape[-2:]) > TILE:
                return self.vae.tiled_decode(z, TILE, TILE_OVERLAP)
            return self.vae.decode(z)
