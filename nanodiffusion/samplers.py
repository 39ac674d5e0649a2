"""Samplers as pure functions over a denoiser, k-diffusion style (k-diffusion `sampling.py`).

Every sampler is `sample_x(denoiser, x, sigmas, *, generator=None, callback=None, **opts) -> x`:
x is VE-scaled (x = x0 + sigma * noise) at sigmas[0], `sigmas` is a 1-D float32 tensor of the
noise levels the denoiser is evaluated at, ending in the final level (usually 0), and the result
is x at sigmas[-1]. Any tensor shape works: image latents (B, 4, h, w), prior embeddings (B, E).
Arithmetic is float32; per-step noise is drawn like diffusers' `randn_tensor` (on the generator's
device, in x's dtype) so that one generator reproduces a diffusers run draw for draw. Option
`post_step(i, x, sigma_next) -> x` runs after each step (inpainting blends the known region there).

Each sampler gives the same result as one diffusers scheduler in a pipeline loop (see
`diffusers_scheduler_for`); `plan` builds the sigmas and options that make it so, `run` runs it.
Known differences: PNDM with v_prediction (diffusers mixes raw v outputs of several steps before
converting them to noise); DPM-Solver Karras with squaredcos_cap_v2 (diffusers truncates t);
rescale_betas_zero_snr, which diffusers' PNDM, LMS and Heun classes lack (they sample a
zero-terminal-SNR model on the plain schedule; ours keep the model's); an epsilon model on a
zero-terminal-SNR schedule with LCM/TCD, whose x0 at alpha 0 diffusers makes NaN (ours is finite).
"""
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .diffusion import NoiseSchedule, exponential_sigmas, karras_sigmas, lcm_boundary
from .errors import InputError


@dataclass(frozen=True)
class Generators:
    """Several generators behind one batch (pipelines/batch.py): `generators[i]` draws
    the next `rows[i]` rows of every draw, as it would draw them for its own batch alone."""
    generators: tuple
    rows: tuple


def _draw(x, generator, dtype):
    """diffusers `randn_tensor`: a CPU generator draws on the CPU, then the noise moves to x."""
    if isinstance(generator, Generators):
        parts = x.split(list(generator.rows))  # each (rows[i], ...)
        return torch.cat([_draw(p, g, dtype) for p, g in zip(parts, generator.generators)])
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
    return noise.to(device=x.device, dtype=torch.float32)


def _denoise(denoiser, x, sigma, dtype):
    """Evaluate the denoiser at one noise level for the whole batch; float32 result."""
    s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    return denoiser(x.to(dtype), s).float()


def _report(callback, i, n, x, denoised, sigma):
    if callback is not None:
        callback(dict(step=i, total=n, x=x, denoised=denoised, sigma=sigma))


def _post(post_step, i, x, s_next):
    """The caller's hook after step i (e.g. inpainting's blend), x at sigma s_next."""
    return x if post_step is None else post_step(i, x, s_next).float()


def _rescale(x, s_to, s_next):
    """diffusers' DDIM/PNDM step to t - T//steps, and the next step reads that VP sample as if
    it were at the next timestep: in VE scaling that is a rescale (1 when the two agree)."""
    if s_to == s_next:
        return x
    return x * math.sqrt((s_next**2 + 1) / (s_to**2 + 1))


def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None):
    """diffusers EulerDiscreteScheduler (s_churn = 0): x += (x - x0) / sigma * dsigma."""
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    for i in range(len(s) - 1):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, len(s) - 1, x, den, s[i])
        x = x + (x - den) / s[i] * (s[i + 1] - s[i])
        x = _post(post_step, i, x, s[i + 1])
    return x.to(dtype)


