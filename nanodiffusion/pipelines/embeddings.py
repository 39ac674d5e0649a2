"""Textual inversion embeddings on a Stable Diffusion pipeline (docs/embeddings.md):
`pipe.load_embedding(path, name=None)`, and the embeddings folder (`pipe.embeddings_dir`,
A1111's `embeddings/`) whose files prompts name by their file names; the "TI hashes" of a call
and A1111's /sdapi/v1/embeddings list. formats/embeddings.py reads the files, prompts.py puts
the vectors where the names are.

As in AUTOMATIC1111 nothing is added to the tokenizer or the text encoder: a name is found in
a prompt's tokens and its vectors enter as token embeddings there, so loading can never leave
the model half-changed. The folder is read again whenever its files change (new, removed,
rewritten); a file that does not fit the model (another width, SDXL's, unreadable) is left
out ("skipped" in A1111's list), and a prompt that names it is an InputError naming the file
(A1111 would read the name as plain words). Loaded embeddings win over the folder's of the
same name.
"""
from collections import OrderedDict
from pathlib import Path

from ..errors import InputError
from ..formats.embeddings import SUFFIXES, read_embedding
from ..prompts import Vocabulary, embeddings_used


class EmbeddingFolder:
    """The embedding files under `root` (A1111 reads its folder and subfolders), each read once
    per version of it (path, size, modification time)."""

    def __init__(self, root):
        self.root = Path(root)
        self._read = {}  # (path, size, mtime) -> EmbeddingFile, or the error (str) reading it

    def files(self):
        """Every embedding file under the folder, sorted; [] when there is no such folder.
        Empty files are passed over, as A1111 passes them over."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.rglob("*")
                      if p.suffix.lower() in SUFFIXES and p.is_file() and p.stat().st_size
                      and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

    def read(self):
        """[(path, EmbeddingFile or the error reading it, a str)] of every file, in order."""
        out, seen = [], {}
        for path in self.files():
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._read:
                try:
                    self._read[key] = read_embedding(path)
                except (ValueError, OSError) as e:
                    self._read[key] = str(e)
            seen[key] = self._read[key]
            out.append((path, seen[key]))
        self._read = seen  # files gone or rewritten are forgotten
        return out


def sort_files(read, width, max_vectors):
    """The folder's files (EmbeddingFolder.read) for a text encoder of `width` (None: none can
    use an embedding) -> (usable {name: EmbeddingFile}, refused {name: EmbeddingFile or the
    error}, each the first file of its name; a name with a usable file is not refused)."""
    usable, refused = {}, {}
    for path, file in read:
        if isinstance(file, str):
            refused.setdefault(path.stem, file)
        elif width is not None and file.misfit(width, max_vectors) is None:
            usable.setdefault(file.name, file)
        else:
            refused.setdefault(file.name, file)
    return usable, {k: v for k, v in refused.items() if k not in usable}


def a1111_item(file):
    """A1111's item of an embedding in /sdapi/v1/embeddings."""
    return {"step": file.step, "sd_checkpoint": file.sd_checkpoint,
            "sd_checkpoint_name": file.sd_checkpoint_name, "shape": file.width,
            "vectors": file.vectors.shape[0]}


def a1111_list(usable, refused):
    """A1111's {"loaded": {name: item}, "skipped": {name: item}}, by name as A1111 sorts them
    (files that could not be read are in neither, as in A1111)."""
    def items(files):
        return {name: a1111_item(f) for name, f in sorted(files.items(),
                                                          key=lambda kv: kv[0].lower())
                if not isinstance(f, str)}
    return {"loaded": items(usable), "skipped": items(refused)}


def default_folder(model):
    """Where the CLI looks for embeddings when --embeddings-dir is not given: A1111's
    embeddings/ (models/../embeddings) for a model in its models/Stable-diffusion, else
    embeddings/ in the folder that holds the model (as `serve --models-dir DIR` reads
    DIR/embeddings); ./embeddings for a bundled or hub model."""
    p = Path(model).expanduser() if model else None
    if p is None or not p.exists():
        return Path("embeddings")
    holder = p.resolve().parent
    if holder.name == "Stable-diffusion":
        return holder.parent.parent / "embeddings"
    return holder / "embeddings"


