"""One training loop for every part (clip, vae, unet, prior, decoder).

What makes it resumable exactly: every random draw of a step comes from generators seeded by
(seed, step, sample index), the data a step sees is a function of the step, and the LR is a
function of the step. A checkpoint therefore needs only the weights, the EMA, the optimizer
and the step; the next step after a resume is the step an unbroken run would have taken.
The same per-sample seeding makes a DDP run with the global batch split over ranks compute the
same loss as one process. Ranks sum their gradients with one all-reduce per step, after
accumulation (`_sync_grads`), rather than through DDP's wrapper, whose hooks only fire when
the loss goes through the wrapper's forward (a part calling `vae.encode` would skip the sync).
"""
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import checkpoint
from .checkpoint import unwrap

PARTS = ("clip", "vae", "unet", "prior", "decoder")


@dataclass
class TrainConfig:
    part: str = "unet"
    data: str = "shapes"            # "shapes" or a folder of captioned images
    out: str = "runs/shapes"        # the run folder; each part writes <out>/<part>/
    image_size: int = 64
    steps: int = 1000
    batch_size: int = 64            # global batch (split over DDP ranks), per optimizer step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    # warm restarts of the cosine: before restarts[0] it decays as if training ended there,
    # then as if it ended at the next entry, the last stage at `steps` (what resuming a
    # 2,000-step run with --steps 3600 and again with --steps 5000 does: [2000, 3600])
    restarts: list[int] = field(default_factory=list)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999        # 0 turns EMA off
    log_every: int = 25
    sample_every: int = 500         # 0: never
    ckpt_every: int = 250
    seed: int = 0
    include_held_out: bool = False
    device: str = "cpu"
    compile: bool = False
    # bf16 autocast of the forward pass: None = on accelerators only; true on CPUs with
    # native bf16 (AVX512-BF16, AMX). On a CPU it also takes attention's math kernel over the
    # flash one, whose bf16 backward is slow there. Forward + backward on this project's
    # 2-core CPU, float32 -> bf16: shapes UNet (batch 64, 2 threads) 1.12 -> 0.58 s, CLIP
    # (batch 128 + twins, 1 thread) 1.94 -> 1.18 s, VAE (batch 32, 1 thread) 1.03 -> 0.69 s
    autocast: bool | None = None
    num_workers: int = 0            # processes that draw the data of the next steps ahead
    # objectives
    prediction_type: str = "epsilon"
    caption_dropout: float = 0.1
    min_snr_gamma: float = 0.0      # 0: plain MSE; 5 is the min-SNR paper's choice
    latent_pool: int = 0            # unet/decoder/prior: cycle N samples, encoded once
    zero_terminal_snr: bool = False  # unet/decoder: pure noise at the last timestep, trailing
    kl_weight: float = 1e-6
    ink_weight: float = 0.0         # vae: extra loss weight of non-white pixels (shapes' objects)
    model: dict = field(default_factory=dict)  # overrides of the part's model preset
    hard_negatives: bool = False    # clip: captions with spatial words mirrored as negatives
    swap_negatives: bool = False    # clip (shapes): pairs bring their colour-swapped twin too
    pooled_text: bool = False       # unet: the pooled text state joins the time embedding too
    decoder_text: bool = False      # decoder: start from <out>/unet, read the caption too
    text_dropout: float = 0.5       # decoder_text: share of samples without the caption
                                    # (DALL·E 2: 50%); the image-only tasks train on these
    bpe_merges: int = 150           # clip: size of the caption BPE learned for small models

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part {self.part!r} is not one of {PARTS}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be between 0 and 1, got {self.text_dropout}")
        ends = [*self.restarts, self.steps]
        if any(not isinstance(r, int) for r in self.restarts) or any(
                a >= b for a, b in zip(ends, ends[1:])) or (self.restarts and
                                                            self.restarts[0] <= self.warmup):
            raise ValueError(f"restarts must be increasing whole steps between warmup "
                             f"({self.warmup}) and steps ({self.steps}), got {self.restarts}")
        if self.swap_negatives and self.data != "shapes":
            raise ValueError(f"swap_negatives needs data = 'shapes' (it redraws the scene), "
                             f"got data = {self.data!r}")
        if self.latent_pool < 0:
            raise ValueError(f"latent_pool must be >= 0 (0: no pool), got {self.latent_pool}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(f"zero_terminal_snr needs prediction_type='v_prediction', got "
                             f"{self.prediction_type!r}: at zero SNR there is no noise to "
                             "predict from")

    def out_path(self, part):
        return Path(self.out) / part

    @property
    def run_dir(self):
        return self.out_path(self.part)


