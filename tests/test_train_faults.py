"""Training under faults, through the command line: a run killed with SIGKILL, stopped with
Ctrl-C or SIGTERM, or refused a write (read-only folder, full disk) tells what happened, keeps
its last checkpoint loadable, and resumed ends with the losses of an unbroken run, each step
logged once. Also: a malformed recipe is named, a trial --steps fits a recipe's schedule, and
the progress bar's rate reads below one sample a second."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from nanodiffusion import cli
from nanodiffusion.formats import checkpoint
from nanodiffusion.train import loop as T
from nanodiffusion.train import load_recipe, train
from nanodiffusion.train.vae import VaePart

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
RECIPE = f"""
[common]
data = "shapes"
image_size = 32
[vae]
steps = {STEPS}
batch_size = 4
warmup = 2
log_every = 1
ckpt_every = 4
sample_every = 0
ema_decay = 0.9
[vae.model]
block_channels = [8, 16]
norm_groups = 8
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def unbroken(recipe, tmp_path_factory):
    """The losses of the tiny run, trained in one go."""
    out = tmp_path_factory.mktemp("unbroken")
    return [r["loss"] for r in train(load_recipe(recipe, "vae", out=str(out)), progress=False)]


def _log(out):
    with open(Path(out) / "vae" / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def _saved_step(out):
    path = Path(out) / "vae" / "state.pt"
    return checkpoint.load_state(path)["step"] if path.exists() else 0


def _assert_finished_like(out, unbroken):
    """Every step logged once, in order, with the unbroken run's loss; the files load."""
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == unbroken
    assert _saved_step(out) == STEPS
    checkpoint.load_model(Path(out) / "vae" / "vae.safetensors")


def _start(recipe, out, *extra, preexec=None):
    cmd = [sys.executable, "-m", "nanodiffusion.cli", "train", "vae", "--recipe", str(recipe),
           "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec)


def _finish(proc, timeout=120):
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def _wait_logged(proc, out, step):
    """Wait until the run has logged `step` (or more); returns the last logged step."""
    log = Path(out) / "vae" / "log.jsonl"
    for _ in range(3000):
        lines = log.read_text().split("\n")[:-1] if log.exists() else []  # whole lines
        if lines and json.loads(lines[-1])["step"] >= step:
            return json.loads(lines[-1])["step"]
        assert proc.poll() is None, _finish(proc)[1][-3000:]
        time.sleep(0.01)
    raise AssertionError(f"step {step} not logged in time")


# ---------------------------------------------------------------- SIGKILL, Ctrl-C, SIGTERM

def test_sigkill_three_times_then_resume_is_the_unbroken_run(recipe, unbroken, tmp_path):
    """kill -9 leaves logged steps past the last checkpoint; the resumed run trains them
    again and must not log them twice."""
    out, ahead = tmp_path / "run", []
    for target in (2, 6, 10):  # mid-way between the checkpoints every 4 steps
        proc = _start(recipe, out)
        logged = _wait_logged(proc, out, target)
        proc.kill()
        proc.wait()
        ahead.append(logged - _saved_step(out))
    assert max(ahead) > 0, ahead  # the kills left steps logged that no checkpoint held
    train(load_recipe(recipe, "vae", out=str(out)), progress=False)  # the same run, resumed
    _assert_finished_like(out, unbroken)


def test_ctrl_c_saves_says_so_exits_130_and_resumes(recipe, unbroken, tmp_path):
    out = tmp_path / "run"
    proc = _start(recipe, out)
    _wait_logged(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    rc, err = _finish(proc)
    assert rc == 128 + signal.SIGINT, err[-3000:]
    saved = _saved_step(out)
    assert 3 <= saved < STEPS
    assert f"saved at step {saved}; run the same command to resume" in err
    assert "Traceback" not in err
    train(load_recipe(recipe, "vae", out=str(out)), progress=False)
    _assert_finished_like(out, unbroken)


def test_sigterm_saves_says_so_and_exits_143(recipe, tmp_path, monkeypatch, capsys):
    calls, loss = [0], VaePart.loss

    def signalling_loss(*args):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)
    monkeypatch.setattr(VaePart, "loss", staticmethod(signalling_loss))
    rc = cli.main(["train", "vae", "--recipe", str(recipe), "--out", str(tmp_path)])
    assert rc == 128 + signal.SIGTERM
    assert _saved_step(tmp_path) == 3
    assert "SIGTERM: saved at step 3; run the same command to resume" in capsys.readouterr().err


def test_a_crash_after_logging_unsaved_steps_resumes_without_repeating_them(
        recipe, unbroken, tmp_path, monkeypatch):
    """The kill -9 case made exact: steps 5 and 6 logged, the checkpoint at 4; and a line
    torn by the kill."""
    calls, loss = [0], VaePart.loss

    def crashing_loss(*args):
        calls[0] += 1
        if calls[0] == 7:
            raise MemoryError("killed")
        return loss(*args)
    monkeypatch.setattr(VaePart, "loss", staticmethod(crashing_loss))
    with pytest.raises(MemoryError):
        train(load_recipe(recipe, "vae", out=str(tmp_path)), progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert _saved_step(tmp_path) == 4
    with open(tmp_path / "vae" / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    records = train(load_recipe(recipe, "vae", out=str(tmp_path)), progress=False)
    assert [r["step"] for r in records] == list(range(5, STEPS + 1))
    _assert_finished_like(tmp_path, unbroken)


# ---------------------------------------------------------------- read-only folder, full disk

def _read_only(folder, monkeypatch):
    """Make `folder` read-only. root writes into it all the same, so for root, creating a
    file there fails as it would for anyone else: PermissionError from mkstemp."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    mkstemp = tempfile.mkstemp

    def refusing(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder / "x"))
        return mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", refusing)


class _FullFile:
    """A file that takes 4 kB, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.room = f, 4096

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk(folder, monkeypatch):
    """Every file checkpoint.py opens for writing fills up after 4 kB (torch.save's writer
    then raises its RuntimeError "enforce fail at inline_container.cc")."""
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r", *a, **k: _FullFile(
        open(path, mode, *a, **k)) if "w" in mode else open(path, mode, *a, **k),
        raising=False)


def _one_clear_line(err, run, cause):
    """Whether stderr ends with the one line that names the file (the exported model or the
    training state, whichever was written first), the cause and the checkpoint kept."""
    names = [f"{run / name}" for name in ("vae.safetensors", "state.pt")]
    return err.splitlines()[-1:] in ([f"error: cannot write checkpoint {name}: {cause}; the "
                                      f"last checkpoint (step 4) is intact"] for name in names)


@pytest.mark.parametrize("fault,cause", [(_read_only, "Permission denied"),
                                         (_full_disk, "No space left on device")])
def test_a_failed_checkpoint_write_is_one_clear_line_and_keeps_the_last(
        recipe, unbroken, tmp_path, monkeypatch, capsys, fault, cause):
    run, calls, loss = tmp_path / "vae", [0], VaePart.loss

    def faulting_loss(*args):  # the fault comes during step 6: the save at step 8 fails
        calls[0] += 1
        if calls[0] == 6:
            fault(run, monkeypatch)
        return loss(*args)
    monkeypatch.setattr(VaePart, "loss", staticmethod(faulting_loss))
    try:
        rc = cli.main(["train", "vae", "--recipe", str(recipe), "--out", str(tmp_path)])
    finally:
        run.chmod(0o755)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1
    assert _one_clear_line(err, run, cause), err
    assert _saved_step(tmp_path) == 4
    checkpoint.load_model(run / "vae.safetensors")
    assert not list(run.glob(".*.tmp"))
    train(load_recipe(recipe, "vae", out=str(tmp_path)), progress=False)
    _assert_finished_like(tmp_path, unbroken)


def _file_size_limit(limit):
    def preexec():  # writes past `limit` bytes fail with EFBIG (not a killing SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_real_failed_write_through_torch_save_is_one_clear_line(recipe, tmp_path):
    """The kernel refuses the write (a file size limit, as a full disk would): torch.save's
    RuntimeError becomes the cause, in one line and a non-zero exit."""
    train(load_recipe(recipe, "vae", out=str(tmp_path), steps=4), progress=False)
    size = (tmp_path / "vae" / "state.pt").stat().st_size
    proc = _start(recipe, tmp_path, "--steps", "8", preexec=_file_size_limit(size // 2))
    rc, err = _finish(proc)
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err and "inline_container" not in err
    assert _one_clear_line(err, tmp_path / "vae", "File too large"), err
    assert _saved_step(tmp_path) == 4
    checkpoint.load_model(tmp_path / "vae" / "vae.safetensors")


# ---------------------------------------------------------------- recipes, progress bar

@pytest.mark.parametrize("content", [b"[vae]\nsteps = = 3\n", b"[vae]\nsteps = 3\xff\n"])
def test_a_malformed_recipe_is_named(tmp_path, capsys, content):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    assert cli.main(["train", "unet", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not a readable TOML recipe (")
    assert cli.main(["train", "unet", "--recipe", str(tmp_path / "none.toml")]) == 2
    assert f"error: no recipe file at {tmp_path / 'none.toml'}" in capsys.readouterr().err


def test_a_trial_steps_fits_the_recipe_schedule(tmp_path, capsys):
    shapes = ROOT / "recipes" / "shapes.toml"
    cfg = load_recipe(shapes, "unet", steps=2)
    assert (cfg.steps, cfg.restarts, cfg.warmup) == (2, [], 0)
    assert capsys.readouterr().err == ("note: steps 2 ends before the recipe's 5000: restarts "
                                       "[2000, 3600] -> [], warmup 200 -> 0\n")
    cfg = load_recipe(shapes, "unet", steps=3000)
    assert (cfg.restarts, cfg.warmup) == ([2000], 200)
    assert load_recipe(shapes, "unet", steps=6000).restarts == [2000, 3600]
    # the command line gets past the schedule, to what the part needs (trained clip and vae)
    rc = cli.main(["train", "unet", "--recipe", str(shapes), "--steps", "2", "--out",
                   str(tmp_path)])
    assert rc == 2 and "clip.safetensors not found" in capsys.readouterr().err
    contradicting = tmp_path / "c.toml"
    contradicting.write_text("[unet]\nsteps = 100\nwarmup = 10\nrestarts = [200]\n")
    with pytest.raises(ValueError, match=rf"{contradicting}: restarts must be increasing"):
        load_recipe(contradicting, "unet", steps=50)


class _Bar:
    """A stand-in for tqdm that keeps what the loop shows."""
    shown = []

    def __init__(self, *args, **kwargs):
        pass

    def set_postfix(self, **values):
        self.shown.append(values)

    def update(self, n):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_progress_bar_rate_under_one_sample_a_second(recipe, tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 10))  # every reading 10 s later: 4 samples in 10 s
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr("tqdm.tqdm", _Bar)
    _Bar.shown = []
    records = train(load_recipe(recipe, "vae", out=str(tmp_path), steps=1), progress=True)
    assert records[0]["samples_per_s"] == pytest.approx(0.4)
    assert _Bar.shown[-1]["sps"] == "0.4"
    assert T._rate(0.0123) == "0.0123" and T._rate(57.26) == "57.3" and T._rate(1234.5) == "1234"
