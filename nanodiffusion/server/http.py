"""What every route shares: the JSON body of a request, and running a Task on the model's
worker while the client stays connected."""
import asyncio
import json

from .params import APIError, bad


async def json_body(request):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad(None, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


DISCONNECT_POLL_S = 0.25


async def run(request, task):
    """Queue `task`, wait for it without blocking the loop; the finished Job, or an APIError.
    A client that goes away cancels its job (queued: skipped; running: stopped at the next
    step), so it frees its place for the others."""
    job = request.app.state.registry.submit(task)
    waiter = asyncio.ensure_future(job.wait())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if not waiter.done() and await request.is_disconnected():
                job.cancel()
                raise APIError(499, "the client closed the connection; its job was cancelled",
                               code="client_disconnected")
    finally:
        if not waiter.done():
            waiter.cancel()
    ev = waiter.result()
    if ev["event"] == "error":
        raise APIError(job.error_status or 500, job.error, param=_param_of(job.error),
                       code=ev["data"].get("code"))
    return job


def _param_of(message):
    """The field a Pipeline error names first ("steps must be ...")."""
    word = (message or "").split(" ", 1)[0]
    known = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "width",
             "height", "n", "strength", "eta", "image", "mask", "guidance_rescale",
             "vae_decoder", "deepcache", "tome")
    return word if word in known else None
