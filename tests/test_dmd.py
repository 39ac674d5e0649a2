"""The dmd part (train/dmd.py): distribution matching of a few-step student on tiny models."""
import json
import math

import pytest
import torch

import tiny_sd  # noqa: E402
import nanodiffusion  # noqa: E402
from nanodiffusion.diffusion import NoiseSchedule, ScheduleConfig  # noqa: E402
from nanodiffusion.formats import checkpoint  # noqa: E402
from nanodiffusion.samplers import sample_tcd  # noqa: E402
from nanodiffusion.train import TrainConfig, train  # noqa: E402
from nanodiffusion.train import loop as T  # noqa: E402
from nanodiffusion.train.dmd import tcd_step  # noqa: E402


@pytest.mark.parametrize("t, nxt, eta", [(499, 249, 0.5), (999, 749, 0.3), (749, 499, 0.0)])
def test_the_simulated_calls_take_the_tcd_samplers_step(t, nxt, eta):
    """tcd_step (VP scaling) is one step of samplers.sample_tcd (sigma scaling) from the same
    x0 and noise estimates, with the same fresh noise."""
    schedule = NoiseSchedule(ScheduleConfig())
    a = schedule.alphas_cumprod
    sig = ((1 - a) / a) ** 0.5
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    low = math.floor((1 - eta) * nxt)
    seen = []
    sample_tcd(lambda x, s: x0, x0 + sig[t] * eps, torch.tensor([sig[t], sig[nxt], 0.0]),
               generator=torch.Generator().manual_seed(5), eta=eta,
               low_sigmas=[float(sig[low]), 0.0],
               post_step=lambda i, x, s: seen.append(x.clone()) or x)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    ours = tcd_step(schedule, x0, eps, torch.tensor([nxt, nxt]), eta, z)
    torch.testing.assert_close(ours / a[nxt] ** 0.5, seen[0], atol=1e-5, rtol=1e-5)


def _cfg(tmp_path, teacher, student, **kw):
    return TrainConfig(**{**dict(
        part="dmd", out=str(tmp_path / "run"), teacher=str(teacher), base=str(student),
        image_size=32, steps=40, batch_size=4, lr=3e-3, warmup=2, log_every=1,
        ckpt_every=1000, sample_every=0, ema_decay=0.0, solver_steps=10, segments=[2, 4],
        eta=0.5, guidance_range=(2.0, 6.0), adam_betas=(0.0, 0.99)), **kw})


def test_dmd_trains_the_student_and_its_folder_generates(tmp_path, monkeypatch):
    """A tiny plain teacher and a tiny LCM student, one batch with the same draws at every step:
    the fake network's denoising loss falls,
    only the student's UNet is exported, into a folder with the student's other parts and
    defaults that generates; the student's and the teacher's files are left as they were."""
    teacher = tiny_sd.build(tmp_path / "teacher")
    student = tiny_sd.build(tmp_path / "student", time_cond_proj_dim=16)
    before = {k: v.clone() for k, v in student.ours.unet.state_dict().items()}
    monkeypatch.setattr(T, "chunk_indices", tiny_sd.fixed_indices)  # one batch, the same draws
    monkeypatch.setattr(T, "sample_generators", lambda cfg, step, indices: [
        torch.Generator().manual_seed(int(i)) for i in indices])
    records = train(_cfg(tmp_path, teacher.folder, student.folder), progress=False)
    fake = [r["fake"] for r in records]
    assert len(records) == 40 and all(math.isfinite(r["loss"]) for r in records)
    assert sum(fake[-10:]) / 10 < 0.92 * sum(fake[:10]) / 10, fake  # 1.05 -> 0.93 here
    assert all(r["dmd_grad"] > 0 for r in records)

    state = checkpoint.load_state(tmp_path / "run" / "dmd" / "state.pt")["model"]
    folder = tmp_path / "run" / "model-dmd"
    out = nanodiffusion.load(folder)
    changed = False
    for k, v in out.unet.state_dict().items():
        assert torch.equal(v, state["student." + k]), k  # the student half, exported
        changed |= not torch.equal(v, before[k])
    assert changed
    assert out.defaults == student.ours.defaults
    assert out.unet.config.time_cond_proj_dim == 16
    for k, v in student.ours.vae.state_dict().items():
        assert torch.equal(v, out.vae.state_dict()[k]), k
    again = nanodiffusion.load(student.folder)  # the base is never written
    for k, v in again.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    image = out.generate("a red circle", seed=1, steps=2, width=32, height=32)[0]
    assert image.size == (32, 32)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["name"] == student.ours.name


def test_dmd_refuses_a_student_without_a_guidance_embedding(tmp_path):
    plain = tiny_sd.build(tmp_path / "plain")
    with pytest.raises(ValueError, match="no guidance embedding"):
        train(_cfg(tmp_path, plain.folder, plain.folder, steps=1), progress=False)


def test_dmd_needs_the_step_counts_it_learns(tmp_path):
    plain = tiny_sd.build(tmp_path / "plain")
    student = tiny_sd.build(tmp_path / "student", time_cond_proj_dim=16)
    with pytest.raises(ValueError, match="needs segments"):
        train(_cfg(tmp_path, plain.folder, student.folder, steps=1, segments=[], eta=0.0),
              progress=False)


def test_a_resumed_run_updates_the_student_on_the_same_steps(tmp_path):
    """Stopped after an odd number of steps and resumed, the run ends with the weights of an
    unbroken one: the steps that update the student follow the loop's step, not a count of
    calls since the start (which made the resumed run's first step skip the student)."""
    teacher = tiny_sd.build(tmp_path / "teacher")
    student = tiny_sd.build(tmp_path / "student", time_cond_proj_dim=16)

    def run(name, *steps):
        for n in steps:
            train(_cfg(tmp_path / name, teacher.folder, student.folder, steps=n, warmup=1,
                       min_lr_ratio=1.0, ckpt_every=1), progress=False)
        return checkpoint.load_state(tmp_path / name / "run" / "dmd" / "state.pt")["model"]

    whole, resumed = run("whole", 4), run("resumed", 3, 4)
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k
