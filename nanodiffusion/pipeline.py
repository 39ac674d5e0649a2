"""The one place the parts meet: txt2img, img2img and inpainting over a text encoder, a UNet,
a VAE and a sampler. The CLI, the server and the tests all call these methods.

Seeds mean what they mean in diffusers on CPU: one CPU generator seeded with `seed` draws, in
diffusers' order, the VAE posterior samples of init images, then the initial latents
`randn((n, C, h, w))`, then the samplers' per-step noise; so a seed gives the image diffusers
gives for the same model and sampler.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import samplers
from .diffusion import Denoiser, NoiseSchedule, ScheduleConfig, cfg_denoiser
from .errors import InputError
from .models.vae import for_inference as vae_for_inference
from .pnginfo import format_parameters

MAX_SIDE = 4096


@dataclass
class Defaults:
    """What a model is meant to be run with; the CLI and server fill missing settings here."""
    steps: int = 25
    guidance: float = 7.5
    sampler: str = "euler"
    width: int = 512
    height: int = 512


class Interrupted(Exception):
    """Raise it from a step callback to stop sampling and get the images of the current
    denoised estimate back, with their parameters, instead of an error."""


def to_pil(x):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (rounded like diffusers)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in x]


def from_pil(image, width=None, height=None):
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos, as diffusers) when asked."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    if width and height and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3)
    return x.permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W)


def make_grid(images, rows=None):
    """Paste equal-sized PIL images into a rows x cols contact sheet."""
    n = len(images)
    rows = rows or int(math.floor(math.sqrt(n)))
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _check_int(name, value, lo, hi):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _check_size(width, height, factor):
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < factor or v > MAX_SIDE or v % factor:
            raise InputError(f"{name} must be a multiple of {factor} between {factor} and "
                             f"{MAX_SIDE}, got {v!r}")


def _check_guidance(guidance):
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or \
            not 0 <= guidance <= 100:
        raise InputError(f"guidance must be a finite number in [0, 100], got {guidance!r}")


class Pipeline:
    """Stable Diffusion: text encoder + UNet + VAE + noise schedule, plus what to run by default.

    `clip` (optional) is a full CLIP model (text and image towers) used for reranking and by
    the unCLIP pipeline; it is not needed for txt2img.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: ScheduleConfig,
                 defaults: Defaults = None, clip=None, name="model"):
        self.unet, self.text_encoder = unet.eval(), text_encoder.eval()
        self.vae = vae_for_inference(vae)
        self.tokenizer, self.schedule_config = tokenizer, schedule
        self.schedule = NoiseSchedule(schedule)
        self.defaults = defaults or Defaults()
        self.clip, self.name = clip, name
        self._prompt_cache = {}

    @property
    def vae_factor(self):
        return 2 ** (len(self.vae.config.block_channels) - 1)

    @property
    def latent_channels(self):
        return self.vae.config.latent_channels

    # ---- text -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts):
        """list of str -> token states (B, T, D); each distinct prompt is encoded once."""
        return self._encode_prompts(prompts)[0]

    def _encode_prompts(self, prompts):
        """list of str -> (token states (B, T, D), pooled states (B, D)), cached per prompt."""
        cache = self._prompt_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            ids = self.tokenizer(missing, max_length=self.text_encoder.config.max_positions)
            hidden, pooled = self.text_encoder(ids.to(self._device))
            for p, h, e in zip(missing, hidden, pooled):
                cache[p] = (h, e)
        for p in dict.fromkeys(prompts):  # least recently used first
            cache[p] = cache.pop(p)
        out = tuple(torch.stack([cache[p][k] for p in prompts]) for k in range(2))
        while len(cache) > 256:  # bounded: a server sees endless prompts
            cache.pop(next(iter(cache)))
        return out

    @property
    def _device(self):
        return next(self.unet.parameters()).device

    # ---- public tasks -------------------------------------------------------------------
    def generate(self, prompt, negative_prompt="", seed=None, steps=None, guidance=None,
                 sampler=None, width=None, height=None, n=1, callback=None, preview=False,
                 eta=None, best_of=1, guidance_rescale=0.0):
        """txt2img: a list of `n` PIL images. best_of > 1 keeps, for each image, the best of
        `best_of` candidates under CLIP (see best_of_n for their seeds); it needs `clip`.
        guidance_rescale (0..1): diffusers' option of that name (diffusion.cfg_denoiser), for
        v-prediction models on zero-terminal-SNR schedules whose guided images over-saturate."""
        if best_of != 1:
            return best_of_n(self, lambda s: self.generate(
                prompt, negative_prompt, s, steps, guidance, sampler, width, height, n,
                callback, preview, eta, guidance_rescale=guidance_rescale), prompt, seed, n,
                best_of)
        width = self.defaults.width if width is None else width
        height = self.defaults.height if height is None else height
        _check_size(width, height, self.vae_factor)
        return self._run(prompt, negative_prompt, seed, steps, guidance, sampler, n, callback,
                         preview, eta, size=(width, height), rescale=guidance_rescale)

    def img2img(self, prompt, image, strength=0.6, negative_prompt="", seed=None, steps=None,
                guidance=None, sampler=None, n=1, callback=None, preview=False, eta=None,
                width=None, height=None, guidance_rescale=0.0):
        """Start from `image` noised to `strength` (0 < strength <= 1): a list of `n` images."""
        _check_strength(strength)
        init = self._image_input(image, width, height)
        return self._run(prompt, negative_prompt, seed, steps, guidance, sampler, n, callback,
                         preview, eta, init=init, strength=strength, rescale=guidance_rescale)

    def inpaint(self, prompt, image, mask, strength=1.0, negative_prompt="", seed=None,
                steps=None, guidance=None, sampler=None, n=1, callback=None, preview=False,
                eta=None, width=None, height=None, guidance_rescale=0.0, keep_unmasked=False):
        """Repaint where `mask` is white (>= 128), keep the rest. 9-channel UNets see the mask;
        other UNets get the known region blended back in at every step. The VAE decoder mixes
        neighbouring latents, so pixels outside the mask near it change too (diffusers' images
        do, the same); `keep_unmasked=True` pastes the input's pixels back outside the mask
        after decoding (AUTOMATIC1111's mask overlay)."""
        _check_strength(strength)
        if not isinstance(keep_unmasked, bool):
            raise InputError(f"keep_unmasked must be True or False, got {keep_unmasked!r}")
        init = self._image_input(image, width, height)
        mask_t = _mask_input(mask, init.shape[-1], init.shape[-2])
        images = self._run(prompt, negative_prompt, seed, steps, guidance, sampler, n, callback,
                           preview, eta, init=init, strength=strength, mask=mask_t,
                           rescale=guidance_rescale)
        return _paste_unmasked(images, init, mask_t) if keep_unmasked else images

    def _image_input(self, image, width, height):
        """The init image at `width` x `height`, which must be multiples of the VAE factor; by
        default its own size rounded down to one (as diffusers does)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
        f = self.vae_factor
        w = image.size[0] - image.size[0] % f if width is None else width
        h = image.size[1] - image.size[1] % f if height is None else height
        _check_size(w, h, f)
        return from_pil(image, w, h)

    # ---- the loop -----------------------------------------------------------------------
    def _settings(self, seed, steps, guidance, sampler, n, eta):
        steps = self.defaults.steps if steps is None else steps
        guidance = self.defaults.guidance if guidance is None else guidance
        sampler = self.defaults.sampler if sampler is None else sampler
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        _check_int("steps", steps, 1, 1000)
        _check_int("n", n, 1, 64)
        _check_int("seed", seed, 0, 2**63 - 1)
        _check_guidance(guidance)
        _check_eta(eta, sampler)
        if sampler not in samplers.SAMPLER_NAMES:
            raise InputError(f"sampler {sampler!r} is not one of {samplers.SAMPLER_NAMES}")
        return seed, steps, float(guidance), sampler

    @torch.no_grad()
    def _run(self, prompt, negative, seed, steps, guidance, sampler, n, callback, preview,
             eta, size=None, init=None, strength=1.0, mask=None, rescale=0.0):
        if not isinstance(prompt, str) or not isinstance(negative, str):
            raise TypeError("prompt and negative_prompt must be strings")
        seed, steps, guidance, sampler = self._settings(seed, steps, guidance, sampler, n, eta)
        gen = torch.Generator("cpu").manual_seed(seed)
        plan = samplers.plan(sampler, self.schedule, steps, strength=strength,
                             **({"eta": eta} if eta is not None else {}))
        cond = self._conditions(prompt, negative, n, guidance)
        w, h = size if size is not None else (init.shape[-1], init.shape[-2])
        shape = (n, self.latent_channels, h // self.vae_factor, w // self.vae_factor)
        sees_mask = self.unet.config.in_channels > self.latent_channels
        # The generator's draws in diffusers' order: init latents, noise, masked-image latents.
        init_latents = None
        if init is not None and (mask is None or strength < 1 or not sees_mask):
            init_latents = self._encode(init, gen).expand(n, -1, -1, -1)
        noise = torch.randn(shape, generator=gen).to(self._device)
        post_step, unet_extra = None, None
        if mask is not None:
            m = F.interpolate(mask.to(self._device), size=shape[-2:])  # (1, 1, h, w) nearest
            masked = self._encode(init * (mask < 0.5), gen)  # (1, C, h, w)
            if sees_mask:
                unet_extra = torch.cat([m, masked], dim=1).expand(n, -1, -1, -1)
            else:
                post_step = _blend_known(init_latents, noise, m, plan)
            if strength == 1.0:
                init_latents = None  # diffusers starts from pure noise at full strength
        denoiser = cfg_denoiser(Denoiser(self._model_fn(unet_extra), plan.schedule,
                                         quantize_t=plan.quantize_t), guidance, rescale)
        latents = self._sample(plan, denoiser, noise, init_latents, gen,
                               self._wrap_callback(callback, preview), post_step, cond)
        images = self.decode_latents(latents)
        params = dict(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler,
                      guidance=guidance, seed=seed, width=w, height=h, model=self.name,
                      strength=strength if init is not None else None, batch_size=n,
                      extra={"Rescale CFG": rescale} if rescale else None)
        for i, im in enumerate(images):
            im.info["parameters"] = format_parameters({**params, "batch_pos": i})
        return images

    def _conditions(self, prompt, negative, n, guidance):
        """The UNet's text kwargs: context (n, T, D) and, where the UNet takes it, text_embeds
        (n, D), with the uncond ones first-batched when guidance is on ((2n, ...))."""
        prompts = [prompt] * n if guidance == 1.0 else [negative] * n + [prompt] * n
        return self.unet.text_condition(*self._encode_prompts(prompts))

    def _model_fn(self, unet_extra):
        """The UNet as the denoiser wrapper calls it, its input in the UNet's dtype (the
        sampler's latents stay float32); 9-channel UNets also get the mask and the masked
        image's latents, `unet_extra` (n, 1 + C, h, w)."""
        dtype = next(self.unet.parameters()).dtype

        def fn(x, t, **cond):
            if unet_extra is not None:
                reps = x.shape[0] // unet_extra.shape[0]
                x = torch.cat([x, unet_extra.repeat(reps, 1, 1, 1)], dim=1)
            return self.unet(x.to(dtype), t, **cond)
        return fn

    @property
    def _vae_dtype(self):
        return next(self.vae.parameters()).dtype

    def _encode(self, image, gen):
        """Init image (1, 3, H, W) -> scaled float32 latents, sampled from the posterior with
        `gen`."""
        post = self.vae.encode(image.to(self._device, self._vae_dtype))
        return post.sample(gen).float() * self.vae.config.scaling_factor

    def decode_latents(self, latents):
        """Scaled latents (B, C, h, w) -> B PIL images (the VAE decoder)."""
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self._vae_dtype))
        if not torch.isfinite(x).all():
            raise FloatingPointError("the decoded image holds NaN or inf values (numerical "
                                     "overflow); try float32 or another sampler")
        return to_pil(x)

    @staticmethod
    def _sample(plan, denoiser, noise, init, gen, callback, post_step, cond):
        """samplers.run; a callback that raises Interrupted ends the run early with the latest
        denoised estimate as the result (AUTOMATIC1111's interrupt keeps the half-made image)."""
        last = {}

        def keep(info):
            last["denoised"] = info["denoised"]  # (n, C, h, w) x0 estimate
            return callback(info)
        try:
            return samplers.run(plan, denoiser, noise, init=init, generator=gen,
                                callback=None if callback is None else keep,
                                post_step=post_step, cond=cond)
        except Interrupted:
            return last["denoised"]  # set before the callback that raised ran

    def _wrap_callback(self, callback, preview):
        """`preview`: True decodes the denoised estimate into info["preview"] (n PIL images)
        at every step, an integer k at steps 0, k, 2k, ... only."""
        if callback is None:
            return None
        every = 1 if preview is True else preview
        if every is not False and every is not None:
            _check_int("preview", every, 1, 10**6)

        def cb(info):
            if every and info["step"] % every == 0:
                info = {**info, "preview": self.decode_latents(info["denoised"])}
            return callback(info)
        return cb


