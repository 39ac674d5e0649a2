"""The lcm part: latent consistency distillation (Luo et al. 2023, "Latent Consistency
Models"). A teacher model (the run's assembled <out>/model, or `teacher = ...`) is distilled
into a student UNet that generates in 1-4 steps, with the `lcm` sampler (a multistep student,
`segments` below, with `tcd`):

- the student starts as the teacher's UNet plus LCM's guidance projection (`cond_proj`, zero at
  the start, so the student begins as the teacher), and learns the guidance scale as an input
  (layers.guidance_embedding of w = guidance - 1) instead of running two branches;
- each sample draws a point t of a DDIM grid (solver_steps points, T / solver_steps apart) and a
  guidance scale in guidance_range; the teacher, with classifier-free guidance at that scale,
  takes one DDIM step from x_t to x_s, s = t - T / solver_steps;
- the loss is the pseudo-Huber distance between the student's consistency function at (x_t, t)
  and the target network's at (x_s, s), each c_skip x + c_out x0_pred (diffusion.lcm_boundary),
  which is x itself at s = 0. The target network is the loop's EMA of the student (ema_decay =
  0.95 in the recipe, LCM's), so it is checkpointed and resumed with the run, and the EMA is what
  is exported, as LCM releases its target network;
- with `segments = [N, ...]` (multistep consistency, as Heek et al. 2024 and TCD's trajectory
  consistency) a point is made consistent not with t = 0 but with the timestep an N-step
  lcm/tcd schedule goes to next below it (N drawn per sample), through the DDIM step of the
  network's output to that timestep (x itself at it: no c_skip needed). Each point then chains
  to its segment's end over solver_steps / N teacher steps, not to 0 over solver_steps, and the
  student is sampled by tcd between the same timesteps (at eta 0 deterministic DDIM steps;
  the recipe's `eta` is the exported model's default).

export() assembles <out>/model-lcm: the student UNet with the teacher's VAE, text encoder and
tokenizer, the teacher's schedule with original_inference_steps = solver_steps (the lcm sampler
picks its timesteps from the grid the student learned), and 4-step lcm defaults (a multistep
student's: its largest N of tcd at the recipe's eta)."""
import dataclasses

import torch

from ..diffusion import NoiseSchedule, add_noise, lcm_boundary, x0_and_noise
from ..formats import checkpoint
from ..formats.ours import save_folder
from ..models.layers import guidance_embedding
from ..models.unet import UNet
from ..pipelines.images import make_grid
from ..pipelines.sd import Pipeline
from ..samplers import consistency_timesteps
from .common import rand, randn, save_ema, source
from .unet import SAMPLE_PROMPTS, UnetPart, frozen_text, latents_of

GUIDANCE_DIM = 256  # LCM's width of the guidance embedding (time_cond_proj_dim)
STEPS = 4           # the assembled model's default number of steps


def teacher_path(cfg):
    return cfg.teacher or str(cfg.out_path("model"))


def load_teacher(cfg, device):
    """The teacher pipeline, opened through the one door (any format the loader reads)."""
    from ..loading import load_pipeline

    pipe = load_pipeline(teacher_path(cfg), device=device)
    if not isinstance(pipe, Pipeline):
        raise ValueError(f"teacher {teacher_path(cfg)!r} is an unCLIP model; lcm distils a "
                         "Stable Diffusion model (kind sd)")
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"teacher {teacher_path(cfg)!r} already embeds the guidance scale "
                         "(an LCM model); distil its own teacher instead")
    return pipe


