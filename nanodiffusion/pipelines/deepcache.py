"""DeepCache (Ma, Fang, Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"): the
UNet's deep features change little from one step to the next, so a sampling run computes them
on every N-th UNet call only and, on the calls between, runs the shallow part of the UNet on
the features last kept (UNet.forward_deepcache; the skip branch is the paper's Stable
Diffusion one, models.unet.DEEPCACHE_BRANCH). The paper's uniform schedule: calls 0, N, 2N,
... are full. Calls, not sampler steps: a sampler that calls the model twice a step (heun)
counts both. The option's one rule is `check_deepcache`; an approximate path, named in the
images' parameters ("DeepCache: N")."""
import numpy as np

from ..errors import InputError
from ..models.unet import DEEPCACHE_BRANCH

MAX_INTERVAL = 1000  # the most steps a call takes: any larger interval means the same


def check_deepcache(interval):
    """None or 1: off (the exact path); an integer N in [2, MAX_INTERVAL]: the full UNet every
    N-th call. Returns the interval, None when off."""
    if interval is None:
        return None
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or \
            not 1 <= interval <= MAX_INTERVAL:
        raise InputError(f"deepcache must be an integer in [1, {MAX_INTERVAL}] (the UNet's "
                         f"full run every N-th step; 1 or none: off), got {interval!r}")
    return None if interval == 1 else int(interval)


def parameters(interval):
    """The PNG parameters' field of an image made with DeepCache ({} when off)."""
    return {"DeepCache": interval} if interval else {}


class CachedUNet:
    """The UNet of one sampling run under DeepCache: `(x, t, **cond) -> output`, the whole UNet
    on calls 0, N, 2N, ... and whenever the kept features do not fit the batch, the shallow
    part between. Make one per run: the features it keeps belong to that run."""

    def __init__(self, unet, interval, branch=DEEPCACHE_BRANCH):
        self.unet, self.interval, self.branch = unet, interval, branch
        self.calls, self.full_calls, self.deep = 0, 0, None

    def __call__(self, x, t, **cond):
        deep = self.deep
        if self.calls % self.interval == 0 or deep is None or deep.shape[0] != x.shape[0]:
            deep = None
            self.full_calls += 1
        out, self.deep = self.unet.forward_deepcache(x, t, **cond, deep=deep,
                                                     branch=self.branch)
        self.calls += 1
        return out