def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
                           eta=1.0):
    """diffusers EulerAncestralDiscreteScheduler: Euler to sigma_down, then noise * sigma_up
    (drawn at every step, the last included, as diffusers does)."""
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    for i in range(len(s) - 1):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, len(s) - 1, x, den, s[i])
        up = min(s[i + 1], eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        x = x + (x - den) / s[i] * (down - s[i])
        x = x + _draw(x, generator, dtype) * up
        x = _post(post_step, i, x, s[i + 1])
    return x.to(dtype)


def _clipped(denoiser, clip_sample):
    """diffusers' clip_sample: the denoised estimate clamped to [-clip_sample, clip_sample]."""
    if clip_sample is None:
        return denoiser
    return lambda x, sigma: denoiser(x, sigma).clamp(-clip_sample, clip_sample)


def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
                clip_sample=None):
    """diffusers HeunDiscreteScheduler: Euler predictor, trapezoid corrector; Euler alone on
    the step to sigma 0 (2N - 1 denoiser calls). `clip_sample`: clamp both estimates."""
    denoiser = _clipped(denoiser, clip_sample)
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    for i in range(len(s) - 1):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, len(s) - 1, x, den, s[i])
        d, dt = (x - den) / s[i], s[i + 1] - s[i]
        if s[i + 1] > 0:
            x2 = x + d * dt
            d = (d + (x2 - _denoise(denoiser, x2, s[i + 1], dtype)) / s[i + 1]) / 2
        x = _post(post_step, i, x + d * dt, s[i + 1])
    return x.to(dtype)


def _lagrange_integral(nodes, j, lo, hi):
    """Exact integral over [lo, hi] of the Lagrange basis polynomial that is 1 at nodes[j] and 0
    at the other nodes (diffusers integrates it with scipy.quad), in u = tau - lo."""
    poly = [1.0]  # coefficients in u, lowest degree first
    for k, node in enumerate(nodes):
        if k == j:
            continue
        c, denom = node - lo, nodes[j] - node
        poly = [((poly[d - 1] if d > 0 else 0.0) - c * (poly[d] if d < len(poly) else 0.0))
                / denom for d in range(len(poly) + 1)]
    width = hi - lo
    return sum(a * width ** (d + 1) / (d + 1) for d, a in enumerate(poly))


def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None, order=4,
               history=None):
    """diffusers LMSDiscreteScheduler: linear multistep over the last `order` slopes with
    Lagrange-polynomial coefficients. diffusers takes the order and the Lagrange nodes from the
    step's index in the full schedule, so img2img passes the skipped sigmas as `history`."""
    dtype, x = x.dtype, x.float()
    s = (history.tolist() if history is not None else []) + sigmas.tolist()
    off, n, ds = len(s) - len(sigmas), len(sigmas) - 1, []
    for i in range(n):
        g = off + i  # index in the full schedule
        den = _denoise(denoiser, x, s[g], dtype)
        _report(callback, i, n, x, den, s[g])
        ds = (ds + [(x - den) / s[g]])[-order:]
        nodes = [s[g - k] for k in range(min(g + 1, order))]
        coeffs = [_lagrange_integral(nodes, j, s[g], s[g + 1]) for j in range(len(nodes))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = _post(post_step, i, x, s[g + 1])
    return x.to(dtype)


def _dpm_x0(den, old, h, h_last):
    """DPM-Solver++(2M) midpoint: the extrapolated x0, D0 + D1 / 2 with D1 = (D0 - old) / r."""
    return den + (den - old) / (2 * (h_last / h))


def _dpmpp_2m(denoiser, x, sigmas, generator, callback, post_step, lower_order_final, sde):
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    n, old, h_last = len(s) - 1, None, None
    for i in range(n):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, n, x, den, s[i])
        z = _draw(x, generator, torch.float32) if sde else None
        r = s[i + 1] / s[i]
        first = old is None or s[i + 1] == 0 or (lower_order_final and i == n - 1)
        h = math.log(s[i] / s[i + 1]) if s[i + 1] > 0 else math.inf
        x0 = den if first else _dpm_x0(den, old, h, h_last)
        if sde:
            x = r**2 * x + (1 - r**2) * x0 + s[i + 1] * math.sqrt(1 - r**2) * z
        else:
            x = r * x + (1 - r) * x0
        x = _post(post_step, i, x, s[i + 1])
        old, h_last = den, h
    return x.to(dtype)


