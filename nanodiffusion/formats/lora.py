"""LoRA files as people download them -> plain data: for each module a LoRA changes, named as
our modules are ("unet.down_blocks.1.attentions.0.proj_in", "text_encoder.encoder.layers.0.
self_attn.q_proj"), its down and up matrices and its alpha. pipelines/lora.py applies them.

Formats read (each file's layout found from its keys):
- kohya / AUTOMATIC1111 (sd-scripts, LyCORIS LoCon): `lora_unet_<module>` and
  `lora_te_<module>` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`, the module's name
  with its dots turned into underscores, in diffusers' UNet names (what sd-scripts trains SD 1.x
  and 2.x on) or the original LDM ones (`lora_unet_input_blocks_4_1_proj_in`, formats/
  ldm_keys.py), the text encoder's in transformers' (`lora_te_text_model_encoder_layers_0_
  self_attn_q_proj`). LoCon's convolutions: a k x k conv down, a 1 x 1 conv up.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.` for the
  text encoder), alpha from the `lora_adapter_metadata` diffusers writes beside them; and
  diffusers' older layout, `<module>.processor.to_q_lora.down.weight`, `q_proj.lora_linear_layer.
  up.weight`, `<module>.lora.down.weight`.
The change a layer makes to its module's weight is (alpha / rank) * up @ down (kohya's, A1111's
and PEFT's scaling; no alpha: 1). Every key must be used, every module found, every shape fit,
or the file is refused with an error naming it and the keys: never a partial LoRA.

Written (save_kohya, what `train lora` makes): the kohya layout, under the names kohya_name
gives, the ones the reader maps back.
"""
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import atomic_write
from .files import key_list, read_checkpoint
from .ldm_keys import RESNET, _unet_layout_diffusers, _unet_pairs

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # our part -> kohya's prefix
# where sd-scripts puts a part's modules: CLIP's under text_model. (transformers 4's layout)
KOHYA_ROOTS = {"unet": "", "text_encoder": "text_model."}
ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down",
         "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
         "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
         "alpha": "alpha"}
# diffusers' older attention-processor layout: `<attention>.processor.to_q_lora.down.weight`;
# the same names serve the text encoder's attention (q_proj ...) in its converted files
OLD_PROCESSOR = re.compile(r"^(?P<attn>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)"
                           r"_lora\.(?:(?P<role>down|up)\.weight|alpha)$")
OLD_TARGETS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"),
               "to_v": ("to_v", "v_proj"), "to_out": ("to_out.0", "out_proj")}
# what other network types a file may hold, named in the error that refuses them
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with Tucker (lora_mid)",
               "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "a full diff",
               "oft_": "OFT"}


@dataclass
class LoraLayer:
    """One module's low-rank change: down (r, in) or (r, in, kh, kw); up (out, r) or (out, r,
    1, 1); alpha None where the file gives none (scale 1)."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self, shape, scale=1.0, device=None):
        """scale * (alpha / rank) * up @ down as a float32 weight of `shape` (a Linear's (out,
        in) or a Conv2d's (out, in, kh, kw); a 1 x 1 conv and a Linear take each other's)."""
        factor = scale * (1.0 if self.alpha is None else self.alpha / self.rank)
        up = self.up.to(device, torch.float32).flatten(1)  # (out, r)
        down = self.down.to(device, torch.float32).flatten(1)  # (r, in * kh * kw)
        return (factor * (up @ down)).reshape(shape)  # (out, in * kh * kw) -> shape


@dataclass(eq=False)  # one file read is one LoRA: compared by identity
class LoraFile:
    """A LoRA file read: `layers` by "unet.<module>" / "text_encoder.<module>" (our names);
    `layout` "kohya", "peft" or "diffusers-old"; `metadata` the safetensors header's text."""
    path: Path
    layers: dict
    layout: str
    metadata: dict = field(default_factory=dict)

    def parts(self):
        return sorted({key.split(".", 1)[0] for key in self.layers})


def read_lora(path, targets) -> LoraFile:
    """The LoRA at `path` for a model whose modules are `targets`: {part ("unet",
    "text_encoder"): {module name: weight shape}} (its Linear and Conv2d modules). Each bad
    file is a ValueError naming it: unreadable or truncated, pickled code, another network
    type, keys that match no module, layers that do not fit their modules."""
    path = Path(path)
    if path.is_dir() and (path / DIFFUSERS_NAME).is_file():
        path = path / DIFFUSERS_NAME  # the folder diffusers' save_lora_weights writes
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    tensors, _ = read_checkpoint(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors, so no LoRA")
    _refuse_other_networks(path, tensors)
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in tensors)
    layout = "kohya" if kohya else ("peft" if any(".lora_A." in k for k in tensors)
                                    else "diffusers-old")
    groups, unread = _group(tensors)
    names = _Names(targets)
    layers, unmatched = {}, list(unread)
    for module, parts in groups.items():
        ours = names.find(module)
        if ours is None:
            unmatched += [f"{module}.{role}" for role in parts]
        else:
            layers[ours] = parts
    if unmatched:
        raise ValueError(f"{path}: {len(unmatched)} LoRA keys match no module of this model "
                         f"(a LoRA for another architecture, e.g. SDXL, or a format not read "
                         f"here); nothing was loaded: {key_list(unmatched)}")
    try:
        alphas = _peft_alphas(metadata, layers) if layout == "peft" else {}
    except (ValueError, re.error) as e:
        raise ValueError(f"{path}: {e}") from e
    return LoraFile(path, _layers(path, layers, alphas, targets), layout, metadata)


