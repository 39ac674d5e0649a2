"""AUTOMATIC1111's `<lora:name:multiplier>` tags in prompts, and the LoRA folder they name
(A1111's `models/Lora/`): the files found there by name, their A1111 hashes ("Lora hashes" in
the PNG parameters) and A1111's /sdapi/v1/loras list of them.

A tag, as A1111's Lora extension reads one (`<lora:NAME>`, `<lora:NAME:M>`, `<lora:NAME:TE:UNET>`,
`te=` / `unet=` named): NAME is a file's name without its suffix, anywhere under the folder,
or the `ss_output_name` alias sd-scripts writes in a file's metadata; M the multiplier of both
the text encoder and the UNet (default 1), TE and UNET each's. The tags are taken out of the
prompt before it is encoded, as A1111 takes them out. `<lyco:...>` is read as `<lora:...>` (A1111
1.5+). Step-wise multipliers (`te=0.5@0,1@10`) and `dyn` are refused, not ignored.
"""
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what A1111 lists in its Lora folder
TAG = re.compile(r"<(lora|lyco):([^>]+)>")  # A1111's extra-network syntax, <type:args>
HEX = re.compile(r"[0-9a-fA-F]{12,64}")


@dataclass(frozen=True)
class Tag:
    name: str
    te: float
    unet: float


def take_tags(prompt):
    """A prompt -> (the prompt without its <lora:...> tags, the tags in order)."""
    tags = []

    def found(m):
        tags.append(_tag(m.group(0), m.group(2).split(":")))
        return ""
    return TAG.sub(found, prompt), tags


def _tag(text, items):
    named = dict(i.split("=", 1) for i in items if "=" in i)
    positional = [i for i in items if "=" not in i]
    if not positional or not positional[0].strip():
        raise InputError(f"{text}: a LoRA tag names its file first: <lora:name:multiplier>")
    unknown = set(named) - {"te", "unet"}
    if unknown or len(positional) > 3:
        raise InputError(f"{text}: this reads <lora:name>, <lora:name:multiplier>, "
                         f"<lora:name:te:unet> and te= / unet=; not {sorted(unknown) or 'dyn'}")
    te = _number(text, named.get("te", positional[1] if len(positional) > 1 else "1"))
    unet = _number(text, named.get("unet", positional[2] if len(positional) > 2 else None), te)
    return Tag(positional[0].strip(), te, unet)


def _number(text, value, default=None):
    if value is None:
        return default
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if x != x or abs(x) == float("inf"):
        raise InputError(f"{text}: multiplier {value!r} is not a number (step-wise "
                         f"multipliers with @ are not read here)")
    return x


def scale_text(te, unet):
    """The multipliers as a tag writes them: "0.8", or "0.5:1" when they differ."""
    return f"{te:g}" if te == unet else f"{te:g}:{unet:g}"


class LoraFolder:
    """The LoRA files under `root` by name (A1111's: the file name without suffix) and by alias
    (sd-scripts' ss_output_name); read again when a name is not found."""

    def __init__(self, root):
        self.root = Path(root)
        self._names = None

    def files(self):
        """Every LoRA file under the folder, sorted; [] when there is no such folder."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.rglob("*")
                      if p.suffix.lower() in SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

    def find(self, name):
        """The file `name` names; an InputError naming the folder when none does."""
        for fresh in (False, True):
            if self._names is None or fresh:
                self._names = self._index()
            if name in self._names:
                return self._names[name]
        where = f"in {self.root}" if self.root.is_dir() else \
            f"because the LoRA folder {self.root} does not exist"
        known = sorted(self._names)
        found = f"; found: {', '.join(known[:20])}" if known else ""
        raise InputError(f"<lora:{name}>: no LoRA named {name!r} {where} (a .safetensors, "
                         f".pt or .ckpt file of that name; the CLI's --lora-dir, the server's "
                         f"<models-dir>/Lora){found}")

    def _index(self):
        names, aliases = {}, {}
        for p in self.files():
            names.setdefault(p.stem, p)
            alias = describe(p)["alias"]
            if alias != p.stem:
                aliases.setdefault(alias, p)
        return {**aliases, **names}  # a file's own name wins over another's alias


def describe(path):
    """A1111's /sdapi/v1/loras item: name, alias, path, metadata (JSON values decoded)."""
    from ..formats.lora import safetensors_metadata

    path = Path(path)
    meta = {}
    if path.suffix == ".safetensors":
        try:
            meta = {k: _json(v) for k, v in safetensors_metadata(path).items()}
        except (ValueError, OSError):
            meta = {}  # listed all the same, as A1111 lists it; loading it names the problem
    alias = meta.get("ss_output_name")
    return {"name": path.stem, "alias": alias if isinstance(alias, str) and alias else path.stem,
            "path": str(path), "metadata": meta}


def _json(value):
    if value.startswith("{"):  # A1111 decodes the values that are JSON objects
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


_HASHES = {}


def short_hash(path):
    """A1111's hash of a LoRA, its first 12 hex digits: the `sshs_model_hash` sd-scripts
    writes in the metadata where it is one, else sha256 of the file, for .safetensors of the
    tensor data only (after the header: kohya's and A1111's "addnet" hash, unchanged by edits
    to the metadata). Cached by path, size and modification time."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _hash(path)[:12]
    return _HASHES[key]


def _hash(path):
    if path.suffix == ".safetensors":
        from ..formats.lora import safetensors_metadata

        given = safetensors_metadata(path).get("sshs_model_hash", "")
        if HEX.fullmatch(given):  # a hash, not whatever else a file may carry there
            return given.lower()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def default_folder(model):
    """Where the CLI looks for the LoRAs that tags name when --lora-dir is not given: Lora/ in
    the folder that holds the model (as `serve --models-dir DIR` reads DIR/Lora), A1111's
    models/Lora for a model in its models/Stable-diffusion; ./models/Lora for a bundled or hub
    model."""
    p = Path(model).expanduser() if model else None
    if p is None or not p.exists():
        return Path("models") / "Lora"
    holder = p.resolve().parent
    return holder.parent / "Lora" if holder.name == "Stable-diffusion" else holder / "Lora"