def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
                    lower_order_final=True):
    """diffusers DPMSolverMultistepScheduler, dpmsolver++ order 2 midpoint. In VE scaling with
    r = sigma_next / sigma: x = r x + (1 - r) D (first order at the first and last steps)."""
    return _dpmpp_2m(denoiser, x, sigmas, generator, callback, post_step, lower_order_final,
                     sde=False)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
                        lower_order_final=True):
    """diffusers DPMSolverMultistepScheduler, sde-dpmsolver++ order 2 midpoint: with r as in
    dpmpp_2m, x = r^2 x + (1 - r^2) D + sigma_next sqrt(1 - r^2) z; z drawn in float32 at
    every step (diffusers draws it before choosing the order)."""
    return _dpmpp_2m(denoiser, x, sigmas, generator, callback, post_step, lower_order_final,
                     sde=True)


def _unipc_b(h):
    """UniPC bh2 (Zhao et al. 2023) b-vector for order 2, B(h) = expm1(-h), predicting x0."""
    hh = -h
    phi_1 = math.expm1(hh)
    phi_k = phi_1 / hh - 1
    return phi_k / phi_1, (phi_k / hh - 0.5) * 2 / phi_1


def _unipc_corrector(x_last, den, ms, s, i, order):
    """UniC: re-solve the step s[i-1] -> s[i] with the new model output `den` at s[i]."""
    m0, r = ms[-1], s[i] / s[i - 1]
    h = math.log(s[i - 1] / s[i])
    if order == 1:
        res = 0.5 * (den - m0)
    else:
        rk = math.log(s[i - 1] / s[i - 2]) / h
        b1, b2 = _unipc_b(h)
        rho0 = (b1 - b2) / (1 - rk)
        res = rho0 * (ms[-2] - m0) / rk + (b1 - rho0) * (den - m0)
    return r * x_last + (1 - r) * m0 - (r - 1) * res


def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None):
    """diffusers UniPCMultistepScheduler, bh2, order 2, predict_x0, lower_order_final: a UniP
    predictor step after a UniC correction of the current sample with the new model output."""
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    n, ms, x_last, order = len(s) - 1, [], None, 1
    for i in range(n):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, n, x, den, s[i])
        if x_last is not None:
            x = _unipc_corrector(x_last, den, ms, s, i, order)
        ms = (ms + [den])[-2:]
        order = min(2, n - i, i + 1)
        x_last, r = x, s[i + 1] / s[i]
        if order == 1:
            x = r * x + (1 - r) * den
        else:  # UniP-2, rho = 1/2: x0 extrapolated along lambda = -log sigma
            rk = math.log(s[i] / s[i - 1]) / math.log(s[i] / s[i + 1])
            x = r * x + (1 - r) * (den + 0.5 * (ms[-2] - den) / rk)
        x = _post(post_step, i, x, s[i + 1])
    return x.to(dtype)


def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None, eta=0.0,
                to_sigmas=None, clip_sample=None):
    """diffusers DDIMScheduler in VE scaling: x = x0 + sqrt(s_to^2 - std^2) eps + std z, where
    std = eta * DDIM's sigma_t / sqrt(a_prev). `to_sigmas[i]` is the level diffusers steps to
    (t - T//steps; the final alpha when below 0); by default sigmas[i + 1]. `clip_sample`:
    x0 clamped to [-clip_sample, clip_sample], eps kept unclipped (as diffusers' step)."""
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    to = to_sigmas.tolist() if to_sigmas is not None else s[1:]
    for i in range(len(s) - 1):
        den = _denoise(denoiser, x, s[i], dtype)
        eps = (x - den) / s[i]
        if clip_sample is not None:
            den = den.clamp(-clip_sample, clip_sample)
        _report(callback, i, len(s) - 1, x, den, s[i])
        std = eta * to[i] * math.sqrt(max(s[i] ** 2 - to[i] ** 2, 0.0)) / s[i]
        x = den + math.sqrt(to[i] ** 2 - std**2) * eps
        if eta > 0:
            x = x + std * _draw(x, generator, dtype)
        x = _post(post_step, i, _rescale(x, to[i], s[i + 1]), s[i + 1])
    return x.to(dtype)


