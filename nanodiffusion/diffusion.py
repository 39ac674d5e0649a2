"""Noise schedules, the denoiser wrappers, training targets and guidance.

Samplers (samplers.py) work in the variance-exploding (VE) scaling of k-diffusion: x = x0 +
sigma * noise. Networks trained as DDPMs see the variance-preserving (VP) input
x_vp = x / sqrt(sigma^2 + 1) at the discrete timestep t with sigma(t) = sqrt((1 - a_t) / a_t),
a_t = alphas_cumprod[t]. `Denoiser` turns such a network into `denoiser(x, sigma) -> x0`
(k-diffusion's `DiscreteEpsDDPMDenoiser`); guidance is one more wrapper around it.
"""
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check(name, value, accepted):
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(accepted)}")


@dataclass
class ScheduleConfig:
    """The training noise schedule and the inference timestep rule (diffusers' scheduler_config)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    # Lin et al. 2024: shift and scale sqrt(alphas_cumprod) so the last timestep is pure noise
    # (zero SNR); used with v prediction and trailing timesteps
    rescale_betas_zero_snr: bool = False
    # lcm and tcd: the grid of the teacher's solver their timesteps are picked from (diffusers'
    # LCMScheduler / TCDScheduler option; None: theirs, 50); other samplers ignore it
    original_inference_steps: int | None = None
    # the fields the diffusers scheduler_config.json this came from left out: each sampler
    # gives them the default of its own diffusers class (`for_scheduler`), as diffusers does
    defaulted: tuple[str, ...] = ()

    def __post_init__(self):
        _check("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 2")
        o = self.original_inference_steps
        if o is not None and (isinstance(o, bool) or not isinstance(o, int)
                              or not 1 <= o <= self.num_train_timesteps):
            raise ValueError(f"original_inference_steps={o!r} must be an integer in "
                             f"[1, {self.num_train_timesteps}] (or unset: 50)")
        self.defaulted = tuple(self.defaulted)
        unknown = sorted(set(self.defaulted) - set(_DIFFUSERS_BASE))
        if unknown:
            raise ValueError(f"defaulted={unknown} are not fields of ScheduleConfig; accepted: "
                             f"{', '.join(_DIFFUSERS_BASE)}")

    @classmethod
    def from_diffusers(cls, config: dict) -> "ScheduleConfig":
        """From a diffusers scheduler_config.json dict; keys we do not model are ignored, keys
        that would change the math in a way we cannot express raise ValueError. Keys left out
        take the defaults of the class the file names (`_class_name`), as diffusers' loader
        gives them, and are recorded in `defaulted`."""
        if config.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; accepted: beta_schedule "
                             f"in {', '.join(BETA_SCHEDULES)}")
        given = {k: v for k, v in config.items() if k in _DIFFUSERS_BASE}
        base = {**_DIFFUSERS_BASE, **SCHEDULER_DEFAULTS.get(config.get("_class_name"), {})}
        missing = tuple(k for k in _DIFFUSERS_BASE if k not in given)
        return cls(**{**base, **given}, defaulted=missing)

    def to_diffusers(self) -> dict:
        """The scheduler_config.json keys, without the defaulted ones (so a diffusers class
        reading it gives them its own default, as our samplers do)."""
        return {k: v for k, v in asdict(self).items()
                if k != "defaulted" and k not in self.defaulted and v is not None}

    def for_scheduler(self, class_name: str) -> "ScheduleConfig":
        """This config as diffusers' `<class_name>.from_config` reads it (the idiom
        `DDIMScheduler.from_config(pipe.scheduler.config)`): the defaulted fields take that
        class's defaults, the given ones are kept. Returns self when nothing changes."""
        if class_name not in SCHEDULER_DEFAULTS:
            raise ValueError(f"unknown diffusers scheduler class {class_name!r}; accepted: "
                             f"{', '.join(SCHEDULER_DEFAULTS)}")
        defaults = {**_DIFFUSERS_BASE, **SCHEDULER_DEFAULTS[class_name]}
        resolved = replace(self, **{k: defaults[k] for k in self.defaulted})
        return self if resolved == self else resolved


