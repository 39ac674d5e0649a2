"""The dmd part: distribution matching (Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", and its DMD2) fine-tunes a few-step student (the lcm part's
<out>/model-lcm, or `base = ...`) so that its samples at 2-4 steps are the teacher's
distribution, not the blend of the teacher's possible images that a regression onto the
teacher's trajectories (consistency distillation) gives where the student cannot tell which
image the noise leads to (shapes at 2 steps: two objects drawn as three, or merged):

- each sample draws a step count N of `segments` and one of the student's N calls (the lcm/tcd
  timesteps on the solver_steps grid); the calls before it run without gradients from pure
  noise, as the tcd sampler runs them at `eta` (DMD2's backward simulation: the call learns on
  the inputs it gets when sampling), and the call itself gives x, its x0;
- x is noised again at a timestep in [0.02 T, 0.98 T]; there the teacher with classifier-free
  guidance at the sampled scale (the real distribution's score) and the fake network (a copy of
  the teacher that learns, with the plain denoising loss, what the student draws now) each
  predict x0. The student's gradient is the difference of the two, normalised per sample by
  the mean |x - real x0| (DMD's): it moves x towards where the teacher's distribution is
  denser than the student's, which picks one image instead of averaging;
- the fake network learns on every step, the student on every `fake_updates`-th (DMD2's two
  time-scale update), both in the one trained module (DmdPair) with one optimizer: each loss
  reaches only its own network's parameters.

export() writes the student alone to <run>/unet.safetensors and assembles <out>/model-dmd: the
student's model folder (VAE, text encoder, schedule, defaults) with the new UNet."""
import copy

import torch
from torch import nn

from ..diffusion import NoiseSchedule, add_noise, training_targets, x0_and_noise
from ..formats import checkpoint
from ..models.layers import guidance_embedding
from ..pipelines.images import make_grid
from ..samplers import consistency_timesteps
from .common import rand, randn, save_with_unet, source
from .lcm import load_teacher
from .unet import SAMPLE_PROMPTS, UnetPart, frozen_text

T_RANGE = (0.02, 0.98)  # DMD's range of the timestep the two scores are compared at


class DmdPair(nn.Module):
    """The trained module: the student and the fake score network."""

    def __init__(self, student, fake):
        super().__init__()
        self.student, self.fake = student, fake


def student_path(cfg):
    return cfg.base or str(cfg.out_path("model-lcm"))


def load_student(cfg, device):
    from ..loading import load_pipeline, model_kind

    path = student_path(cfg)
    if model_kind(path) != "sd":
        raise ValueError(f"student {path!r} is an unCLIP model; dmd fine-tunes a Stable "
                         "Diffusion model (kind sd)")
    pipe = load_pipeline(path, device=device)
    if pipe.unet.config.time_cond_proj_dim is None:
        raise ValueError(f"student {path!r} has no guidance embedding (time_cond_proj_dim); "
                         "dmd fine-tunes a few-step model: train lcm first, or give one as base")
    return pipe


