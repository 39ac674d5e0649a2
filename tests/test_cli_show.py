"""The CLI shows its work: `nanodiffusion info` reads back the parameters PNGs carry, and
`--save-steps K` writes the strip of decoded estimates, on the bundled shapes model."""
import json

import numpy as np
import pytest
from PIL import Image

from nanodiffusion import cli, pnginfo

PARAMS = dict(prompt="a red circle", negative_prompt="blurry", steps=20, sampler="dpmpp-2m",
              guidance=3.0, seed=42, width=64, height=64, model="shapes")


def _png(path, parameters=None):
    im = Image.new("RGB", (8, 8), "red")
    if parameters is not None:
        im.info["parameters"] = parameters
    pnginfo.save_png(im, path)
    return str(path)


def test_info_prints_the_parameters(tmp_path, capsys):
    text = pnginfo.format_parameters(PARAMS)
    path = _png(tmp_path / "a.png", text)
    assert cli.main(["info", path]) == 0
    assert capsys.readouterr().out.strip() == text
    assert cli.main(["info", "--json", path]) == 0
    (p,) = json.loads(capsys.readouterr().out)
    assert (p["file"], p["prompt"], p["negative_prompt"]) == (path, "a red circle", "blurry")
    assert (p["Seed"], p["Steps"], p["Sampler"], p["Size"]) == ("42", "20", "DPM++ 2M", "64x64")


def test_info_on_files_without_parameters_or_unreadable(tmp_path, capsys):
    good = _png(tmp_path / "good.png", pnginfo.format_parameters(PARAMS))
    plain = _png(tmp_path / "plain.png")
    assert cli.main(["info", plain]) == 1
    assert "plain.png: no generation parameters" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    assert cli.main(["info", good, str(tmp_path / "notes.png")]) == 2
    out = capsys.readouterr()
    assert "a red circle" in out.out and "notes.png: not a readable image" in out.err
    assert cli.main(["info", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err


def _tiles(path, side=64):
    a = np.asarray(Image.open(path).convert("RGB"))  # (H, W * k, 3)
    assert a.shape[0] == side and a.shape[1] % side == 0
    return [a[:, i:i + side] for i in range(0, a.shape[1], side)]


def test_save_steps_writes_the_strip(tmp_path, capsys):
    out = tmp_path / "out.png"
    common = ["generate", "a red circle", "--seed", "5", "--steps", "5"]
    assert cli.main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert cli.main(common + ["--save-steps", "2", "--out", str(out)]) == 0
    # Steps 0 and 2 kept (4 is the last: the final image stands for it), then the final image.
    tiles = _tiles(tmp_path / "out-steps.png")
    final = np.asarray(Image.open(out).convert("RGB"))
    assert len(tiles) == 3 and np.array_equal(tiles[-1], final)
    strip_params = pnginfo.read_parameters(tmp_path / "out-steps.png")
    assert strip_params == Image.open(out).info["parameters"] and "Seed: 5" in strip_params
    assert not np.array_equal(tiles[0], final) and tiles[0].std() > 0
    # Decoding previews along the way leaves the image as it is without them.
    assert Image.open(tmp_path / "plain.png").tobytes() == Image.open(out).tobytes()
    assert cli.main(common + ["-n", "2", "--save-steps", "1", "--out", str(out)]) == 0
    for i in (1, 2):
        tiles = _tiles(tmp_path / f"out-{i}-steps.png")
        final = np.asarray(Image.open(tmp_path / f"out-{i}.png").convert("RGB"))
        assert len(tiles) == 5 and np.array_equal(tiles[-1], final)
    assert "out-2-steps.png" in capsys.readouterr().out


@pytest.mark.parametrize("k", ["0", "-3", "two"])
def test_save_steps_must_be_a_positive_integer(k, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "x", "--save-steps", k])
    assert e.value.code == 2
    assert f"--save-steps: must be an integer >= 1, got '{k}'" in capsys.readouterr().err
