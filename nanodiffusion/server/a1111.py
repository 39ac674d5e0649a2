"""The part of AUTOMATIC1111's web UI API (/sdapi/v1) that scripts and front ends use most:
txt2img, img2img (with mask), samplers, models, progress, interrupt."""
import json
import time

from fastapi import APIRouter, Request

from .. import samplers
from ..pnginfo import A1111_SAMPLERS
from .app import json_body, run
from .params import bad, b64, build_task, decode_image, get_int

router = APIRouter(prefix="/sdapi/v1")


def _model(reg, body):
    """A1111 picks the model with override_settings.sd_model_checkpoint; `model` also works."""
    over = body.get("override_settings") or {}
    name = over.get("sd_model_checkpoint") if isinstance(over, dict) else None
    return reg.resolve_name(name or body.get("model"))


def _fields(body, limits):
    n = get_int(body, "batch_size", 1, 1, limits.max_n) * get_int(body, "n_iter", 1, 1,
                                                                  limits.max_n)
    if n > limits.max_n:
        raise bad("n_iter", f"batch_size * n_iter must be at most {limits.max_n}, got {n}")
    return {"prompt": body.get("prompt", ""), "negative_prompt": body.get("negative_prompt"),
            "seed": body.get("seed"), "steps": body.get("steps"),
            "guidance": body.get("cfg_scale"), "sampler": body.get("sampler_name") or
            body.get("sampler_index"), "width": body.get("width"),
            "height": body.get("height"), "n": n, "strength": body.get("denoising_strength"),
            "guidance_rescale": body.get("guidance_rescale")}


def _answer(body, task, job):
    info = {"prompt": task.kwargs["prompt"], "negative_prompt": task.kwargs["negative_prompt"],
            "seed": job.result["seed"], "all_seeds": [job.result["seed"]] * len(job.pngs),
            "steps": job.result["steps"], "cfg_scale": job.result["guidance"],
            "sampler_name": A1111_SAMPLERS.get(job.result["sampler"], job.result["sampler"]),
            "width": job.result["width"], "height": job.result["height"],
            "sd_model_name": task.model,
            "infotexts": job.result["infotexts"]}
    params = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {"images": [b64(p) for p in job.pngs], "parameters": params,
            "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(request: Request):
    reg = request.app.state.registry
    body = await json_body(request)
    task = build_task(_model(reg, body), _fields(body, reg.limits), reg.limits)
    return _answer(body, task, await run(request, task))


@router.post("/img2img")
async def img2img(request: Request):
    reg = request.app.state.registry
    body = await json_body(request)
    inits = body.get("init_images")
    if not isinstance(inits, list) or not inits:
        raise bad("init_images", "init_images must be a list with one base64 image")
    image = decode_image(inits[0], "init_images", reg.limits)
    mask = decode_image(body["mask"], "mask", reg.limits) if body.get("mask") else None
    if mask is not None and body.get("inpainting_mask_invert"):
        from PIL import ImageOps

        mask = ImageOps.invert(mask.convert("L"))
    fields = _fields(body, reg.limits)
    if fields["strength"] is None:
        fields["strength"] = 0.75  # A1111's default denoising_strength
    task = build_task(_model(reg, body), fields, reg.limits, image=image, mask=mask)
    return _answer(body, task, await run(request, task))


@router.get("/samplers")
async def sampler_list():
    seen, out = set(), []
    for name in samplers.SAMPLER_NAMES:
        shown = A1111_SAMPLERS.get(name, name)
        if shown not in seen:
            seen.add(shown)
            out.append({"name": shown, "aliases": [name], "options": {}})
    return out


@router.get("/sd-models")
async def sd_models(request: Request):
    reg = request.app.state.registry
    return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n,
             "config": None} for n in reg.names()]


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False):
    reg = request.app.state.registry
    running = reg.running()
    state = {"skipped": False, "interrupted": False, "job": "", "job_count":
             len(running) + reg.queued_count(), "job_timestamp": "", "job_no": 0,
             "sampling_step": 0, "sampling_steps": 0}
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None}
    job = running[0]
    frac = job.step / job.total if job.total else 0.0
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / frac - elapsed if frac > 0 else 0.0
    state.update(job=job.id, sampling_step=job.step, sampling_steps=job.total,
                 interrupted=job.interrupt_requested.is_set())
    return {"progress": frac, "eta_relative": eta, "state": state,
            "current_image": None if skip_current_image else job.preview, "textinfo": None}


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop what runs now (every model's current job), as A1111's button does: the requests
    waiting on those jobs get the images as they are at that step."""
    for job in request.app.state.registry.running():
        job.interrupt()
    return {}
