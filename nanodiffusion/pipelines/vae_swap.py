"""A Stable Diffusion pipeline's VAE swapped for one from a file, as AUTOMATIC1111's --vae-path
and sd_vae setting and diffusers' `vae=` do: `pipe.load_vae(path)` (a VAE single file or a
diffusers VAE folder, read by formats/vae.py), `pipe.load_vae(None)` the model's own back. The
images then carry it in their parameters as A1111 writes it: "VAE hash" (the first 10 hex
digits of the file's sha256; a folder's, of its weights file) and "VAE" (its name).

The model's own VAE is kept aside untouched and a file's VAE is a module of its own: a swap
changes which module decodes latents and encodes init images, never a weight of the model. A
file that fails (unreadable, not a VAE, made for another latent space) leaves the pipeline as
it was. The VAEs of the last few files stay in memory (a server whose requests name VAEs by
turns reads each file once while its size and time stay the same).

A single file records neither the latent scale nor its GroupNorm groups: it takes the model's
(A1111 keeps the model's scale_factor); a diffusers folder's config.json says both, and they
are used, as diffusers' pipelines use those of the VAE they are given.
"""
import hashlib
from collections import OrderedDict
from pathlib import Path

from ..errors import InputError
from ..formats.diffusers import WEIGHT_NAMES
from ..formats.single_file import LDMHints
from ..formats.vae import read_vae
from ..models.vae import for_inference

CACHED_VAES = 2  # file VAEs kept in memory beside the model's own, the least recent dropped


class VaeMixin:
    """The VAE methods of Pipeline (pipelines/sd.py)."""

    vae_file = None  # the file or folder the VAE in use was read from; None: the model's own

    def load_vae(self, path):
        """Encode and decode with the VAE at `path` (an LDM single file, .safetensors or a
        .ckpt / .pt read with weights_only, with or without first_stage_model.; the same under
        diffusers' names; a diffusers AutoencoderKL folder) from now on; None: the model's own
        again. -> its name as the PNG parameters give it (None for the model's own). A file
        that is not a VAE, or whose latents are not this model's UNet's (latent channels,
        downscale factor), is an InputError naming it, and nothing changes."""
        own = self.__dict__.setdefault("_own_vae", self.vae)  # set while the own one is in use
        if path is None:
            self.vae, self.vae_file = own, None
            return None
        path = Path(path)
        self.vae, self.vae_file = self._file_vae(path, own), path
        return vae_name(path)

    def vae_parameters(self):
        """The PNG parameters' fields of the VAE in use: A1111's "VAE hash" and "VAE" for a
        file's, none for the model's own (A1111 writes them only for a file)."""
        if self.vae_file is None:
            return {}
        return {"VAE hash": vae_hash(self.vae_file), "VAE": vae_name(self.vae_file)}

    def _file_vae(self, path, own):
        cache = self.__dict__.setdefault("_vae_cache", OrderedDict())
        if not path.exists():
            raise InputError(f"{path}: no such VAE file or folder")
        try:
            key = _identity(path)
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            like = next(own.parameters())
            hints = LDMHints(norm_groups=own.config.norm_groups,
                             scaling_factor=own.config.scaling_factor)
            vae = read_vae(path, hints, like.device, like.dtype)
        except (ValueError, OSError) as e:  # the caller's file: named, with what is wrong
            raise InputError(str(e) if str(path) in str(e) else f"{path}: {e}") from e
        check_fits(vae.config, own.config, path)
        cache[key] = for_inference(vae)
        while len(cache) > CACHED_VAES:
            cache.popitem(last=False)
        return cache[key]


def check_fits(cfg, own, where):
    """An InputError naming `where` unless the VAE of config `cfg` works in the latent space
    of the model whose own VAE has config `own`: the same latent channels, downscale factor
    and image channels (its block widths may differ)."""
    def space(c):
        return c.latent_channels, 2 ** (len(c.block_channels) - 1), c.in_channels, c.out_channels

    def text(c):
        lat, f, i, o = space(c)
        return (f"{lat} latent channels at a {f}x downscale, {i} -> {o} image channels "
                f"(block widths {list(c.block_channels)})")
    if space(cfg) != space(own):
        raise InputError(f"{where}: this VAE does not fit the model: it has {text(cfg)}; the "
                         f"model's UNet works on the latents of a VAE with {text(own)}")


def vae_name(path):
    """A1111's name of a VAE: its file's name (suffix included); a folder's name."""
    return Path(path).name


def _files(path):
    """The files a VAE is read from: the file, or a folder's files (not its subfolders)."""
    path = Path(path)
    return [path] if not path.is_dir() else sorted(p for p in path.iterdir() if p.is_file())


def _identity(path):
    """(path, size, modification time) of each of a VAE's files: a changed file is read again."""
    return tuple((str(p.resolve()), st.st_size, st.st_mtime_ns)
                 for p in _files(path) for st in [p.stat()])


_HASHES = {}


def vae_hash(path):
    """A1111's "VAE hash": sha256 of the file, its first 10 hex digits; of a diffusers folder,
    of its weights file. Cached by path, size and modification time."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), path)
    key = _identity(path)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:10]
    return _HASHES[key]
