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
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..formats import checkpoint
from ..formats.checkpoint import unwrap
from ..models import packing, winograd
from .config import TrainConfig, chunk_indices, lr_at
from .parts import get_part
from .prefetch import Prefetcher


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
        frozen["ema"] = ema  # a part may read it while training (lcm: its target network)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay, betas=cfg.adam_betas)
        start = _resume(cfg, model, ema, opt)
        if rank == 0:
            with _failing_writes("log", start):
                _trim_log(cfg.run_dir / "log.jsonl", start)
            if cfg.autocast and not _autocast(cfg, device):
                print("note: autocast = true, but this CPU has no bfloat16 arithmetic (AVX2 "
                      "only): training in float32, about 20x faster here", file=sys.stderr)
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
            frozen["step"] = step  # a part may read it (dmd: which steps update the student)
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
                packing.unpack(unwrap(model))  # a sampling pipeline packs its convolutions
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
    """Whether the forward pass runs in bf16 autocast: cfg.autocast (None: on accelerators
    only), but never on a CPU without bfloat16 arithmetic (oneDNN has none: AVX2 only, as AMD's
    Zen 3 and desktop Intel before Sapphire Rapids), where torch's bfloat16 kernels ran the
    shapes UNet's training step (batch 64) 21x slower than float32: 8.0 against 0.37 s."""
    if device.type == "cpu" and not winograd.onednn_bfloat16():
        return False
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
        indices = chunk_indices(cfg, step, a, rank, world)
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