def _blend_known(init_latents, noise, mask, plan):
    """Inpainting with an ordinary UNet (diffusers' 4-channel path): after every step, put back
    the known region, noised to the step's next noise level (clean after the last step).
    Samplers work on x = x0 + sigma * noise; the blend is made in diffusers' VP scaling."""
    def post_step(i, x, sigma_next):
        last = i == len(plan.sigmas) - 2
        s = float(sigma_next)
        known = init_latents if last else init_latents + s * noise
        scale = (1 + s * s) ** 0.5
        known_vp = known if last else known / scale
        return ((1 - mask) * known_vp + mask * (x / scale)) * scale
    return post_step


# ---- best-of-N reranking by CLIP, for this pipeline and the unCLIP one --------------------
MAX_BEST_OF = 16


def _image_clip(pipe):
    clip = getattr(pipe, "clip", None)
    if clip is None or not hasattr(clip, "encode_image"):
        raise InputError(f"best_of needs a CLIP image encoder to rank the candidates, and the "
                         f"model {pipe.name!r} has a text encoder only; use best_of=1, or a "
                         f"model whose folder holds a full CLIP (text and image towers)")
    return clip


@torch.no_grad()
def clip_scores(pipe, prompt, images):
    """CLIP cosine similarity of each PIL image to `prompt`, by `pipe.clip` (a CLIPModel with
    both towers) and `pipe.tokenizer`: a list of floats."""
    clip = _image_clip(pipe)
    device = next(clip.parameters()).device
    ids = pipe.tokenizer([prompt], max_length=clip.text_model.config.max_positions)
    text = F.normalize(clip.encode_text(ids.to(device)), dim=-1)  # (1, E)
    pixels = torch.cat([clip.preprocess((from_pil(im) + 1) / 2) for im in images])
    imgs = F.normalize(clip.encode_image(pixels.to(device)), dim=-1)  # (B, E)
    return (imgs.float() @ text[0].float()).tolist()


