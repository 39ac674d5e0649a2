"""DALL·E 2 (unCLIP) over our parts: text -> CLIP text encoding -> prior -> CLIP image
embedding -> decoder UNet (latent, Kandinsky 2.2 style: conditioned on the image embedding,
and with decoder_text on the caption too, as DALL·E 2's decoder) -> VAE. Plus what an image
embedding allows: variations, text-diff edits, interpolation, captions by CLIP similarity;
and best-of-N reranking (rerank.best_of_n).

Seeds: one CPU generator seeded with `seed` draws the prior's initial noise (n, E), the
prior sampler's noise, then the decoder's initial latents and its sampler's noise.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import samplers
from ..data.shapes import enumerate_captions
from ..diffusion import PRIOR_SCHEDULE, Denoiser, NoiseSchedule, ScheduleConfig, cfg_denoiser
from ..errors import InputError
from ..models.packing import onednn_linears
from ..models.vae import for_inference as vae_for_inference
from ..prompts import escape, plain_text
from .checks import check_guidance, check_int, check_sampler
from .decoders import tiny_decode
from .images import from_pil, to_pil
from .rerank import best_of_n
from .settings import Defaults, Request, resolve, tag

EDIT_MAX_THETA = 0.5  # edit(strength=1) slerps half way to the text diff (DALL·E 2 fig. 5)


@dataclass
class UnCLIPDefaults(Defaults):
    """Defaults of the decoder (steps, guidance, sampler, size) and of the prior."""
    guidance: float = 4.0
    prior_steps: int = 25
    prior_guidance: float = 4.0
    prior_sampler: str = "ddim"


def slerp(a, b, theta):
    """Spherical interpolation of the directions of (B, E) embeddings, the norm interpolated
    linearly (the decoder was trained on unnormalised CLIP embeddings)."""
    ua, ub = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (B, 1)
    direction = (torch.sin((1 - theta) * omega) * ua + torch.sin(theta * omega) * ub) \
        / torch.sin(omega)
    norm = (1 - theta) * a.float().norm(dim=-1, keepdim=True) + \
        theta * b.float().norm(dim=-1, keepdim=True)
    return (direction * norm).to(a.dtype)


@torch.no_grad()
def sample_prior(prior, schedule, text, uncond, *, generator, steps, guidance, sampler,
                 callback=None):
    """CLIP image embeddings (B, E) for text conditions `text` = (states (B, T, D), emb
    (B, E)), with classifier-free guidance against `uncond` (same shapes)."""
    clip = schedule.clip_sample_range if schedule.clip_sample else None
    # x0 is clamped in each guidance branch (the Denoiser), as the shipped prior was measured;
    # the sampler must not clamp the guided x0 again (diffusers clamps only after guidance)
    sched = NoiseSchedule(dataclasses.replace(schedule, clip_sample=False))
    plan = samplers.plan(sampler, sched, steps)

    def model(x, t, text_states, text_emb):
        return prior(x, t, text_states, text_emb)
    denoiser = cfg_denoiser(Denoiser(model, sched, quantize_t=plan.quantize_t,
                                     clip_denoised=clip), guidance)
    states, emb = text
    if guidance != 1.0:
        states, emb = torch.cat([uncond[0], states]), torch.cat([uncond[1], emb])  # (2B, ...)
    device = next(prior.parameters()).device
    noise = torch.randn((text[1].shape[0], prior.config.embed_dim), generator=generator)
    x = samplers.run(plan, denoiser, noise.to(device), generator=generator, callback=callback,
                     cond={"text_states": states, "text_emb": emb})
    return prior.denormalize(x)


class UnCLIPPipeline:
    """prior + decoder UNet + VAE + CLIP (both towers) + tokenizer."""

    def __init__(self, prior, decoder, vae, clip, tokenizer, schedule: ScheduleConfig,
                 prior_schedule: ScheduleConfig = PRIOR_SCHEDULE, defaults=None, name="unclip",
                 decoder_text=False):
        self.prior, self.decoder = prior.eval(), decoder.eval()
        # DALL·E 2's decoder also reads the caption (GLIDE's text pathway): text-to-image
        # passes the prompt, the image-only tasks (variations, edits, interpolation) ""
        self.decoder_text = decoder_text
        self.vae, self.clip, self.tokenizer = vae_for_inference(vae), clip.eval(), tokenizer
        onednn_linears(prior, decoder, clip)  # the VAE's: its for_inference
        self.schedule_config, self.prior_schedule = schedule, prior_schedule
        self.schedule = NoiseSchedule(schedule)
        self.defaults = defaults or UnCLIPDefaults()
        self.name = name
        self.tiny_decoder = None  # a TAESD: live previews (decoders.py)
        self._candidates = (None, None)  # (captions, their unit text embeddings)

    @property
    def vae_factor(self):
        return 2 ** (len(self.vae.config.block_channels) - 1)

    @property
    def _device(self):
        return next(self.decoder.parameters()).device

    # ---- CLIP ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts):
        """list of str -> (token states (B, T, D), projected text embeddings (B, E))."""
        hidden, pooled = self._text_states(prompts)
        return hidden, self.clip.text_projection(pooled)

    def _text_states(self, prompts):
        """list of str -> (token states (B, T, D), pooled states (B, D))."""
        text = self.clip.text_model
        ids = self.tokenizer(prompts, max_length=text.config.max_positions).to(self._device)
        return text(ids)

    @torch.no_grad()
    def encode_image(self, images):
        """list of PIL images -> CLIP image embeddings (B, E), not normalised."""
        pixels = torch.cat([self.clip.preprocess((from_pil(im) + 1) / 2) for im in images])
        return self.clip.encode_image(pixels.to(self._device))

    # ---- settings -----------------------------------------------------------------------
    def _settings(self, *, seed, steps, guidance, sampler, width, height, n=1):
        """The decoder's Settings (settings.resolve)."""
        req = Request(seed=seed, steps=steps, guidance=guidance, sampler=sampler, n=n)
        return resolve(self.defaults, req, width, height, self.vae_factor)

    def _prior_settings(self, steps, guidance, sampler):
        d = self.defaults
        s = dict(steps=d.prior_steps if steps is None else steps,
                 guidance=d.prior_guidance if guidance is None else guidance,
                 sampler=d.prior_sampler if sampler is None else sampler)
        check_int("prior_steps", s["steps"], 1, self.prior_schedule.num_train_timesteps)
        check_guidance(s["guidance"])
        check_sampler(s["sampler"])
        return s

    # ---- the two stages -----------------------------------------------------------------
    def prior_embeds(self, prompt, negative_prompt, n, generator, steps=None, guidance=None,
                     sampler=None):
        """n CLIP image embeddings (n, E) for `prompt`. The unconditional branch is the
        learned null caption, or the negative prompt's encoding when one is given."""
        p = self._prior_settings(steps, guidance, sampler)
        text = self.encode_text([prompt] * n)
        if negative_prompt or not self.prior.config.learned_null:
            uncond = self.encode_text([negative_prompt] * n)
        else:
            uncond = tuple(u.to(self._device) for u in self.prior.null_condition(n))
        return sample_prior(self.prior, self.prior_schedule, text, uncond, generator=generator,
                            **p)

    @torch.no_grad()
    def decode(self, image_embeds, generator, steps, guidance, sampler, width, height,
               callback=None, prompt=""):
        """Image embeddings (B, E) -> B PIL images; the unconditional branch of guidance is
        the zero embedding (the decoder's dropped condition in training), and the empty
        caption for a decoder that reads `prompt` too."""
        plan = samplers.plan(sampler, self.schedule, steps)
        B, f = image_embeds.shape[0], self.vae_factor
        shape = (B, self.vae.config.latent_channels, height // f, width // f)
        noise = torch.randn(shape, generator=generator).to(self._device)
        denoiser = cfg_denoiser(Denoiser(self.decoder, self.schedule,
                                         quantize_t=plan.quantize_t), guidance)
        embeds = image_embeds.to(self._device)
        prompts = [prompt] * B
        if guidance != 1.0:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2B, E): uncond, cond
            prompts = [""] * B + prompts
        cond = {"image_embeds": embeds}
        if self.decoder_text:
            cond.update(self.decoder.text_condition(*self._text_states(prompts)))
        latents = samplers.run(plan, denoiser, noise, generator=generator, callback=callback,
                               cond=cond)
        return self.decode_latents(latents)

    @torch.no_grad()
    def decode_latents(self, latents, vae_decoder="full"):
        """Scaled latents (B, C, h, w) -> B PIL images (the VAE decoder, or "tiny" the tiny)."""
        if vae_decoder == "tiny":
            x = tiny_decode(self.tiny_decoder, latents)
        else:
            x = self.vae.decode(latents / self.vae.config.scaling_factor)
        if not torch.isfinite(x).all():
            raise FloatingPointError("the decoded image holds NaN or inf values")
        return to_pil(x)

    def _render(self, embeds, s, callback=None, generator=None, prompt=""):
        """Embeddings (B, E) -> B images with the decoder Settings `s`."""
        gen = generator or torch.Generator("cpu").manual_seed(s.seed)
        return self.decode(embeds, gen, steps=s.steps, guidance=s.guidance, sampler=s.sampler,
                           width=s.width, height=s.height, callback=callback, prompt=prompt)

    def _tag(self, images, s, prompt="", negative_prompt="", **extra):
        """settings.tag; `extra` adds fields (e.g. Task)."""
        return tag(images, s, self.name, prompt, negative_prompt, extra=extra)

    # ---- public tasks -------------------------------------------------------------------
    def generate(self, prompt, negative_prompt="", seed=None, steps=None, guidance=None,
                 sampler=None, width=None, height=None, n=1, callback=None, best_of=1,
                 prior_steps=None, prior_guidance=None, prior_sampler=None, clip_skip=1,
                 prompt_syntax=True):
        """txt2img: `n` PIL images. best_of > 1 keeps, for each image, the best of
        `best_of` candidates under CLIP (candidate k from seed + k: rerank.best_of_n).
        Prompts in AUTOMATIC1111's syntax are read without it (docs/prompts.md: the prior
        takes one window of CLIP's last layer, so no weights, chunks or clip skip here)."""
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise TypeError("prompt and negative_prompt must be strings")
        if clip_skip != 1 or isinstance(clip_skip, bool):
            raise InputError(f"clip_skip {clip_skip!r}: unCLIP models take only 1 (their prior "
                             f"was trained on CLIP's last layer)")
        if not isinstance(prompt_syntax, bool):
            raise InputError(f"prompt_syntax must be True or False, got {prompt_syntax!r}")
        read, shown = (plain_text, str) if prompt_syntax else (str, escape)

        def run(seed):
            s = self._settings(seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                               width=width, height=height, n=n)
            gen = torch.Generator("cpu").manual_seed(s.seed)
            embeds = self.prior_embeds(read(prompt), read(negative_prompt), n, gen,
                                       steps=prior_steps, guidance=prior_guidance,
                                       sampler=prior_sampler)
            return self._tag(self._render(embeds, s, callback, gen, read(prompt)), s,
                             shown(prompt), shown(negative_prompt))
        return run(seed) if best_of == 1 else best_of_n(self, run, read(prompt), seed, n,
                                                        best_of)

    def variations(self, image, n=4, seed=1, steps=None, guidance=None, sampler=None,
                   width=None, height=None, callback=None, caption="auto"):
        """The image's CLIP embedding rendered again with new noise: n PIL images. A decoder
        that reads text also gets `caption`: by default ("auto") the caption CLIP ranks first
        for the image (`describe`), so all the decoder sees still comes from the image through
        CLIP; or a caption of your own; "" gives the image embedding alone (DALL·E 2's)."""
        s = self._settings(seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                           width=width, height=height, n=n)
        z = self.encode_image([image])  # (1, E)
        if caption == "auto":
            caption = self._describe(z, top=1)[0][0] if self.decoder_text else ""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string or \"auto\", got {type(caption).__name__}")
        if caption and not self.decoder_text:
            raise InputError(f"caption {caption!r}: this decoder does not read text; give "
                             f"\"auto\" or \"\"")
        return self._tag(self._render(z.expand(n, -1), s, callback, prompt=caption), s, caption,
                         Task="variations")

    def edit(self, image, source, target, strength=1.0, seed=1, n=1, steps=None,
             guidance=None, sampler=None, width=None, height=None, callback=None):
        """DALL·E 2 text diffs (§3.3), applied directly in CLIP space (not through the
        prior): the image embedding is slerped towards the unit difference of the target's
        and the source caption's text embeddings by theta = 0.5 * strength. `source` "auto":
        the caption CLIP ranks first for the image (`describe`), for callers that have only
        the target (OpenAI's images.edit)."""
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise InputError(f"strength must be in [0, 1], got {strength!r}")
        s = self._settings(seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                           width=width, height=height, n=n)
        z = self.encode_image([image])  # (1, E)
        if source == "auto":
            source = self._describe(z, top=1)[0][0]
        _, emb = self.encode_text([source, target])  # (2, E)
        diff = F.normalize(emb[1:] - emb[:1], dim=-1) * z.norm(dim=-1, keepdim=True)
        edited = slerp(z, diff, EDIT_MAX_THETA * strength)
        return self._tag(self._render(edited.expand(n, -1), s, callback), s, target,
                         Task="edit", **{"Edit from": source, "Edit strength": strength})

    def interpolate(self, a, b, frames=8, seed=1, steps=None, guidance=None, sampler=None,
                    width=None, height=None, callback=None):
        """`frames` images along the slerp from a to b (PIL images, or prompts turned into
        embeddings by the prior), each decoded from the same noise (a fresh generator with
        `seed` per frame, so stochastic samplers' step noise is shared too)."""
        check_int("frames", frames, 2, 64)
        s = self._settings(seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                           width=width, height=height)
        gen = torch.Generator("cpu").manual_seed(s.seed)
        ends = [self.prior_embeds(x, "", 1, gen) if isinstance(x, str) else
                self.encode_image([x]) for x in (a, b)]
        thetas = [i / (frames - 1) for i in range(frames)]
        images = [self._render(slerp(ends[0], ends[1], th), s,
                               _frame_callback(callback, i, frames))[0]
                  for i, th in enumerate(thetas)]
        return self._tag(images, s, Task="interpolate")

    def describe(self, image, candidates=None, top=5, callback=None):
        """The `top` captions most similar to the image under CLIP, as (caption, cosine
        similarity) pairs, most similar first. Default candidates: every shapes caption.
        `callback({"step", "total"})` after each chunk of candidates encoded."""
        return self._describe(self.encode_image([image]), candidates, top, callback)

    @torch.no_grad()
    def _describe(self, embedding, candidates=None, top=5, callback=None):
        """describe() for an image's CLIP embedding (1, E), encoded already."""
        if candidates is None:
            candidates = enumerate_captions()
        candidates = list(candidates)
        if not candidates or not all(isinstance(c, str) for c in candidates):
            raise InputError("candidates must be a non-empty list of strings")
        check_int("top", top, 1, len(candidates))
        text = self._candidate_embeds(candidates, callback)  # (N, E) unit
        img = F.normalize(embedding, dim=-1)  # (1, E)
        scores = (text @ img[0]).tolist()
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])[:top]
        return [(candidates[i], scores[i]) for i in order]

    def _candidate_embeds(self, candidates, callback=None, chunk=256):
        if self._candidates[0] == candidates:  # the default list is encoded once
            return self._candidates[1]
        starts = range(0, len(candidates), chunk)
        embs = []
        for k, i in enumerate(starts):
            embs.append(self.encode_text(candidates[i:i + chunk])[1])
            if callback is not None:
                callback({"step": k, "total": len(starts)})
        embs = torch.cat(embs)
        self._candidates = (candidates, F.normalize(embs, dim=-1))
        return self._candidates[1]


def _frame_callback(callback, frame, frames):
    """A step callback of one frame of `frames` -> the caller's, counting the steps of all
    frames as one run (step, total)."""
    if callback is None:
        return None

    def cb(info):
        return callback({**info, "step": frame * info["total"] + info["step"],
                         "total": frames * info["total"]})
    return cb
