"""The models a server offers: the bundled ones, or every model in a folder, by name. Loaded
lazily on first use, then kept; each loaded model gets its own Worker."""
import threading
from pathlib import Path

import torch

from .. import check_dtype, loading
from ..formats.files import WEIGHT_SUFFIXES
from .jobs import Files, Job, Worker
from .params import SERVER_VAE, APIError, Limits, Task

def scan(models_dir):
    """name -> path for every model `nanodiffusion.load` accepts in `models_dir` (None: the
    bundled names whose files are installed)."""
    if models_dir is None:
        found = {}
        for name in loading.BUNDLED_NAMES:
            try:
                found[name] = loading.resolve(name)
            except FileNotFoundError:
                pass
        return found
    found = {}
    for p in sorted(Path(models_dir).iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() and ((p / "model.json").exists() or (p / "model_index.json").exists()):
            found.setdefault(p.name, p)
        elif p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            found.setdefault(p.stem, p)
    return found


# What each kind of model does through the server, and the options only one kind has.
TASKS = {"sd": ("generate", "img2img", "inpaint"), "unclip": ("generate", "variations", "edit")}
KIND_NAMES = {"sd": "a Stable Diffusion model", "unclip": "an unCLIP (DALL·E 2) model"}
SD_OPTIONS = ("guidance_rescale", "vae_decoder", "deepcache", "tome")


def check_task(task, kind):
    """A 400 naming what `task` asks that a model of `kind` cannot do, before it is queued."""
    if task.kind not in TASKS[kind]:
        other = next(k for k in TASKS if task.kind in TASKS[k])
        raise APIError(400, f"model {task.model!r} is {KIND_NAMES[kind]}, which does "
                            f"{', '.join(TASKS[kind])}; {task.kind} needs {KIND_NAMES[other]}",
                       param="model", code="unsupported_for_model")
    for key in SD_OPTIONS:
        if kind != "sd" and key in task.kwargs:
            raise APIError(400, f"{key} is an option of Stable Diffusion models; model "
                                f"{task.model!r} is {KIND_NAMES[kind]}", param=key)
    if kind != "sd" and task.vae is not None:
        raise APIError(400, f"sd_vae {task.vae.name!r}: another VAE is for Stable Diffusion "
                            f"models; model {task.model!r} is {KIND_NAMES[kind]}",
                       param="sd_vae")


def check_name(name):
    """Model names are plain names: no path separators, no '..', nothing absolute."""
    if not isinstance(name, str) or not name:
        raise APIError(400, "model must be a non-empty string", param="model")
    if "/" in name or "\\" in name or ".." in name or Path(name).is_absolute() or \
            name.startswith("~") or "\0" in name:
        raise APIError(400, f"invalid model name {name!r}: give a name from /v1/models, "
                            f"not a path", param="model", code="invalid_model_name")
    return name


class Registry:
    def __init__(self, models_dir=None, device="cpu", limits=None, dtype="float32",
                 prediction_type=None, vae=None, low_memory=False):
        """`dtype`: a torch float dtype's name for Stable Diffusion models (unCLIP models
        always load in float32); `prediction_type`: that of single files (None: found); `vae`:
        the VAE file or folder Stable Diffusion models run with unless a request says
        otherwise (None: their own); `low_memory`: Stable Diffusion models keep their text
        encoder's, UNet's and VAE's weights on disk except while each runs."""
        check_dtype(dtype)
        self.vae = None if vae is None else Path(vae)
        if self.vae is not None and not self.vae.exists():
            raise FileNotFoundError(f"--vae {vae}: no such VAE file or folder")
        self.dtype, self.prediction_type, self.low_memory = dtype, prediction_type, low_memory
        self.models_dir = None if models_dir is None else Path(models_dir)
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise FileNotFoundError(f"--models-dir {models_dir}: not a folder")
        self.device, self.limits = device, limits or Limits()
        self.files, self.jobs = Files(), {}
        self._pipes, self._workers, self._found, self._kinds = {}, {}, None, {}
        self._lock, self._load_locks = threading.Lock(), {}

    def found(self):
        """name -> path of the models served: the folder is read once, and again on
        refresh() (AUTOMATIC1111's refresh-checkpoints), not on every request."""
        with self._lock:
            if self._found is None:
                self._found = scan(self.models_dir)
            return self._found

    def refresh(self):
        with self._lock:
            self._found, self._kinds = None, {}
        return self.found()

    def names(self):
        return sorted(self.found())

    def default_name(self):
        names = self.names()
        if not names:
            raise APIError(400, "this server has no model installed", param="model",
                           code="model_not_found")
        return "shapes" if "shapes" in names else names[0]

    def resolve_name(self, name):
        """A request's model name (None: the default) -> a name this server offers."""
        if name is None or name == "":
            return self.default_name()
        check_name(name)
        if name not in self.found():
            raise APIError(404, f"model {name!r} not found; available: {self.names()}",
                           param="model", code="model_not_found")
        return name

    def pipe(self, name):
        """The loaded Pipeline of `name`, loading it once (other models keep serving)."""
        with self._lock:
            if name in self._pipes:
                return self._pipes[name]
            lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._pipes:
                path = self.found().get(name)
                if path is None:
                    raise ValueError(f"model {name!r} is no longer installed")
                dtype = "float32" if self.kind(name) == "unclip" else self.dtype
                single = {"prediction_type": self.prediction_type} if path.is_file() else {}
                low = self.low_memory and self.kind(name) != "unclip"  # never all in memory
                pipe = loading.load_pipeline(path, device=self.device, low_memory=low,
                                             dtype=getattr(torch, dtype), **single)
                if self.models_dir is not None:  # A1111's layout: <models>/Lora
                    pipe.lora_dir = self.models_dir / "Lora"
                    pipe.embeddings_dir = self.models_dir / "embeddings"
                with self._lock:
                    self._pipes[name] = pipe
            return self._pipes[name]

    def worker(self, name):
        with self._lock:
            if name not in self._workers:
                self._workers[name] = Worker(name, self.pipe, self.files,
                                             self.limits.max_queue, self.limits.max_batch)
            return self._workers[name]

    def kind(self, name):
        """"sd" or "unclip" for a model this server offers, read from its model.json once (not
        on every request), without loading it."""
        path = self.found().get(name)
        if path is None:
            raise APIError(404, f"model {name!r} not found; available: {self.names()}",
                           param="model", code="model_not_found")
        with self._lock:
            if name not in self._kinds:
                self._kinds[name] = loading.model_kind(path)
            return self._kinds[name]

    def submit(self, task: Task):
        kind = self.kind(task.model)
        if task.vae == SERVER_VAE:
            task.vae = self.vae if kind == "sd" else None
        check_task(task, kind)
        job = self.worker(task.model).submit(Job(task))
        with self._lock:
            self.jobs[job.id] = job
            while len(self.jobs) > 1000:
                self.jobs.pop(next(iter(self.jobs)))
        return job

    def job(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r}", param="id", code="job_not_found")
        return job

    def running(self):
        """Jobs running now, the most recently started first."""
        with self._lock:
            jobs = [j for w in self._workers.values() for j in w.running]
        return sorted(jobs, key=lambda j: j.started or 0, reverse=True)

    def queued_count(self):
        with self._lock:
            return sum(w.queue.qsize() for w in self._workers.values())

    def loaded(self):
        with self._lock:
            return sorted(self._pipes)