def student_from(teacher_unet, model_overrides):
    """The teacher's UNet with LCM's guidance projection, zero at the start."""
    other = sorted(set(model_overrides) - {"time_cond_proj_dim"})
    if other:
        raise ValueError(f"lcm model settings {other} follow from the teacher's UNet; only "
                         "time_cond_proj_dim (the guidance embedding's width) can be set")
    dim = model_overrides.get("time_cond_proj_dim", GUIDANCE_DIM)
    student = UNet(dataclasses.replace(teacher_unet.config, time_cond_proj_dim=dim))
    student.to(next(teacher_unet.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing,
                                                                               unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


class LcmPart:
    @staticmethod
    def build(cfg, device):
        pipe = load_teacher(cfg, device)
        if cfg.image_size % pipe.vae_factor:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of the teacher's "
                             f"VAE factor {pipe.vae_factor}")
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
        student = student_from(pipe.unet, cfg.model)
        target = student_from(pipe.unet, cfg.model).requires_grad_(False)
        frozen = {"source": source(cfg)[0], "pipe": pipe, "teacher": pipe.unet, "vae": pipe.vae,
                  "text": pipe.text_encoder, "clip": pipe.clip, "tokenizer": pipe.tokenizer,
                  "schedule": NoiseSchedule(pipe.schedule_config), "cache": {},
                  "target": target}
        if cfg.segments:  # the same table every step
            frozen["segment_ends"] = segment_ends(frozen["schedule"].num_train_timesteps,
                                                  cfg.segments, cfg.solver_steps).to(device)
        return student, frozen

    batch = staticmethod(UnetPart.batch)  # the same frozen VAE latents, pooled

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        enc, captions = batch
        device = enc["mean"].device
        schedule, kind = frozen["schedule"], frozen["pipe"].schedule_config.prediction_type
        x0 = latents_of(frozen["vae"], enc, gens)
        B, T = x0.shape[0], schedule.num_train_timesteps
        gap = T // cfg.solver_steps
        # a point of the DDIM grid gap-1, 2 gap-1, ..., T-1, and the one before it (0 at the end)
        idx = (rand(gens, device) * cfg.solver_steps).long().clamp(max=cfg.solver_steps - 1)
        t = (idx + 1) * gap - 1
        s = (t - gap).clamp(min=0)
        lo, hi = cfg.guidance_range
        guidance = lo + (hi - lo) * rand(gens, device)  # (B,)
        w_emb = guidance_embedding(guidance - 1, model_cond_dim(model)).to(device)
        noise = randn(gens, x0.shape[1:], device)
        x_t = add_noise(schedule, x0, noise, t)
        context, pooled, _ = frozen_text(frozen, captions)
        text = checkpoint.unwrap(model).text_condition(context, pooled)

        if cfg.segments:  # multistep: the next timestep below t of an N-step schedule
            ends = frozen["segment_ends"]
            pick = (rand(gens, device) * len(cfg.segments)).long().clamp(max=ends.shape[0] - 1)
            end = ends[pick, idx]

            def consistency(net_out, x, at):
                return _ddim_to(schedule, net_out, x, at, end, kind)
        else:  # LCM: c_skip x + c_out x0, which is x itself at t = 0
            def consistency(net_out, x, at):
                c_skip, c_out = (_bcast(c, x0) for c in lcm_boundary(at.cpu()))
                return c_skip * x + c_out * x0_and_noise(schedule, net_out, x, at, kind)[0]
        pred = consistency(model(x_t, t, timestep_cond=w_emb, **text), x_t, t)

        with torch.no_grad():
            x_s = _teacher_step(frozen, schedule, kind, x_t, t, s, guidance, captions)
            target = _target_model(frozen, model)
            goal = consistency(target(x_s, s, timestep_cond=w_emb, **text), x_s, s)
        diff = (pred.float() - goal.float()).reshape(B, -1)
        if cfg.huber_c > 0:  # pseudo-Huber per element, LCM's choice over MSE
            per = ((diff**2 + cfg.huber_c**2).sqrt() - cfg.huber_c).mean(dim=1)
        else:
            per = (diff**2).mean(dim=1)
        return per.mean(), {"guidance": float(guidance.mean())}

    @staticmethod
    def export(cfg, model, ema):
        save_ema(model, ema, cfg.run_dir / "unet.safetensors")
        assemble_model(cfg, None)

    @staticmethod
    def sample(cfg, model, frozen, path):
        model.eval()
        try:
            pipe = frozen["pipe"]
            student = Pipeline(model, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                               lcm_schedule(cfg, pipe), defaults=lcm_defaults(cfg, pipe),
                               clip=pipe.clip, name="lcm")
            images = [student.generate(p, seed=i)[0] for i, p in enumerate(SAMPLE_PROMPTS)]
            make_grid(images, rows=2).save(path)
        finally:
            model.train()


def model_cond_dim(model):
    return checkpoint.unwrap(model).config.time_cond_proj_dim


def segment_ends(T, segments, solver_steps):
    """(len(segments), solver_steps) long: for each step count N and each point of the grid
    (point i is timestep (i + 1) T / solver_steps - 1), the timestep an N-step lcm/tcd schedule
    on that grid goes to next from the interval holding the point: the largest of its later
    timesteps (0 after the last) below the point."""
    gap = T // solver_steps
    points = torch.arange(1, solver_steps + 1) * gap - 1
    rows = []
    for n in segments:
        nxt = torch.tensor(consistency_timesteps(T, n, solver_steps)[1:] + [0])
        rows.append(torch.where(nxt[None, :] < points[:, None], nxt[None, :], -1).amax(1))
    return torch.stack(rows)


def _ddim_to(schedule, out, x, t, end, kind):
    """The DDIM step of a model output `out` at (x, t) to timestep `end`, divided by
    sqrt(a_end) (x0 + sigma_end noise: at end = 0 nearly x0, and the scale of x0 at every
    end); x itself (so divided) where end == t."""
    x0, eps = x0_and_noise(schedule, out, x, t, kind)
    a = _bcast(schedule.alphas_cumprod[end.cpu()], x)
    return x0 + ((1 - a) / a) ** 0.5 * eps


def _bcast(v, x):
    return v.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _teacher_step(frozen, schedule, kind, x_t, t, s, guidance, captions):
    """One DDIM step of the guided teacher from x_t at t to s (VP scaling): x0 and noise each
    guided as uncond + g (cond - uncond), then sqrt(a_s) x0 + sqrt(1 - a_s) noise."""
    B = x_t.shape[0]
    context, pooled, _ = frozen_text(frozen, [""] * B + list(captions))
    text = frozen["teacher"].text_condition(context, pooled)
    out = frozen["teacher"](torch.cat([x_t, x_t]), torch.cat([t, t]), **text)
    x0, eps = x0_and_noise(schedule, out, torch.cat([x_t, x_t]), torch.cat([t, t]), kind)
    g = _bcast(guidance, x_t)
    (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
    x0, eps = x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)
    a_s = _bcast(schedule.alphas_cumprod[s.cpu()], x_t)
    return a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps


def _target_model(frozen, model):
    """The target network: the loop's EMA of the student (frozen["ema"], set by the loop)
    loaded into a copy of the student; the student itself when the run has no EMA."""
    ema = frozen.get("ema")
    if ema is None:
        return checkpoint.unwrap(model)
    target = frozen["target"]
    target.load_state_dict(ema.params, strict=True)
    return target


def lcm_defaults(cfg, pipe):
    """4 steps at the middle of the guidance range the student learned (shapes: range [2, 6],
    guidance 4; its LCM eval at 4 steps, guidance 3 / 4 / 5: pairs 82.0 / 86.0 / 81.0), with
    the lcm sampler, or for a multistep student tcd at the recipe's eta (0: deterministic DDIM
    steps between its timesteps; shapes [2, 4] at 4 steps, eta 0 / 0.3 / 0.5 / 0.7: pairs
    86.5 / 90.0 / 91.5 / 90.5), the steps it learned (its largest segments count)."""
    lo, hi = cfg.guidance_range
    if cfg.segments:
        return dataclasses.replace(pipe.defaults, steps=max(cfg.segments),
                                   guidance=(lo + hi) / 2, sampler="tcd", eta=cfg.eta)
    return dataclasses.replace(pipe.defaults, steps=STEPS, guidance=(lo + hi) / 2,
                               sampler="lcm")


def lcm_schedule(cfg, pipe):
    """The teacher's schedule, whose lcm timesteps come from the grid the student learned
    (original_inference_steps = solver_steps, as LCMScheduler's option)."""
    return dataclasses.replace(pipe.schedule_config, original_inference_steps=cfg.solver_steps)


def assemble_model(cfg, pipe):
    """<out>/model-lcm: the distilled UNet with the teacher's other parts."""
    pipe = pipe or load_teacher(cfg, "cpu")
    save_folder(cfg.out_path("model-lcm"), unet=cfg.run_dir / "unet.safetensors", vae=pipe.vae,
                clip=pipe.clip, text_encoder=None if pipe.clip is not None else
                pipe.text_encoder, tokenizer=pipe.tokenizer, schedule=lcm_schedule(cfg, pipe),
                defaults=lcm_defaults(cfg, pipe), name=f"{pipe.name}-lcm")
