"""Several txt2img requests of a Stable Diffusion Pipeline as one sampler run:
`generate_batch(pipe, requests)`, what the server's worker calls for the jobs that wait
together (serve --max-batch).

Each request keeps what it would have alone: its noise is drawn by its own generator seeded
with its seed, in diffusers' order (the initial latents, then each step's noise:
samplers.Generators), its prompts are encoded as `generate` encodes them, its images are
decoded, tagged and checked on their own, and its callback sees only its rows. Only the UNet
runs on the whole batch. Requests that cannot share a UNet call (another size, steps, sampler,
guidance, eta, guidance_rescale, deepcache, tome, LoRA set, or prompt length in chunks) run as
separate groups of the same call.

Exactness: on CPU the UNet's matrix products (its linear layers and convolutions) round
differently for another batch size (oneDNN picks its kernels by shape), so a batched image
may differ from its single twin in the last bits of the latents, and then by a level in a few
pixel values (DESIGN.md; the server batches only when asked: serve --max-batch).
"""
from dataclasses import dataclass
from itertools import accumulate

import torch

from .. import samplers
from ..diffusion import Denoiser, cfg_denoiser
from .decoders import check_vae_decoder
from .deepcache import check_deepcache
from .lora_tags import take_tags
from .tome import check_tome
from .settings import Request, Settings, resolve
from .sd import Interrupted, Pipeline

# generate()'s keyword arguments a batched request may give (best_of is not one: it ranks
# candidates of one request)
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "width",
          "height", "n", "callback", "preview", "eta", "guidance_rescale", "vae_decoder",
          "clip_skip", "prompt_syntax", "deepcache", "tome")


@dataclass
class Member:
    """One request, checked and encoded: what it runs with and how its run went."""
    text: str  # the prompt as given, LoRA tags included
    negative: str
    req: Request
    settings: Settings
    loras: object  # lora.CallLoras
    embeddings: dict  # its "TI hashes"
    cond: dict  # the UNet's text kwargs, as generate() makes them
    key: tuple  # what must be equal to share a UNet call
    callback: object = None
    stopped: torch.Tensor | None = None  # its denoised rows when its callback interrupted it
    error: Exception | None = None


@torch.no_grad()
def generate_batch(pipe, requests):
    """`requests`: dicts of generate()'s keyword arguments (FIELDS) -> for each, in order,
    its list of images, or the exception that ended it (as asyncio.gather's
    return_exceptions): one request's bad input or failed decode never fails the others.
    Each image equals, up to the last bits of the UNet (module docstring), the image
    generate(**request) gives. A request's callback that raises Interrupted stops that
    request (its images: the current estimate, as generate's), any other exception fails it;
    the run stops when no request is left to finish (rows of stopped requests go on being
    computed until then: the samplers keep per-batch state)."""
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"generate_batch takes a Stable Diffusion Pipeline, not "
                        f"{type(pipe).__name__}")
    results, groups = [None] * len(requests), {}
    for i, kw in enumerate(requests):
        try:
            m = _member(pipe, kw)
        except Exception as e:  # noqa: BLE001 - this request's own error; the others run
            results[i] = e
            continue
        groups.setdefault(m.key, []).append((i, m))
    for group in groups.values():
        for (i, _), out in zip(group, _run_group(pipe, [m for _, m in group])):
            results[i] = out
    return results


def _member(pipe, kw):
    """One request checked, its LoRAs read and its prompts encoded, as Pipeline._run does."""
    unknown = set(kw) - set(FIELDS)
    if unknown:
        raise TypeError(f"generate_batch: a request takes {FIELDS}, not {sorted(unknown)}")
    kw = dict(kw)
    prompt, negative = kw.pop("prompt"), kw.pop("negative_prompt", "")
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise TypeError("prompt and negative_prompt must be strings")
    size = kw.pop("width", None), kw.pop("height", None)
    req = Request(**kw)
    s = resolve(pipe.defaults, req, *size, pipe.vae_factor)
    check_vae_decoder(req.vae_decoder, pipe.tiny_decoder)
    samplers.plan(s.sampler, pipe.schedule, s.steps,
                  **({"eta": s.eta} if s.eta is not None else {}))  # its checks
    loras = pipe.use_loras(prompt, req.prompt_syntax)
    embeddings = pipe.use_embeddings([loras.prompt, negative], req.prompt_syntax)
    cond = pipe._conditions(loras.prompt, negative, req.n, s.guidance, req)
    tags = tuple(take_tags(prompt)[1]) if req.prompt_syntax else ()
    shapes = tuple((k, tuple(v.shape[1:])) for k, v in cond.items())
    key = (s.steps, s.guidance, s.sampler, s.width, s.height, s.eta, req.guidance_rescale,
           check_deepcache(req.deepcache), check_tome(req.tome), tags, shapes)
    return Member(prompt, negative, req, s, loras, embeddings, cond, key,
                  pipe._wrap_callback(req.callback, req.preview))


