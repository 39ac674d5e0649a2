"""Data workers: the samples of the next steps, drawn in forked processes while the current
step computes. A step's samples are those the part's own source gives (common.source), so
workers change nothing but speed."""
import multiprocessing as mp
import os
import warnings

import torch

from .common import source
from .config import chunk_indices

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
        global _SOURCE
        _SOURCE = source(cfg)[0]
        self.cfg, self.rank, self.world = cfg, rank, world
        self.pool = mp.get_context("fork").Pool(cfg.num_workers, initializer=_worker_init)
        self.pending, self.ready = {}, {}

    def _indices(self, step):
        return [i for a in range(self.cfg.grad_accum)
                for i in chunk_indices(self.cfg, step, a, self.rank, self.world)]

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
