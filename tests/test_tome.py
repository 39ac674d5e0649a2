"""Token merging (models/tome.py, pipelines/tome.py): the bipartite matching merges the most
similar tokens and puts every token back; the UNet merges at its finest attention level only;
the option is off bit for bit at 0, keeps a seed's image, and reaches the images' parameters
and the CLI, Python and HTTP doors (the served subprocess with webuiapi and openai:
test_front_door_server.py)."""
import json

import numpy as np
import pytest
import torch

from nanodiffusion import cli
from nanodiffusion.errors import InputError
from nanodiffusion.models import unet
from nanodiffusion.models.tome import Merge, TokenMerging, _destinations
from nanodiffusion.pipelines.tome import check_tome
from nanodiffusion.pnginfo import parse_parameters, read_parameters
from test_deepcache import _pixels, pipe  # noqa: F401  (the bundled model on one thread)

PROMPT = "a red circle above a blue square"


# ---- the matching --------------------------------------------------------------------------
def test_one_destination_in_each_whole_two_by_two_cell():
    gen = torch.Generator().manual_seed(0)
    for h, w in ((4, 4), (5, 7), (8, 2)):
        dst = _destinations(h, w, gen).view(h, w)
        cells = dst[:h // 2 * 2, :w // 2 * 2].reshape(h // 2, 2, w // 2, 2).sum(dim=(1, 3))
        assert (cells == 1).all()
        assert not dst[h // 2 * 2:].any() and not dst[:, w // 2 * 2:].any()  # the rest: sources


def test_the_most_similar_sources_merge_and_every_token_comes_back():
    """Sources equal to a destination merge first (similarity 1); merge() averages them in,
    unmerge() gives each merged source its destination's value and the others their own."""
    torch.manual_seed(0)
    H = W = 4
    x = torch.randn(1, H * W, 8)
    gen = torch.Generator().manual_seed(1)
    dst = _destinations(H, W, torch.Generator().manual_seed(1)).nonzero().squeeze(1)
    src = [i for i in range(H * W) if i not in dst.tolist()]
    twins = {src[0]: dst[2].item(), src[5]: dst[0].item()}  # exact copies of a destination
    for s, d in twins.items():
        x[0, s] = x[0, d] * 3  # the same direction: cosine similarity 1
    m = Merge(x, H, W, 2, gen)
    merged = sorted(m.src_idx[m.merged[0]].tolist())
    assert merged == sorted(twins)
    y = m.merge(x)
    assert y.shape == (1, H * W - 2, 8)
    back = m.unmerge(y)
    for s, d in twins.items():  # the destination holds the mean of itself and its twin
        assert torch.allclose(back[0, d], x[0, d] * 2) and torch.allclose(back[0, s],
                                                                          x[0, d] * 2)
    kept = [i for i in range(H * W) if i not in twins and i not in twins.values()]
    assert torch.equal(back[0, kept], x[0, kept])


def test_at_most_the_sources_merge():
    x = torch.randn(2, 36, 4)
    m = Merge(x, 6, 6, 36, torch.Generator().manual_seed(0))
    assert m.r == 27 and m.merge(x).shape == (2, 9, 4)
    assert m.unmerge(m.merge(x)).shape == x.shape


# ---- the UNet --------------------------------------------------------------------------------
def test_the_unet_merges_at_its_finest_attention_level_only(monkeypatch):
    """SHAPES has attention at 8x8 and 4x4 for 16x16 latents: only the 8x8 level's blocks
    merge, 64 tokens to 32 at ratio 0.5; the output moves a little, and a fresh run with the
    same setting gives it again."""
    torch.manual_seed(0)
    model = unet.UNet(unet.SHAPES).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 128)
    seen = []
    real = Merge.merge
    monkeypatch.setattr(Merge, "merge", lambda self, y: seen.append(y.shape[1]) or real(self, y))
    with torch.no_grad():
        exact = model(x, 500, context=ctx)
        merged = model(x, 500, context=ctx, tome=TokenMerging(0.5))
        again = model(x, 500, context=ctx, tome=TokenMerging(0.5))
        cached, _ = model.forward_deepcache(x, 500, context=ctx, tome=TokenMerging(0.5))
    # the 8x8 level's 3 transformers (1 down, 2 up; not the 4x4 level's 4) in each of the
    # three runs (merged, again, the deepcache forward)
    assert set(seen) == {64} and len(seen) == 3 * 3
    assert torch.equal(merged, again) and torch.equal(merged, cached)
    diff = (merged - exact).abs().max().item()
    assert 0 < diff < 0.5 * exact.abs().max().item()


# ---- the option --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 0.95, 1, True, "0.5", float("nan")])
def test_bad_ratios_are_input_errors_naming_the_value(pipe, bad):
    with pytest.raises(InputError, match=r"tome must be a number in \[0, 0.9\].*got"):
        check_tome(bad)
    with pytest.raises(InputError, match="tome"):
        pipe.generate("a red circle", seed=0, steps=2, tome=bad)


def test_zero_is_the_exact_path_bit_for_bit(pipe):
    ref = pipe.generate(PROMPT, seed=3, n=2)
    for off in (None, 0, 0.0):
        images = pipe.generate(PROMPT, seed=3, n=2, tome=off)
        assert _pixels(images).tobytes() == _pixels(ref).tobytes()
        assert images[0].info["parameters"] == ref[0].info["parameters"]


def test_a_seed_gives_the_same_merged_image_and_the_parameters_say_so(pipe):
    ref = pipe.generate(PROMPT, seed=3)
    a = pipe.generate(PROMPT, seed=3, tome=0.5)
    b = pipe.generate(PROMPT, seed=3, tome=0.5)
    assert _pixels(a).tobytes() == _pixels(b).tobytes()
    assert _pixels(a).tobytes() != _pixels(ref).tobytes()
    assert np.abs(_pixels(a) - _pixels(ref)).mean() < 20  # the same picture, approximately
    assert parse_parameters(a[0].info["parameters"])["Token merging ratio"] == "0.5"
    for task in (lambda: pipe.img2img(PROMPT, ref[0], seed=1, tome=0.3),
                 lambda: pipe.inpaint(PROMPT, ref[0], ref[0].convert("L"), seed=1, tome=0.3)):
        assert "Token merging ratio: 0.3" in task()[0].info["parameters"]


# ---- the doors ---------------------------------------------------------------------------------
def test_cli_flag_and_png_field(pipe, tmp_path, capsys):
    from front_door import run_cli

    out = tmp_path / "tome.png"
    done = run_cli("generate", PROMPT, "--seed", 3, "--tome", 0.5, "--out", out,
                   env={"OMP_NUM_THREADS": "1"})  # as `pipe`: the same bytes
    assert done.returncode == 0, done.stderr
    assert "Token merging ratio: 0.5" in read_parameters(out)
    from PIL import Image
    want = pipe.generate(PROMPT, seed=3, tome=0.5)
    assert _pixels([Image.open(out)]).tobytes() == _pixels(want).tobytes()
    capsys.readouterr()
    assert cli.main(["info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["Token merging ratio"] == "0.5"
    assert cli.main(["generate", "a red circle", "--tome", "2", "--out",
                     str(tmp_path / "x.png")]) == 2
    assert "tome must be a number in [0, 0.9]" in capsys.readouterr().err
    assert cli.main(["generate", "a red circle", "--pipeline", "unclip", "--tome", "0.5",
                     "--out", str(tmp_path / "u.png")]) == 2
    assert "--tome is for Stable Diffusion models" in capsys.readouterr().err


def test_batched_requests_keep_their_ratio(pipe):
    """The server's batching: requests with another ratio run as their own group, and each
    image is its single twin's (same shapes here, so the batch runs as one group per ratio)."""
    from nanodiffusion.pipelines.batch import generate_batch

    reqs = [dict(prompt=PROMPT, seed=3, tome=0.5), dict(prompt=PROMPT, seed=4),
            dict(prompt=PROMPT, seed=5, tome=0.5)]
    out = generate_batch(pipe, reqs)
    for req, images in zip(reqs, out):
        twin = pipe.generate(**req)
        assert np.abs(_pixels(images) - _pixels(twin)).max() <= 1
        assert ("Token merging ratio" in images[0].info["parameters"]) == ("tome" in req)
