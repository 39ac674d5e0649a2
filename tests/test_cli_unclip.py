"""Best-of-N CLIP reranking on both pipelines, and the unCLIP commands of the CLI (generate
--pipeline unclip, --best-of, vary, edit, interpolate, describe), on tiny random models saved
as folders by the real saving code and opened by the real loading code."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion import cli, cli_io, loading
from nanodiffusion.diffusion import ScheduleConfig
from nanodiffusion.formats.ours import save_folder, save_unclip_folder
from nanodiffusion.models import clip, prior, unet, vae
from nanodiffusion.models.tokenizer import CLIPTokenizer
from nanodiffusion.pipelines.rerank import clip_scores, rank_images
from nanodiffusion.pipelines.sd import Defaults
from nanodiffusion.pnginfo import format_parameters, parse_parameters
from nanodiffusion.pipelines.unclip import UnCLIPDefaults, UnCLIPPipeline

SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three tiny models: unCLIP, SD with a full CLIP, SD with a text encoder only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    full_clip = clip.CLIPModel(clip.TINY_TEXT, clip.TINY_VISION)
    tok, autoencoder = CLIPTokenizer.default(), vae.VAE(vae.TINY)
    save_unclip_folder(root / "unclip", prior=prior.Prior(prior.TINY),
                       decoder=unet.UNet(dataclasses.replace(unet.TINY, image_embed_dim=16)),
                       vae=autoencoder, clip=full_clip, tokenizer=tok, schedule=ScheduleConfig(),
                       defaults=UnCLIPDefaults(steps=2, prior_steps=2, width=SIZE, height=SIZE),
                       name="tiny-unclip")
    sd = dict(unet=unet.UNet(unet.TINY), vae=autoencoder, tokenizer=tok,
              schedule=ScheduleConfig(), defaults=Defaults(steps=2, width=SIZE, height=SIZE))
    save_folder(root / "sd-clip", clip=full_clip, name="tiny-sd-clip", **sd)
    save_folder(root / "sd-text", text_encoder=clip.CLIPTextModel(clip.TINY_TEXT),
                        name="tiny-sd-text", **sd)
    yield {k: str(root / k) for k in ("unclip", "sd-clip", "sd-text")}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes(folders):
    return {k: loading.load_pipeline(v) for k, v in folders.items()}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _params(path):
    with Image.open(path) as im:
        return parse_parameters(im.info["parameters"])


def _same(a, b):
    return a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


# ---- best-of-N reranking, both pipelines ----------------------------------------------------
@pytest.mark.parametrize("kind", ["unclip", "sd-clip"])
def test_best_of_keeps_the_highest_clip_candidate_of_each_image(pipes, kind):
    """Candidate k of image i is image i of generate(seed + k): best_of must keep, per image,
    the candidate that CLIP scores highest, with that candidate's own seed in its parameters."""
    pipe, prompt, seed, n, best_of = pipes[kind], "a red circle", 7, 2, 4
    kept = pipe.generate(prompt, seed=seed, n=n, best_of=best_of, steps=2)
    batches = [pipe.generate(prompt, seed=seed + k, n=n, steps=2) for k in range(best_of)]
    picks = []
    for i in range(n):
        scores = clip_scores(pipe, prompt, [b[i] for b in batches])
        assert len(set(scores)) == best_of  # distinct candidates, so the pick is meaningful
        k = int(np.argmax(scores))
        picks.append(k)
        assert _same(kept[i], batches[k][i])
        assert f"Seed: {seed + k}," in kept[i].info["parameters"]
    assert any(k != 0 for k in picks), picks  # not merely the best_of=1 image
    ranked = rank_images(pipe, prompt, [b[0] for b in batches])
    assert _same(ranked[0][0], kept[0])


def test_best_of_one_is_plain_generate(pipes):
    pipe = pipes["sd-clip"]
    a = pipe.generate("a blue star", seed=4, best_of=1, steps=2)[0]
    assert _same(a, pipe.generate("a blue star", seed=4, steps=2)[0])


@pytest.mark.parametrize("best_of", [0, -1, 17, 2.5])
def test_best_of_out_of_range_is_refused(pipes, best_of):
    for pipe in (pipes["unclip"], pipes["sd-clip"]):
        with pytest.raises(ValueError, match=rf"best_of must be an integer in \[1, 16\], got "
                                             rf"{best_of}"):
            pipe.generate("a red circle", seed=1, best_of=best_of, steps=2)


def test_best_of_needs_a_clip_image_encoder(pipes):
    pipe = pipes["sd-text"]
    assert pipe.clip is None
    with pytest.raises(ValueError, match="best_of needs a CLIP image encoder.*tiny-sd-text"):
        pipe.generate("a red circle", seed=1, best_of=2, steps=2)
    assert len(pipe.generate("a red circle", seed=1, best_of=1, steps=2)) == 1


