"""What one call of a pipeline runs with, decided in one place for both pipelines: the model's
Defaults, the caller's Request (None: the model's default), and the Settings `resolve` makes
of the two, checked. Every image a pipeline returns carries its Settings in
`image.info["settings"]` beside its AUTOMATIC1111 "parameters" text (`tag`), so the server
reads what ran instead of working the defaults out again."""
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from ..pnginfo import format_parameters
from .checks import check_eta, check_guidance, check_int, check_sampler, check_size
from .deepcache import check_deepcache
from .tome import check_tome

OUTPUT_TYPES = ("pil", "latent")


@dataclass
class Defaults:
    """What a model is meant to be run with; `resolve` fills a call's missing settings here."""
    steps: int = 25
    guidance: float = 7.5
    sampler: str = "euler"
    width: int = 512
    height: int = 512
    eta: float | None = None  # the default sampler's eta (a tcd-sampled model's gamma 0)


@dataclass(frozen=True)
class Request:
    """One call's sampling settings as the caller gave them; None takes the model's default
    (a random seed for seed). eta, guidance_rescale, preview, clip_skip and prompt_syntax are
    Stable Diffusion's (the last two checked where the prompts are encoded: prompts.py)."""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    n: int = 1
    eta: float | None = None
    guidance_rescale: float = 0.0
    callback: Callable | None = None
    preview: bool | int = False
    vae_decoder: str = "full"  # "tiny": the final images from the model's tiny decoder
    clip_skip: int = 1
    prompt_syntax: bool = True
    deepcache: int | None = None  # DeepCache's interval N (deepcache.py); None or 1: off
    tome: float | None = None  # token merging's ratio (tome.py); None or 0: off
    output_type: str = "pil"  # "latent": the final latents, undecoded (diffusers' name)


@dataclass(frozen=True)
class Settings:
    """The settings an image was made with, the model's defaults filled in."""
    seed: int
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int
    eta: float | None = None  # None: the sampler's own default


def resolve(defaults, request, width, height, factor):
    """`request` and the size (None: the model's) with `defaults` in place of what is None,
    each value checked (sizes against the VAE's `factor`): Settings."""
    d, r = defaults, request
    width = d.width if width is None else width
    height = d.height if height is None else height
    check_size(width, height, factor)
    steps = d.steps if r.steps is None else r.steps
    guidance = d.guidance if r.guidance is None else r.guidance
    sampler = d.sampler if r.sampler is None else r.sampler
    seed = int.from_bytes(os.urandom(4), "little") if r.seed is None else r.seed
    check_int("steps", steps, 1, 1000)
    check_int("n", r.n, 1, 64)
    check_int("seed", seed, 0, 2**63 - 1)
    check_guidance(guidance)
    # the model's eta goes with its sampler only (a user's other sampler has its own default)
    eta = r.eta if r.eta is not None else d.eta if sampler == d.sampler else None
    check_eta(eta, sampler)
    check_sampler(sampler)
    check_deepcache(r.deepcache)
    check_tome(r.tome)
    if r.output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {r.output_type!r}")
    return Settings(seed, steps, float(guidance), sampler, width, height, eta)


def tag(images, settings, model, prompt="", negative_prompt="", strength=None, extra=None,
        clip_skip=1):
    """Give each image its Settings and its A1111 "parameters" text (`strength` for images
    made from an init image; `extra`: further fields, e.g. Task). Returns `images`."""
    s = settings
    params = dict(prompt=prompt, negative_prompt=negative_prompt, steps=s.steps,
                  sampler=s.sampler, guidance=s.guidance, seed=s.seed, width=s.width,
                  height=s.height, model=model, strength=strength, batch_size=len(images),
                  extra=extra, clip_skip=clip_skip)
    for i, im in enumerate(images):
        im.info["settings"] = s
        im.info["parameters"] = format_parameters({**params, "batch_pos": i})
    return images