def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
                final_noise=True, clip_sample=None):
    """diffusers DDPMScheduler (fixed_small) posterior q(x_next | x, x0) in VE scaling:
    mean x0 + (s_next / s)^2 (x - x0), std s_next sqrt(1 - (s_next / s)^2). diffusers draws
    noise while t > 0, so the last step draws unless it starts at t = 0 (`final_noise`).
    `clip_sample`: x0 clamped to [-clip_sample, clip_sample]."""
    denoiser = _clipped(denoiser, clip_sample)
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    n = len(s) - 1
    for i in range(n):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, n, x, den, s[i])
        ratio = (s[i + 1] / s[i]) ** 2
        x = den + ratio * (x - den)
        if i < n - 1 or final_noise:
            x = x + s[i + 1] * math.sqrt(1 - ratio) * _draw(x, generator, dtype)
        x = _post(post_step, i, x, s[i + 1])
    return x.to(dtype)


def _adams_bashforth(ets):
    """PLMS combination of the last 1..4 noise predictions (diffusers PNDM `step_plms`)."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24


def sample_plms(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
                to_sigmas=None, redo_sigma=None):
    """diffusers PNDMScheduler with skip_prk_steps. Its timesteps repeat the second one: step 0
    is Euler (in VE; DDIM's formula (9) in VP), step 1 evaluates the repeated level and redoes
    step 0 from the same start with the mean of both slopes, then Adams-Bashforth up to order 4.
    So `sigmas` should repeat its second entry (plan() does). `to_sigmas` as in sample_ddim;
    `redo_sigma`: the level diffusers assigns the redone start (t + T//steps), default sigmas[0]."""
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    to = to_sigmas.tolist() if to_sigmas is not None else s[1:]
    ets, x_first = [], None
    for i in range(len(s) - 1):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, len(s) - 1, x, den, s[i])
        e = (x - den) / s[i]
        if i == 1:
            s_src = s[0] if redo_sigma is None else redo_sigma
            src, e = _rescale(x_first, s[0], s_src), (e + ets[-1]) / 2
        else:
            ets = ets[-3:] + [e]
            src, s_src, e = x, s[i], _adams_bashforth(ets)
            x_first = x if i == 0 else x_first
        x = _post(post_step, i, _rescale(src + (to[i] - s_src) * e, to[i], s[i + 1]), s[i + 1])
    return x.to(dtype)


def sample_lcm(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None,
               c_skip=None, c_out=None, clip_sample=None):
    """diffusers LCMScheduler (Luo et al. 2023): the consistency estimate c_skip x_vp + c_out x0
    (x_vp = x / sqrt(sigma^2 + 1), diffusers' sample; per-step `c_skip`, `c_out`, default 0
    and 1), then fresh noise to the next level, x = estimate + sigma_next z; the last step
    returns the estimate. `clip_sample`: x0 clamped before the scalings."""
    denoiser = _clipped(denoiser, clip_sample)
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    n = len(s) - 1
    skip = [0.0] * n if c_skip is None else torch.as_tensor(c_skip).tolist()
    out = [1.0] * n if c_out is None else torch.as_tensor(c_out).tolist()
    for i in range(n):
        den = _denoise(denoiser, x, s[i], dtype)
        den = out[i] * den + skip[i] * (x / math.sqrt(s[i] ** 2 + 1))
        _report(callback, i, n, x, den, s[i])
        x = den if i == n - 1 else den + s[i + 1] * _draw(x, generator, dtype)
        x = _post(post_step, i, x, s[i + 1])
    return x.to(dtype)


def sample_tcd(denoiser, x, sigmas, *, generator=None, callback=None, post_step=None, eta=0.3,
               low_sigmas=None):
    """diffusers TCDScheduler (Zheng et al. 2024, strategic stochastic sampling): the DDIM
    step to the lower level low_sigmas[i] (diffusers' timestep floor((1 - eta) t_next); plan()
    gives them), then fresh noise back up to the next level: x = x0 + low eps + sqrt(
    sigma_next^2 - low^2) z, drawn while eta > 0 on every step but the last. `eta` is the
    paper's gamma, diffusers' default 0.3; without `low_sigmas` only eta = 0 (DDIM) is known."""
    dtype, x, s = x.dtype, x.float(), sigmas.tolist()
    n = len(s) - 1
    if low_sigmas is None and eta > 0:
        raise ValueError("sample_tcd with eta > 0 needs low_sigmas (plan() gives them)")
    low = s[1:] if low_sigmas is None else torch.as_tensor(low_sigmas).tolist()
    for i in range(n):
        den = _denoise(denoiser, x, s[i], dtype)
        _report(callback, i, n, x, den, s[i])
        x = den + low[i] * (x - den) / s[i]
        if eta > 0 and i < n - 1:
            x = x + math.sqrt(max(s[i + 1] ** 2 - low[i] ** 2, 0.0)) * _draw(x, generator, dtype)
        x = _post(post_step, i, x, s[i + 1])
    return x.to(dtype)


# name -> (sampler, diffusers scheduler class, config overrides)
_DPM = dict(solver_order=2, solver_type="midpoint", lower_order_final=True,
            euler_at_final=False, final_sigmas_type="zero")
_SAMPLERS = {
    "ddim": (sample_ddim, "DDIMScheduler", {}),
    "ddpm": (sample_ddpm, "DDPMScheduler", dict(variance_type="fixed_small")),
    "pndm": (sample_plms, "PNDMScheduler", dict(skip_prk_steps=True)),
    "plms": (sample_plms, "PNDMScheduler", dict(skip_prk_steps=True)),
    "euler": (sample_euler, "EulerDiscreteScheduler", {}),
    "euler-karras": (sample_euler, "EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "euler-exponential": (sample_euler, "EulerDiscreteScheduler",
                          dict(use_exponential_sigmas=True)),
    "euler-ancestral": (sample_euler_ancestral, "EulerAncestralDiscreteScheduler", {}),
    "heun": (sample_heun, "HeunDiscreteScheduler", {}),
    "lms": (sample_lms, "LMSDiscreteScheduler", {}),
    "dpmpp-2m": (sample_dpmpp_2m, "DPMSolverMultistepScheduler",
                 dict(_DPM, algorithm_type="dpmsolver++")),
    "dpmpp-2m-karras": (sample_dpmpp_2m, "DPMSolverMultistepScheduler",
                        dict(_DPM, algorithm_type="dpmsolver++", use_karras_sigmas=True)),
    "dpmpp-2m-sde": (sample_dpmpp_2m_sde, "DPMSolverMultistepScheduler",
                     dict(_DPM, algorithm_type="sde-dpmsolver++")),
    "dpmpp-2m-sde-karras": (sample_dpmpp_2m_sde, "DPMSolverMultistepScheduler",
                            dict(_DPM, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    "unipc": (sample_unipc, "UniPCMultistepScheduler",
              dict(solver_type="bh2", solver_order=2, predict_x0=True, lower_order_final=True)),
    "lcm": (sample_lcm, "LCMScheduler", {}),
    "tcd": (sample_tcd, "TCDScheduler", {}),
}
SAMPLER_NAMES = list(_SAMPLERS)


def _spec(name: str):
    if name not in _SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLER_NAMES)}")
    return _SAMPLERS[name]


def diffusers_scheduler_for(name: str) -> tuple[str, dict]:
    """(diffusers scheduler class name, config overrides) that `name` reproduces; the rest of
    the config is `ScheduleConfig.to_diffusers()`."""
    _, cls, extra = _spec(name)
    return cls, dict(extra)


@dataclass
class Plan:
    """What one diffusers scheduler would do for `steps` at `strength`, as sampler inputs.

    sigmas: float32 (N + 1,) levels from the img2img start; timesteps: the model timesteps
    diffusers uses (for reference); init_noise_scale: txt2img start x = randn * this (VE);
    quantize_t: build the Denoiser with it (diffusers' integer timesteps); final_scale: the
    sampler returns x at sigmas[-1] in VE scaling, which `run` multiplies by this to get the
    latents diffusers returns (1 / sqrt(sigma_last^2 + 1), not 1 where DDIM/PNDM end at
    alphas_cumprod[0]); fn: the sampler with its options bound; schedule: the NoiseSchedule
    the sampler's diffusers class makes of the model's (`ScheduleConfig.for_scheduler`), to
    build the Denoiser with.
    """

    sampler: str
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_scale: float
    quantize_t: bool
    final_scale: float
    fn: Callable
    schedule: NoiseSchedule | None = None


def _start(steps: int, strength: float) -> int:
    """diffusers img2img `get_timesteps`: the index of the first step that runs."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength={strength} must be in (0, 1]")
    start = max(steps - min(int(steps * strength), steps), 0)
    if start >= steps:
        raise InputError(f"steps={steps} at strength={strength} leaves no step to run; "
                         "raise steps or strength")
    return start


def _vp_plan(name, schedule: NoiseSchedule, steps: int, start: int):
    """DDIM / DDPM / PNDM: integer timesteps; returns (timesteps, sigmas, sampler options)."""
    cfg, T = schedule.config, schedule.num_train_timesteps
    ts = [int(t) for t in schedule.timesteps(steps)]
    if name in ("pndm", "plms"):
        ts = ts[:2] + ts[1:]  # diffusers PNDM (skip_prk_steps) repeats the second timestep
    ts, ratio = ts[start:], T // steps
    final = 0.0 if name == "ddpm" or cfg.set_alpha_to_one else schedule.sigmas[0].item()

    def sig(t):
        return schedule.sigmas[t].item() if t >= 0 else final

    if name == "ddpm":  # diffusers DDPM steps to the next timestep
        to_ts = ts[1:] + [-1]
    elif name == "ddim":
        to_ts = [t - ratio for t in ts]
    else:  # PNDM: its second call (counter 1) steps to its own timestep
        to_ts = [t if c == 1 else t - ratio for c, t in enumerate(ts)]
    s_eval, s_to = [sig(t) for t in ts], [sig(t) for t in to_ts]
    opts = {}
    if s_to[:-1] != s_eval[1:]:
        opts["to_sigmas"] = torch.tensor(s_to, dtype=torch.float32)
    if name in ("pndm", "plms") and len(ts) > 1 and ts[1] + ratio != ts[0]:
        opts["redo_sigma"] = sig(min(ts[1] + ratio, T - 1))
    if name == "ddpm":
        opts["final_noise"] = ts[-1] > 0
    return ts, s_eval + [s_to[-1]], opts


# LCMScheduler and TCDScheduler keep alphas_cumprod[T-1] = 0 on a zero-terminal-SNR schedule
# (sigma infinite) where NoiseSchedule has 2**-24 (diffusers' Euler family's): their x0 there is
# -v, against ours 2**-12 x_vp - v. A level of 2**30 (alpha 2**-60) gives their x0 to float32
# precision in VE scaling (x ~ 2**30 at that step: fine in float32, the samplers' arithmetic).
_TERMINAL_SIGMA = 2.0**30


def consistency_timesteps(T: int, steps: int, original_steps: int) -> list[int]:
    """LCM's and TCD's timesteps, descending: `steps` of the `original_steps` grid points
    k-1, 2k-1, ..., T-1 (k = T // original_steps), evenly by index from T-1 (diffusers'
    set_timesteps; timestep_spacing and steps_offset unused)."""
    origin = np.arange(original_steps, 0, -1) * (T // original_steps) - 1  # descending
    picked = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[picked]]


def _consistency_plan(name, schedule: NoiseSchedule, steps: int, start: int,
                      original_steps: int | None, eta: float | None):
    """LCM / TCD: consistency_timesteps from `start`; returns (timesteps, sigmas, sampler
    options). Defaults: 50 original steps (diffusers' config), sample_tcd's eta."""
    T = schedule.num_train_timesteps
    original_steps = 50 if original_steps is None else original_steps
    if isinstance(original_steps, bool) or not isinstance(original_steps, int) or \
            not 1 <= original_steps <= T:
        raise InputError(f"original_inference_steps must be an integer in [1, {T}], got "
                         f"{original_steps!r}")
    if steps > original_steps:
        raise InputError(f"steps={steps} must be at most original_inference_steps="
                         f"{original_steps} for the {name} sampler (its timesteps are a subset)")
    ts = consistency_timesteps(T, steps, original_steps)[start:]
    zero_snr = schedule.config.rescale_betas_zero_snr

    def sig(t):
        return _TERMINAL_SIGMA if zero_snr and t == T - 1 else schedule.sigmas[t].item()

    if name == "lcm":  # its last step returns the consistency estimate: x0, sigma 0
        c_skip, c_out = lcm_boundary(torch.tensor(ts))
        return ts, [sig(t) for t in ts] + [0.0], dict(c_skip=c_skip, c_out=c_out)
    eta = inspect.signature(sample_tcd).parameters["eta"].default if eta is None else eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise InputError(f"eta (TCD's gamma) must be a number in [0, 1], got {eta!r}")
    # diffusers: the next timestep (0 after the last), and s = floor((1 - eta) t_next) in its
    # float32 arithmetic; it ends at t = 0 (sigma(0), not 0)
    nxt = ts[1:] + [0]
    low = [sig(int(torch.floor((1 - eta) * torch.tensor(t)))) for t in nxt]
    return ts, [sig(t) for t in ts] + [sig(0)], dict(eta=eta, low_sigmas=torch.tensor(low))


def _sigma_plan(name, schedule: NoiseSchedule, steps: int):
    """Euler family and DPM-Solver/UniPC: (timesteps, sigmas without the final 0, quantize_t)."""
    multistep = name.startswith("dpmpp") or name == "unipc"
    karras = name.endswith("karras")
    ts = schedule.timesteps(steps, multistep=multistep, rounded=multistep)
    sig = schedule.interp_sigmas(ts)
    if name.endswith("exponential"):  # diffusers Euler: log-even between the spaced ends
        sig = exponential_sigmas(sig[-1].item(), sig[0].item(), steps)
        return schedule.sigma_to_t(torch.from_numpy(sig).float()).double().numpy(), sig, False
    if not karras:
        return ts, sig, bool(np.all(ts == np.round(ts)))
    if multistep:  # diffusers DPMSolver: Karras over the whole training range, t rounded
        full = schedule.sigmas.numpy()
        sig = karras_sigmas(full[0].item(), full[-1].item(), steps)
    else:  # diffusers Euler: Karras between the spaced schedule's ends, t fractional
        sig = karras_sigmas(sig[-1].item(), sig[0].item(), steps)
    ts = schedule.sigma_to_t(torch.from_numpy(sig).float()).double().numpy()
    rounded = multistep and schedule.config.beta_schedule != "squaredcos_cap_v2"
    return (ts.round() if rounded else ts), sig, rounded


def plan(sampler: str, schedule: NoiseSchedule, steps: int, strength: float = 1.0, *,
         original_inference_steps: int | None = None, **options) -> Plan:
    """The sigmas, start scaling and options that make `sampler` reproduce its diffusers
    scheduler (`diffusers_scheduler_for`) for `steps` steps, starting at img2img `strength`
    (for every sampler, lcm and tcd included, as StableDiffusionImg2ImgPipeline: the first
    steps of the txt2img schedule are skipped). `options` go to the sampler (e.g. eta=1.0 for
    ddim, as diffusers' `step(eta=...)`). `original_inference_steps` (lcm, tcd; default the
    schedule's, else 50): that scheduler config option. Schedule options a diffusers scheduler_config left out take
    the defaults of the sampler's diffusers class, as `<class>.from_config(pipe.scheduler.config)`
    gives them."""
    fn, cls, _ = _spec(sampler)
    if steps < 1 or steps > schedule.num_train_timesteps:
        raise InputError(f"steps={steps} must be in [1, {schedule.num_train_timesteps}]")
    if original_inference_steps is not None and sampler not in ("lcm", "tcd"):
        raise InputError(f"original_inference_steps is an option of the lcm and tcd samplers "
                         f"only, not of {sampler!r}")
    if original_inference_steps is None and sampler in ("lcm", "tcd"):
        original_inference_steps = schedule.config.original_inference_steps  # None: 50
    start = _start(steps, strength)
    cfg = schedule.config.for_scheduler(cls)
    if cfg is not schedule.config:
        schedule = NoiseSchedule(cfg)
    clip = {"clip_sample": cfg.clip_sample_range} if cfg.clip_sample and \
        "clip_sample" in inspect.signature(fn).parameters else {}
    vp = sampler in ("ddim", "ddpm", "pndm", "plms", "lcm", "tcd")  # integer t, VP start
    if sampler in ("lcm", "tcd"):
        ts, sig, opts = _consistency_plan(sampler, schedule, steps, start, original_inference_steps,
                                          options.pop("eta", None) if sampler == "tcd" else None)
    elif vp:
        ts, sig, opts = _vp_plan(sampler, schedule, steps, start)
    if vp:
        sigmas = torch.tensor(sig, dtype=torch.float32)
        init, quantize = math.sqrt(sigmas[0].item() ** 2 + 1), True  # VP start: randn * 1
    else:
        ts, sig, quantize = _sigma_plan(sampler, schedule, steps)
        full = torch.from_numpy(np.concatenate([sig, [0.0]])).float()
        s_max = full.max().item()
        if sampler.startswith("dpmpp") or sampler == "unipc":
            init = math.sqrt(full[0].item() ** 2 + 1)  # VP start: randn * 1
        elif schedule.config.timestep_spacing == "leading":  # diffusers' init_noise_sigma
            init = math.sqrt(s_max**2 + 1)
        else:
            init = s_max
        opts = {"history": full[:start]} if sampler == "lms" and start > 0 else {}
        ts, sigmas = ts[start:], full[start:]
    return Plan(sampler=sampler, sigmas=sigmas, timesteps=torch.tensor(np.asarray(ts)).float(),
                init_noise_scale=init, quantize_t=quantize,
                final_scale=1 / math.sqrt(sigmas[-1].item() ** 2 + 1),
                fn=functools.partial(fn, **opts, **clip, **options), schedule=schedule)


def run(plan: Plan, denoiser, noise: torch.Tensor, *, init: torch.Tensor | None = None,
        generator: torch.Generator | None = None, callback=None, cond: dict | None = None,
        post_step=None) -> torch.Tensor:
    """Sample from `noise` (txt2img: x = noise * init_noise_scale) or from `init` latents
    (img2img: x = init + noise * sigmas[0], diffusers' add_noise at the first timestep in VE
    scaling); returns the final latents in x0 scaling. `denoiser` should have been built with
    `quantize_t=plan.quantize_t`; `cond` kwargs are bound to it; `post_step(i, x, sigma_next)
    -> x` runs after every step (inpainting's blend of the known region)."""
    sigmas = plan.sigmas.to(noise.device)
    if cond:
        denoiser = functools.partial(denoiser, **cond)
    if init is None:
        x = noise * plan.init_noise_scale
    else:
        x = (init.float() + noise.float() * plan.sigmas[0].item()).to(noise.dtype)
    hook = {"post_step": post_step} if post_step is not None else {}
    x = plan.fn(denoiser, x, sigmas, generator=generator, callback=callback, **hook)
    return x * plan.final_scale if plan.final_scale != 1.0 else x
