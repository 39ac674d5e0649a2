"""AUTOMATIC1111's informational routes: png-info (a PNG's generation parameters read back),
interrogate (the captions CLIP ranks highest for an image), cmd-flags, memory, and the lists of
what A1111 installs beside the checkpoints (upscalers, styles, scripts), each empty here: those
features do not exist in this server (LoRAs: a1111_loras.py, VAEs: a1111_vae.py); the textual
inversion embeddings of the models folder's embeddings/."""
import asyncio
import json
import os
import re
import weakref

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Request

from ..pipelines.embeddings import EmbeddingFolder, a1111_list, sort_files
from ..pipelines.images import from_pil
from ..pnginfo import parse_parameters
from ..pipelines.unclip import UnCLIPPipeline
from .a1111_options import current_model
from .http import json_body
from .params import APIError, bad, decode_image, get_str

router = APIRouter()

# ---- png-info ---------------------------------------------------------------------------
# PIL's image.info keys that are image properties, not text a generator wrote (A1111's
# png-info leaves the same ones out of `items`).
NOT_TEXT = ("parameters", "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif",
            "loop", "background", "timestamp", "duration", "progressive", "progression",
            "icc_profile", "chromaticity", "photoshop", "transparency", "gamma", "srgb",
            "aspect")
SIZE = re.compile(r"(\d+)x(\d+)")


def a1111_parameters(text):
    """The "parameters" text -> its fields as A1111's png-info gives them: Prompt, Negative
    prompt and each `Key: value` as text (JSON-quoted values unquoted), a "WxH" value split
    into Key-1 and Key-2 (Size-1, Size-2)."""
    fields = parse_parameters(text)
    out = {"Prompt": fields.pop("prompt"), "Negative prompt": fields.pop("negative_prompt")}
    for key, value in fields.items():
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = SIZE.fullmatch(value) if isinstance(value, str) else None
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


@router.post("/png-info")
async def png_info(request: Request):
    reg = request.app.state.registry
    body = await json_body(request)
    if not body.get("image"):
        raise bad("image", "image is required: a base64 PNG")
    im = decode_image(body["image"], "image", reg.limits)
    text = im.info.get("parameters")
    text = text if isinstance(text, str) else ""
    items = {k: v if isinstance(v, (str, int, float, bool)) else str(v)
             for k, v in im.info.items() if isinstance(k, str) and k not in NOT_TEXT}
    return {"info": text, "items": items,
            "parameters": a1111_parameters(text) if text.strip() else {}}


# ---- interrogate ------------------------------------------------------------------------
TOP_CAPTIONS = 5
_caption_embeds = weakref.WeakKeyDictionary()  # SD pipeline -> captions' unit embeddings


@router.post("/interrogate")
async def interrogate(request: Request):
    """A1111's CLIP interrogator on the current A1111 model: `caption` is the shapes caption
    CLIP finds most similar to the image (an unCLIP model's describe; for a Stable Diffusion
    model with a full CLIP, the same ranking); `captions`, the best few with their cosine
    similarity. "clip" is the only interrogator `model`."""
    reg = request.app.state.registry
    body = await json_body(request)
    model = get_str(body, "model", "clip") or "clip"
    if model != "clip":
        raise bad("model", f"model {model!r} is not an interrogator of this server; "
                           f"accepted: ['clip']")
    if not body.get("image"):
        raise bad("image", "image is required: a base64 image")
    image = decode_image(body["image"], "image", reg.limits)
    name = current_model(request.app)
    pipe = await asyncio.to_thread(reg.pipe, name)
    ranked = await asyncio.to_thread(rank_captions, pipe, name, image, TOP_CAPTIONS)
    return {"caption": ranked[0][0],
            "captions": [{"caption": c, "score": s} for c, s in ranked]}


def rank_captions(pipe, name, image, top):
    """The `top` shapes captions most similar to `image` under the model's CLIP, as (caption,
    cosine similarity), most similar first; a 400 for a model without an image encoder."""
    if isinstance(pipe, UnCLIPPipeline):
        return pipe.describe(image, top=top)
    clip = getattr(pipe, "clip", None)
    if clip is None or not hasattr(clip, "encode_image"):
        raise APIError(400, f"model {name!r} has a text encoder only, no CLIP image encoder to "
                            f"interrogate with; choose an unCLIP model or one whose folder "
                            f"holds a full CLIP with sd_model_checkpoint (/sdapi/v1/options)",
                       param="sd_model_checkpoint", code="no_image_encoder")
    return _clip_ranking(pipe, clip, image, top)


