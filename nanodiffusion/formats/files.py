"""Weight files: reading tensors safely (`read_checkpoint`, `read_state_dict`: safetensors, or
torch.load with weights_only=True), the accepted suffixes, and the one strict loader of a state
dict into a module (`check_state_dict`; `build` around it), whose errors name the part and the keys.
"""
import contextlib
import contextvars
import ctypes
import functools
import json
import math
import mmap
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES  # every weight file we read


def key_list(keys, limit: int = 20) -> str:
    """'a, b, c ... (N in all)' for error messages."""
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state_dict(path, dtype=None, mapped=False) -> dict:
    """Tensors of a .safetensors file, or of a pickled .ckpt/.pt/.pth/.bin read with
    weights_only=True (no code runs; a file that needs code is refused); floating ones in
    `dtype` if given. `mapped`: see read_safetensors."""
    return read_checkpoint(path, dtype, mapped)[0]


# safetensors' dtype names -> torch's (the format: an 8-byte little-endian header length, a
# JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the data)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool}


def _cast(t, dtype):
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_safetensors(path, dtype=None, mapped=False) -> dict:
    """The tensors of a .safetensors file, read tensor by tensor into memory of their own (no
    second copy of the file): a tensor already in `dtype` (or with `dtype` None) is the bytes
    read, any other floating one is cast as it is read (from a mapping of its pages where there
    is one: no buffer to fault in), so the peak is the result plus one tensor. `mapped`: the
    tensors that need no cast are not read but views of a private mapping of their pages of the
    file (`_mapped`), read when first touched, as diffusers' weights stay in their files'
    mappings: a model loads in a fraction of the time, a part that may never run (the VAE's
    encoder in txt2img) takes no memory until it does, and a weight laid out anew at its first
    use (a packed convolution's) is copied once, from the file's pages, not read and then
    copied. Files holding other dtypes (float8, ...) go through safetensors' own reader. A cut
    or malformed file is a ValueError naming `path`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            if any(v.get("dtype") not in SAFETENSORS_DTYPES for v in header.values()):
                return {k: _cast(v, dtype) for k, v in load_file(str(path)).items()}
            start, out = 8 + n, {}
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
                src, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
                begin, end = info["data_offsets"]
                want = math.prod(shape) * src.itemsize
                if end - begin != want or start + end > size:
                    raise ValueError(f"tensor {name!r}: data_offsets {begin}..{end} do not fit "
                                     f"its shape {shape} {info['dtype']} or the file's size")
                cast = dtype not in (None, src) and src.is_floating_point
                t = None
                if (mapped or cast) and (start + begin) % src.itemsize == 0:
                    t = _mapped(f, start + begin, want, src, shape)
                if t is not None:  # left mapped, or cast from the file's pages (no buffer)
                    out[name] = t.to(dtype) if cast else t
                    continue
                f.seek(start + begin)
                buf = torch.empty(want, dtype=torch.uint8)  # torch's allocator: aligned as
                if f.readinto(buf.numpy()) != want:         # any tensor (the same kernels)
                    raise ValueError(f"tensor {name!r} is cut short")
                out[name] = _cast(buf.view(src).reshape(shape), dtype)
            return out
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


class _Pages:
    """A private mapping of a file's pages (_mapped), unmapped when the last tensor over it
    goes: it rides on the buffer that torch.frombuffer holds. It keeps munmap itself, as a
    process's exit may clear this module's names before it goes."""

    def __init__(self, addr, length):
        self.addr, self.length, self.munmap = addr, length, _libc().munmap

    def __del__(self):
        self.munmap(self.addr, self.length)


@functools.cache
def _libc():
    """The C library with mmap (glibc's mmap64 where there is one: its offset is 64-bit on
    32-bit systems too) and munmap declared."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.map = getattr(libc, "mmap64", None) or libc.mmap
    libc.map.restype = ctypes.c_void_p
    libc.map.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


def _mapped(f, offset, nbytes, dtype, shape):
    """The `nbytes` at `offset` of the open file `f` as a tensor of `dtype` and `shape` over a
    private mapping of their own pages (MAP_PRIVATE: a write copies the page, never the file),
    unmapped when the last tensor over it goes, so that a weight laid out anew (a packed
    convolution's at its first call, the VAE's encoder at its first run) gives its pages back as
    it goes, not all at the end. mmap(2) itself, through ctypes: Python's mmap objects each hold
    a duplicate of the file's descriptor, one per tensor (SD 1.5 has 1,130), past many systems'
    limit of 1,024 open files. None where there is none: a tensor under a page (its mapping
    would hold more than it), a system that is not POSIX (on Windows a mapped file can be
    neither removed nor replaced, and our exports replace the file they write), a file system
    that does not map."""
    if os.name != "posix" or nbytes < mmap.PAGESIZE:
        return None
    first = offset // mmap.PAGESIZE * mmap.PAGESIZE
    length = offset + nbytes - first
    try:
        addr = _libc().map(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE,
                           f.fileno(), first)
    except (OSError, AttributeError):  # no C library to ask
        return None
    if addr is None or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
        return None
    pages = (ctypes.c_ubyte * length).from_address(addr)
    pages.owner = _Pages(addr, length)  # torch.frombuffer holds `pages`, and so this
    return torch.frombuffer(pages, dtype=dtype, count=nbytes // dtype.itemsize,
                            offset=offset - first).view(shape)


