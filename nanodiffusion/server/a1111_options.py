"""AUTOMATIC1111's settings and checkpoints: GET/POST /sdapi/v1/options (sd_model_checkpoint
picks the model that A1111 requests use when they name none, CLIP_stop_at_last_layers their
clip skip, sd_vae their VAE (a1111_vae.py), token_merging_ratio (and _img2img) their token
merging; other keys are kept and echoed, as A1111 keeps them), sd-models with their sha256 once known, and the refresh routes."""
import asyncio
import hashlib
import re
import threading
from pathlib import Path

from fastapi import APIRouter, Request

from ..formats.files import WEIGHT_SUFFIXES
from . import a1111_vae
from .http import json_body
from .params import MAX_CLIP_SKIP, APIError, bad, get_int, get_tome

router = APIRouter()

# Options clients read whose values this server cannot change (one image format): the values
# it runs with, the first one shown.
FIXED = {"samples_format": ("png",)}
CLIP_SKIP = "CLIP_stop_at_last_layers"  # A1111's clip skip: 1 is the text encoder's last layer
READ_ONLY = ("sd_model_checkpoint", "sd_checkpoint_hash")  # set by the model switch only
# A1111's "VAE type for decode" -> our vae_decoder (pipelines/decoders.py): TAESD is the
# model's tiny decoder; A1111's live preview method needs no setting here (previews use the
# tiny decoder whenever the model has one)
DECODE_METHOD, DECODE_METHODS = "sd_vae_decode_method", {"Full": "full", "TAESD": "tiny"}
# A1111's token merging ratios (Settings > Optimizations); the img2img one, where not 0, is
# used by img2img requests instead of the other (A1111's rule)
TOME, TOME_IMG2IMG = "token_merging_ratio", "token_merging_ratio_img2img"
MAX_OPTIONS = 1000
# A1111 titles checkpoints "name.safetensors [0123456789]"; clients send those back.
TITLE_SUFFIX = re.compile(r"(\.(" + "|".join(s[1:] for s in WEIGHT_SUFFIXES)
                          + r"))?( \[[0-9a-fA-F]{8,64}\])?$")


class Options:
    def __init__(self):
        self.model = None  # chosen by POST sd_model_checkpoint; None: the server's default
        self.values = {k: accepted[0] for k, accepted in FIXED.items()} | {CLIP_SKIP: 1}
        self.values[DECODE_METHOD] = "Full"
        self.values[TOME] = self.values[TOME_IMG2IMG] = 0.0
        self.values[a1111_vae.OPTION] = a1111_vae.AUTOMATIC


def decode_method(value, param):
    """A1111's sd_vae_decode_method value -> our vae_decoder; a 400 naming `param` for others."""
    if value not in DECODE_METHODS:
        raise bad(param, f"{param} {value!r} is not one of {list(DECODE_METHODS)}")
    return DECODE_METHODS[value]


def tome_ratio(over, values, img2img):
    """The token merging ratio of an A1111 request: its override_settings `over`, else the
    /options `values`, each by A1111's rule (img2img: the img2img ratio where not 0). Checked
    by params.get_tome under the name TOME."""
    def pick(d):
        if img2img and d.get(TOME_IMG2IMG) not in (None, 0, 0.0, ""):
            return d[TOME_IMG2IMG]
        return d.get(TOME)
    ratio = pick(over)
    return pick(values) if ratio is None else ratio


def options(app):
    """This app's A1111 options, made on first use."""
    opts = getattr(app.state, "a1111_options", None)
    if opts is None:
        opts = app.state.a1111_options = Options()
    return opts


def checkpoint(app, title, param):
    """A model as A1111 clients name it (our name, or a title with an extension and a hash)
    -> our name; a 400 for a path, a 404 naming it for any other unknown name."""
    names = app.state.registry.names()
    if not isinstance(title, str) or not title:
        raise bad(param, f"{param} must be a model name, got {title!r}")
    for name in (title, TITLE_SUFFIX.sub("", title)):
        if name in names:
            return name
    if any(c in title for c in "/\\\0") or ".." in title:
        raise bad(param, f"{param} {title!r} is a path; give a model name from "
                         f"/sdapi/v1/sd-models: {names}")
    raise APIError(404, f"{param} {title!r} is not a model of this server; available: {names}",
                   param=param, code="model_not_found")


