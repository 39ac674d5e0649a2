"""Every check of a pipeline's inputs, once: each raises an InputError naming the value and
what is accepted (the server answers it with a 400, the CLI with exit 2)."""
import math

import numpy as np

from .. import samplers
from ..errors import InputError

MAX_SIDE = 4096


def check_int(name, value, lo, hi):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def check_size(width, height, factor):
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < factor or v > MAX_SIDE or v % factor:
            raise InputError(f"{name} must be a multiple of {factor} between {factor} and "
                             f"{MAX_SIDE}, got {v!r}")


def check_guidance(guidance):
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or \
            not 0 <= guidance <= 100:
        raise InputError(f"guidance must be a finite number in [0, 100], got {guidance!r}")


# the samplers whose noise `eta` scales; for tcd it is TCD's gamma (0 deterministic, 1 fully
# stochastic; the tcd sampler's default 0.3, as diffusers' TCDScheduler.step)
ETA_SAMPLERS = ("ddim", "euler-ancestral", "tcd")


def check_eta(eta, sampler):
    if eta is None:
        return
    if sampler not in ETA_SAMPLERS:
        raise InputError(f"eta is an option of the {', '.join(ETA_SAMPLERS)} samplers only, "
                         f"not of {sampler!r}")
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise InputError(f"eta must be a number in [0, 1], got {eta!r}")


def check_strength(strength):
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength!r}")




def check_sampler(sampler):
    if sampler not in samplers.SAMPLER_NAMES:
        raise InputError(f"sampler {sampler!r} is not one of {samplers.SAMPLER_NAMES}")