def load_recipe(path, part, **overrides):
    """A recipe TOML has a [common] table and one table per part; overrides win. The recipe
    is checked as written first; a `steps` override shorter than it then takes the recipe's
    schedule along (_fit_steps)."""
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no recipe file at {path}") from None
    except (OSError, ValueError) as e:  # a folder, bad UTF-8, bad TOML
        raise ValueError(f"{path}: not a readable TOML recipe ({e})") from None
    if part not in recipe:
        raise ValueError(f"{path}: no [{part}] table; it has {sorted(recipe)}")
    values = {**recipe.get("common", {}), **recipe[part], "part": part}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; accepted: {sorted(names)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        TrainConfig(**values)
        if isinstance(given.get("steps"), int):
            values.update(_fit_steps(values, given["steps"]))
        return TrainConfig(**{**values, **given})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _fit_steps(values, steps):
    """The recipe's restarts and warmup for a shorter run (a trial with --steps 2): restarts
    at or past `steps` are dropped, and a warmup as long as the run shrinks to the recipe's
    share of it; one note on stderr says what changed."""
    planned = values.get("steps", TrainConfig.steps)
    restarts, warmup = values.get("restarts", []), values.get("warmup", TrainConfig.warmup)
    if steps >= planned:
        return {}
    fitted, changes = {"restarts": [r for r in restarts if r < steps]}, []
    if fitted["restarts"] != restarts:
        changes.append(f"restarts {restarts} -> {fitted['restarts']}")
    if warmup >= steps:
        fitted["warmup"] = warmup * steps // planned
        changes.append(f"warmup {warmup} -> {fitted['warmup']}")
    if changes:
        print(f"note: steps {steps} ends before the recipe's {planned}: {', '.join(changes)}",
              file=sys.stderr)
    return fitted


def lr_at(cfg, step):
    """Linear warmup, then cosine decay to min_lr_ratio * lr, towards the first of
    cfg.restarts past `step` (cfg.steps after the last)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    end = next((r for r in cfg.restarts if r > step), cfg.steps)
    progress = min(1.0, (step - cfg.warmup) / max(1, end - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(
        math.pi * progress)))


def sample_generators(cfg, step, indices):
    """One generator per sample, seeded by (seed, step, index): DDP- and resume-invariant."""
    return [torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_000_033 + int(i))
            for i in indices]


class EMA:
    """Exponential moving average of the weights. The decay warms up as (1 + n) / (10 + n)
    over the n updates so far: with a fixed 0.999 from the first step, a 1000-step run's
    average would still hold 37% of the random initial weights."""

    def __init__(self, model, decay):
        self.decay = decay
        self.params = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.params[k].lerp_(v.detach(), 1 - decay)
            else:
                self.params[k].copy_(v)


class Stop:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (save, then exit)."""

    def __init__(self):
        self.requested, self.signum = False, None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: the loop is stuck somewhere; leave now
            raise KeyboardInterrupt(f"signal {signum} received twice: stopped without saving")
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Records(list):
    """What train() returns: the records of this call's steps. `stopped_by` is the signal
    (SIGINT, SIGTERM) that ended the run before cfg.steps, after saving its last step."""
    stopped_by = None


class WriteFailed(OSError):
    """A file of the run could not be written (full disk, read-only folder). The message
    names the file, the cause and the checkpoint on disk, which atomic writes keep intact."""


@contextlib.contextmanager
def _failing_writes(what, saved):
    """A failed write in the block as WriteFailed; `saved`: the step of the checkpoint on
    disk (0: none)."""
    try:
        yield
    except OSError as e:
        kept = f"the last checkpoint (step {saved}) is intact" if saved else "nothing saved yet"
        where = f" {e.filename}" if e.filename else ""
        err = WriteFailed(f"cannot write {what}{where}: {e.strerror or e}; {kept}")
        err.errno = e.errno
        raise err from e


def _save(cfg, part, model, ema, opt, step, rank, saved):
    """Write the part's exports, then the training state; returns the step saved. The state
    goes last so that it never runs ahead of the exports: a resume after a failed write (at
    `saved`, the step on disk before) redoes the steps and writes both again."""
    if rank != 0:
        return step
    state = {"step": step, "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
             "ema": ema.params if ema else None, "config": json.dumps(dataclasses.asdict(cfg))}
    with _failing_writes("checkpoint", saved):
        part.export(cfg, unwrap(model), ema.params if ema else None)
        checkpoint.save_state(cfg.run_dir / "state.pt", state)
    return step


def _resume(cfg, model, ema, opt):
    path = cfg.run_dir / "state.pt"
    if not path.exists():
        return 0
    state = checkpoint.load_state(path)
    unwrap(model).load_state_dict(state["model"], strict=True)
    opt.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        ema.params = state["ema"]
    return int(state["step"])


def _trim_log(path, step):
    """Cut log.jsonl after the last line of a step <= `step` (the resumed checkpoint's): a run
    killed after logging steps it had not saved yet logs them again when it resumes. A torn
    last line (killed while writing it) goes too."""
    if not path.exists():
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                done = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                done = False
            if not done:
                break
            keep += len(line)
    if keep < path.stat().st_size:  # no write when there is nothing to cut (read-only disk)
        os.truncate(path, keep)


def _log(cfg, record, rank, saved):
    if rank == 0:
        with _failing_writes("log", saved), open(cfg.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, progress=True):
    """Train one part; returns the list of logged records of this invocation."""
    from .train_parts import get_part

    rank, world = _dist_info()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must divide by ranks x grad_accum "
                         f"({world} x {cfg.grad_accum})")
    device = torch.device(cfg.device)
    with _failing_writes("run folder", 0):
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    part = get_part(cfg.part)
    prefetch = Prefetcher(cfg, rank, world) if cfg.num_workers > 0 else None  # fork first
    try:
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves global state alone
            torch.manual_seed(cfg.seed)
            model, frozen = part.build(cfg, device)
        if prefetch is not None:
            frozen["source"] = prefetch
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        start = _resume(cfg, model, ema, opt)
        if rank == 0:
            with _failing_writes("log", start):
                _trim_log(cfg.run_dir / "log.jsonl", start)
        if world > 1:  # as DDP does on wrapping: every rank starts from rank 0's weights
            for t in model.state_dict().values():
                dist.broadcast(t, 0)
        if cfg.compile:
            model = torch.compile(model)
        return _loop(cfg, part, model, frozen, ema, opt, start, rank, world, device, progress)
    finally:
        if prefetch is not None:
            prefetch.close()


