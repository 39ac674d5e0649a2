"""Every `nanodiffusion` command the README shows, run as the user runs it (a subprocess of
the installed command) in a fresh folder, with the bundled models and tiny stand-ins for the
checkpoints a user would download. The commands are read from the README itself, so the
README cannot drift from what works. Plus the faults of the CLI's own doors."""
import base64
import errno
import io
import re
import shlex
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny_sd
from front_door import run_cli, served
from nanodiffusion import cli, pnginfo
from nanodiffusion.data import shapes

README = Path(__file__).parents[1] / "README.md"
SECTIONS = ("# nanodiffusion", "## Generate", "## unCLIP (DALL·E 2)")


def readme_commands():
    """The `nanodiffusion ...` lines of the README's bash blocks in SECTIONS (continuation
    lines joined, comments dropped), in order."""
    text, out = README.read_text(), []
    for section in re.split(r"\n(?=#{1,2} )", text):
        if not section.startswith(SECTIONS):
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if ".venv/bin/nanodiffusion " in line:
                    line = "nanodiffusion " + line.split(".venv/bin/nanodiffusion ", 1)[1]
                if line.startswith("nanodiffusion "):
                    out.append(shlex.split(line)[1:])
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh folder with what the README's commands read: shapes images and tiny stand-ins
    for the SD 1.5 and SD 2.1 (v-prediction) checkpoints."""
    root = tmp_path_factory.mktemp("readme")
    for i, name in enumerate(("in.png", "photo.png", "a.png", "b.png")):
        shapes.sample(i, split="eval")[0].save(root / name)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(root / "mask.png")
    models = root / "models"
    stand_ins = {"v1-5-pruned-emaonly.safetensors": tiny_sd.build(models / "eps"),
                 "v2-1_768-ema-pruned.safetensors": tiny_sd.build(models / "v", prediction_type=
                                                                  "v_prediction")}
    return root, {k: str(v.folder) for k, v in stand_ins.items()}


def test_readme_shows_the_commands_it_should():
    commands = {c[0] for c in readme_commands()}
    assert {"generate", "img2img", "inpaint", "info", "export", "vary", "edit", "interpolate",
            "describe"} <= commands


def _for_stand_in(argv, stand_ins):
    """argv with a downloaded checkpoint's name replaced by its tiny stand-in, and then the
    sizes meant for it (512, 768) by 64: the stand-ins are for the doors, not for time."""
    if not any(a in stand_ins for a in argv):
        return argv
    return [stand_ins.get(a, "64" if a in ("512", "768") else a) for a in argv]


def test_every_readme_command_runs(workdir):
    root, stand_ins = workdir
    for argv in readme_commands():
        argv = _for_stand_in(argv, stand_ins)
        t = time.time()
        r = run_cli(*argv, cwd=root)
        print(f"{time.time() - t:5.1f} s  nanodiffusion {shlex.join(argv)}")
        assert r.returncode == 0, f"nanodiffusion {shlex.join(argv)}:\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, r.stderr
        for path in re.findall(r"^(\S+\.png)$", r.stdout, re.M):
            assert Image.open(root / path).size[0] >= 32, path
    for name in ("out.png", "star-1.png", "star-4.png", "star-grid.png", "cat-1.png",
                 "cat-2.png", "l.png", "fast.png", "c-steps.png", "variations-4.png",
                 "edit.png", "morph.png"):
        assert (root / name).is_file(), name
    assert Image.open(root / "cat-1.png").size == (64, 64)
    assert "Negative prompt: blurry" in pnginfo.read_parameters(root / "cat-1.png")
    assert (root / "exported" / "model_index.json").is_file()


def test_help_describes_every_setting():
    r = run_cli("generate", "--help", env={"COLUMNS": "1000"})  # no wrapping
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for option in ("--seed", "--steps", "--guidance", "--sampler", "--width", "--prediction-type"):
        assert re.search(re.escape(option) + r" \S+ [a-z(]", text), option
    from nanodiffusion.samplers import SAMPLER_NAMES

    listed = re.search(r"--sampler SAMPLER (.*?)\(default", text).group(1)
    assert re.findall(r"[a-z0-9-]+(?=,| or )|(?<=or )[a-z0-9-]+", listed) == SAMPLER_NAMES
    r = run_cli("img2img", "--help")
    assert "(default 0.6)" in " ".join(r.stdout.split()) and "init image" in r.stdout


def test_out_that_cannot_be_written_fails_before_generating(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_cli("generate", "a red circle", "--out", tmp_path / "afile" / "o.png")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'afile'} is a file, not a folder" in r.stderr


def test_images_are_kept_when_out_fails_after_generating(tmp_path, monkeypatch, capsys):
    """The folder was writable when the command started and fails when the images are done
    (disk full, read-only remount): they are saved in a temporary folder, and said so."""
    real = pnginfo.save_png

    def failing(image, path):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(image, path)
    monkeypatch.setattr(pnginfo, "save_png", failing)
    temp = tmp_path / "temp"  # the temporary folder's root here, not the real /tmp
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    rc = cli.main(["generate", "a red circle", "--steps", "2", "-n", "2",
                   "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "Read-only file system" in err
    rescue = Path(re.search(r"saved in (\S+) instead", err).group(1))
    assert rescue.parent == temp
    saved = sorted(p.name for p in rescue.iterdir())
    assert saved == ["o-1.png", "o-2.png"]
    assert "Steps: 2" in real.__globals__["read_parameters"](rescue / "o-1.png")


def test_non_model_files_are_named(tmp_path):
    garbage, other = tmp_path / "notes.safetensors", tmp_path / "classifier.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    save_file({"fc.weight": torch.zeros(2, 2)}, other)  # a real file, not Stable Diffusion
    for bad in (garbage, other):
        r = run_cli("generate", "x", "--model", bad, "--out", tmp_path / "o.png")
        assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_prediction_type_of_a_single_file_from_the_cli_and_serve(workdir, tmp_path):
    """--prediction-type overrides what a single file is taken to predict, in `generate` and in
    `serve` (the file here records v_prediction: an export of the v stand-in)."""
    root, stand_ins = workdir
    models = tmp_path / "models"
    models.mkdir()
    single = models / "v2.safetensors"
    r = run_cli("export", stand_ins["v2-1_768-ema-pruned.safetensors"], single,
                "--format", "single-file")
    assert r.returncode == 0, r.stderr
    pixels = {}
    for kind in (None, "v_prediction", "epsilon"):
        out = tmp_path / f"{kind}.png"
        flag = ("--prediction-type", kind) if kind else ()
        r = run_cli("generate", "a cat", "--model", single, "--seed", 1, "--steps", 3,
                    "--width", 64, "--height", 64, "--out", out, *flag)
        assert r.returncode == 0, r.stderr
        pixels[kind] = Image.open(out).convert("RGB").tobytes()
    assert pixels[None] == pixels["v_prediction"] != pixels["epsilon"]
    with served("--models-dir", models, "--prediction-type", "epsilon") as (url, _):
        r = httpx.post(url + "/v1/images/generations", timeout=120, json={
            "model": "v2", "prompt": "a cat", "seed": 1, "steps": 3, "size": "64x64"})
        assert r.status_code == 200, r.text
    served_pixels = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert served_pixels.convert("RGB").tobytes() == pixels["epsilon"]
