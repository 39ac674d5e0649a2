"""Batching in the server (serve --max-batch): txt2img jobs that wait together run as one
pipelines.batch.generate_batch call, each keeping its own noise, prompts, images, parameters
and errors. The UNet's calls are watched through a forward pre-hook (their batch sizes), which
also holds the worker at a chosen call so that jobs pile up in its queue.

Batched images equal their single twins up to the last bits of the UNet (on CPU oneDNN picks
its GEMM kernels by batch size): measured on the bundled shapes model, at most 1/255 in one
or two channel values of a batch of 8 (most images byte-equal); BOUND allows 2."""
import base64
import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import nanodiffusion
from nanodiffusion.errors import InputError
from nanodiffusion.pipelines.batch import generate_batch
from nanodiffusion.pipelines.sd import Interrupted

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from live_server import serve  # noqa: E402

from nanodiffusion.cli import _parser  # noqa: E402
from nanodiffusion.server import Limits, create_app  # noqa: E402
from nanodiffusion.server.models import Registry  # noqa: E402
from nanodiffusion.server.params import Task, encode_png  # noqa: E402

BOUND = 2  # /255: the most a batched image's channel value may differ from its twin's
FAST = dict(steps=3, sampler="euler", guidance=3.0)  # one UNet call per step
PROMPTS = ["a red circle", "a blue square on the left", "two green triangles",
           "a yellow star at the top", "a small purple circle"]


@pytest.fixture(scope="module")
def pipe():
    return nanodiffusion.load("shapes")


class UNetCalls:
    """A forward pre-hook on a UNet: `sizes` the batch size of every call; `hold(i, until)`
    makes call i wait until `until()` is true (so that jobs queue up meanwhile)."""

    def __init__(self, unet):
        self.sizes, self.holds = [], {}
        self.handle = unet.register_forward_pre_hook(self)

    def hold(self, i, until):
        self.holds[i] = until

    def __call__(self, module, args):
        i = len(self.sizes)
        self.sizes.append(args[0].shape[0])
        deadline = time.time() + 60
        while i in self.holds and not self.holds[i]():
            assert time.time() < deadline, f"UNet call {i} held for 60 s"
            time.sleep(0.01)


def pixels(im):
    return np.asarray(im.convert("RGB"), dtype=np.int64)


def assert_twin(images, twin):
    """Batched images against the same request made alone: the same parameters text and
    Settings, pixels within BOUND."""
    assert len(images) == len(twin)
    for got, want in zip(images, twin):
        assert got.info["parameters"] == want.info["parameters"]
        assert np.abs(pixels(got) - pixels(want)).max() <= BOUND


def wait_all(jobs, timeout=120):
    deadline = time.time() + timeout
    while any(j.status in ("queued", "running") for j in jobs):
        assert time.time() < deadline, [j.status for j in jobs]
        time.sleep(0.02)


def job_images(job):
    return [Image.open(io.BytesIO(p)) for p in job.pngs]


# ---- the pipeline function ------------------------------------------------------------
def test_generate_batch_matches_single_twins(pipe):
    """Prompts, seeds and n differ, an ancestral sampler draws per-step noise: each
    request's images are its single twin's; same-shaped requests share every UNet call,
    another size runs as its own group, a bad request fails alone."""
    reqs = [dict(prompt=PROMPTS[0], seed=11, n=2, **FAST, negative_prompt="blue"),
            dict(prompt=PROMPTS[1], seed=12, **FAST),
            dict(prompt=PROMPTS[2], seed=13, **{**FAST, "sampler": "euler-ancestral"}),
            dict(prompt=PROMPTS[3], seed=14, **{**FAST, "sampler": "euler-ancestral"}),
            dict(prompt=PROMPTS[4], seed=15, width=128, height=128, **FAST),
            dict(prompt=PROMPTS[1], seed=-3, **FAST)]  # refused by the pipeline's checks
    calls = UNetCalls(pipe.unet)
    try:
        out = generate_batch(pipe, reqs)
    finally:
        calls.handle.remove()
    # CFG doubles each batch: (2 + 1) euler, 2 euler-ancestral, 1 at 128 px; 3 steps each
    assert calls.sizes == [6] * 3 + [4] * 3 + [2] * 3
    assert isinstance(out[5], InputError) and "seed" in str(out[5])
    for r, images in zip(reqs[:5], out[:5]):
        assert_twin(images, pipe.generate(**r))
    # the noise is each request's own: swapping seeds changes the image
    other = pipe.generate(**{**reqs[1], "seed": 13})[0]
    assert np.abs(pixels(out[1][0]) - pixels(other)).max() > 20


