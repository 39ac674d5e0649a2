"""Weight files: reading tensors safely (`read_checkpoint`, `read_state_dict`: safetensors, or
torch.load with weights_only=True), the accepted suffixes, and the one strict loader of a state
dict into a module (`check_state_dict`; `build` around it), whose errors name the part and the keys.
"""
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES  # every weight file we read


def key_list(keys, limit: int = 20) -> str:
    """'a, b, c ... (N in all)' for error messages."""
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_state_dict(path) -> dict:
    """Tensors of a .safetensors file, or of a pickled .ckpt/.pt/.pth/.bin read with
    weights_only=True (no code runs; a file that needs code is refused)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path) -> tuple[dict, int | None]:
    """(tensors, global_step) of a weight file as read_state_dict reads it. global_step, the
    training step ldm's checkpoints record beside the weights (or a "global_step" tensor among
    them), is None where the file has none; it is taken out of the tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        return sd, _global_step(sd.pop("global_step", None), path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format (accepted: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: the file contains pickled code (objects other than tensors) "
                         f"and was refused; convert it to .safetensors with a trusted tool "
                         f"({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    step = obj.get("global_step") if isinstance(obj, dict) else None
    sd = _tensors_only(obj, path)
    inner = sd.pop("global_step", None)
    return sd, _global_step(inner if inner is not None else step, path)


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


def check_state_dict(module: nn.Module, sd: dict, name: str) -> nn.Module:
    """Load `sd` into `module` strictly (floating tensors as float32); missing, unexpected and
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
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=any(p.is_meta for p in module.parameters()))
    return module


def build(cls, cfg, sd: dict, name: str, device, dtype) -> nn.Module:
    """`cls(cfg)` with the weights `sd` (check_state_dict), on `device` in `dtype`, in eval mode."""
    with torch.device("meta"):  # no time spent on a random init that is overwritten
        model = cls(cfg)
    return check_state_dict(model, sd, name).to(device=device, dtype=dtype).eval()
