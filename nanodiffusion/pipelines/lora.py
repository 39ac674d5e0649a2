"""LoRAs on a Stable Diffusion pipeline: `pipe.load_lora(path, scale)` (several at once, each
with its scale), `<lora:name:scale>` tags in prompts (lora_tags.py), `pipe.unload_lora(name)`,
`pipe.unload_loras()`. formats/lora.py reads the files.

LoRAs are fused into the weights, as AUTOMATIC1111 applies them: the pipeline keeps a copy of
the original weight of every module a LoRA changes, and the weights in use are always made
from those copies, original + sum of scale * (alpha / rank) * up @ down over the LoRAs active
(in float32, in the order they were loaded, then cast to the weights' dtype), whenever the set
of active LoRAs or their scales changes. So an image depends only on the LoRAs of its call,
never on those before it, and unloading them all puts back the original weights bit for bit
without reading the model again. A generation runs at the model's own speed.

The LoRAs of a call are the loaded ones and its prompt's tags; after it they stay fused until
a call with other LoRAs (a server with one LoRA in every request fuses it once).
"""
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..formats.lora import read_lora
from .lora_tags import LoraFolder, scale_text, short_hash, take_tags

CACHED_FILES = 8  # LoRA files read for tags kept in memory, the least recently used dropped


@dataclass(frozen=True)
class Active:
    """A LoRA file (formats.lora.LoraFile) as used: its name and each part's multiplier."""
    name: str
    file: object
    te: float
    unet: float


@dataclass(frozen=True)
class CallLoras:
    """What one call runs with: `prompt` without its tags (to encode), `recorded` the prompt
    for the PNG parameters (the loaded LoRAs as tags after it), `parameters` ("Lora hashes")."""
    prompt: str
    recorded: str
    parameters: dict


class LoraStack:
    """The LoRAs of one pipeline's UNet and text encoder, and the original weights they
    replace."""

    def __init__(self, modules):
        self.modules = modules  # part ("unet", "text_encoder") -> its root module
        self.loaded = OrderedDict()  # name -> Active, in load order
        self.files = OrderedDict()  # (path, size, mtime) -> LoraFile: files read for tags
        self.folder = None
        self._originals = {}  # "part.module" -> the module's original weight
        self._fused = ()  # the (name, file, te, unet) list the weights are made of now

    def targets(self):
        """{part: {module name: weight shape}} of every Linear and Conv2d a LoRA may change."""
        return {part: {n: tuple(m.weight.shape) for n, m in root.named_modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d))}
                for part, root in self.modules.items()}

    def read(self, path):
        """formats.lora.read_lora of `path` for this model, kept for the next time."""
        path = Path(path)
        st = path.stat() if path.is_file() else None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns) if st else None
        if key in self.files:
            self.files.move_to_end(key)
            return self.files[key]
        lora = read_lora(path, self.targets())
        if key is not None:
            self.files[key] = lora
            while len(self.files) > CACHED_FILES:
                self.files.popitem(last=False)
        return lora

    @staticmethod
    def _key(active):
        return tuple((a.name, a.file, a.te, a.unet) for a in active)  # files by identity

    def is_fused(self, active):
        """Whether the weights are those of `active` (a list of Active) already."""
        return self._key(active) == self._fused

    def fuse(self, active):
        """Make the weights those of `active` (a list of Active); -> the parts whose weights
        changed. Modules no LoRA changes any more get their original weights back."""
        key = self._key(active)
        if key == self._fused:
            return set()
        changes = {}  # "part.module" -> [(layer, multiplier)]
        for a in active:
            for module, layer in a.file.layers.items():
                scale = a.te if module.startswith("text_encoder.") else a.unet
                changes.setdefault(module, []).append((layer, scale))
        changed = set()
        with torch.no_grad():
            for module in sorted(set(changes) | set(self._originals)):
                weight = self._module(module).weight
                if module not in self._originals:
                    self._originals[module] = weight.detach().clone()
                original = self._originals[module]
                if module in changes:
                    w = original.to(torch.float32, copy=True)  # never the original itself
                    for layer, scale in changes[module]:
                        w += layer.delta(w.shape, scale, w.device)
                    weight.copy_(w)
                else:
                    weight.copy_(original)
                    del self._originals[module]
                changed.add(module.split(".", 1)[0])
        self._fused = key
        return changed

    def _module(self, module):
        part, name = module.split(".", 1)
        return self.modules[part].get_submodule(name)


