"""The part of AUTOMATIC1111's web UI API (/sdapi/v1) that scripts and front ends use:
txt2img, img2img (with mask), samplers and schedulers, progress, interrupt, skip. The settings
and checkpoint routes are in a1111_options.py; png-info, interrogate and the lists in
a1111_info.py.

Requests are read in A1111's field names (the DIALECT given to build_task), so that errors
name cfg_scale, sampler_name, denoising_strength and list A1111's sampler names; image i of a
batch is made with seed + i, as in A1111 (the task's seed_per_image). Prompts are read in
A1111's syntax; its clip skip is the setting CLIP_stop_at_last_layers, and its VAE sd_vae
(a1111_vae.py), each from the request's override_settings, else as /options set it."""
import json
import time

from fastapi import APIRouter, Request

from .. import samplers
from ..pnginfo import A1111_SAMPLERS
from . import a1111_info, a1111_loras, a1111_options, a1111_vae
from .http import json_body, run
from .params import Dialect, bad, b64, build_task, decode_image, get_int, get_str

router = APIRouter(prefix="/sdapi/v1")

# A1111 1.9+ sends the sigma schedule apart from the sampler (sampler_name "DPM++ 2M",
# scheduler "Karras"); ours is a suffix of the sampler's name (dpmpp-2m-karras).
# name -> (label, our suffix); "automatic" is the sampler's own schedule.
SCHEDULERS = {"automatic": ("Automatic", ""), "karras": ("Karras", "-karras"),
              "exponential": ("Exponential", "-exponential")}


def _split(ours):
    """Our sampler name -> (the sampler without its schedule suffix, the scheduler's name)."""
    for key, (_, suffix) in SCHEDULERS.items():
        if suffix and ours.endswith(suffix) and ours[:-len(suffix)] in samplers.SAMPLER_NAMES:
            return ours[:-len(suffix)], key
    return ours, "automatic"


def shown_sampler(ours):
    """(sampler_name, scheduler label) as A1111 1.9+ reports them, for our sampler `ours`."""
    base, key = _split(ours)
    if key != "automatic" and base in A1111_SAMPLERS:
        return A1111_SAMPLERS[base], SCHEDULERS[key][0]
    return A1111_SAMPLERS.get(ours, ours), SCHEDULERS["automatic"][0]


def sampler_names():
    """The sampler_name values accepted, A1111's names where it has them, each once: {name:
    our names}. A sampler that is another one plus a scheduler (euler-exponential: "Euler" +
    "Exponential") and has no name of its own in A1111 is not listed."""
    out = {}
    for ours in samplers.SAMPLER_NAMES:
        shown = A1111_SAMPLERS.get(ours)
        if shown is None:
            base, key = _split(ours)
            if key != "automatic" and base in A1111_SAMPLERS:
                continue
            shown = ours
        out.setdefault(shown, []).append(ours)
    return out


def _sampler(d, name):
    """sampler_name (A1111's names, old style "DPM++ 2M Karras" included, or ours) with the
    request's scheduler -> our sampler name, or None for the model's default."""
    given = get_str(d, name, default=None)
    ours = None
    if given:
        lookup = {n.lower(): n for n in samplers.SAMPLER_NAMES}
        lookup.update({a.lower(): n for n, a in A1111_SAMPLERS.items()
                       if n in samplers.SAMPLER_NAMES})
        ours = lookup.get(given.lower())
        if ours is None:
            raise bad(name, f"{name} {given!r} is not one of {list(sampler_names())}")
    return _scheduled(ours, given, d, name)


def _scheduled(ours, given, d, sampler_field, name="scheduler"):
    """Our sampler `ours` (None: the model's default) on the schedule that d[name] names (A1111's
    scheduler names or labels; missing or "Automatic": the sampler's own)."""
    v = get_str(d, name, default=None)
    keys = {k: k for k in SCHEDULERS} | {lab.lower(): k for k, (lab, _) in SCHEDULERS.items()}
    key = keys.get((v or "automatic").lower())
    if key is None:
        raise bad(name, f"{name} {v!r} is not one of {[lab for lab, _ in SCHEDULERS.values()]}")
    if key == "automatic":
        return ours
    label = SCHEDULERS[key][0]
    if ours is None:
        raise bad(name, f"{name} {v!r} needs a {sampler_field} to apply to")
    base, own = _split(ours)
    allowed = [k for k, (_, suffix) in SCHEDULERS.items() if k == "automatic" or (
        own in ("automatic", k) and base + suffix in samplers.SAMPLER_NAMES)]
    if key not in allowed:
        with_it = [shown_sampler(n)[0] for n in samplers.SAMPLER_NAMES if _split(n)[1] == key]
        raise bad(name, f"{name} {v!r} is not available with {sampler_field} {given!r}; with "
                        f"it: {[SCHEDULERS[k][0] for k in allowed]}. {label} goes with "
                        f"{with_it}")
    return base + SCHEDULERS[key][1]


DIALECT = Dialect(names={"guidance": "cfg_scale", "sampler": "sampler_name",
                         "strength": "denoising_strength",
                         "clip_skip": "CLIP_stop_at_last_layers",
                         "tome": a1111_options.TOME}, sampler=_sampler,
                  seed_per_image=True, keep_unmasked=True)


def _model(request, body):
    """override_settings.sd_model_checkpoint (or `model`), else the model /options chose."""
    over = body.get("override_settings") or {}
    name = over.get("sd_model_checkpoint") if isinstance(over, dict) else None
    if name:
        return a1111_options.checkpoint(request.app, name, "override_settings.sd_model_checkpoint")
    if body.get("model"):
        return a1111_options.checkpoint(request.app, body["model"], "model")
    return a1111_options.current_model(request.app)