# The defaults of ScheduleConfig's fields in diffusers' scheduler classes (their __init__
# signatures, diffusers 0.42): diffusers records the keys a scheduler_config.json leaves out
# (`_use_default_values`) and `from_config` of another class drops them, so that class's
# defaults apply: an Euler config read by DDIM clips x0 and ends at alpha 1. A class without
# an option behaves as its value here (no clipping, no alpha-1 step).
_DIFFUSERS_BASE = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, clip_sample=False,
    clip_sample_range=1.0, set_alpha_to_one=False, rescale_betas_zero_snr=False,
    original_inference_steps=None)
SCHEDULER_DEFAULTS = {
    "DDIMScheduler": dict(timestep_spacing="leading", clip_sample=True, set_alpha_to_one=True),
    "DDPMScheduler": dict(timestep_spacing="leading", clip_sample=True),
    "PNDMScheduler": dict(timestep_spacing="leading"),
    "HeunDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012),
    "EulerDiscreteScheduler": {}, "EulerAncestralDiscreteScheduler": {},
    "LMSDiscreteScheduler": {}, "DPMSolverMultistepScheduler": {},
    "UniPCMultistepScheduler": {},
    "LCMScheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=True, timestep_spacing="leading",
                         original_inference_steps=50),
    "TCDScheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=True, timestep_spacing="leading",
                         original_inference_steps=50),
}


# DALL·E 2's prior schedule: cosine betas, x0 prediction, x0 clamped to +-5 std; sampling
# starts at the last training timestep (trailing spacing).
PRIOR_SCHEDULE = ScheduleConfig(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                timestep_spacing="trailing", steps_offset=0, clip_sample=True,
                                clip_sample_range=5.0)


