"""Request fields -> one validated Task, whatever API they came through (OpenAI, AUTOMATIC1111,
the native job API). Limits are the server's own (--max-side, --max-n, --max-steps); the
Pipeline then checks the rest (sampler options, guidance range) with its own clear errors."""
import base64
import binascii
import io
import math
import os
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, UnidentifiedImageError

from .. import samplers
from ..errors import InputError
from ..pipelines.decoders import VAE_DECODERS
from ..pipelines.deepcache import check_deepcache
from ..pipelines.tome import check_tome
from ..pnginfo import A1111_SAMPLERS, save_png



# clip_skip at most this here (OpenCLIP bigG, the deepest text encoder of SD models, has 32
# layers); the pipeline checks it against its own text encoder's layers
MAX_CLIP_SKIP = 32


@dataclass
class Limits:
    max_side: int = 1024
    max_n: int = 8
    max_steps: int = 150
    max_queue: int = 8
    max_batch: int = 1  # images per UNet batch of waiting txt2img jobs (1: each job alone)
    max_image_bytes: int = 16 * 2**20
    max_prompt_chars: int = 10000

    def __post_init__(self):
        for name, v in vars(self).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class APIError(Exception):
    """An error answered in OpenAI's shape; `param` names the bad field."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def bad(param, message):
    return APIError(400, message, param=param)


SERVER_VAE = "server"  # Task.vae: the server's (serve --vae), else the model's own


@dataclass
class Task:
    """One call of a Pipeline method: `kind` is generate, img2img or inpaint. seed_per_image:
    image i of the batch is made alone with seed + i (AUTOMATIC1111's batches), not drawn
    with the others from one generator seeded with seed (diffusers' batches). `vae`: the VAE
    file a Stable Diffusion model runs this call with, None its own, SERVER_VAE the server's
    (Registry.submit decides it)."""
    model: str
    kind: str
    kwargs: dict = field(default_factory=dict)
    seed_per_image: bool = False
    vae: object = SERVER_VAE


@dataclass(frozen=True)
class Dialect:
    """How an API spells the common fields, so that its errors name the client's fields:
    `names` maps ours (guidance, sampler, strength) to the client's (cfg_scale, ...);
    `sampler(d, name)` reads the sampler field (default get_sampler)."""
    names: dict = field(default_factory=dict)
    sampler: Callable | None = None
    seed_per_image: bool = False
    # inpainting keeps the input's pixels outside the mask exactly (AUTOMATIC1111's overlay,
    # OpenAI's edits), rather than diffusers' decoded ones; a request's keep_unmasked wins
    keep_unmasked: bool = False

    def name(self, ours):
        return self.names.get(ours, ours)


NATIVE = Dialect()  # the job API: our names, diffusers' images
OPENAI = Dialect(keep_unmasked=True)


# ---- scalar fields ----------------------------------------------------------------------
def get_int(d, name, default, lo, hi):
    v = d.get(name)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        v = int(v)
    except (TypeError, ValueError):
        raise bad(name, f"{name} must be an integer, got {d.get(name)!r}") from None
    if not lo <= v <= hi:
        raise bad(name, f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def get_float(d, name, default, lo, hi):
    v = d.get(name)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool):
            raise ValueError
        v = float(v)
    except (TypeError, ValueError):
        raise bad(name, f"{name} must be a number, got {d.get(name)!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise bad(name, f"{name} must be a number in [{lo}, {hi}], got {v}")
    return v


def get_bool(d, name, default):
    v = d.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, str) and v.lower() in ("true", "false"):  # multipart form fields
        return v.lower() == "true"
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {v!r}")
    return v


def get_str(d, name, default="", limit=10000):
    v = d.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"{name} must be a string, got {type(v).__name__}")
    if len(v) > limit:
        raise bad(name, f"{name} is longer than {limit} characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes: a lone surrogate
        raise bad(name, f"{name} is not valid Unicode text: character {e.start} is a lone "
                        f"surrogate ({v[e.start]!a})") from None
    return v


def parse_size(value, limits, param="size"):
    """"WxH" -> (W, H); None or "auto" -> (None, None), the model's defaults."""
    if value in (None, "", "auto"):
        return None, None
    try:
        w, h = (int(s) for s in str(value).lower().split("x"))
    except ValueError:
        raise bad(param, f"{param} must look like '512x512', got {value!r}") from None
    check_side(param, w, limits)
    check_side(param, h, limits)
    return w, h


def check_side(param, v, limits):
    """The server's own limit on a side; the model's size step (its VAE factor: 8 for Stable
    Diffusion, 4 for the bundled models) is the pipeline's check, the one place that knows it."""
    if not 1 <= v <= limits.max_side:
        raise bad(param, f"{param} must be between 1 and {limits.max_side} (this server's "
                         f"--max-side), got {v}")


def get_sampler(d, name="sampler"):
    """Our sampler names, or the names AUTOMATIC1111 shows ("Euler a", "DPM++ 2M Karras")."""
    v = get_str(d, name, default=None)
    if v is None or v == "":
        return None
    if v in samplers.SAMPLER_NAMES:
        return v
    ours = {a1111.lower(): n for n, a1111 in A1111_SAMPLERS.items()
            if n in samplers.SAMPLER_NAMES}
    if v.lower() in ours:
        return ours[v.lower()]
    raise bad(name, f"{name} {v!r} is not one of {samplers.SAMPLER_NAMES}")


def get_vae_decoder(d, name="vae_decoder"):
    """What decodes the final images: "full" (the VAE; missing means it) or "tiny"."""
    v = get_str(d, name, default=None)
    if v is None or v == "":
        return "full"
    if v not in VAE_DECODERS:
        raise bad(name, f"{name} must be one of {list(VAE_DECODERS)}, got {v!r}")
    return v


def get_deepcache(d, name="deepcache"):
    """DeepCache's interval (None: off), by the pipeline's rule; "3" from a form field too."""
    v = d.get(name)
    if v is None or v == "":
        return None
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON numbers such as 3.0
    try:
        return check_deepcache(v)
    except InputError as e:
        raise bad(name, str(e).replace("deepcache", name, 1)) from None


def get_tome(d, name="tome"):
    """Token merging's ratio (None: off), by the pipeline's rule; "0.5" from a form field too."""
    v = d.get(name)
    if v is None or v == "":
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass  # named in check_tome's error
    try:
        return check_tome(v)
    except InputError as e:
        raise bad(name, str(e).replace("tome", name, 1)) from None


def get_seed(d, name="seed"):
    """A seed; missing or -1 (AUTOMATIC1111's "random") draws one here, so it can be reported."""
    seed = get_int(d, name, None, -1, 2**63 - 1)
    if seed is None or seed == -1:
        seed = int.from_bytes(os.urandom(4), "little")
    return seed


# ---- images -----------------------------------------------------------------------------
def decode_image(data, param, limits):
    """bytes, or base64 text (a data: URL included) -> a PIL image, checked for size."""
    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        if len(text) > limits.max_image_bytes * 4 // 3 + 4:
            raise bad(param, f"{param} is larger than {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise bad(param, f"{param} is not valid base64") from None
    if not isinstance(data, (bytes, bytearray)):
        raise bad(param, f"{param} must be an image file or base64 text")
    if len(data) > limits.max_image_bytes:
        raise bad(param, f"{param} is larger than {limits.max_image_bytes} bytes")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        _check_image_size(im, param, limits)  # before the pixels are decoded
        im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad(param, f"{param} is not a decodable image (PNG, JPEG, WebP)") from None
    return im


def _check_image_size(im, param, limits):
    if max(im.size) > 4 * limits.max_side:
        raise bad(param, f"{param} is {im.size[0]}x{im.size[1]}; at most "
                         f"{4 * limits.max_side} pixels a side")


def encode_png(image):
    """PIL image -> PNG bytes with its "parameters" text chunk (deterministic)."""
    buf = io.BytesIO()
    save_png(image, buf)
    return buf.getvalue()


def b64(data):
    return base64.b64encode(data).decode("ascii")


# ---- the common task --------------------------------------------------------------------
def build_task(model, f, limits, image=None, mask=None, dialect=NATIVE):
    """`f`: the request's fields (prompt, negative_prompt, seed, steps, guidance, sampler,
    width, height, n, strength, guidance_rescale, clip_skip, prompt_syntax, vae_decoder,
    deepcache, tome), guidance, sampler, strength, clip_skip and tome as `dialect` names
    them. With `image` img2img, with `image` and `mask` inpaint."""
    prompt = get_str(f, "prompt", None, limits.max_prompt_chars)
    if prompt is None:
        raise bad("prompt", "prompt is required")
    kw = dict(prompt=prompt,
              negative_prompt=get_str(f, "negative_prompt", "", limits.max_prompt_chars),
              **_sampling(f, limits, dialect))
    rescale = get_float(f, "guidance_rescale", 0.0, 0, 1)
    if rescale:  # passed only when asked for: unCLIP pipelines have no such option
        kw["guidance_rescale"] = rescale
    if get_vae_decoder(f) != "full":  # the same: unCLIP pipelines decode with their VAE
        kw["vae_decoder"] = get_vae_decoder(f)
    deepcache = get_deepcache(f, dialect.name("deepcache"))
    if deepcache is not None:  # the same: Stable Diffusion's approximate path
        kw["deepcache"] = deepcache
    tome = get_tome(f, dialect.name("tome"))
    if tome is not None:  # the same
        kw["tome"] = tome
    kw.update(_prompt_options(f, dialect))
    per_image = dialect.seed_per_image
    if image is None:
        if mask is not None:
            raise bad("mask", "a mask needs an image to inpaint")
        return Task(model, "generate", kw, seed_per_image=per_image)
    kw["image"] = _init_image(image, kw, limits)
    if mask is not None:
        kw["mask"] = mask
        kw["keep_unmasked"] = get_bool(f, "keep_unmasked", dialect.keep_unmasked)
    kw["strength"] = _strength(f, kw["steps"], 0.6 if mask is None else 1.0,
                               dialect.name("strength"))
    return Task(model, "img2img" if mask is None else "inpaint", kw, seed_per_image=per_image)


def _prompt_options(f, dialect):
    """clip_skip (A1111's numbering: 1 is the last layer) and prompt_syntax (False: the
    prompt is literal text), each only where it is not the default."""
    out = {}
    clip_skip = get_int(f, dialect.name("clip_skip"), 1, 1, MAX_CLIP_SKIP)
    if clip_skip != 1:
        out["clip_skip"] = clip_skip
    if not get_bool(f, "prompt_syntax", True):
        out["prompt_syntax"] = False
    return out


def _strength(f, steps, default, name):
    """img2img's strength, which must leave steps * strength >= 1 steps to run (diffusers'
    get_timesteps)."""
    v = get_float(f, name, default, 1e-3, 1.0)
    if steps is not None and int(steps * v) < 1:
        raise bad(name, f"{name} {v} with steps {steps} leaves no step to run (steps * {name} "
                        f"must be at least 1); raise steps or {name}")
    return v


def _sampling(f, limits, dialect=NATIVE):
    """The settings every task has: seed, steps, guidance, sampler, n, width, height."""
    name = dialect.name
    kw = dict(seed=get_seed(f), steps=get_int(f, "steps", None, 1, limits.max_steps),
              guidance=get_float(f, name("guidance"), None, 0, 100),
              sampler=(dialect.sampler or get_sampler)(f, name("sampler")),
              n=get_int(f, "n", 1, 1, limits.max_n))
    if dialect.seed_per_image and kw["seed"] + kw["n"] - 1 > 2**63 - 1:
        raise bad("seed", f"seed {kw['seed']} + {kw['n'] - 1} (the batch's last image) is past "
                          f"2**63 - 1")
    for side in ("width", "height"):
        v = get_int(f, side, None, 1, 10**6)
        if v is not None:
            check_side(side, v, limits)
        kw[side] = v
    return kw


def _init_image(image, kw, limits):
    if kw["width"] is None and max(image.size) > limits.max_side:
        raise bad("image", f"image is {image.size[0]}x{image.size[1]}; give a size, or an "
                           f"image at most {limits.max_side} pixels a side")
    return image


def build_unclip_task(model, f, limits, image):
    """unCLIP tasks on an image: variations, or with a `prompt` DALL·E 2's text-diff edit
    from the caption CLIP gives the image to the prompt (`strength` in [0, 1], default 1)."""
    kw = _sampling(f, limits)
    kw["image"] = _init_image(image, kw, limits)
    prompt = get_str(f, "prompt", None, limits.max_prompt_chars)
    if prompt is None:
        return Task(model, "variations", kw)
    kw.update(source="auto", target=prompt, strength=get_float(f, "strength", 1.0, 0, 1.0))
    return Task(model, "edit", kw)


def public_params(task):
    """The task's settings as JSON-able data (images left out)."""
    return {k: v for k, v in task.kwargs.items() if k not in ("image", "mask")} | {
        "model": task.model, "mode": task.kind}
