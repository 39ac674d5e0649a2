"""Textual inversion embeddings as people download them -> plain data: the vectors (n, D) that
stand for a name in prompts, and what the file says of itself. pipelines/embeddings.py uses
them; prompts.py puts them where the name is.

Layouts read (each found from the file's contents, as AUTOMATIC1111's create_embedding_from_data
finds it):
- AUTOMATIC1111's `.pt`: torch.save of {"string_to_token": {"*": 265}, "string_to_param":
  {"*": (n, D)}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}, read with
  torch.load(weights_only=True): nothing in a file runs, a file that would run code is refused.
- one tensor, (n, D) or (D,), under any key: the `.safetensors` A1111 extensions and civitai
  give (`emb_params`), diffusers' `learned_embeds.safetensors` / `.bin` ({token: vectors}).
- SDXL embeddings (`clip_l` (n, 768) and `clip_g` (n, 1280)) are read, to be listed and refused
  by name: nanodiffusion has no SDXL models.
An embedding's name is its file's name without the suffix, as in A1111; diffusers' files, all
named learned_embeds, are named by the token they hold (diffusers' `<cat-toy>`).
"""
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .files import key_list, torch_load

SUFFIXES = (".pt", ".bin", ".safetensors")  # what A1111 reads in its embeddings folder
DIFFUSERS_STEM = "learned_embeds"  # diffusers' file name: the token inside names it
MAX_BYTES = 64 * 2**20  # an embedding is kilobytes; a bigger file is a model put there by mistake
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(eq=False)  # one file read is one embedding: compared by identity
class EmbeddingFile:
    """An embedding file read: `vectors` (n, D) float32 (SDXL: clip_l and clip_g side by side,
    (n, 768 + 1280), as A1111 counts its width); `sha256` of the whole file (A1111's hash);
    `step`, `sd_checkpoint`, `sd_checkpoint_name` what an A1111 file records (else None)."""
    path: Path
    name: str
    vectors: torch.Tensor
    sha256: str
    sdxl: bool = False
    step: object = None
    sd_checkpoint: object = None
    sd_checkpoint_name: object = None

    @property
    def width(self):
        return self.vectors.shape[1]

    def misfit(self, width, max_vectors):
        """Why a text encoder of `width` whose chunks hold `max_vectors` tokens cannot use
        this embedding (a sentence naming the file), or None when it can."""
        if self.sdxl:
            return (f"{self.path}: an SDXL embedding (clip_l and clip_g vectors); "
                    f"nanodiffusion has no SDXL models, so it cannot use it")
        n = self.vectors.shape[0]
        if self.width != width:
            kind = {768: " (SD 1.x)", 1024: " (SD 2.x)"}.get(self.width, "")
            return (f"{self.path}: an embedding {self.width} wide{kind}, for another model; "
                    f"this model's text encoder is {width} wide")
        if n > max_vectors:
            return (f"{self.path}: {n} vectors, more than the {max_vectors} tokens of a "
                    f"prompt chunk of this model")
        return None


def read_embedding(path) -> EmbeddingFile:
    """The embedding file at `path` (.pt, .bin or .safetensors). Each bad file is a ValueError
    naming it: truncated or unreadable, a pickle that would run code, a layout that is not an
    embedding, vectors that are not finite numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embedding file")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: not an embedding file (accepted: {', '.join(SUFFIXES)})")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB, too big for a "
                         f"textual inversion embedding (a model file?)")
    data = path.read_bytes()
    if path.suffix.lower() == ".safetensors":
        try:
            obj = load_safetensors(data)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        obj = torch_load(path, io.BytesIO(data))
    token, vectors, sdxl = _vectors(path, obj)
    meta = obj if isinstance(obj, dict) and "string_to_param" in obj else {}
    name = token if path.stem == DIFFUSERS_STEM and token else path.stem
    return EmbeddingFile(path, name, vectors, hashlib.sha256(data).hexdigest(), sdxl,
                         *(_plain(meta.get(k)) for k in ("step", "sd_checkpoint",
                                                         "sd_checkpoint_name")))


def _vectors(path, obj):
    """(the token the file names, vectors (n, D) float32, SDXL or not) of a file's contents."""
    if isinstance(obj, torch.Tensor):  # a bare tensor (diffusers reads these too)
        return None, _matrix(path, "the tensor", obj), False
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a textual inversion "
                         f"embedding")
    if "string_to_param" in obj:  # A1111's
        params = obj["string_to_param"]
        tensors = params if isinstance(params, dict) else {"string_to_param": params}
        where = "string_to_param"
    elif all(k in obj for k in SDXL_KEYS):
        parts = [_matrix(path, k, obj[k]) for k in SDXL_KEYS]
        if parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"{path}: clip_l has {parts[0].shape[0]} vectors, clip_g "
                             f"{parts[1].shape[0]}")
        return None, torch.cat(parts, dim=1), True  # (n, 768 + 1280)
    else:
        tensors, where = obj, "the file"
    found = {str(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(found) != 1 or len(tensors) != 1:
        keys = key_list(map(str, tensors)) or "none"
        raise ValueError(f"{path}: not a textual inversion embedding: {where} must hold one "
                         f"tensor of vectors (AUTOMATIC1111's string_to_param {{'*': (n, "
                         f"width)}}, emb_params, or diffusers' {{token: vectors}}); it holds "
                         f"{len(found)} tensors among its keys: {keys}")
    (token, tensor), = found.items()
    named = token not in ("*", "emb_params") and not token.startswith("string_to_param")
    return token if named else None, _matrix(path, token, tensor), False


def _matrix(path, key, tensor):
    """A tensor of vectors -> (n, D) float32: (D,) is one vector; values must be finite."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or \
            tensor.ndim not in (1, 2) or tensor.numel() == 0:
        what = (f"a {tuple(tensor.shape)} {tensor.dtype} tensor"
                if isinstance(tensor, torch.Tensor) else f"a {type(tensor).__name__}")
        raise ValueError(f"{path}: {key} is {what}, not vectors (n, width) of floats")
    out = tensor.detach().to(torch.float32).reshape(-1, tensor.shape[-1])  # (n, D)
    if not torch.isfinite(out).all():
        raise ValueError(f"{path}: {key} holds NaN or infinite values")
    return out


def _plain(value):
    """What A1111 records beside the vectors, as JSON can show it."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
