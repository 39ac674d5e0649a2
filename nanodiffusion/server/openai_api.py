"""OpenAI's Images API, so the official client works with base_url=".../v1". Extras beyond
OpenAI's fields (seed, steps, guidance, guidance_rescale, sampler, negative_prompt, strength,
clip_skip, prompt_syntax, vae_decoder, deepcache, tome) come through the client's
`extra_body`, as JSON or as multipart form fields. Prompts are read in AUTOMATIC1111's syntax (docs/prompts.md)
unless prompt_syntax is false."""
import time

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from .http import json_body, run
from .params import (OPENAI, bad, b64, build_task, build_unclip_task, decode_image, get_str,
                     parse_size)

router = APIRouter(prefix="/v1")
FORMATS = ("b64_json", "url")


def _fields(body, limits):
    """OpenAI names -> the common ones; `size` "WxH" -> width, height."""
    f = {k: body.get(k) for k in ("prompt", "negative_prompt", "seed", "steps", "guidance",
                                  "sampler", "n", "strength", "guidance_rescale",
                                  "keep_unmasked", "clip_skip", "prompt_syntax",
                                  "vae_decoder", "deepcache", "tome")}
    f["width"], f["height"] = parse_size(body.get("size"), limits)
    if f["guidance"] is None:
        f["guidance"] = body.get("guidance_scale")
    return f


def _format(body):
    fmt = get_str(body, "response_format", "b64_json") or "b64_json"
    if fmt not in FORMATS:
        raise bad("response_format", f"response_format must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _response(request, job, fmt):
    base = str(request.base_url).rstrip("/")
    data = [{"b64_json": b64(png)} if fmt == "b64_json" else {"url": base + url}
            for png, url in zip(job.pngs, job.result["images"])]
    for d in data:
        d["revised_prompt"] = None
    return {"created": int(job.finished or time.time()), "data": data}


@router.get("/models")
async def list_models(request: Request):
    reg = request.app.state.registry
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                        "owned_by": "nanodiffusion"} for n in reg.names()]}


@router.post("/images/generations")
async def generations(request: Request):
    reg = request.app.state.registry
    body = await json_body(request)
    fmt = _format(body)
    task = build_task(reg.resolve_name(body.get("model")), _fields(body, reg.limits),
                      reg.limits)
    return _response(request, await run(request, task), fmt)


async def _form(request):
    """Multipart fields -> (plain fields, {name: bytes of each uploaded file})."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad(None, "this endpoint takes multipart/form-data (image and mask files)")
    form = await request.form()
    fields, files = {}, {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            if name in files:
                raise bad(name, f"give one {name} (several images are not supported)")
            files[name] = await value.read()
        else:
            fields[name] = value
    return fields, files


@router.post("/images/edits")
async def edits(request: Request):
    """Stable Diffusion models: with a mask inpaint (transparent or white mask pixels are
    repainted), without img2img at `strength` (default 0.6). unCLIP models: DALL·E 2's text
    diff from the caption CLIP gives the image to the prompt (no mask)."""
    reg = request.app.state.registry
    body, files = await _form(request)
    fmt = _format(body)
    model = reg.resolve_name(body.get("model"))
    image = _image(files, reg.limits)
    fields = _fields(body, reg.limits)
    if reg.kind(model) == "unclip":
        if "mask" in files:
            raise bad("mask", f"model {model!r} is an unCLIP model, whose edits follow the "
                              "prompt over the whole image: leave out the mask, or use a "
                              "Stable Diffusion model to inpaint")
        task = build_unclip_task(model, fields, reg.limits, image)
    else:
        mask = None
        if "mask" in files:
            mask = openai_mask(decode_image(files["mask"], "mask", reg.limits))
        task = build_task(model, fields, reg.limits, image=image, mask=mask, dialect=OPENAI)
    return _response(request, await run(request, task), fmt)


def _image(files, limits):
    if "image" not in files:
        raise bad("image", "image is required (a PNG, JPEG or WebP file)")
    return decode_image(files["image"], "image", limits)


def openai_mask(mask):
    """OpenAI's masks mark the area to edit by transparency; ours by white. An RGBA mask with
    any transparency becomes (alpha < 128) -> white; other masks are used as they are."""
    if mask.mode in ("RGBA", "LA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda a: 255 if a < 128 else 0)
    return mask


@router.post("/images/variations")
async def variations(request: Request):
    """DALL·E 2's variations of an image (unCLIP models): its CLIP embedding decoded again."""
    reg = request.app.state.registry
    body, files = await _form(request)
    fmt = _format(body)
    model = reg.resolve_name(body.get("model") or _default_unclip(reg))
    fields = _fields(body, reg.limits)
    fields["prompt"] = None  # OpenAI's variations take no prompt
    task = build_unclip_task(model, fields, reg.limits, _image(files, reg.limits))
    return _response(request, await run(request, task), fmt)


def _default_unclip(reg):
    """With no model named, variations go to the first unCLIP model this server offers."""
    return next((n for n in reg.names() if reg.kind(n) == "unclip"), None)