class LoraMixin:
    """The LoRA methods of Pipeline (pipelines/sd.py)."""

    lora_dir = None  # the folder <lora:name> tags are looked up in (lora_tags.LoraFolder)

    @property
    def _loras(self):
        stack = self.__dict__.get("_lora_stack")
        if stack is None:
            stack = self._lora_stack = LoraStack({"unet": self.unet,
                                                  "text_encoder": self.text_encoder})
        return stack

    @property
    def loras(self):
        """{name: (text encoder multiplier, UNet multiplier)} of the loaded LoRAs."""
        return {name: (a.te, a.unet) for name, a in self._loras.loaded.items()}

    def load_lora(self, path, scale=1.0, *, text_encoder_scale=None, name=None):
        """Load the LoRA file at `path` (kohya / A1111, LoCon, diffusers / PEFT; see
        formats/lora.py) with multiplier `scale` (`text_encoder_scale`: the text encoder's,
        if not the same), fused into the weights now; -> its name (`name`, default the file's
        name without suffix). A file that does not fit this model is refused whole."""
        unet, te = _multiplier(scale), _multiplier(scale if text_encoder_scale is None
                                                     else text_encoder_scale)
        stack = self._loras
        name = name or Path(path).stem
        if name in stack.loaded:
            raise InputError(f"a LoRA named {name!r} is loaded already; unload_lora({name!r}) "
                             f"first, or give another name")
        with self.resident_parts():  # low memory: their shapes are checked
            stack.loaded[name] = Active(name, stack.read(path), te, unet)
        try:
            self._fuse_loras([])
        except BaseException:  # e.g. out of memory: not loaded; the next fuse starts again
            del stack.loaded[name]
            raise
        return name

    def unload_lora(self, name):
        """Take the LoRA `name` off; the weights are rebuilt from the originals."""
        if name not in self._loras.loaded:
            raise InputError(f"no LoRA named {name!r} is loaded; loaded: {list(self.loras)}")
        del self._loras.loaded[name]
        self._fuse_loras([])

    def unload_loras(self):
        """Take every LoRA off: the original weights back, bit for bit."""
        self._loras.loaded.clear()
        self._fuse_loras([])

    def _fuse_loras(self, extra):
        """Fuse the loaded LoRAs and `extra` (Active); prompts encoded with other text
        encoder weights are forgotten."""
        active = [*self._loras.loaded.values(), *extra]
        if self._loras.is_fused(active):  # as they are (low memory: no part read in)
            return
        with self.resident_parts() as held:  # low memory: in for the fusing
            changed = self._loras.fuse(active)
            for part in changed:
                if held.get(part) is not None:
                    held[part].dirty = True  # the file takes the fused weights
        if "text_encoder" in changed:
            self._prompt_cache.clear()

    def use_loras(self, prompt, syntax=True):
        """One call's LoRAs: the loaded ones and the prompt's <lora:...> tags (not read when
        `syntax` is False: the prompt is literal text), fused; -> CallLoras."""
        text, tags = take_tags(prompt) if syntax else (prompt, [])
        stack = self._loras
        extra = []
        if tags:
            if self.lora_dir is None:
                raise InputError(f"the prompt names LoRAs ({', '.join(t.name for t in tags)}) "
                                 f"but this pipeline has no LoRA folder (lora_dir; the CLI's "
                                 f"--lora-dir, the server's <models-dir>/Lora)")
            if stack.folder is None or stack.folder.root != Path(self.lora_dir):
                stack.folder = LoraFolder(self.lora_dir)
            with self.resident_parts():  # low memory: their shapes are checked
                for t in tags:
                    extra.append(Active(t.name, _read_tagged(stack, t.name), t.te, t.unet))
        self._fuse_loras(extra)
        named = [*stack.loaded.values(), *extra]
        hashes = {a.name.replace(":", "").replace(",", ""): short_hash(a.file.path)
                  for a in named}
        recorded = " ".join([prompt] + [f"<lora:{a.name}:{scale_text(a.te, a.unet)}>"
                                        for a in stack.loaded.values()])
        params = {"Lora hashes": ", ".join(f"{k}: {v}" for k, v in hashes.items())}
        return CallLoras(text, recorded, params if hashes else {})


def _read_tagged(stack, name):
    path = stack.folder.find(name)
    try:
        return stack.read(path)
    except ValueError as e:  # the tag names a file that is not a LoRA of this model
        raise InputError(f"<lora:{name}>: {e}") from e


def _multiplier(x):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise InputError(f"a LoRA's scale must be a finite number, got {x!r}")
    return float(x)