def _loop(cfg, part, model, frozen, ema, opt, start, rank, world, device, progress):
    from tqdm import tqdm

    records, micro, saved = Records(), cfg.batch_size // (world * cfg.grad_accum), start
    bar = tqdm(total=cfg.steps, initial=start, disable=None if progress and rank == 0 else True,
               desc=f"train {cfg.part}", dynamic_ncols=True)
    with bar, Stop() as stop:  # the bar ends its line before an error is printed
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss_sum, metrics, stopping = _accumulate(cfg, part, model, frozen, step, rank,
                                                      world, micro, device, stop)
            _check_finite("loss", loss_sum, step)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            _check_finite("gradient norm", float(norm), step)  # a NaN step must not be saved
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema:
                ema.update(unwrap(model), step)
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss_sum, "lr": lr_at(cfg, step),
                   "grad_norm": float(norm), "samples_per_s": cfg.batch_size / dt, **metrics}
            records.append(rec)
            bar.set_postfix(loss=f"{loss_sum:.4f}", sps=_rate(rec["samples_per_s"]))
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                _log(cfg, rec, rank, saved)
            if done % cfg.ckpt_every == 0 or done == cfg.steps or stopping:
                saved = _save(cfg, part, model, ema, opt, done, rank, saved)
            if cfg.sample_every and done % cfg.sample_every == 0 and rank == 0:
                with _failing_writes("sample", saved):
                    part.sample(cfg, unwrap(model), frozen, cfg.run_dir / f"sample-{done:06d}.png")
            if stopping:
                if done < cfg.steps:  # other ranks stop with the one that got the signal
                    records.stopped_by = stop.signum or signal.SIGTERM
                break
    return records


def _rate(samples_per_s):
    """Samples per second for the progress bar, with 3 significant digits: a large model on a
    CPU trains at well under one."""
    return f"{samples_per_s:.0f}" if samples_per_s >= 100 else f"{samples_per_s:.3g}"


def _check_finite(name, value, step):
    if not math.isfinite(value):
        raise FloatingPointError(f"{name} is {value} at step {step + 1}; stopped without "
                                 f"saving, the last checkpoint on disk is kept")


def _autocast(cfg, device):
    return device.type != "cpu" if cfg.autocast is None else cfg.autocast