def _refuse_other_networks(path, tensors):
    for key in tensors:
        tail = key.rsplit(".", 2)[-2:]  # a network's own names end its keys
        kind = next((kind for marker, kind in UNSUPPORTED.items()
                     if any(t.startswith(marker) for t in tail)), None)
        if key.endswith((".lora_B.bias", ".lora_up.bias")):
            kind = "LoRA with biases"
        if kind:
            raise ValueError(f"{path}: a {kind} network ({key}), not a LoRA; this reads "
                             f"LoRA and LoCon (lora_down / lora_up, lora_A / lora_B)")
        if key.startswith(("lora_te1_", "lora_te2_")):
            raise ValueError(f"{path}: an SDXL LoRA ({key}: two text encoders); SDXL models "
                             f"are not supported here, so neither are their LoRAs")


def _group(tensors):
    """{module as the file names it: {"down", "up", "alpha": tensor}}, and the keys that are
    none of these."""
    groups, unread = {}, []
    for key, value in tensors.items():
        old = OLD_PROCESSOR.match(key)
        if old:
            module, role = f"{old['attn']}.{old['proj']}_lora", old["role"] or "alpha"
        else:
            module, role = next(((key[:-len(s) - 1], r) for s, r in ROLES.items()
                                 if key.endswith("." + s)), (None, None))
        if module is None:
            unread.append(key)
        else:
            groups.setdefault(module, {})[role] = value
    return groups, unread


class _Names:
    """A LoRA file's module names -> ours ("part.module"): kohya's underscored names (diffusers'
    and LDM's), dotted ones with or without a part prefix, diffusers' old processor names."""

    def __init__(self, targets):
        self.targets = {part: set(mods) for part, mods in targets.items()}
        self.flat = {}  # kohya's underscored name -> ours; None where two modules share it
        for part, modules in self.targets.items():
            for name in modules:
                ours = f"{part}.{name}"
                for alias in self._aliases(part, name, modules):
                    key = _underscored(part, alias)
                    self.flat[key] = ours if self.flat.get(key, ours) == ours else None

    @staticmethod
    def _aliases(part, name, modules):
        if part == "text_encoder":  # sd-scripts' CLIP modules sit under text_model.
            return [name, KOHYA_ROOTS[part] + name]
        ldm = _ldm_names(modules).get(name)
        return [name] + ([ldm] if ldm else [])

    def find(self, module):
        if module.startswith(tuple(PARTS.values())):
            return self.flat.get(module)
        if module.endswith("_lora"):  # diffusers' old processor layout
            attn, proj = module[:-len("_lora")].rsplit(".", 1)
            return next(filter(None, (self._dotted(f"{attn}.{t}") for t in OLD_TARGETS[proj])),
                        None)
        return self._dotted(module)

    def _dotted(self, module):
        """`unet.<name>`, `text_encoder.[text_model.]<name>`, or a name without its part
        (diffusers' oldest UNet files; peft's own `base_model.model.` prefix)."""
        module = module.removeprefix("base_model.model.")
        part, _, rest = module.partition(".")
        tries = [(part, rest)] if part in self.targets else [(p, module) for p in self.targets]
        for part, name in tries:
            name = name.removeprefix("text_model.") if part == "text_encoder" else name
            if name in self.targets[part]:
                return f"{part}.{name}"
        return None


def _underscored(part, name):
    return PARTS[part] + name.replace(".", "_")


def kohya_name(part, module):
    """The kohya name of our module `module` of `part` ("unet", "text_encoder"), as sd-scripts
    writes it and A1111, ComfyUI and diffusers read it: `lora_unet_down_blocks_1_attentions_0_
    proj_in`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`."""
    return _underscored(part, KOHYA_ROOTS[part] + module)