class EmbeddingMixin:
    """The textual inversion methods of Pipeline (pipelines/sd.py)."""

    embeddings_dir = None  # the folder whose embeddings prompts name (A1111's embeddings/)

    @property
    def _ti(self):
        state = self.__dict__.get("_ti_state")
        if state is None:
            state = self._ti_state = {"loaded": OrderedDict(), "folder": None, "in_use": {}}
        return state

    @property
    def embeddings(self):
        """{name: number of vectors} of the embeddings loaded with load_embedding."""
        return {name: f.vectors.shape[0] for name, f in self._ti["loaded"].items()}

    def _fit(self):
        cfg = self.text_encoder.config
        return cfg.width, cfg.max_positions - 2  # a chunk: the window less start and end

    def load_embedding(self, path, name=None):
        """Load the textual inversion embedding at `path` (A1111's .pt or .safetensors,
        diffusers' learned_embeds; formats/embeddings.py), to be used by `name` in prompts
        (default: the file's name without suffix; diffusers' learned_embeds files, the token
        they hold); -> the name. A file this model cannot use is refused (ValueError naming
        it) and nothing changes."""
        file = read_embedding(path)
        problem = file.misfit(*self._fit())
        if problem:
            raise ValueError(problem)
        name = file.name if name is None else name
        if not isinstance(name, str) or not self.tokenizer.encode(name):
            raise InputError(f"an embedding's name must be a word a prompt can hold, got "
                             f"{name!r}")
        if name in self._ti["loaded"]:
            raise InputError(f"an embedding named {name!r} is loaded already; "
                             f"unload_embedding({name!r}) first, or give another name")
        self._ti["loaded"][name] = file
        return name

    def unload_embedding(self, name):
        if name not in self._ti["loaded"]:
            raise InputError(f"no embedding named {name!r} is loaded; loaded: "
                             f"{list(self.embeddings)}")
        del self._ti["loaded"][name]

    def unload_embeddings(self):
        self._ti["loaded"].clear()

    def _folder_files(self):
        """sort_files of the embeddings folder ({}, {} without one)."""
        if self.embeddings_dir is None:
            return {}, {}
        folder = self._ti["folder"]
        if folder is None or folder.root != Path(self.embeddings_dir):
            folder = self._ti["folder"] = EmbeddingFolder(self.embeddings_dir)
        return sort_files(folder.read(), *self._fit())

    def embedding_list(self):
        """A1111's /sdapi/v1/embeddings: the loaded and the folder's usable embeddings, and the
        folder's that do not fit this model."""
        usable, refused = self._folder_files()
        return a1111_list({**usable, **self._ti["loaded"]}, refused)

    def _vocabulary(self):
        """(prompts.Vocabulary, {name: EmbeddingFile}) of the embeddings prompts may name now.
        The prompts encoded with other embeddings are forgotten."""
        usable, refused = self._folder_files()
        files = {**usable, **self._ti["loaded"]}
        in_use = {**refused, **files}
        last = self._ti["in_use"]
        if last.keys() != in_use.keys() or any(last[k] is not v for k, v in in_use.items()):
            self._prompt_cache.clear()
            self._ti["in_use"] = in_use
        why = {k: v if isinstance(v, str) else v.misfit(*self._fit())
               for k, v in refused.items() if k not in files}
        return Vocabulary(self.tokenizer, {k: f.vectors for k, f in files.items()}, why), files

    def use_embeddings(self, prompts, syntax=True):
        """The PNG parameters of the embeddings `prompts` name: A1111's "TI hashes" (name: the
        first 12 hex digits of the file's sha256), {} when they name none."""
        vocabulary, files = self._vocabulary()
        names = dict.fromkeys(n for p in prompts
                              for n in embeddings_used(self.tokenizer, p, vocabulary, syntax))
        hashes = [f"{n.replace(':', '').replace(',', '')}: {files[n].sha256[:12]}"
                  for n in names]
        return {"TI hashes": ", ".join(hashes)} if hashes else {}