@torch.no_grad()
def _clip_ranking(pipe, clip, image, top, chunk=256):
    """UnCLIPPipeline.describe's ranking over the shapes captions, for a Stable Diffusion
    pipeline's full CLIP; the captions' embeddings are computed once per pipeline."""
    from ..data.shapes import enumerate_captions

    captions = enumerate_captions()
    first = next(clip.parameters())
    text = _caption_embeds.get(pipe)
    if text is None:
        length = clip.text_model.config.max_positions
        embeds = [clip.encode_text(pipe.tokenizer(captions[i:i + chunk], max_length=length)
                                   .to(first.device)) for i in range(0, len(captions), chunk)]
        text = _caption_embeds[pipe] = F.normalize(torch.cat(embeds).float(), dim=-1)  # (N, E)
    pixels = clip.preprocess((from_pil(image) + 1) / 2)  # (1, 3, S, S)
    img = F.normalize(clip.encode_image(pixels.to(first.device, first.dtype)).float(), dim=-1)
    scores = (text @ img[0]).tolist()
    order = sorted(range(len(captions)), key=lambda i: -scores[i])[:top]
    return [(captions[i], scores[i]) for i in order]


# ---- lists ------------------------------------------------------------------------------
# The lists of what A1111 installs beside the checkpoints, with the fields of A1111's items;
# none of these features exists here, so each is empty (loras: a1111_loras.py, sd-vae:
# a1111_vae.py).
EMPTY_LISTS = {"upscalers": "name, model_name, model_path, model_url, scale",
               "latent-upscale-modes": "name", "hypernetworks": "name, path",
               "face-restorers": "name, cmd_dir", "realesrgan-models": "name, path, scale",
               "prompt-styles": "name, prompt, negative_prompt",
               "script-info": "name, is_alwayson, is_img2img, args"}


def _empty_list(path, fields):
    async def route():
        return []

    router.add_api_route(f"/{path}", route, methods=["GET"], name=path,
                         description=f"A1111's items: {{{fields}}}; none here.")


for _path, _fields in EMPTY_LISTS.items():
    _empty_list(_path, _fields)


@router.get("/embeddings")
async def embeddings(request: Request):
    """A1111's {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
    "skipped": {...}}: the files of the models folder's embeddings/ that the current model can
    use, and those it cannot (another width; every one for an unCLIP model)."""
    reg = request.app.state.registry
    folder = None if reg.models_dir is None else reg.models_dir / "embeddings"
    if folder is None or not folder.is_dir():
        return {"loaded": {}, "skipped": {}}
    pipe = await asyncio.to_thread(reg.pipe, current_model(request.app))
    if isinstance(pipe, UnCLIPPipeline):
        return a1111_list(*sort_files(EmbeddingFolder(folder).read(), None, 0))
    return await asyncio.to_thread(pipe.embedding_list)


@router.post("/refresh-embeddings")
async def refresh_embeddings():
    """The folder is read on every request here, so there is nothing to refresh."""
    return None


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/cmd-flags")
async def cmd_flags(request: Request):
    """The settings this server was started with, in A1111's names where it has them."""
    reg = request.app.state.registry
    return {"api": True, "nowebui": False, "device": str(reg.device), "dtype": reg.dtype,
            "no_half": reg.dtype == "float32",
            "ckpt_dir": None if reg.models_dir is None else str(reg.models_dir),
            **vars(reg.limits)}


@router.get("/memory")
async def memory(request: Request):
    """A1111's shape: ram used by this process and the machine's total (free = total - used,
    as A1111 counts it), and the accelerator's memory or an error."""
    return {"ram": _ram(), "cuda": _accelerator(request.app.state.registry.device)}


def _ram():
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page  # resident pages
    except (OSError, ValueError, IndexError) as e:  # not Linux
        return {"error": str(e)}
    return {"free": total - used, "used": used, "total": total}


def _accelerator(device):
    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    try:
        dev = torch.device(device)
        free, total = torch.cuda.mem_get_info(dev)
        stats = torch.cuda.memory_stats(dev)
    except (RuntimeError, ValueError, AssertionError) as e:  # e.g. the server runs on the CPU
        return {"error": str(e)}

    def pair(key):
        return {"current": stats.get(f"{key}.all.current", 0),
                "peak": stats.get(f"{key}.all.peak", 0)}
    return {"system": {"free": free, "used": total - free, "total": total},
            "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
            "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0),
                       "oom": stats.get("num_ooms", 0)}}
