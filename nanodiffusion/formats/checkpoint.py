"""Our own checkpoint format: safetensors with the model's class and config in the metadata,
so a file rebuilds its model alone (DESIGN.md rule 7). Training state (optimizer, EMA, RNG,
data position) goes in a second file read back with `torch.load(weights_only=True)`.

Every write is atomic: a temporary file in the same folder, fsync, then `os.replace`, so a
crash never leaves a half-written checkpoint where the last good one was.
"""
import dataclasses
import json
import os
import pickle
import re
import tempfile
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import built, check_state_dict, on_meta, read_state_dict

FORMAT = "nanodiffusion/1"


def _model_classes():
    # Explicit table of what our files may hold; a new model adds one line here.
    from ..models.clip import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
    from ..models.taesd import TAESD, TAESDConfig
    from ..models.unet import UNet, UNetConfig
    from ..models.vae import VAE, VAEConfig

    table = {
        "UNet": (UNet, {"config": UNetConfig}),
        "VAE": (VAE, {"config": VAEConfig}),
        "TAESD": (TAESD, {"config": TAESDConfig}),
        "CLIPTextModel": (CLIPTextModel, {"config": CLIPTextConfig}),
        "CLIPModel": (CLIPModel, {"text_config": CLIPTextConfig,
                                  "vision_config": CLIPVisionConfig}),
    }
    try:
        from ..models.prior import Prior, PriorConfig

        table["Prior"] = (Prior, {"config": PriorConfig})
    except ImportError:
        pass
    return table


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d):
    """Rebuild a config dataclass from JSON, turning lists back into tuples where the field
    is a tuple, and refusing unknown fields by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {unknown}; "
                         f"accepted: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        is_tuple = hints.get(k) is tuple or typing.get_origin(hints.get(k)) is tuple
        kwargs[k] = tuple(v) if is_tuple and isinstance(v, list) else v
    return cls(**kwargs)


def _model_args(module):
    """The constructor arguments of one of our models, as (class name, {arg: config})."""
    name = type(module).__name__
    if name not in _model_classes():
        raise TypeError(f"cannot save a {name}: not one of {sorted(_model_classes())}")
    _, arg_types = _model_classes()[name]
    return name, {arg: getattr(module, arg) for arg in arg_types}


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) then move the finished file over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp makes 0600 files, and writers may replace the file (safetensors' save_file
        # does), so the mode is set on what was written: 0666 less the umask, as open() gives
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write(path, write_fn):
    """atomic_write, with a failed write (full disk, read-only folder, file size limit) as an
    OSError whose filename is `path` (not the temporary file) and whose strerror is the cause.
    torch.save and safetensors report such failures as their own errors (torch: a RuntimeError
    "enforce fail at inline_container.cc" that names neither)."""
    try:
        atomic_write(path, write_fn)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except SafetensorError as e:  # its message ends "I/O error: <strerror> (os error <errno>)"
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer
    turns it into a RuntimeError without the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _torch_save(obj, tmp):
    with open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def unwrap(module):
    """The plain module under a torch.compile and/or DDP wrapper."""
    module = getattr(module, "_orig_mod", module)
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    return getattr(module, "_orig_mod", module)


def save_model(module, path, dtype=None, extra=None):
    """Write `module` (unwrapped: never a DDP or compiled wrapper) to a safetensors file whose
    metadata holds its class and config. `dtype` (e.g. torch.float16) shrinks storage."""
    module = unwrap(module)
    name, args = _model_args(module)
    meta = {"format": FORMAT, "class": name,
            "config": json.dumps({k: config_to_dict(v) for k, v in args.items()})}
    if extra:
        meta["extra"] = json.dumps(extra)
    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    _write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def read_metadata(path):
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_model(path, dtype=torch.float32, device="cpu"):
    """Rebuild a model from one of our safetensors files, loading weights strictly."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a nanodiffusion model file (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    table = _model_classes()
    if meta.get("class") not in table:
        raise ValueError(f"{path}: unknown model class {meta.get('class')!r}; "
                         f"known: {sorted(table)}")
    cls, arg_types = table[meta["class"]]
    raw = json.loads(meta["config"])
    args = {k: config_from_dict(arg_types[k], raw[k]) for k in arg_types}
    sd = read_state_dict(path, dtype, mapped=True)  # each cast as read, or left in the file
    with on_meta():  # no time spent on a random init that is overwritten
        model = cls(**args)
    check_state_dict(model, sd, str(path), dtype)
    if any(b.is_meta for b in model.buffers()):  # non-persistent buffers: build for real
        model = cls(**args)
        check_state_dict(model, sd, str(path), dtype)
    del sd  # the model holds the tensors: nothing else (low-memory loading, files.on_build)
    return built(model.to(device=device, dtype=dtype).eval())


def save_state(path, state):
    """Training state: a dict of tensors, numbers, strings, lists and dicts (no objects).
    A failed write is an OSError naming `path` and the cause; the file there is kept."""
    _write(path, lambda tmp: _torch_save(state, tmp))


def load_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated or foreign
        raise ValueError(f"{path}: not a readable training state ({e})") from e
