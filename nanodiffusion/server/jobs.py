"""Jobs and the workers that run them: one thread and one bounded queue per loaded model, so a
model runs one generation at a time and a seed gives the same bytes whatever else is queued.

A job's events (progress, done, error) go from the worker thread to every asyncio listener
through `loop.call_soon_threadsafe`; a listener that arrives late first gets the last progress
event and the final one."""
import asyncio
import io
import queue
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import asdict

from ..errors import InputError
from ..pipelines.decoders import preview_decoder, small_preview
from ..pipelines.batch import generate_batch
from ..pipelines.sd import Interrupted, Pipeline
from .batching import take_companions
from .params import APIError, Task, b64, encode_png, public_params

TERMINAL = ("done", "error")
PREVIEW_SIDE = 128


class Cancelled(Exception):
    """Raised from the sampler callback to abort a job mid-run."""


class Files:
    """The generated PNGs by unguessable id, the oldest dropped past `capacity`."""

    def __init__(self, capacity=512):
        self.capacity, self._files, self._lock = capacity, OrderedDict(), threading.Lock()

    def put(self, data):
        fid = uuid.uuid4().hex
        with self._lock:
            self._files[fid] = data
            while len(self._files) > self.capacity:
                self._files.popitem(last=False)
        return fid

    def get(self, fid):
        with self._lock:
            return self._files.get(fid)