def read_checkpoint(path, dtype=None, mapped=False) -> tuple[dict, int | None]:
    """(tensors, global_step) of a weight file as read_state_dict reads it. global_step, the
    training step ldm's checkpoints record beside the weights (or a "global_step" tensor among
    them), is None where the file has none; it is taken out of the tensors. `dtype`: floating
    tensors come back in it, each cast as it is read; `mapped`: those that need no cast left in
    the file's mapping (read_safetensors; a pickled file is read whole)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = read_safetensors(path, dtype, mapped)
        return sd, _global_step(sd.pop("global_step", None), path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format (accepted: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)})")
    obj = torch_load(path)
    step = obj.get("global_step") if isinstance(obj, dict) else None
    sd = _tensors_only(obj, path)
    inner = sd.pop("global_step", None)
    if dtype is not None:
        for k, v in sd.items():  # one at a time, each original freed as it goes
            sd[k] = _cast(v, dtype)
    return sd, _global_step(inner if inner is not None else step, path)


def torch_load(path, source=None):
    """torch.load of a pickled file with weights_only=True: tensors, dicts, lists, strings and
    numbers come back, nothing in the file runs. `source`: the file's bytes as a file object
    (default: the file at `path`). A file that needs code, or a cut or broken one, is a
    ValueError naming `path`."""
    try:
        return torch.load(path if source is None else source, map_location="cpu",
                          weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: the file contains pickled code (objects other than tensors) "
                         f"and was refused; convert it to .safetensors with a trusted tool "
                         f"({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e


def _global_step(value, path: Path) -> int | None:
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{path}: global_step={value!r} is not a whole number")


def _tensors_only(obj, path: Path) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not isinstance(obj.get("global_step", 0), torch.Tensor):  # a step beside the weights
        obj = {k: v for k, v in obj.items() if k != "global_step"}
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {key_list(bad)}")
    return obj


def misfit(module: nn.Module, sd: dict) -> tuple[list, list, list]:
    """(missing, unexpected, wrong shapes) of `sd` against `module`'s state dict; each wrong
    shape is (key, shape in sd, shape in the module)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    return missing, unexpected, shapes


def check_state_dict(module: nn.Module, sd: dict, name: str, dtype=None) -> nn.Module:
    """Load `sd` into `module` strictly (floating tensors in `dtype`, default float32: a tensor
    already in it is taken as it is, not copied); missing, unexpected and
    wrongly shaped keys become one ValueError naming `name` (the file, or the file and part),
    the module's class and the keys. Every loader of weights goes through here, so every such
    error reads the same. A module built on the meta device takes the tensors themselves (no
    copy into nothing)."""
    missing, unexpected, shapes = misfit(module, sd)
    shapes = [f"{k} {have} != {want}" for k, have, want in shapes]
    problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in (
        ("missing", missing), ("unexpected", unexpected),
        ("with the wrong shape (weights != model)", shapes)) if keys]
    if problems:
        raise ValueError(f"{name}: the weights do not fit the {type(module).__name__}: "
                         + "; ".join(problems))
    sd = {k: _cast(v, dtype or torch.float32) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=any(p.is_meta for p in module.parameters()))
    return module


def build(cls, cfg, sd, name: str, device, dtype) -> nn.Module:
    """`cls(cfg)` with the weights `sd` (check_state_dict), on `device` in `dtype`, in eval
    mode. The module holds the tensors of `sd` where they already are in `dtype` (as
    read_checkpoint(path, dtype) reads them): no second copy of the weights. `sd` may be a
    function that reads them, called here: a reader that passes functions reads each part just
    before it is built and holds nothing of it after (low-memory loading puts each part on disk
    before the next is read: on_build)."""
    if callable(sd):
        sd = sd()
    with on_meta():
        model = cls(cfg)
    model = check_state_dict(model, sd, name, dtype).to(device=device, dtype=dtype).eval()
    del sd
    return built(model)


class _NoInit(TorchFunctionMode):
    """torch.nn.init's functions do nothing (they return their tensor)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta():
    """Modules made inside are built on the meta device, their initialisations skipped: no
    memory and no time for weights that are replaced (check_state_dict). Skipped, not run on
    meta: torch's meta normal_ imports torch._dynamo, 70 MB held for good."""
    with torch.device("meta"), _NoInit():
        yield


_ON_BUILD = contextvars.ContextVar("on_build", default=None)


@contextlib.contextmanager
def on_build(fn):
    """Within the block (in this thread), every module a reader builds from its weights
    (`build`, checkpoint.load_model) is handed to `fn` as soon as it is built: low-memory
    loading puts each part on disk before the next is read (pipelines/offload.py)."""
    token = _ON_BUILD.set(fn)
    try:
        yield
    finally:
        _ON_BUILD.reset(token)


def built(module: nn.Module) -> nn.Module:
    """A reader's module, just built, given to the `on_build` function if there is one."""
    fn = _ON_BUILD.get()
    if fn is not None:
        fn(module)
    return module