class DmdPart:
    @staticmethod
    def build(cfg, device):
        if not cfg.segments:
            raise ValueError("dmd needs segments = [N, ...]: the step counts the student "
                             "learns to sample with")
        if cfg.model:
            raise ValueError(f"dmd model settings {sorted(cfg.model)} follow from the student; "
                             "remove them from the recipe")
        teacher = load_teacher(cfg, device)
        student = load_student(cfg, device)
        if teacher.schedule_config.prediction_type != student.schedule_config.prediction_type:
            raise ValueError("the teacher and the student predict different things "
                             f"({teacher.schedule_config.prediction_type} and "
                             f"{student.schedule_config.prediction_type})")
        fake = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        for m in (teacher.unet, teacher.vae, teacher.text_encoder):
            m.requires_grad_(False)
        model = DmdPair(student.unet.requires_grad_(True).train(), fake)
        schedule = NoiseSchedule(student.schedule_config)
        T = schedule.num_train_timesteps
        frozen = {"source": source(cfg)[0], "pipe": teacher,
                  "student_pipe": student, "teacher": teacher.unet, "vae": teacher.vae,
                  "text": teacher.text_encoder, "clip": teacher.clip,
                  "tokenizer": teacher.tokenizer, "schedule": schedule, "cache": {},
                  "timesteps": [consistency_timesteps(T, n, cfg.solver_steps)
                                for n in cfg.segments]}
        return model, frozen

    batch = staticmethod(UnetPart.batch)  # the captions (and latents, unused) of the data

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        pair = checkpoint.unwrap(model)
        student, fake, teacher = pair.student, pair.fake, frozen["teacher"]
        schedule, kind = frozen["schedule"], frozen["pipe"].schedule_config.prediction_type
        enc, captions = batch
        device, B = enc["mean"].device, len(captions)
        learns = (frozen["step"] + 1) % cfg.fake_updates == 0  # the loop's step: resumable
        lo, hi = cfg.guidance_range
        guidance = lo + (hi - lo) * rand(gens, device)
        w_emb = guidance_embedding(guidance - 1, student.config.time_cond_proj_dim).to(device)
        context, pooled, _ = frozen_text(frozen, captions)
        text = student.text_condition(context, pooled)

        def x0_of(net, x, t, **kw):
            return x0_and_noise(schedule, net(x, t, **kw), x, t, kind)

        # the student's inputs at the call each sample learns, from its earlier calls
        x = randn(gens, enc["mean"].shape[1:], device)  # noise: the first call's input (VP)
        pick = (rand(gens, device) * len(cfg.segments)).long().clamp(max=len(cfg.segments) - 1)
        calls = torch.tensor([len(frozen["timesteps"][p]) for p in pick.tolist()])
        k = (rand(gens, device) * calls).long().clamp(max=calls - 1)
        ts = [frozen["timesteps"][p] + [0] for p in pick.tolist()]
        with torch.no_grad():
            for j in range(int(k.max())):  # a row past its end is masked below anyway
                t = torch.tensor([row[min(j, len(row) - 1)] for row in ts], device=device)
                nxt = torch.tensor([row[min(j + 1, len(row) - 1)] for row in ts],
                                   device=device)
                x0, eps = x0_of(student, x, t, timestep_cond=w_emb, **text)
                stepped = tcd_step(schedule, x0, eps, nxt, cfg.eta,
                                   randn(gens, x.shape[1:], device))
                x = torch.where((k > j).reshape(-1, 1, 1, 1), stepped, x)
        t = torch.tensor([row[int(i)] for row, i in zip(ts, k)], device=device)
        with torch.set_grad_enabled(learns):
            sample = x0_of(student, x, t, timestep_cond=w_emb, **text)[0]
        # the two scores at a noised sample
        T = schedule.num_train_timesteps
        tau = (T_RANGE[0] + (T_RANGE[1] - T_RANGE[0]) * rand(gens, device)) * T
        tau = tau.long()
        noise = randn(gens, sample.shape[1:], device)
        with torch.no_grad():
            x_tau = add_noise(schedule, sample.detach(), noise, tau)
            both = frozen_text(frozen, [""] * B + list(captions))
            x0 = x0_of(teacher, torch.cat([x_tau, x_tau]), torch.cat([tau, tau]),
                       **teacher.text_condition(both[0], both[1]))[0]
            uncond, cond = x0.chunk(2)
            real = uncond + guidance.reshape(-1, 1, 1, 1) * (cond - uncond)
            faked = x0_of(fake, x_tau, tau, **teacher.text_condition(context, pooled))[0]
            norm = (sample - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
            grad = (faked - real) / norm
        # 0.5 |x - sg(x - grad)|^2: its gradient in x is grad
        dmd = 0.5 * ((sample - (sample - grad).detach()) ** 2).mean() if learns else \
            torch.zeros((), device=device)
        # the fake network: the denoising loss on what the student drew
        t_f = (rand(gens, device) * T).long().clamp(max=T - 1)
        x_t, target = training_targets(schedule, sample.detach(), randn(gens, sample.shape[1:],
                                                                        device), t_f, kind)
        denoise = ((fake(x_t, t_f, **teacher.text_condition(context, pooled)).float()
                    - target.float()) ** 2).mean()
        return dmd + denoise, {"dmd_grad": float(grad.abs().mean()),
                              "fake": float(denoise.detach())}

    @staticmethod
    def export(cfg, model, ema):
        pair = checkpoint.unwrap(model)
        if ema is not None:  # the EMA's student half
            live = {k: v.clone() for k, v in pair.state_dict().items()}
            pair.load_state_dict(ema, strict=True)
        try:
            checkpoint.save_model(pair.student, cfg.run_dir / "unet.safetensors")
        finally:
            if ema is not None:
                pair.load_state_dict(live, strict=True)
        assemble_model(cfg, None)

    @staticmethod
    def sample(cfg, model, frozen, path):
        from ..pipelines.sd import Pipeline

        student = checkpoint.unwrap(model).student
        student.eval()
        try:
            base = frozen["student_pipe"]
            pipe = Pipeline(student, base.vae, base.text_encoder, base.tokenizer,
                            base.schedule_config, defaults=base.defaults, clip=base.clip,
                            name="dmd")
            images = [pipe.generate(p, seed=i, steps=min(cfg.segments))[0]
                      for i, p in enumerate(SAMPLE_PROMPTS)]
            make_grid(images, rows=2).save(path)
        finally:
            student.train()


def tcd_step(schedule, x0, eps, nxt, eta, z):
    """The tcd sampler's step in VP scaling (samplers.sample_tcd): the DDIM step to the lower
    timestep floor((1 - eta) nxt), then fresh noise z back up to nxt; x0 itself at nxt = 0."""
    low = torch.floor((1 - eta) * nxt.float()).long()
    a = schedule.alphas_cumprod.to(x0.device)
    a_low, a_nxt = a[low].reshape(-1, 1, 1, 1), a[nxt].reshape(-1, 1, 1, 1)
    x = a_low**0.5 * x0 + (1 - a_low) ** 0.5 * eps
    r = a_nxt / a_low
    x = r**0.5 * x + (1 - r) ** 0.5 * z
    return torch.where((nxt == 0).reshape(-1, 1, 1, 1), x0, x)


def assemble_model(cfg, pipe):
    """<out>/model-dmd: the student's model folder (its name too) with the fine-tuned UNet."""
    save_with_unet(pipe or load_student(cfg, "cpu"), cfg.out_path("model-dmd"),
                   cfg.run_dir / "unet.safetensors")