def test_best_of_seed_range(pipes):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 9223372036854775804\]"):
        pipes["sd-clip"].generate("a red circle", seed=2**63 - 2, best_of=4, steps=2)


# ---- generate --------------------------------------------------------------------------------
def test_cli_generate_unclip(folders, pipes, tmp_path, capsys):
    out = tmp_path / "a.png"
    rc, stdout, err = _run(capsys, "generate", "a green star", "--pipeline", "unclip",
                           "--model", folders["unclip"], "--seed", 3, "--steps", 2,
                           "--out", out)
    assert rc == 0, err
    assert stdout.strip() == str(out)
    p = _params(out)
    assert (p["prompt"], p["Seed"], p["Steps"], p["Model"]) == ("a green star", "3", "2",
                                                                "tiny-unclip")
    with Image.open(out) as im:
        assert _same(im, pipes["unclip"].generate("a green star", seed=3, steps=2)[0])


@pytest.mark.parametrize("kind", ["unclip", "sd-clip"])
def test_cli_best_of(folders, pipes, kind, tmp_path, capsys):
    out = tmp_path / "b.png"
    rc, _, err = _run(capsys, "generate", "a red circle", "--model", folders[kind], "--seed", 7,
                      "--steps", 2, "--best-of", 3, "--out", out)
    assert rc == 0, err
    with Image.open(out) as im:
        assert _same(im, pipes[kind].generate("a red circle", seed=7, best_of=3, steps=2)[0])


def test_cli_best_of_errors(folders, tmp_path, capsys):
    rc, _, err = _run(capsys, "generate", "a red circle", "--model", folders["sd-text"],
                      "--best-of", 2, "--steps", 2, "--out", tmp_path / "x.png")
    assert rc == 2 and "best_of needs a CLIP image encoder" in err
    rc, _, err = _run(capsys, "generate", "a red circle", "--model", folders["sd-clip"],
                      "--best-of", 0, "--out", tmp_path / "x.png")
    assert rc == 2 and "best_of must be an integer in [1, 16], got 0" in err
    rc, _, err = _run(capsys, "generate", "a red circle", "--model", folders["sd-clip"],
                      "--best-of", 2, "--save-steps", 1, "--out", tmp_path / "x.png")
    assert rc == 2 and "--best-of 2" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_pipeline_kind_must_match(folders, tmp_path, capsys):
    rc, _, err = _run(capsys, "generate", "a red circle", "--pipeline", "unclip", "--model",
                      folders["sd-clip"], "--out", tmp_path / "x.png")
    assert rc == 2 and folders["sd-clip"] in err and "needs an unCLIP model" in err
    rc, _, err = _run(capsys, "generate", "a red circle", "--pipeline", "sd", "--model",
                      folders["unclip"], "--out", tmp_path / "x.png")
    assert rc == 2 and "is an unCLIP model; this needs a Stable Diffusion model" in err
    rc, _, err = _run(capsys, "vary", tmp_path / "none.png", "--model", folders["sd-clip"])
    assert rc == 2 and "none.png" in err  # the missing image is named before any loading
    rc, _, err = _run(capsys, "img2img", "x", "--image", tmp_path / "none.png", "--model",
                      folders["unclip"], "--out", tmp_path / "x.png")
    assert rc == 2 and "is an unCLIP model" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_dtype(folders, tmp_path, capsys):
    """--dtype runs a Stable Diffusion model in half precision and is refused for unCLIP."""
    rc, _, err = _run(capsys, "generate", "a red circle", "--model", folders["sd-clip"],
                      "--dtype", "bfloat16", "--steps", "2", "--seed", "1", "--out",
                      tmp_path / "half.png")
    assert rc == 0 and Image.open(tmp_path / "half.png").size[0] > 0
    rc, _, err = _run(capsys, "generate", "a red circle", "--pipeline", "unclip", "--model",
                      folders["unclip"], "--dtype", "bfloat16", "--out", tmp_path / "u.png")
    assert rc == 2 and "--dtype bfloat16: unCLIP models run in float32 only" in err
    assert not (tmp_path / "u.png").exists()


