"""The one place the parts meet: txt2img, img2img and inpainting over a text encoder, a UNet,
a VAE and a sampler. The CLI, the server and the tests all call these methods.

Seeds mean what they mean in diffusers on CPU: one CPU generator seeded with `seed` draws, in
diffusers' order, the VAE posterior samples of init images, then the initial latents
`randn((n, C, h, w))`, then the samplers' per-step noise; so a seed gives the image diffusers
gives for the same model and sampler.
"""
import contextlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image

from .. import samplers
from ..diffusion import Denoiser, NoiseSchedule, ScheduleConfig, cfg_denoiser
from ..errors import InputError
from ..malloc import pooled_blocks, trim
from ..models.layers import guidance_embedding, kept_context_projections
from ..models.packing import cpu_input, onednn_linears, pack, packed_weights
from ..models.unet import for_inference as unet_for_inference
from ..models.vae import for_encoding
from ..models.vae import for_inference as vae_for_inference
from ..prompts import encode_cached, escape, plain_text
from .checks import check_int, check_size, check_strength
from .decoders import check_vae_decoder, parameters, preview_decoder, tiny_decode
from .deepcache import CachedUNet, check_deepcache
from .deepcache import parameters as deepcache_parameters
from .images import from_pil, mask_input, paste_unmasked, to_pil
from .embeddings import EmbeddingMixin
from .lora import LoraMixin
from .offload import OffloadMixin
from .rerank import best_of_n
from .settings import Defaults, Request, resolve, tag
from .tome import merging
from .tome import parameters as tome_parameters
from .vae_swap import VaeMixin


class Interrupted(Exception):
    """Raise it from a step callback to stop sampling and get the images of the current
    denoised estimate back, with their parameters, instead of an error."""