def _fields(body, limits, options, img2img=False):
    """A1111's request -> build_task's fields, in A1111's names; n = batch_size * n_iter;
    CLIP_stop_at_last_layers and sd_vae_decode_method from override_settings, else from
    `options` (/options'); token_merging_ratio the same (img2img: A1111's img2img ratio where
    not 0); our deepcache from override_settings, else from the body."""
    n = get_int(body, "batch_size", 1, 1, limits.max_n) * get_int(body, "n_iter", 1, 1,
                                                                  limits.max_n)
    if n > limits.max_n:
        raise bad("n_iter", f"batch_size * n_iter must be at most {limits.max_n}, got {n}")
    if body.get("enable_hr"):
        raise bad("enable_hr", "enable_hr (hires fix) is not supported here; ask for the final "
                               "width and height with enable_hr false")
    if body.get("styles"):
        raise bad("styles", f"styles {body['styles']!r}: this server has no prompt styles")
    f = {k: body.get(k) for k in ("negative_prompt", "seed", "steps", "cfg_scale", "scheduler",
                                  "width", "height", "denoising_strength", "guidance_rescale")}
    f.update(prompt=body.get("prompt", ""), n=n,
             sampler_name=body.get("sampler_name") or body.get("sampler_index"))
    over = body.get("override_settings")
    over = over if isinstance(over, dict) else {}
    key = "CLIP_stop_at_last_layers"
    f[key] = over[key] if over.get(key) is not None else options.get(key)
    f[a1111_options.TOME] = a1111_options.tome_ratio(over, options, img2img)
    key = "deepcache"  # DeepCache's interval (no A1111 setting): override_settings or the body
    f[key] = over[key] if over.get(key) is not None else body.get(key)
    key = a1111_options.DECODE_METHOD  # A1111's "VAE type for decode": Full or TAESD
    param = f"override_settings.{key}" if over.get(key) is not None else key
    f["vae_decoder"] = a1111_options.decode_method(over.get(key) or options.get(key), param)
    return f


def _answer(request, body, task, job):
    kw, res = task.kwargs, job.result
    seeds, (sampler, scheduler) = res["seeds"], shown_sampler(res["sampler"])
    info = {"prompt": kw["prompt"], "all_prompts": [kw["prompt"]] * len(seeds),
            "negative_prompt": kw["negative_prompt"],
            "all_negative_prompts": [kw["negative_prompt"]] * len(seeds),
            "seed": res["seed"], "all_seeds": seeds, "steps": res["steps"],
            "cfg_scale": res["guidance"], "sampler_name": sampler, "scheduler": scheduler,
            "width": res["width"], "height": res["height"],
            "batch_size": get_int(body, "batch_size", 1, 1, 10**6),
            "denoising_strength": kw.get("strength"), "sd_model_name": task.model,
            "sd_model_hash": a1111_options.short_hash(request.app, task.model),
            "index_of_first_image": 0, "infotexts": res["infotexts"], "styles": [],
            "clip_skip": kw.get("clip_skip", 1), "extra_generation_params": {},
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)),
            "interrupted": res["interrupted"]}
    params = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {"images": [b64(p) for p in job.pngs], "parameters": params,
            "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(request: Request):
    reg = request.app.state.registry
    body = await json_body(request)
    options = a1111_options.options(request.app).values
    fields = _fields(body, reg.limits, options)
    task = build_task(_model(request, body), fields, reg.limits, dialect=DIALECT)
    task.vae = a1111_vae.requested(request.app, body, options)
    return _answer(request, body, task, await run(request, task))


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
    options = a1111_options.options(request.app).values
    fields = _fields(body, reg.limits, options, img2img=True)
    if fields["denoising_strength"] is None:
        fields["denoising_strength"] = 0.75  # A1111's default
    task = build_task(_model(request, body), fields, reg.limits, image=image, mask=mask,
                      dialect=DIALECT)
    task.vae = a1111_vae.requested(request.app, body, options)
    return _answer(request, body, task, await run(request, task))


@router.get("/samplers")
async def sampler_list():
    return [{"name": shown, "aliases": ours, "options": {}}
            for shown, ours in sampler_names().items()]


@router.get("/schedulers")
async def scheduler_list():
    """The schedulers a request may name (A1111's shape); Karras' rho is 7, as in A1111."""
    return [{"name": k, "label": label, "aliases": None,
             "default_rho": 7.0 if k == "karras" else -1.0, "need_inner_model": False}
            for k, (label, _) in SCHEDULERS.items()]


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
                 interrupted=job.interrupt_requested.is_set(),
                 skipped=job.skip_requested.is_set())
    return {"progress": frac, "eta_relative": eta, "state": state,
            "current_image": None if skip_current_image else job.preview, "textinfo": None}


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop what runs now (every model's current job), as A1111's button does: the requests
    waiting on those jobs get the images made so far, the current one as it is at that step;
    the rest of an A1111 batch is not made."""
    for job in request.app.state.registry.running():
        job.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request):
    """A1111's skip: the image being made now stops as it is at this step, and its batch goes
    on with the next image (A1111 requests' jobs only: other APIs' batches are one call)."""
    for job in request.app.state.registry.running():
        if job.task.seed_per_image:
            job.skip()
    return None


router.include_router(a1111_options.router)
router.include_router(a1111_info.router)
router.include_router(a1111_loras.router)
router.include_router(a1111_vae.router)