def _betas(cfg: ScheduleConfig) -> torch.Tensor:
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":  # diffusers: linspace of sqrt(beta), squared
        lin = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32)
        return lin**2

    # squaredcos_cap_v2: diffusers betas_for_alpha_bar (Nichol & Dhariwal cosine), beta <= 0.999
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(alphas_cumprod) is shifted to end at 0 and scaled to keep its first
    value (Lin et al. 2024, Algorithm 1; diffusers' `rescale_zero_terminal_snr`)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    ab = root**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """A discrete DDPM schedule seen as VE noise levels sigma(t), t = 0..T-1 (float32, CPU)."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        self.num_train_timesteps = self.config.num_train_timesteps
        # computed exactly as diffusers does (float32 cumprod), so sigmas agree bit for bit
        self.betas = _betas(self.config)
        if self.config.rescale_betas_zero_snr:
            self.betas = zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if self.config.rescale_betas_zero_snr:
            # sigma would be infinite at the last timestep: diffusers' Euler, DPM-Solver and
            # UniPC schedulers use 2**-24 there, and so do we (training included)
            self.alphas_cumprod[-1] = 2**-24
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of `sigma`, interpolating linearly in log-sigma (diffusers'
        `_sigma_to_t`, k-diffusion's `sigma_to_t`); clamped to [0, T-1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.clamp(min=1e-10).log()
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1
        low = low.clamp(0, log_sigmas.shape[0] - 2).reshape(log_sigma.shape)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t) -> torch.Tensor:
        """sigma at (fractional) timesteps t, linear in sigma between integers (as diffusers'
        Euler family); float32."""
        t = torch.as_tensor(t, dtype=torch.float32)
        return torch.from_numpy(self.interp_sigmas(t.cpu().numpy())).float().to(t.device)

    def timesteps(self, steps: int, *, multistep: bool = False, rounded: bool = True) -> np.ndarray:
        """The inference timesteps (descending, float64) of diffusers' `set_timesteps` under
        the config's `timestep_spacing`. `multistep`: the DPMSolver/UniPC rule (steps + 1 points,
        the last dropped); `rounded=False`: the Euler family's unrounded float32 linspace.
        numpy, as in diffusers, so the float rounding agrees."""
        cfg, T, n = self.config, self.num_train_timesteps, steps
        if cfg.timestep_spacing == "linspace":
            if multistep:
                return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
            ts = np.linspace(0, T - 1, n)
            ts = ts.round() if rounded else ts.astype(np.float32).astype(np.float64)
            return ts[::-1].copy()
        if cfg.timestep_spacing == "leading":
            if multistep:
                ratio = T // (n + 1)
                ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1]
            else:
                ts = (np.arange(0, n) * (T // n)).round()[::-1]
            return (ts + cfg.steps_offset).astype(np.float64)
        return (np.round(np.arange(T, 0, -T / n)) - 1).astype(np.float64)  # trailing

    def interp_sigmas(self, timesteps) -> np.ndarray:
        """sigma at fractional timesteps, linear in sigma (np.interp, as diffusers), float64."""
        sig = self.sigmas.numpy()
        return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(sig)), sig)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) = 1 / sigma(t)^2 at integer timesteps."""
        t = torch.as_tensor(t)
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return a / (1 - a)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () -> (B, 1, ..., 1) to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser:
    """`denoiser(x, sigma, **cond) -> x0` around `model(x_in, t, **cond)` trained as a DDPM.

    x is VE-scaled; the model sees x_in = x / sqrt(sigma^2 + 1) at t = sigma_to_t(sigma), rounded
    when `quantize_t` (diffusers' integer timesteps). The prediction type (default: the
    schedule's) is converted to x0 here, so samplers never branch on it. `clip_denoised` clamps
    x0 (diffusers' clip_sample).
    """

    def __init__(self, model, schedule: NoiseSchedule, prediction_type: str | None = None,
                 quantize_t: bool = False, clip_denoised: float | None = None):
        prediction_type = prediction_type or schedule.config.prediction_type
        _check("prediction_type", prediction_type, PREDICTION_TYPES)
        self.model, self.schedule = model, schedule
        self.prediction_type, self.quantize_t = prediction_type, quantize_t
        self.clip_denoised = clip_denoised

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()
        t = self.schedule.sigma_to_t(sigma)
        t = t.round() if self.quantize_t else t
        s = _bcast(sigma, x)
        c_in = (s**2 + 1) ** -0.5
        out = self.model((x * c_in).to(dtype), t, **cond).float()
        if self.prediction_type == "epsilon":
            x0 = x - s * out
        elif self.prediction_type == "v_prediction":  # x0 = sqrt(a) x_vp - sqrt(1-a) v
            x0 = x * c_in**2 - s * c_in * out
        else:
            x0 = out
        if self.clip_denoised is not None:
            x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
        return x0.to(dtype)

    def base(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The x0 a zero model output gives at (x, sigma), float32: x for epsilon, x / (sigma^2
        + 1) for v, 0 for sample prediction (x0 = base + k * output)."""
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if self.prediction_type == "epsilon":
            return x
        if self.prediction_type == "v_prediction":
            return x / (_bcast(sigma.expand(x.shape[0]), x) ** 2 + 1)
        return torch.zeros_like(x)


def cfg_denoiser(denoiser, guidance: float, rescale: float = 0.0):
    """Classifier-free guidance, uncond + g * (cond - uncond), for callers that batch the
    conditioning themselves: with guidance != 1 every cond kwarg is (2B, ...) = [uncond; cond]
    (diffusers' order), x and sigma are (B,) and get doubled, and the model runs once on the 2B
    batch; with guidance == 1 the kwargs are (B, ...) and the denoiser runs once as is.

    `rescale` (0..1) is diffusers' `guidance_rescale` (Lin et al. 2023, "Common Diffusion Noise
    Schedules are Flawed", eq. 15-16): the guided model output is scaled to the conditional
    output's standard deviation, and mixed with the unscaled one by `rescale`. It needs a
    `Denoiser` (its `base`)."""
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or \
            not 0 <= rescale <= 1:  # also rejects NaN
        raise InputError(f"guidance_rescale must be a number in [0, 1], got {rescale!r}")
    guidance, rescale = float(guidance), float(rescale)
    if guidance == 1.0:
        return denoiser

    def guided(x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **cond)  # (2B, ...)
        uncond, cond_out = out.float().chunk(2)
        x0 = uncond + guidance * (cond_out - uncond)
        if rescale:
            x0 = rescale_guided(x0, cond_out, denoiser.base(x, sigma), rescale)
        return x0.to(x.dtype)
    return guided


def rescale_guided(x0_cfg, x0_cond, base, rescale: float):
    """guidance_rescale in x0 terms. A model output is affine in x0, out = (x0 - base) / k with
    the same base and k for both branches, so the ratio of the outputs' per-sample standard
    deviations (torch.std, as diffusers) is that of x0 - base, and mixing outputs is mixing
    x0 - base."""
    dims = list(range(1, x0_cfg.ndim))
    guided, cond = x0_cfg - base, x0_cond - base
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return base + guided * (rescale * ratio + (1 - rescale))


def _alpha_bar(schedule: NoiseSchedule, t, x: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at integer timesteps t (scalar or (B,)), shaped to broadcast against x."""
    t = torch.as_tensor(t, device=x.device).long()
    return _bcast(schedule.alphas_cumprod.to(x.device)[t], x)


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """Forward process in VP scaling at integer timesteps t (scalar or (B,)), diffusers'
    `add_noise`: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a = _alpha_bar(schedule, t, x0)
    return (a**0.5 * x0.float() + (1 - a) ** 0.5 * noise.float()).to(x0.dtype)


def training_targets(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t,
                     prediction_type: str = "epsilon"):
    """(x_t, target): the VP-scaled model input at timesteps t and what the model should
    predict (noise, v = sqrt(a) noise - sqrt(1-a) x0, or x0)."""
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    x_t = add_noise(schedule, x0, noise, t)
    if prediction_type == "epsilon":
        return x_t, noise
    if prediction_type == "sample":
        return x_t, x0
    a = _alpha_bar(schedule, t, x0)
    return x_t, (a**0.5 * noise.float() - (1 - a) ** 0.5 * x0.float()).to(x0.dtype)


def x0_and_noise(schedule: NoiseSchedule, out: torch.Tensor, x_t: torch.Tensor, t,
                 prediction_type: str = "epsilon"):
    """(x0, noise) that a model output `out` of `prediction_type` implies at the VP-scaled
    x_t and integer timesteps t: the inverse of training_targets, float32."""
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    a = _alpha_bar(schedule, t, x_t)
    x_t, out = x_t.float(), out.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - a) ** 0.5 * out) / a**0.5, out
    if prediction_type == "sample":
        return out, (x_t - a**0.5 * out) / (1 - a) ** 0.5
    return a**0.5 * x_t - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x_t


def lcm_boundary(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's consistency-function scalings (c_skip, c_out) at timesteps t, float32: the
    consistency model is c_skip x_t + c_out x0_pred, which is x_t itself at t = 0 (diffusers'
    LCMScheduler and its distillation script, with their default scaling 10 and sigma_data
    0.5)."""
    st = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def snr(schedule: NoiseSchedule, t) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at integer timesteps t."""
    return schedule.snr(t)


def loss_weights(schedule: NoiseSchedule, t, prediction_type: str = "epsilon",
                 min_snr_gamma: float | None = None) -> torch.Tensor:
    """Per-sample MSE weights (B,): ones, or Min-SNR-gamma (Hang et al. 2023, as diffusers'
    training scripts do it): min(snr, g) / snr for eps, min(snr + 1, g) / (snr + 1) for v
    (the v loss is the x0 loss times snr + 1), min(snr, g) for x0."""
    s = schedule.snr(t)
    if not min_snr_gamma:
        return torch.ones_like(s)
    if prediction_type == "v_prediction":
        s = s + 1
    clipped = s.clamp(max=min_snr_gamma)
    if prediction_type == "sample":
        return clipped
    return clipped / s.clamp(min=1e-12)


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma, descending, float64 (diffusers
    `_convert_to_exponential`)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5) noise levels, descending, float64 (diffusers
    `_convert_to_karras`)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