def rank_images(pipe, prompt, images):
    """(image, CLIP cosine similarity to `prompt`) pairs, most similar first."""
    return sorted(zip(images, clip_scores(pipe, prompt, images)), key=lambda p: -p[1])


def best_of_n(pipe, generate, prompt, seed, n, best_of):
    """Best-of-N reranking: `generate(s)` makes a batch of n images with seed s; candidate k
    (k = 0 .. best_of - 1) of image i is image i of the batch of seed `seed + k`, so candidate
    0 is what best_of=1 gives. Each image i keeps the candidate CLIP finds most similar to
    `prompt` (the lowest k on a tie), with that candidate's own parameters (its seed)."""
    _check_int("best_of", best_of, 1, MAX_BEST_OF)
    if best_of > 1:
        _image_clip(pipe)  # fail before generating anything
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    _check_int("seed", seed, 0, 2**63 - best_of)  # seeds seed .. seed + best_of - 1
    batches = [generate(seed + k) for k in range(best_of)]
    if best_of == 1:
        return batches[0]
    candidates = [batch[i] for i in range(n) for batch in batches]  # image-major
    scores = clip_scores(pipe, prompt, candidates)
    picks = [max(range(best_of), key=lambda k: (scores[i * best_of + k], -k)) for i in range(n)]
    return [batches[k][i] for i, k in enumerate(picks)]


