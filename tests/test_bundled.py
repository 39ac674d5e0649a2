"""The bundled default model: it loads with no argument and by name, and generates images."""
import numpy as np

import nanodiffusion
from nanodiffusion.loading import BUNDLED


def test_bundled_model_is_shipped_and_small():
    folder = BUNDLED / "shapes"
    assert (folder / "model.json").exists()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"bundled model is {size / 2**20:.1f} MiB"


def test_default_model_generates_a_picture_deterministically():
    pipe = nanodiffusion.load()
    assert pipe.name == "shapes"
    a = pipe.generate("a red circle", seed=3, n=2)
    b = nanodiffusion.load("shapes").generate("a red circle", seed=3, n=2)
    assert len(a) == 2 and a[0].size == (pipe.defaults.width, pipe.defaults.height)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    pixels = np.asarray(a[0]).astype(int)
    # a picture, not a blank or noise: mostly white background with a coloured object
    white = (pixels.min(axis=-1) > 200).mean()
    assert 0.3 < white < 0.995, white


def test_bundled_unclip_model_is_shipped_small_and_generates():
    folder = BUNDLED / "shapes-unclip"
    assert (folder / "model.json").exists()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"bundled unCLIP model is {size / 2**20:.1f} MiB"
    pipe = nanodiffusion.load("shapes-unclip")
    a = pipe.generate("a red circle", seed=3, steps=8)
    b = pipe.generate("a red circle", seed=3, steps=8)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    white = (np.asarray(a[0]).astype(int).min(axis=-1) > 200).mean()
    assert 0.3 < white < 0.995, white
    varied = pipe.variations(a[0], n=2, seed=1)
    assert len(varied) == 2 and varied[0].size == a[0].size


def test_bundled_lcm_model_is_shipped_small_and_generates_in_four_steps():
    """shapes-lcm: the shapes UNet distilled by `train lcm` (issue 21), guidance embedded; a
    multistep student ([2, 4]) whose folder declares 4 tcd steps at eta 0.5."""
    folder = BUNDLED / "shapes-lcm"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"bundled LCM model is {size / 2**20:.1f} MiB"
    pipe = nanodiffusion.load("shapes-lcm")
    d = pipe.defaults
    assert (d.steps, d.sampler, d.eta) == (4, "tcd", 0.5)
    assert pipe.unet.config.time_cond_proj_dim == 256
    a = pipe.generate("a red circle", seed=3)
    b = pipe.generate("a red circle", seed=3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    pixels = np.asarray(a[0]).astype(int)
    white = (pixels.min(axis=-1) > 200).mean()
    assert 0.3 < white < 0.995, white
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    assert red.mean() > 0.02, red.mean()  # a red object


def test_the_readme_command_imports_no_compiler_stack(tmp_path):
    """The README's first command (the bundled model, through the CLI) never imports
    torch._dynamo / torch._inductor (~1 s of its ~3 s and ~70 MB): building CLIP's vision
    embeddings on the meta device ran `torch.randn(w) * w ** -0.5`, whose prims wrapper
    imports torch._dynamo."""
    import subprocess
    import sys
    out = tmp_path / "o.png"
    code = ("import sys; from nanodiffusion.cli import main; "
            f"rc = main(['generate', 'a red circle above a blue square', '--steps', '2', "
            f"'--out', {str(out)!r}]); "
            "print(rc, sorted(m for m in ('torch._dynamo', 'torch._inductor') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.exists()
    assert res.stdout.strip().splitlines()[-1] in ("0 []", "None []"), res.stdout