def _run_group(pipe, members):
    """One sampler run over `members` (one key) -> per member its images or its error."""
    try:
        latents = _sample(pipe, members)
    except Exception as e:  # noqa: BLE001 - the run's error is each member's
        return [e] * len(members)
    out, start = [], 0
    for m in members:
        rows = latents[start:start + m.req.n] if m.stopped is None else m.stopped
        start += m.req.n
        if m.error is not None:
            out.append(m.error)
            continue
        try:
            out.append(pipe._tagged(rows, m.settings, m.req, m.negative, m.loras,
                                    m.embeddings))
        except Exception as e:  # noqa: BLE001 - e.g. this member's NaN image
            out.append(e)
    return out


def _sample(pipe, members):
    """The members' latents (sum of n, C, h, w): their noises from their own generators,
    their conditions side by side, one UNet call per step."""
    m0, s = members[0], members[0].settings
    pipe.use_loras(m0.text, m0.req.prompt_syntax)  # the group's LoRAs: another's may be fused
    plan = samplers.plan(s.sampler, pipe.schedule, s.steps,
                         **({"eta": s.eta} if s.eta is not None else {}))
    rows = tuple(m.req.n for m in members)
    gens = tuple(torch.Generator("cpu").manual_seed(m.settings.seed) for m in members)
    f = pipe.vae_factor
    shape = (pipe.latent_channels, s.height // f, s.width // f)
    noise = torch.cat([torch.randn((n, *shape), generator=g) for n, g in zip(rows, gens)])
    embedded = pipe.unet.config.time_cond_proj_dim is not None  # LCM: one branch
    guidance = 1.0 if embedded else s.guidance
    model = pipe._model_fn(None, m0.req)
    denoiser = cfg_denoiser(Denoiser(model, plan.schedule, quantize_t=plan.quantize_t),
                            guidance, m0.req.guidance_rescale)
    with pipe.unet_loop():
        return pipe._sample(plan, denoiser, noise.to(pipe._device), None,
                            samplers.Generators(gens, rows), _dispatch(members, rows), None,
                            _merge([m.cond for m in members], guidance != 1.0))


def _merge(conds, paired):
    """The members' UNet kwargs as one batch. `paired` (guidance on): each is (2n, ...) =
    [uncond; cond], and the batch is [every uncond; every cond] (cfg_denoiser's halves)."""
    out = {}
    for k in conds[0]:
        if paired:
            halves = [c[k].chunk(2) for c in conds]  # each ((n, ...), (n, ...))
            out[k] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[k] = torch.cat([c[k] for c in conds])
    return out


def _dispatch(members, rows):
    """The batch's step callback: each member's own callback with its rows of x and
    denoised; Interrupted from it stops that member, another exception fails it. None when
    no member has a callback."""
    if all(m.callback is None for m in members):
        return None
    bounds = list(zip(accumulate((0,) + rows[:-1]), accumulate(rows)))

    def callback(info):
        for m, (a, b) in zip(members, bounds):
            if m.callback is None or m.stopped is not None or m.error is not None:
                continue
            try:
                m.callback({**info, "x": info["x"][a:b], "denoised": info["denoised"][a:b]})
            except Interrupted:
                m.stopped = info["denoised"][a:b]
            except Exception as e:  # noqa: BLE001 - this member's; the others go on
                m.error = e
        if all(m.stopped is not None or m.error is not None for m in members):
            raise Interrupted  # no member waits for the rest of the run
    return callback