def current_model(app):
    """The model A1111 requests use when they name none: the one POST /options chose, else
    the server's default."""
    reg, chosen = app.state.registry, options(app).model
    if chosen is None:
        return reg.default_name()
    if chosen not in reg.names():
        raise APIError(404, f"sd_model_checkpoint {chosen!r} (chosen with /sdapi/v1/options) "
                            f"is no longer installed; available: {reg.names()}",
                       param="sd_model_checkpoint", code="model_not_found")
    return chosen


# ---- checkpoint hashes ------------------------------------------------------------------
_hashes, _hash_lock = {}, threading.Lock()


def _files(path):
    """The identity of a model's files: (path, size, mtime) of each, in path order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])


def sha256(path):
    """A checkpoint's sha256: of a single file its bytes (the hash A1111 and civitai show); of
    a model folder, each file's relative path, size and bytes, in path order. Computed once
    while the files' sizes and times stay the same."""
    key = _files(path)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    root, h = Path(path), hashlib.sha256()
    for name, size, _ in key:
        if root.is_dir():
            h.update(f"{Path(name).relative_to(root).as_posix()}\0{size}\0".encode())
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    with _hash_lock:
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def cached_sha256(path):
    """sha256(path) where it was computed already, else None (as A1111 lists unhashed ones)."""
    key = _files(path)
    with _hash_lock:
        return _hashes.get(key)


def short_hash(app, name):
    """A1111's short model hash (10 hex digits) where known."""
    path = app.state.registry.found().get(name)
    sha = cached_sha256(path) if path is not None else None
    return sha and sha[:10]


# ---- routes -----------------------------------------------------------------------------
@router.get("/options")
async def get_options(request: Request):
    reg, opts = request.app.state.registry, options(request.app)
    found = reg.found()
    name = opts.model or (reg.default_name() if found else None)
    path = found.get(name)
    sha = None if path is None else await asyncio.to_thread(sha256, path)
    return {**opts.values, "sd_model_checkpoint": name, "sd_checkpoint_hash": sha}


@router.post("/options")
async def set_options(request: Request):
    """sd_model_checkpoint switches the model; the FIXED options take only the values this
    server runs with, CLIP_stop_at_last_layers an integer, token_merging_ratio(_img2img) a
    number in [0, 0.9], sd_vae "Automatic", "None" or a
    name /sd-vae lists; other keys are kept and echoed.
    All or nothing: a bad value changes nothing. Answers null, as A1111 does."""
    body = await json_body(request)
    for key, accepted in FIXED.items():
        if key in body and body[key] not in accepted:
            raise bad(key, f"{key} {body[key]!r} is not supported here; accepted: "
                           f"{list(accepted)}")
    if CLIP_SKIP in body:  # checked against a model's layers when a request uses it
        body[CLIP_SKIP] = get_int(body, CLIP_SKIP, 1, 1, MAX_CLIP_SKIP)
    if DECODE_METHOD in body:  # "TAESD" checked against a model when a request uses it
        decode_method(body[DECODE_METHOD], DECODE_METHOD)
    for key in (TOME, TOME_IMG2IMG):
        if key in body:
            body[key] = get_tome(body, key) or 0.0
    if a1111_vae.OPTION in body:  # a file is checked against a model when a request uses it
        a1111_vae.choice(request.app, body[a1111_vae.OPTION], a1111_vae.OPTION)
    name = None
    if "sd_model_checkpoint" in body:
        name = checkpoint(request.app, body["sd_model_checkpoint"], "sd_model_checkpoint")
    opts = options(request.app)
    new = {k: v for k, v in body.items() if k not in READ_ONLY}
    if len(opts.values.keys() | new.keys()) > MAX_OPTIONS:
        raise bad(None, f"at most {MAX_OPTIONS} options are kept")
    opts.values.update(new)
    if name is not None:
        opts.model = name
    return None


@router.get("/sd-models")
async def sd_models(request: Request):
    out = []
    for name, path in sorted(request.app.state.registry.found().items()):
        sha = cached_sha256(path)
        out.append({"title": name, "model_name": name, "hash": sha and sha[:10],
                    "sha256": sha, "filename": name, "config": None})
    return out


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request):
    """Read the models folder again: models added (or removed) since appear in every API."""
    await asyncio.to_thread(request.app.state.registry.refresh)
    return None


@router.post("/refresh-vae")
async def refresh_vae():
    return None


@router.post("/refresh-loras")
async def refresh_loras():
    return None