ETA_SAMPLERS = ("ddim", "euler-ancestral")  # the samplers whose noise `eta` scales


def _check_eta(eta, sampler):
    if eta is None:
        return
    if sampler not in ETA_SAMPLERS:
        raise InputError(f"eta is an option of the {', '.join(ETA_SAMPLERS)} samplers only, "
                         f"not of {sampler!r}")
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise InputError(f"eta must be a number in [0, 1], got {eta!r}")


def _check_strength(strength):
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength!r}")


def _paste_unmasked(images, init, mask):
    """The input image's pixels (init (1, 3, H, W) in [-1, 1]) where the binary `mask` (1, 1, H,
    W) is 0, the generated ones where it is 1; each image keeps its parameters."""
    original = to_pil(init)[0]  # exact: from_pil's v / 255 rounds back to v
    alpha = Image.fromarray((mask[0, 0].cpu().numpy() * 255).astype(np.uint8))  # (H, W)
    out = []
    for im in images:
        pasted = Image.composite(im, original, alpha)
        pasted.info.update(im.info)
        out.append(pasted)
    return out


def _mask_input(mask, width, height):
    """PIL mask -> (1, 1, H, W) binary float, white = repaint (diffusers binarizes at 0.5)."""
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask must be a PIL.Image, got {type(mask).__name__}")
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    return (m >= 0.5).float()