def test_generate_batch_callbacks_are_per_request(pipe):
    """A callback sees its own rows; Interrupted from it stops that request only (its
    images: the estimate at that step, as a lone interrupted call's), another exception
    fails only that request."""
    seen = []

    def interrupt_at_1(info):
        if info["step"] == 1:
            raise Interrupted

    def watch(info):
        seen.append(info["denoised"].shape[0])

    def broken(info):
        raise RuntimeError("the client's callback broke")
    reqs = [dict(prompt=PROMPTS[0], seed=1, callback=interrupt_at_1, **FAST),
            dict(prompt=PROMPTS[1], seed=2, n=2, callback=watch, **FAST),
            dict(prompt=PROMPTS[2], seed=3, callback=broken, **FAST)]
    out = generate_batch(pipe, reqs)
    assert seen == [2, 2, 2]  # its two rows, at every step
    assert isinstance(out[2], RuntimeError)
    assert_twin(out[0], pipe.generate(**reqs[0]))
    assert_twin(out[1], pipe.generate(**{**reqs[1], "callback": None}))
    done = pipe.generate(**{**reqs[0], "callback": None})[0]
    assert np.abs(pixels(out[0][0]) - pixels(done)).max() > 0  # it did stop early


# ---- the server's worker --------------------------------------------------------------
def _task(prompt, seed, **kw):
    kwargs = dict(prompt=prompt, negative_prompt="", seed=seed, n=1, width=None, height=None,
                  **FAST)
    return Task("shapes", "generate", {**kwargs, **kw})


def _queued_jobs(max_batch):
    """A registry whose worker is held in its first job's first UNet call until four more
    jobs wait: three batchable ones, one with other steps, one bad (a LoRA tag where the
    server has no LoRA folder). -> (registry, UNetCalls, jobs)."""
    reg = Registry(limits=Limits(max_batch=max_batch))
    calls = UNetCalls(reg.pipe("shapes").unet)
    calls.hold(0, lambda: reg.queued_count() == 5)
    jobs = [reg.submit(_task(PROMPTS[0], 100))]
    while not calls.sizes:
        time.sleep(0.01)
    jobs += [reg.submit(_task(PROMPTS[1], 101)), reg.submit(_task(PROMPTS[2], 102, n=2)),
             reg.submit(_task(PROMPTS[3], 103, steps=2)),
             reg.submit(_task(PROMPTS[4] + " <lora:missing>", 104)),
             reg.submit(_task(PROMPTS[4], 105))]
    return reg, calls, jobs


def test_worker_batches_waiting_jobs(pipe):
    reg, calls, jobs = _queued_jobs(max_batch=8)
    wait_all(jobs)
    calls.handle.remove()
    # the first alone; then jobs 1, 2 (n=2), 5 in one batch (the bad one 4 fails before
    # sampling); then job 3, whose steps differ
    assert calls.sizes == [2] * 3 + [8] * 3 + [2] * 2
    bad = jobs[4]
    assert (bad.status, bad.error_status) == ("error", 400) and "LoRA" in bad.error
    for job in jobs[:4] + jobs[5:]:
        assert job.status == "done"
        assert job.result["seeds"] == [job.task.kwargs["seed"]] * job.task.kwargs["n"]
        assert_twin(job_images(job), pipe.generate(**job.task.kwargs))
        assert job.step == job.total == job.task.kwargs["steps"]  # its own progress


def test_max_batch_1_runs_each_job_alone(pipe):
    reg, calls, jobs = _queued_jobs(max_batch=1)
    wait_all(jobs)
    calls.handle.remove()
    assert calls.sizes == [2] * 3 + [2] * 3 + [4] * 3 + [2] * 2 + [2] * 3  # job after job
    for job in (jobs[1], jobs[2]):  # alone: the bytes of pipe.generate
        assert job.pngs == [encode_png(im) for im in pipe.generate(**job.task.kwargs)]


def test_max_batch_limits_the_images_of_a_batch():
    reg, calls, jobs = _queued_jobs(max_batch=3)
    wait_all(jobs)
    calls.handle.remove()
    # 1 + 2 images fit (jobs 1, 2); job 5 waits for the next batch, after job 3
    assert calls.sizes == [2] * 3 + [6] * 3 + [2] * 2 + [2] * 3
    assert [j.status for j in jobs] == ["done"] * 4 + ["error", "done"]