class Pipeline(LoraMixin, VaeMixin, EmbeddingMixin, OffloadMixin):
    """Stable Diffusion: text encoder + UNet + VAE + noise schedule, plus what to run by default.
    LoRAs: load_lora, unload_lora(s), <lora:name:scale> tags in prompts (pipelines/lora.py).
    Another VAE: load_vae(path), load_vae(None) the model's own (pipelines/vae_swap.py).
    Textual inversion: load_embedding, embeddings_dir, names in prompts (embeddings.py).

    `clip` (optional) is a full CLIP model (text and image towers) used for reranking and by
    the unCLIP pipeline; it is not needed for txt2img.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: ScheduleConfig,
                 defaults: Defaults = None, clip=None, name="model"):
        # loaded with low memory, the parts are on disk already, laid out for inference
        # before they went there (offload.built_to_disk): for_inference moves no weight then
        self.unet = unet_for_inference(unet)
        self.text_encoder = text_encoder.eval()
        onednn_linears(text_encoder, clip)  # the UNet's and the VAE's: their for_inference
        self.vae = vae_for_inference(vae)
        self.tokenizer, self.schedule_config = tokenizer, schedule
        self.schedule = NoiseSchedule(schedule)
        self.defaults = defaults or Defaults()
        self.clip, self.name = clip, name
        self.tiny_decoder = None  # a TAESD: live previews, vae_decoder="tiny" (decoders.py)
        self._prompt_cache = {}

    @contextlib.contextmanager
    def unet_loop(self):
        """The UNet ready for a sampling loop. Its cross-attention layers
        project the prompt's states to keys and values once for the loop
        (layers.kept_context_projections). Its convolutions run on
        prepacked weights (models/packing.py), which stay packed from one call to the next;
        with low memory the UNet is in memory for the loop only: it is packed for the loop
        (about a dense call's weight reorders), then unpacked, each layer given back its
        file's weight (no reorder: SD 1.5 at 512 px in bfloat16, 2 cores, 0.38-0.43 -> 0.013
        s), and its activations' big blocks come from the block pool (malloc.pooled_blocks:
        pages resident for the next call, not mapped anew). SD 1.5 at 512 px in bfloat16, 4
        steps, 2-core Xeon with AMX: the UNet's 4 calls 6.7-6.8 s (dense, before the pool)
        -> 5.3-5.4 s, against 4.6-4.7 s without low memory; the peak 2.16 -> 2.18 GB.
        When the loop ends, the heap its activations left is given back (malloc.trim: glibc
        keeps freed blocks resident), so that the decode, which sets the call's peak, starts
        from the loaded model: SD 1.5 at 512 px in bfloat16 on a 2-core Zen 3 (3 processes of
        2 calls each way), RSS before the decode 2.71-2.89 -> 2.45-2.47 GB and the call's peak
        3.04-3.24 -> 2.94-3.12 GB (where the decode's blocks land in the heap moves it), for
        ~40 ms (low memory's UNet gives its memory back as it goes to disk)."""
        with self.resident(self.unet), kept_context_projections():
            if self.low_memory:
                with packed_weights(self.unet), pooled_blocks():
                    yield
            else:
                pack(self.unet)
                try:
                    yield
                finally:
                    trim()

    @property
    def vae_factor(self):
        return 2 ** (len(self.vae.config.block_channels) - 1)

    @property
    def latent_channels(self):
        return self.vae.config.latent_channels

    # ---- text -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts, clip_skip=1, prompt_syntax=True):
        """list of str -> token states (B, S, D); each distinct prompt is encoded once."""
        return self._encode_prompts(prompts, clip_skip, prompt_syntax)[0]

    def _encode_prompts(self, prompts, clip_skip=1, prompt_syntax=True):
        """list of str -> (token states (B, S, D), pooled states (B, D)), cached per prompt:
        A1111's syntax and chunks of the text encoder's window, S = chunks x window
        (prompts.py); clip_skip in A1111's numbering (1: the last layer)."""
        with self.running(self.text_encoder):  # low memory: read in for the time it runs
            return encode_cached(self._prompt_cache, self.text_encoder, self.tokenizer,
                                 prompts, clip_skip, prompt_syntax, self._vocabulary()[0])

    @property
    def _device(self):
        return next(self.unet.parameters()).device

    # ---- public tasks -------------------------------------------------------------------
    def generate(self, prompt, negative_prompt="", seed=None, steps=None, guidance=None,
                 sampler=None, width=None, height=None, n=1, callback=None, preview=False,
                 eta=None, best_of=1, guidance_rescale=0.0, vae_decoder="full", clip_skip=1,
                 prompt_syntax=True, deepcache=None, tome=None, output_type="pil"):
        """txt2img: a list of `n` PIL images (output_type "latent": the final latents, (n, C,
        h, w) float32 scaled as the UNet sees them, undecoded, as diffusers' output_type).
        best_of > 1 keeps, for each image, the best of `best_of` candidates under CLIP (see
        best_of_n for their seeds); it needs `clip`.
        guidance_rescale (0..1): diffusers' option of that name (diffusion.cfg_denoiser), for
        v-prediction models on zero-terminal-SNR schedules whose guided images over-saturate.
        vae_decoder "tiny": the final images from the tiny decoder (decoders.py).
        Prompts are read in AUTOMATIC1111's syntax (docs/prompts.md; prompt_syntax=False:
        literal text); clip_skip N takes the text encoder's N-th layer from the end (A1111's
        "Clip skip"; diffusers' clip_skip=N-1). deepcache N (here and in img2img, inpaint):
        the approximate path of DeepCache, the whole UNet every N-th step only and its shallow
        part between (pipelines/deepcache.py); None or 1: the exact path. tome r (here and in
        img2img, inpaint): token merging, the approximate path of merging the share r of the
        tokens before the finest level's self-attention (pipelines/tome.py); None or 0: exact."""
        req = Request(seed=seed, steps=steps, guidance=guidance, sampler=sampler, n=n, eta=eta,
                      guidance_rescale=guidance_rescale, callback=callback, preview=preview,
                      vae_decoder=vae_decoder, clip_skip=clip_skip, prompt_syntax=prompt_syntax,
                      deepcache=deepcache, tome=tome, output_type=output_type)

        def run(seed):
            return self._run(prompt, negative_prompt, replace(req, seed=seed),
                             size=(width, height))
        if best_of == 1:
            return run(seed)
        if output_type != "pil":
            raise InputError(f"best_of {best_of} ranks images: output_type must be 'pil', "
                             f"got {output_type!r}")
        words = plain_text(prompt) if prompt_syntax else prompt  # what CLIP ranks them by
        return best_of_n(self, run, words, seed, n, best_of)

    def img2img(self, prompt, image, strength=0.6, negative_prompt="", seed=None, steps=None,
                guidance=None, sampler=None, n=1, callback=None, preview=False, eta=None,
                width=None, height=None, guidance_rescale=0.0, vae_decoder="full", clip_skip=1,
                prompt_syntax=True, deepcache=None, tome=None):
        """Start from `image` noised to `strength` (0 < strength <= 1): a list of `n` images."""
        check_strength(strength)
        init = self._image_input(image, width, height)
        req = Request(seed=seed, steps=steps, guidance=guidance, sampler=sampler, n=n, eta=eta,
                      guidance_rescale=guidance_rescale, callback=callback, preview=preview,
                      vae_decoder=vae_decoder, clip_skip=clip_skip, prompt_syntax=prompt_syntax,
                      deepcache=deepcache, tome=tome)
        return self._run(prompt, negative_prompt, req, init=init, strength=strength)

    def inpaint(self, prompt, image, mask, strength=1.0, negative_prompt="", seed=None,
                steps=None, guidance=None, sampler=None, n=1, callback=None, preview=False,
                eta=None, width=None, height=None, guidance_rescale=0.0, keep_unmasked=False,
                vae_decoder="full", clip_skip=1, prompt_syntax=True, deepcache=None, tome=None):
        """Repaint where `mask` is white (>= 128), keep the rest. 9-channel UNets see the mask;
        other UNets get the known region blended back in at every step. The VAE decoder mixes
        neighbouring latents, so pixels outside the mask near it change too (diffusers' images
        do, the same); `keep_unmasked=True` pastes the input's pixels back outside the mask
        after decoding (AUTOMATIC1111's mask overlay)."""
        check_strength(strength)
        if not isinstance(keep_unmasked, bool):
            raise InputError(f"keep_unmasked must be True or False, got {keep_unmasked!r}")
        init = self._image_input(image, width, height)
        mask_t = mask_input(mask, init.shape[-1], init.shape[-2])
        req = Request(seed=seed, steps=steps, guidance=guidance, sampler=sampler, n=n, eta=eta,
                      guidance_rescale=guidance_rescale, callback=callback, preview=preview,
                      vae_decoder=vae_decoder, clip_skip=clip_skip, prompt_syntax=prompt_syntax,
                      deepcache=deepcache, tome=tome)
        images = self._run(prompt, negative_prompt, req, init=init, strength=strength,
                           mask=mask_t)
        return paste_unmasked(images, init, mask_t) if keep_unmasked else images

    def _image_input(self, image, width, height):
        """The init image at `width` x `height`, which must be multiples of the VAE factor; by
        default its own size rounded down to one (as diffusers does)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
        f = self.vae_factor
        w = image.size[0] - image.size[0] % f if width is None else width
        h = image.size[1] - image.size[1] % f if height is None else height
        check_size(w, h, f)
        return from_pil(image, w, h)

    # ---- the loop -----------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, prompt, negative, req, *, size=(None, None), init=None, strength=1.0,
             mask=None):
        """`req` (a Request) from noise at `size` (None: the model's), or from `init` (1, 3,
        H, W) noised to `strength`, inpainting where `mask` (1, 1, H, W) is 1."""
        if not isinstance(prompt, str) or not isinstance(negative, str):
            raise TypeError("prompt and negative_prompt must be strings")
        if init is not None:
            size = (init.shape[-1], init.shape[-2])
        s = resolve(self.defaults, req, *size, self.vae_factor)
        check_vae_decoder(req.vae_decoder, self.tiny_decoder)
        n = req.n
        gen = torch.Generator("cpu").manual_seed(s.seed)
        plan = samplers.plan(s.sampler, self.schedule, s.steps, strength=strength,
                             **({"eta": s.eta} if s.eta is not None else {}))
        loras = self.use_loras(prompt, req.prompt_syntax)  # fused; the prompt without tags
        embeddings = self.use_embeddings([loras.prompt, negative], req.prompt_syntax)
        cond = self._conditions(loras.prompt, negative, n, s.guidance, req)
        shape = (n, self.latent_channels, s.height // self.vae_factor, s.width // self.vae_factor)
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
        rescale = req.guidance_rescale
        embedded = self.unet.config.time_cond_proj_dim is not None  # LCM: one branch
        model = self._model_fn(unet_extra, req)
        denoiser = cfg_denoiser(Denoiser(model, plan.schedule, quantize_t=plan.quantize_t),
                                1.0 if embedded else s.guidance, rescale)
        with self.unet_loop():
            latents = self._sample(plan, denoiser, noise, init_latents, gen,
                                   self._wrap_callback(req.callback, req.preview), post_step,
                                   cond)
        if req.output_type == "latent":
            return latents
        return self._tagged(latents, s, req, negative, loras, embeddings,
                            strength if init is not None else None)

    def _tagged(self, latents, s, req, negative, loras, embeddings, strength=None):
        """A call's final latents -> its images, decoded and tagged with Settings `s` and the
        PNG parameters of `req`, its LoRAs and embeddings (`strength`: from an init image)."""
        rescale = req.guidance_rescale
        extra = {**({"Rescale CFG": rescale} if rescale else {}), **parameters(req.vae_decoder),
                 **loras.parameters, **embeddings, **self.vae_parameters(),
                 **deepcache_parameters(check_deepcache(req.deepcache)),
                 **tome_parameters(req.tome)}
        shown = str if req.prompt_syntax else escape  # written so that A1111 reads `prompt`
        images = self.decode_latents(latents, req.vae_decoder)
        trim()  # the decode's heap given back: between calls the process holds the model
        return tag(images, s, self.name,
                   shown(loras.recorded), shown(negative), strength=strength,
                   extra=extra or None, clip_skip=req.clip_skip)

    def _conditions(self, prompt, negative, n, guidance, req):
        """The UNet's text kwargs: context (n, S, D) and, where the UNet takes it, text_embeds
        (n, D), with the uncond ones first-batched when guidance is on ((2n, ...)). A UNet
        that embeds the guidance scale (LCM's time_cond_proj_dim) gets it as timestep_cond,
        w = guidance - 1 as diffusers gives it, and no uncond branch (the negative prompt
        is not used, as in diffusers). `req`: the prompts' clip_skip and prompt_syntax."""
        dim, text = self.unet.config.time_cond_proj_dim, (req.clip_skip, req.prompt_syntax)
        if dim is not None:
            cond = self.unet.text_condition(*self._encode_prompts([prompt] * n, *text))
            w = torch.full((n,), guidance - 1.0)
            return {**cond, "timestep_cond": guidance_embedding(w, dim).to(self._device)}
        prompts = [prompt] * n if guidance == 1.0 else [negative] * n + [prompt] * n
        return self.unet.text_condition(*self._encode_prompts(prompts, *text))

    def _model_fn(self, unet_extra, req):
        """The UNet as the denoiser wrapper calls it, its input in the UNet's dtype (the
        sampler's latents stay float32); 9-channel UNets also get the mask and the masked
        image's latents, `unet_extra` (n, 1 + C, h, w). Request `req`'s approximate paths are
        made here for one run, so that what they keep dies with it: DeepCache's UNet
        (deepcache.CachedUNet) and token merging's TokenMerging (tome.py)."""
        dtype = next(self.unet.parameters()).dtype
        deepcache = check_deepcache(req.deepcache)
        unet = self.unet if deepcache is None else CachedUNet(self.unet, deepcache)
        tome = merging(req.tome)
        extra = {} if tome is None else {"tome": tome}

        def fn(x, t, **cond):
            if unet_extra is not None:
                reps = x.shape[0] // unet_extra.shape[0]
                x = torch.cat([x, unet_extra.repeat(reps, 1, 1, 1)], dim=1)
            return unet(cpu_input(x, dtype), t, **cond, **extra)
        return fn

    @property
    def _vae_dtype(self):
        return next(self.vae.parameters()).dtype

    def _encode(self, image, gen):
        """Init image (1, 3, H, W) -> scaled float32 latents, sampled from the posterior with
        `gen`."""
        with self.running(self.vae):
            post = for_encoding(self.vae).encode(image.to(self._device, self._vae_dtype))
        return post.sample(gen).float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents, vae_decoder="full"):
        """Scaled latents (B, C, h, w) -> B PIL images (the VAE decoder, or "tiny" the tiny;
        large ones in tiles with low memory: OffloadMixin._decode)."""
        if vae_decoder == "tiny":
            x = tiny_decode(self.tiny_decoder, latents)
        else:
            x = self._decode((latents / self.vae.config.scaling_factor).to(self._vae_dtype))
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
        at every step, an integer k at steps 0, k, 2k, ... only; with the tiny decoder where
        the model has one."""
        if callback is None:
            return None
        every = 1 if preview is True else preview
        if every is not False and every is not None:
            check_int("preview", every, 1, 10**6)

        def cb(info):
            if every and info["step"] % every == 0:
                info = {**info, "preview": self.decode_latents(info["denoised"],
                                                               preview_decoder(self))}
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