def save_kohya(path, layers, metadata=None):
    """Write `layers` ({"unet.<module>" / "text_encoder.<module>": LoraLayer}, our names) as a
    kohya / A1111 file, atomically: each module's `lora_down.weight` and `lora_up.weight` (a
    Linear's matrices, or a conv's: down (r, in, kh, kw), up (out, r, 1, 1)) and its `alpha`
    (a float32 scalar; the rank where the layer has none) under kohya_name, the text
    `metadata` (sd-scripts' ss_* keys) in the header."""
    tensors = {}
    for ours, layer in sorted(layers.items()):
        key = kohya_name(*ours.split(".", 1))
        alpha = layer.rank if layer.alpha is None else layer.alpha
        tensors[f"{key}.lora_down.weight"] = layer.down.detach().cpu().contiguous()
        tensors[f"{key}.lora_up.weight"] = layer.up.detach().cpu().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


_LDM_CACHE = {}


def _ldm_names(modules):
    """Our UNet module names -> their LDM names (ldm_keys' rename tables), for the UNets those
    tables describe; {} for others."""
    key = frozenset(modules)
    if key not in _LDM_CACHE:
        try:
            pairs = _unet_pairs(*_unet_layout_diffusers(modules))
        except (ValueError, IndexError):
            pairs = []
        out = {}
        for ldm, ours, table in pairs:
            for name in modules:
                if not (name + ".").startswith(ours):
                    continue
                rest = (name + ".")[len(ours):]
                if table is RESNET:
                    rest = next((a for a, b in table if b == rest), None)
                if rest is not None and (name not in out or len(ours) > out[name][1]):
                    out[name] = ((ldm + rest)[:-1], len(ours))
        _LDM_CACHE[key] = {name: ldm for name, (ldm, _) in out.items()}
    return _LDM_CACHE[key]


def _layers(path, found, alphas, targets):
    """{ours: {"down", "up", "alpha"}} -> {ours: LoraLayer}, each checked against its module's
    weight shape; every problem of the file in one error."""
    layers, problems = {}, []
    for ours, parts in found.items():
        part, name = ours.split(".", 1)
        if "down" not in parts or "up" not in parts:
            have = "lora_down" if "down" in parts else "lora_up" if "up" in parts else "alpha"
            problems.append(f"{ours}: only its {have}")
            continue
        down, up = parts["down"], parts["up"]
        alpha = parts["alpha"].item() if "alpha" in parts else alphas.get(ours)
        layer = LoraLayer(down, up, None if alpha is None else float(alpha))
        problem = _misfit(layer, targets[part][name])
        if problem:
            problems.append(f"{ours}: {problem}")
        layers[ours] = layer
    if problems:
        raise ValueError(f"{path}: {len(problems)} LoRA layers do not fit this model (a LoRA "
                         f"for another architecture, e.g. SD 2.x on SD 1.x, or a damaged "
                         f"file); nothing was loaded: {key_list(problems, 8)}")
    return layers


def _misfit(layer, shape):
    """Why `layer` cannot change a weight of `shape`, or None."""
    down, up = layer.down, layer.up
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.ndim == 4 and up.shape[2:] != (1, 1):
        return f"down {tuple(down.shape)} / up {tuple(up.shape)} are not a LoRA's matrices"
    if up.shape[1] != down.shape[0]:
        return f"up {tuple(up.shape)} has rank {up.shape[1]}, down {tuple(down.shape)} rank " \
               f"{down.shape[0]}"
    kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
    made = (up.shape[0], down.shape[1], *kernel)
    want = tuple(shape) if len(shape) == 4 else (*shape, 1, 1)
    if made != want:
        return f"makes a weight of {_shape(made)}, the module's is {tuple(shape)}"
    return None


def _shape(made):
    return made[:2] if made[2:] == (1, 1) else made


def _peft_alphas(metadata, layers):
    """{ours: alpha} from the LoraConfig diffusers saves as "lora_adapter_metadata" ({"unet.r":
    4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}); {} without it (scale 1)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"lora_adapter_metadata is not JSON ({e})") from e
    out = {}
    for ours, parts in layers.items():
        part, name = ours.split(".", 1)
        if config.get(f"{part}.use_dora") or config.get(f"{part}.use_rslora"):
            raise ValueError(f"the LoRA's {part} uses DoRA or rsLoRA, which this does not read")
        alpha = config.get(f"{part}.lora_alpha")
        for pattern, value in (config.get(f"{part}.alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({pattern.lstrip('^')})", name):
                alpha = value
        if alpha is not None and "down" in parts:
            out[ours] = float(alpha)
    return out


def safetensors_metadata(path) -> dict:
    """The text metadata of a safetensors file's header ({} where it has none); a file too
    short to hold its header is a ValueError naming it."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        text = f.read(n) if 0 <= n <= 100 * 2**20 else b""
    if n < 0 or len(text) != n:
        raise ValueError(f"{path}: not a readable safetensors file (its header is cut short)")
    try:
        meta = json.loads(text).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return {str(k): str(v) for k, v in meta.items()}