def test_cancelled_job_in_a_batch_ends_alone(pipe):
    """A job cancelled at its batch's second step ends then ("cancelled"), while the
    others of its batch finish with their twins' images."""
    reg = Registry(limits=Limits(max_batch=8))
    calls = UNetCalls(reg.pipe("shapes").unet)
    calls.hold(0, lambda: reg.queued_count() == 3)
    first = reg.submit(_task(PROMPTS[0], 1))
    while not calls.sizes:
        time.sleep(0.01)
    batch = [reg.submit(_task(p, 2 + i)) for i, p in enumerate(PROMPTS[1:4])]
    calls.hold(4, lambda: batch[1].cancel() or True)  # call 4: the batch's second step
    wait_all([first, *batch])
    calls.handle.remove()
    assert calls.sizes == [2] * 3 + [6] * 3
    assert (batch[1].status, batch[1].error_status) == ("cancelled", 409)
    assert batch[1].finished < batch[0].finished  # it ended before its batch did
    for job in (batch[0], batch[2]):
        assert job.status == "done"
        assert_twin(job_images(job), pipe.generate(**job.task.kwargs))


# ---- over HTTP ----------------------------------------------------------------------------
def test_concurrent_openai_clients_are_batched(pipe):
    """Four openai clients at once and one that hangs up while its job runs in the batch:
    the clients get their own images (their twins'), the batch goes on without the one that
    left."""
    app = create_app(limits=Limits(max_batch=8))
    reg = app.state.registry
    calls = UNetCalls(reg.pipe("shapes").unet)
    calls.hold(0, lambda: reg.queued_count() == 4)
    # the batch's first step waits until the server has seen the hang-up
    calls.hold(3, lambda: any(j.cancel_requested.is_set() for j in reg.jobs.values()))
    results = {}
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(i):
            r = client.images.generate(model="shapes", prompt=PROMPTS[i], size="64x64",
                                       response_format="b64_json",
                                       extra_body={"seed": 50 + i, **FAST})
            results[i] = base64.b64decode(r.data[0].b64_json)

        def hang_up():  # sends its request, and closes once the batch's first step runs
            conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
            conn.request("POST", "/v1/images/generations", json.dumps(
                {"model": "shapes", "prompt": PROMPTS[4], "size": "64x64", "seed": 54,
                 **FAST}), {"Content-Type": "application/json"})
            while len(calls.sizes) < 4:
                time.sleep(0.01)
            conn.close()
        threads = [threading.Thread(target=ask, args=(0,))]
        threads[0].start()
        while not calls.sizes:
            time.sleep(0.01)
        threads += [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
        threads.append(threading.Thread(target=hang_up))
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(timeout=120)
    calls.handle.remove()
    assert calls.sizes == [2] * 3 + [8] * 3
    assert sorted(results) == [0, 1, 2, 3]
    left = [j for j in reg.jobs.values() if j.task.kwargs["prompt"] == PROMPTS[4]]
    assert [j.status for j in left] == ["cancelled"]
    for i in range(4):
        got = Image.open(io.BytesIO(results[i]))
        twin = pipe.generate(PROMPTS[i], seed=50 + i, width=64, height=64, **FAST)
        assert_twin([got], twin)


def test_serve_max_batch_option():
    p = _parser()
    assert p.parse_args(["serve"]).max_batch == 1  # off unless asked: bytes of lone runs
    assert p.parse_args(["serve", "--max-batch", "4"]).max_batch == 4
    with pytest.raises(ValueError, match="max_batch"):
        Limits(max_batch=0)


def test_unbatchable_tasks_are_left_waiting():
    from nanodiffusion.server.batching import batch_key

    base = _task("a red circle", 1)
    assert batch_key(base) == batch_key(_task("a blue square", 2, n=2))
    assert batch_key(base) != batch_key(_task("a red circle", 1, steps=4))
    assert batch_key(base) != batch_key(_task("a red circle", 1, width=128, height=128))
    a1111 = Task("shapes", "generate", {**base.kwargs, "n": 2}, seed_per_image=True)
    assert batch_key(a1111) is None  # its images are made one by one, seed + i
    assert batch_key(Task("shapes", "img2img", {**base.kwargs, "image": None})) is None
    assert batch_key(Task("shapes", "generate", {**base.kwargs, "best_of": 2})) is None