def test_cli_bundled_unclip_not_shipped(monkeypatch, photo, tmp_path, capsys):
    monkeypatch.setattr(loading, "BUNDLED", tmp_path / "weights")
    out = ["--out", tmp_path / "o.png"]
    for argv in (["vary", photo, *out], ["describe", photo],
                 ["generate", "a red circle", "--pipeline", "unclip", *out]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, argv
        assert "'shapes-unclip' is not shipped with this version" in err
        assert str(tmp_path / "weights" / "shapes-unclip") in err
        assert "Traceback" not in err


# ---- vary, edit, interpolate, describe -----------------------------------------------------
def test_cli_vary(folders, pipes, photo, tmp_path, capsys):
    out = tmp_path / "variations.png"
    rc, stdout, err = _run(capsys, "vary", photo, "-n", 3, "--model", folders["unclip"],
                           "--seed", 5, "--steps", 2, "--sampler", "ddim", "--out", out,
                           "--grid")
    assert rc == 0, err
    paths = [tmp_path / f"variations-{i}.png" for i in (1, 2, 3)]
    assert stdout.split() == [str(p) for p in paths] + [str(tmp_path / "variations-grid.png")]
    expected = pipes["unclip"].variations(Image.open(photo), n=3, seed=5, steps=2,
                                          sampler="ddim")
    for i, (p, e) in enumerate(zip(paths, expected)):
        with Image.open(p) as im:
            assert im.size == (SIZE, SIZE) and _same(im, e)
        params = _params(p)
        assert (params["Task"], params["Seed"], params["Sampler"], params["Batch pos"]) == \
            ("variations", "5", "DDIM", str(i))
    assert not _same(expected[0], expected[1])  # new noise per variation


def test_cli_edit(folders, pipes, photo, tmp_path, capsys):
    out = tmp_path / "edit.png"
    rc, _, err = _run(capsys, "edit", photo, "--from", "a red circle", "--to", "a blue circle",
                      "--strength", 0.5, "--model", folders["unclip"], "--seed", 2,
                      "--steps", 2, "--guidance", 2.0, "--out", out)
    assert rc == 0, err
    expected = pipes["unclip"].edit(Image.open(photo), "a red circle", "a blue circle",
                                    strength=0.5, seed=2, steps=2, guidance=2.0)[0]
    with Image.open(out) as im:
        assert _same(im, expected)
    p = _params(out)
    assert (p["prompt"], p["Task"], p["Edit from"], p["Edit strength"], p["CFG scale"]) == \
        ("a blue circle", "edit", "a red circle", "0.5", "2.0")
    rc, _, err = _run(capsys, "edit", photo, "--from", "a", "--to", "b", "--strength", 2,
                      "--model", folders["unclip"], "--out", tmp_path / "bad.png")
    assert rc == 2 and "strength must be in [0, 1], got 2.0" in err


def test_cli_interpolate(folders, pipes, photo, tmp_path, capsys):
    other = tmp_path / "other.png"
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(other)
    out = tmp_path / "morph.png"
    rc, stdout, err = _run(capsys, "interpolate", photo, other, "--frames", 3, "--model",
                           folders["unclip"], "--seed", 1, "--steps", 2, "--out", out,
                           "--save-frames")
    assert rc == 0, err
    frames = [tmp_path / f"morph-{i}.png" for i in (1, 2, 3)]
    assert stdout.split() == [str(out)] + [str(f) for f in frames]
    expected = pipes["unclip"].interpolate(Image.open(photo), Image.open(other), frames=3,
                                           seed=1, steps=2)
    with Image.open(out) as strip:
        assert strip.size == (3 * SIZE, SIZE)
        for i, e in enumerate(expected):
            assert _same(strip.crop((i * SIZE, 0, (i + 1) * SIZE, SIZE)), e)
    assert _params(out)["Task"] == "interpolate"
    for f, e in zip(frames, expected):
        with Image.open(f) as im:
            assert _same(im, e)


@pytest.mark.parametrize("frames", [1, 0, 65])
def test_cli_interpolate_frame_count(folders, photo, tmp_path, capsys, frames):
    rc, _, err = _run(capsys, "interpolate", photo, photo, "--frames", frames, "--model",
                      folders["unclip"], "--out", tmp_path / "m.png")
    assert rc == 2 and f"frames must be an integer in [2, 64], got {frames}" in err
    assert not (tmp_path / "m.png").exists()


def test_cli_describe(folders, pipes, photo, tmp_path, capsys):
    captions = ["a red circle", "a blue square", "a green star"]
    cands = tmp_path / "captions.txt"
    cands.write_text("\n".join(captions[:2]) + "\n\n  " + captions[2] + "  \n")
    rc, stdout, err = _run(capsys, "describe", photo, "--top", 2, "--candidates", cands,
                           "--model", folders["unclip"])
    assert rc == 0, err
    expected = pipes["unclip"].describe(Image.open(photo), captions, top=2)
    assert stdout.splitlines() == [f"{s:.4f}  {c}" for c, s in expected]
    rc, stdout, _ = _run(capsys, "describe", photo, "--candidates", cands, "--model",
                         folders["unclip"])
    assert rc == 0 and sorted(line.split("  ", 1)[1] for line in stdout.splitlines()) == \
        sorted(captions)  # default top: 5, or all when fewer candidates


def test_cli_describe_default_candidates(folders, photo, capsys):
    rc, stdout, err = _run(capsys, "describe", photo, "--model", folders["unclip"])
    assert rc == 0, err
    scores = [float(line.split("  ")[0]) for line in stdout.splitlines()]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)


