"""The HTTP app: the OpenAI Images API (/v1), an AUTOMATIC1111 subset (/sdapi/v1), the native
job API with server-sent events (/api/jobs) and the web page (/). Every route turns its fields
into a params.Task and hands it to the model's worker, which calls the Pipeline."""
import hmac
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from . import a1111, openai_api
from .http import json_body
from .models import Registry
from .params import APIError, Limits, bad, build_task, decode_image

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/health", "/favicon.ico")
OPEN_PREFIXES = ("/static/", "/v1/files/")  # file ids are unguessable; <img> sends no header


def create_app(models_dir=None, device="cpu", api_key=None, limits=None, dtype="float32",
               prediction_type=None, vae=None, low_memory=False):
    """`dtype`: Stable Diffusion models' precision; `prediction_type`: that of the single-file
    checkpoints in `models_dir` (None: found per file); `vae`: a VAE file or folder the Stable
    Diffusion models use in place of their own (serve --vae; A1111's sd_vae "Automatic");
    `low_memory`: theirs on (Pipeline.set_low_memory, serve --low-memory)."""
    limits = limits or Limits()
    app = FastAPI(title="nanodiffusion", docs_url="/docs", redoc_url=None)
    app.state.registry = Registry(models_dir, device, limits, dtype, prediction_type, vae,
                                  low_memory)
    app.state.api_key = api_key
    _install_errors(app)
    _install_auth(app, api_key)
    app.include_router(openai_api.router)
    app.include_router(a1111.router)
    _native_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _install_errors(app):
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        err = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in err.get("loc", [])[1:]) or None
        return JSONResponse(APIError(400, f"{param}: {err.get('msg', 'invalid')}",
                                     param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(),
                            status_code=exc.status_code)


def _install_auth(app, api_key):
    if not api_key:
        return

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def _native_routes(app):
    reg = app.state.registry

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": reg.names(), "loaded": reg.loaded(),
                "running": len(reg.running()), "queued": reg.queued_count(),
                "auth": bool(app.state.api_key)}

    @app.get("/v1/files/{name}")
    async def file(name: str):
        data = reg.files.get(name.removesuffix(".png"))
        if data is None:
            raise APIError(404, f"no file {name!r} (files are kept for a while only)",
                           code="file_not_found")
        return Response(data, media_type="image/png")

    @app.get("/api/models")
    async def models():
        return {"models": reg.names(), "limits": vars(reg.limits),
                "samplers": _sampler_names()}

    @app.post("/api/jobs")
    async def create_job(request: Request):
        body = await json_body(request)
        task = _job_task(reg, body)
        job = reg.submit(task)
        return {"id": job.id, "status": job.status}

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str):
        return reg.job(job_id).summary()

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        job = reg.job(job_id)
        job.cancel()
        return {"id": job.id, "status": job.status, "cancel_requested": True}

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str):
        return StreamingResponse(_sse(reg.job(job_id)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})


def _sampler_names():
    from .. import samplers

    return list(samplers.SAMPLER_NAMES)


def _job_task(reg, body):
    """Native fields: those of Pipeline.generate, plus model, strength, and an init image as
    base64 (`init_image`) or as the id of a file this server made (`init_file`), `mask`."""
    model = reg.resolve_name(body.get("model"))
    lim = reg.limits
    image = mask = None
    if body.get("init_file"):
        data = reg.files.get(str(body["init_file"]).rsplit("/", 1)[-1].removesuffix(".png"))
        if data is None:
            raise bad("init_file", f"no file {body['init_file']!r}")
        image = decode_image(data, "init_file", lim)
    elif body.get("init_image"):
        image = decode_image(body["init_image"], "init_image", lim)
    if body.get("mask"):
        mask = decode_image(body["mask"], "mask", lim)
    return build_task(model, body, lim, image=image, mask=mask)


async def _sse(job):
    q = job.subscribe()
    try:
        yield f"event: queued\ndata: {json.dumps({'id': job.id})}\n\n"
        while True:
            ev = await q.get()
            yield f"event: {ev['event']}\ndata: {json.dumps(ev['data'])}\n\n"
            if ev["event"] in ("done", "error"):
                return
    finally:
        job.unsubscribe(q)