class Job:
    def __init__(self, task: Task):
        self.id, self.task = uuid.uuid4().hex, task
        self.status = "queued"  # queued | running | done | error | cancelled
        self.step, self.total, self.preview = 0, 0, None
        self.result, self.error, self.error_status = None, None, None
        self.created, self.started, self.finished = time.time(), None, None
        self.cancel_requested = threading.Event()
        self.interrupt_requested = threading.Event()  # stop, but keep the images as they are
        self.skip_requested = threading.Event()  # stop this image, go on with the next
        self._lock, self._listeners, self._history = threading.Lock(), [], []

    # ---- events -----------------------------------------------------------------------
    def publish(self, event, data):
        ev = {"event": event, "data": data}
        with self._lock:
            if event == "progress":  # keep only the latest progress for late listeners
                self._history = [e for e in self._history if e["event"] != "progress"]
            self._history.append(ev)
            for loop, q in self._listeners:
                try:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                except RuntimeError:  # that listener's event loop has closed
                    pass

    def subscribe(self):
        """An asyncio.Queue of this job's events, starting with what already happened."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            for ev in self._history:
                q.put_nowait(ev)
            self._listeners.append((loop, q))
        return q

    def unsubscribe(self, q):
        with self._lock:
            self._listeners = [(lp, x) for lp, x in self._listeners if x is not q]

    async def wait(self):
        """The final event (done or error), without blocking the event loop."""
        q = self.subscribe()
        try:
            while True:
                ev = await q.get()
                if ev["event"] in TERMINAL:
                    return ev
        finally:
            self.unsubscribe(q)

    def cancel(self):
        self.cancel_requested.set()

    def interrupt(self):
        """AUTOMATIC1111's interrupt: stop sampling and finish with the current estimate."""
        self.interrupt_requested.set()

    def skip(self):
        """AUTOMATIC1111's skip, for a seed_per_image task: the image being made stops as
        it is (as on interrupt), the batch goes on with the next."""
        self.skip_requested.set()

    def summary(self):
        out = {"id": self.id, "status": self.status, "model": self.task.model,
               "progress": {"step": self.step, "total": self.total},
               "parameters": public_params(self.task), "created": int(self.created)}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class Worker:
    """One thread per model; `submit` answers 429 when `max_queue` jobs already wait. With
    `max_batch` > 1, txt2img jobs waiting together run as one batch of up to that many
    images (batching.py)."""

    def __init__(self, name, get_pipe, files, max_queue, max_batch=1):
        self.name, self.get_pipe, self.files = name, get_pipe, files
        self.queue, self.max_batch = queue.Queue(maxsize=max_queue), max_batch
        self.running, self.seconds_per_job = [], 5.0  # the jobs running now
        self.thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)
        self.thread.start()

    def submit(self, job):
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            wait = max(1, round(self.seconds_per_job * (self.queue.qsize() + 1)))
            raise APIError(429, f"the queue of model {self.name!r} is full "
                                f"({self.queue.maxsize} waiting); retry later",
                           code="queue_full", headers={"Retry-After": str(wait)}) from None
        return job

    def _loop(self):
        while True:
            job = self.queue.get()
            if job.cancel_requested.is_set():
                self._finish_cancelled(job)
                continue
            jobs = [job]
            if self.max_batch > 1:
                jobs += take_companions(self.queue, job, self.max_batch)
            self.running = jobs
            try:
                if len(jobs) == 1:
                    self._run(job)
                else:
                    self._run_batch(jobs)
            finally:
                self.running = []

    def _run(self, job):
        job.status, job.started = "running", time.time()
        try:
            pipe = self.get_pipe(self.name)
            if hasattr(pipe, "load_vae"):  # every job says its VAE: none is left by the last
                pipe.load_vae(job.task.vae)
            method = getattr(pipe, job.task.kind)
            images = _call(method, job, self._callback(job, pipe))
        except (Cancelled, Interrupted):  # Interrupted: from a task that cannot stop early
            return self._finish_cancelled(job)
        except Exception as e:  # noqa: BLE001 - the job's error, a 400 or a 500
            return self._finish_failed(job, e)
        self._finish_done(job, images)

    def _run_batch(self, jobs):
        """`jobs` (batching.batch_key equal) as one pipelines.batch.generate_batch call;
        each gets its own images or error. A job cancelled mid-batch ends at once."""
        for job in jobs:
            job.status, job.started = "running", time.time()
        try:
            pipe = self.get_pipe(self.name)
            if not isinstance(pipe, Pipeline):  # unCLIP: one job after the other
                for job in jobs:
                    self._run(job)
                return
            pipe.load_vae(jobs[0].task.vae)  # the batch's VAE (in its key)
            results = generate_batch(pipe, [{**job.task.kwargs,
                                             "callback": self._batch_callback(job, pipe)}
                                            for job in jobs])
        except Exception as e:  # noqa: BLE001 - e.g. the model failed to load: every job's
            results = [e] * len(jobs)
        for job, result in zip(jobs, results):
            if job.status == "cancelled":  # ended when it was cancelled
                continue
            if isinstance(result, Exception):
                self._finish_failed(job, result)
            else:
                self._finish_done(job, result)

    def _batch_callback(self, job, pipe):
        cb = self._callback(job, pipe)

        def step(info):
            if job.cancel_requested.is_set():  # its client hears now; cb raises Cancelled
                self._finish_cancelled(job)
            return cb(info)
        return step

    def _finish_failed(self, job, e):
        if isinstance(e, InputError):  # a setting this model refuses: the client can fix it
            return self._finish_error(job, 400, str(e))
        traceback.print_exception(e)  # an internal error: a 500, logged here
        return self._finish_error(job, 500, f"{type(e).__name__}: {e}")

    def _finish_done(self, job, images):
        pngs = [encode_png(im) for im in images]
        ids = [self.files.put(p) for p in pngs]
        infotexts = [im.info.get("parameters", "") for im in images]
        ran = [im.info["settings"] for im in images]  # the Settings the pipeline resolved
        job.result = {"images": [f"/v1/files/{i}.png" for i in ids], "infotexts": infotexts,
                      **asdict(ran[0]), "seeds": [s.seed for s in ran],
                      "interrupted": job.interrupt_requested.is_set()}
        job.pngs = pngs
        job.finished, job.status = time.time(), "done"
        took = (job.finished - job.started) / max(1, len(self.running))  # a batch's share
        self.seconds_per_job = 0.7 * self.seconds_per_job + 0.3 * took
        job.publish("done", job.result)

    def _finish_cancelled(self, job):
        job.status, job.finished, job.error, job.error_status = "cancelled", time.time(), \
            "cancelled", 409
        job.publish("error", {"message": "cancelled", "code": "cancelled"})

    def _finish_error(self, job, status, message):
        job.status, job.finished, job.error, job.error_status = "error", time.time(), \
            message, status
        job.publish("error", {"message": message, "code": "generation_failed"})

    @staticmethod
    def _callback(job, pipe):
        def cb(info):
            if job.cancel_requested.is_set():
                raise Cancelled()
            if job.interrupt_requested.is_set() or job.skip_requested.is_set():
                raise Interrupted()
            job.step, job.total = info["step"] + 1, info["total"]
            every = max(1, job.total // 6)
            if job.step % every == 0 and job.step < job.total:
                job.preview = preview_png(pipe, info["denoised"])
            job.publish("progress", {"step": job.step, "total": job.total,
                                     "preview": job.preview})
        return cb


def _call(method, job, callback):
    """Run the task: its images. A seed_per_image task runs one call per image with seed + i,
    so that image i is what a single request with that seed gives (AUTOMATIC1111's batches);
    its progress counts the whole batch. An interrupt ends the batch at the image it stops, a
    skip only that image."""
    kw = job.task.kwargs
    if not job.task.seed_per_image:
        return method(**kw, callback=callback)
    n, images = kw["n"], []
    for i in range(n):
        if i and job.interrupt_requested.is_set():
            break

        def step(info, i=i):
            total = n * info["total"]
            return callback({**info, "step": i * info["total"] + info["step"], "total": total})
        images += method(**{**kw, "n": 1, "seed": kw["seed"] + i}, callback=step)
        job.skip_requested.clear()
    return images


def preview_png(pipe, denoised):
    """A small PNG (base64) of the first image's current estimate (decoders.small_preview),
    every few steps rather than through `preview=True`, which would decode all images whole
    every step. None for a model without a tiny decoder that runs with low memory (serve
    --low-memory): its VAE would be read in beside the UNet, the two parts low memory never
    holds together (SD 1.5 in bfloat16, 256 px, 12 steps: the server's VmHWM 2,381,048 kB
    with such previews, 2,160,824 without, and the job 87.0 s against 77.2)."""
    if preview_decoder(pipe) == "full" and getattr(pipe, "low_memory", False):
        return None
    im = small_preview(pipe, denoised, PREVIEW_SIDE)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return b64(buf.getvalue())