def test_cli_describe_bad_inputs(folders, photo, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for argv, message in [(["--candidates", empty], "holds no captions"),
                          (["--candidates", tmp_path / "nope.txt"], "no candidates file"),
                          (["--top", 0], "top must be an integer in [1, "),
                          (["--top", 4, "--candidates", empty.with_name("c3.txt")], "got 4")]:
        empty.with_name("c3.txt").write_text("a\nb\nc\n")
        rc, _, err = _run(capsys, "describe", photo, "--model", folders["unclip"], *argv)
        assert rc == 2 and message in err, (argv, err)


@pytest.mark.parametrize("command", [["vary"], ["edit", "--from", "a", "--to", "b"],
                                     ["interpolate", "PHOTO"], ["describe"]])
def test_cli_missing_or_unreadable_image(folders, photo, tmp_path, capsys, command):
    rest = [photo if a == "PHOTO" else a for a in command[1:]]
    rc, _, err = _run(capsys, command[0], tmp_path / "missing.png", *rest, "--model",
                      folders["unclip"])
    assert rc == 2 and f"no image file at '{tmp_path / 'missing.png'}'" in err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    rc, _, err = _run(capsys, command[0], text, *rest, "--model", folders["unclip"])
    assert rc == 2 and "is not an image file PIL can read" in err and "notes.png" in err


def test_model_kind(folders):
    assert isinstance(loading.load_pipeline(folders["unclip"]), UnCLIPPipeline)
    assert [loading.model_kind(folders[k]) for k in ("unclip", "sd-clip", "sd-text")] == \
        ["unclip", "sd", "sd"]


def test_extra_parameters_round_trip():
    text = format_parameters(dict(prompt="a", steps=2, sampler="euler", guidance=4.0, seed=1,
                                  width=32, height=32, extra={"Task": "edit",
                                                              "Edit from": "red, round: x"}))
    p = parse_parameters(text)
    assert p["Task"] == "edit" and p["Edit from"] == '"red, round: x"' and p["Seed"] == "1"


def test_eval_writes_a_best_of_report_where_asked(folders, tmp_path, capsys):
    """`eval --best-of 2 --best-of-prompts 1 --out R`: the whole unCLIP report, with the
    reranking compared on the first single prompt only, goes to R, not the model folder."""
    import json
    from pathlib import Path

    out = tmp_path / "r.json"
    rc, text, err = _run(capsys, "eval", folders["unclip"], "--n", 2, "--best-of", 2,
                         "--best-of-prompts", 1, "--out", out)
    assert rc == 0, err
    got = json.loads(out.read_text())
    assert json.loads(text) == got
    assert got["best_of_prompts"] == 1 and got["fidelity"]["n"] == 4
    assert 0 <= got["best_of_2_single"] <= 1 and got["best_of_1_single"] in (0.0, 1.0)
    assert {"variations", "text_diffs", "clip_retrieval"} <= set(got)
    assert not (Path(folders["unclip"]) / "report.json").exists()
    rc, _, err = _run(capsys, "eval", folders["unclip"], "--n", 2, "--best-of", 2,
                      "--best-of-prompts", 3, "--out", out)
    assert rc != 0 and "best_of_prompts" in err and "3" in err


def test_unclip_commands_report_progress(folders, photo, tmp_path, capsys, monkeypatch):
    """vary, edit, interpolate and describe show a progress bar, as generate does: each calls
    the CLI's progress callback over its whole run (interpolate: every frame's steps)."""
    seen = {}

    def progress(desc="denoise", unit="step"):
        def cb(info):
            seen.setdefault(command, []).append((info["step"], info["total"]))
        return cb
    monkeypatch.setattr(cli_io, "progress", progress)
    common = ("--model", folders["unclip"], "--seed", 1, "--steps", 2)
    for command, argv in (("vary", ("vary", photo, "-n", 1, *common)),
                          ("edit", ("edit", photo, "--to", "a blue circle", *common)),
                          ("interpolate", ("interpolate", photo, photo, "--frames", 3,
                                           *common)),
                          ("describe", ("describe", photo, "--model", folders["unclip"]))):
        rc, _, err = _run(capsys, *argv, *(() if command == "describe" else
                                          ("--out", tmp_path / f"{command}.png")))
        assert rc == 0, err
    assert seen["vary"] == [(0, 2), (1, 2)] and seen["edit"] == [(0, 2), (1, 2)]
    assert seen["interpolate"] == [(i, 6) for i in range(6)]
    assert seen["describe"] and seen["describe"][-1][0] == seen["describe"][-1][1] - 1