def _precision(cfg, device):
    """The forward pass's context: bf16 autocast where cfg asks for it and, on a CPU, with
    it, the math attention kernel (TrainConfig.autocast gives the timings)."""
    stack = contextlib.ExitStack()
    on = _autocast(cfg, device)
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=on))
    if on and device.type == "cpu":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def _accumulate(cfg, part, model, frozen, step, rank, world, micro, device, stop):
    """Forward/backward over this rank's share of the global batch, in grad_accum chunks.
    Each chunk's loss is scaled so the gradient summed over chunks and ranks is that of the
    global-batch mean. Returns (loss, metrics, stopping): with several ranks, whether any
    rank was asked to stop, so that all of them save and leave after the same step."""
    loss_sum, metrics = 0.0, {}
    if isinstance(frozen["source"], Prefetcher):
        frozen["source"].schedule(step)
    for a in range(cfg.grad_accum):
        indices = _chunk_indices(cfg, step, a, rank, world)
        batch = part.batch(cfg, frozen, indices, device)
        gens = sample_generators(cfg, step, indices)
        with _precision(cfg, device):
            loss, m = part.loss(cfg, model, frozen, batch, gens)
        scale = micro / cfg.batch_size
        (loss * scale).backward()
        loss_sum += float(loss.detach()) * scale
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) * scale
    if world == 1:
        return loss_sum, metrics, stop.requested
    _sync_grads(model)
    # on the model's device: nccl reduces accelerator tensors only
    t = torch.tensor([loss_sum, float(stop.requested), *metrics.values()], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    return float(t[0]), dict(zip(metrics, t[2:].tolist())), bool(t[1] > 0)


def _sync_grads(model):
    """Sum the gradients over ranks in one flat all-reduce (each rank's loss is already scaled
    by its share of the global batch). A parameter without a gradient counts as zeros, so
    every rank reduces the same layout."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (N,)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _chunk_indices(cfg, step, chunk, rank, world):
    """The sample indices of one rank's gradient-accumulation chunk of a step."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    first = step * cfg.batch_size + (chunk * world + rank) * micro
    return list(range(first, first + micro))


_SOURCE = None


def _worker_init():
    # A forked worker inherits the parent's intra-op thread count; many workers x many
    # threads oversubscribe the cores the training step needs.
    torch.set_num_threads(1)
    # Its own process group: Ctrl-C in a terminal and `timeout` signal the whole group, and a
    # worker killed by that left the main process waiting TIMEOUT_S for its samples before it
    # could save. The main process ends the workers itself (close()); if it dies, their task
    # pipe closes and they exit.
    os.setpgrp()


def _draw(index):
    # A numpy array, not a tensor: multiprocessing pickles tensors through torch's shared-
    # memory reducer (a file descriptor per tensor), which made 2 workers ~10x slower than
    # drawing in the main process; numpy arrays travel as plain bytes.
    image, caption = _SOURCE(index)
    return index, (image.numpy(), caption)


class Prefetcher:
    """Draws the samples of the next few steps in worker processes while the current step
    computes. Forked before any model exists (OpenMP and CUDA state must not be inherited).
    Calling it with an index gives that sample, as the part's own source would."""

    AHEAD = 3
    TIMEOUT_S = 120  # a step's data late by this much means the workers are stuck

    def __init__(self, cfg, rank, world):
        from .train_parts import _source

        global _SOURCE
        _SOURCE = _source(cfg)[0]
        self.cfg, self.rank, self.world = cfg, rank, world
        self.pool = mp.get_context("fork").Pool(cfg.num_workers, initializer=_worker_init)
        self.pending, self.ready = {}, {}

    def _indices(self, step):
        return [i for a in range(self.cfg.grad_accum)
                for i in _chunk_indices(self.cfg, step, a, self.rank, self.world)]

    def schedule(self, step):
        """Ask for the steps after `step`; keep only what this step needs."""
        for s in range(step, min(step + self.AHEAD + 1, self.cfg.steps)):
            if self.pool is not None and s not in self.pending:
                self.pending[s] = self.pool.map_async(_draw, self._indices(s), chunksize=8)
        if step in self.pending:
            try:
                items = self.pending.pop(step).get(timeout=self.TIMEOUT_S)
            except mp.TimeoutError:
                warnings.warn(f"data workers gave nothing in {self.TIMEOUT_S} s; drawing the "
                              f"data in the main process from step {step + 1} on")
                self.close()
                self.pool, self.pending, items = None, {}, []
            self.ready = {i: (torch.from_numpy(image), caption) for i, (image, caption) in items}

    def __call__(self, index):
        return self.ready.pop(index) if index in self.ready else _SOURCE(index)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def main_ddp(cfg):
    """Entry point under torchrun: gloo on CPU, nccl on accelerators."""
    backend = "gloo" if cfg.device == "cpu" else "nccl"
    dist.init_process_group(backend)
    try:
        if cfg.device != "cpu":
            cfg.device = f"{cfg.device.split(':')[0]}:{int(os.environ.get('LOCAL_RANK', 0))}"
        return train(cfg, progress=True)
    finally:
        dist.destroy_process_group()
