"""Textual inversion: embedding files in the formats people download (AUTOMATIC1111's .pt and
.safetensors, diffusers' learned_embeds .safetensors / .bin; one vector or several), written
here as their tools write them, loaded by `pipe.load_embedding` against diffusers'
`load_textual_inversion` on a tiny random model, same pixels, the name in the prompt and in the
negative prompt; an n-vector name as n tokens of a chunk, weighted by its brackets; the
embeddings folder, "TI hashes"; the bad files refused whole with their names; the CLI's
--embedding and the A1111 API's /sdapi/v1/embeddings and prompts."""
import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from transformers import CLIPTokenizer as HFTokenizer  # noqa: E402

from nanodiffusion import pnginfo, prompts  # noqa: E402
from nanodiffusion.errors import InputError  # noqa: E402
from nanodiffusion.pipelines.embeddings import default_folder  # noqa: E402
from nanodiffusion.prompts import Vector, Vocabulary, parse  # noqa: E402

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red circle on a blue square", "green", 3, 3, 16
WIDTH = 32  # the tiny text encoder's (tiny_sd.text_encoder)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd"))


@pytest.fixture
def pipe(sd):
    """The pipeline, given back without embeddings or folder after each test."""
    yield sd.ours
    sd.ours.unload_embeddings()
    sd.ours.embeddings_dir = None


# ---- the files, as their tools write them ---------------------------------------------------
def vectors(n, seed, width=WIDTH):
    """n random vectors, far from the token embeddings (std 0.02) to change the image."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_a1111_pt(path, vecs, step=500):
    """AUTOMATIC1111's Embedding.save: torch.save of its dict, the vectors a tensor being
    trained (requires_grad)."""
    torch.save({"string_to_token": {"*": 265},
                "string_to_param": {"*": vecs.clone().requires_grad_(True)},
                "name": path.stem, "step": step, "sd_checkpoint": "81761151",
                "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


def write_emb_params(path, vecs):
    """The .safetensors that A1111 extensions and civitai give: one tensor, emb_params."""
    save_file({"emb_params": vecs.contiguous()}, str(path))
    return path


def write_diffusers(folder, token, vecs, suffix=".safetensors"):
    """diffusers' textual inversion training script: {token: vectors} in learned_embeds, one
    vector as (D,)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {token: vecs[0] if len(vecs) == 1 else vecs}
    path = folder / f"learned_embeds{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in data.items()}, str(path))
    else:
        torch.save(data, path)
    return path


# name in prompts -> (writer, vectors): every format, one vector and several
FORMATS = {
    "a1111-pt": lambda d: (write_a1111_pt(d / "inkblot.pt", vectors(1, 1)), "inkblot"),
    "a1111-pt-multi": lambda d: (write_a1111_pt(d / "inkblot.pt", vectors(3, 2)), "inkblot"),
    "emb-params": lambda d: (write_emb_params(d / "plasma.safetensors", vectors(2, 3)), "plasma"),
    "diffusers-safetensors": lambda d: (write_diffusers(d, "<cat-toy>", vectors(1, 4)),
                                        "<cat-toy>"),
    "diffusers-bin-multi": lambda d: (write_diffusers(d, "zigzag", vectors(4, 5), ".bin"),
                                      "zigzag"),
}


def ours(pipe, prompt=PROMPT, negative=NEGATIVE, **kw):
    return tiny_sd.as_array(pipe.generate(prompt, negative_prompt=negative, seed=SEED,
                                          steps=STEPS, sampler="euler", width=SIZE,
                                          height=SIZE, **kw))


def assert_matches(pipe, prompt, negative, ref):
    """Our images and latents against those of `ref`, a diffusers pipeline."""
    with tiny_sd.latents_of(ref.vae) as want_latents:
        want = ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, width=SIZE,
                   height=SIZE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(SEED)).images
    with tiny_sd.latents_of(pipe.vae) as got_latents:
        got = ours(pipe, prompt, negative)
    # ours are bytes, diffusers' floats: its rounding alone is up to 0.5/255, and a pixel on a
    # rounding edge moves past it with float noise far below the latents' 2e-5 bound
    tiny_sd.assert_close_images(got, want, (got_latents, want_latents), tol=0.51 / 255)
    return want


def diffusers_pipeline(sd, paths, tokens):
    """diffusers' load_textual_inversion into copies of the text encoder and tokenizer (it
    adds tokens to both, which the other tests must not see)."""
    ref = StableDiffusionPipeline(**{**sd.ref.components,
                                     "text_encoder": copy.deepcopy(sd.ref.text_encoder),
                                     "tokenizer": HFTokenizer.from_pretrained(
                                         sd.folder / "tokenizer")})
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, sd.scheduler_config, "euler")
    ref.load_textual_inversion([str(p) for p in paths], token=tokens)
    return ref


def text_state(pipe):
    return ({k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
            dict(pipe.tokenizer.encoder))


# ---- parity with diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("where", ["prompt", "negative"])
def test_embedding_matches_diffusers(sd, pipe, tmp_path, fmt, where):
    """Each format, its name in the prompt or in the negative prompt: the images diffusers
    makes with load_textual_inversion, and far from those with a plain word in its place."""
    path, name = FORMATS[fmt](tmp_path)
    prompt, negative = (f"a {name} circle", NEGATIVE) if where == "prompt" else \
        (PROMPT, f"green, {name} blurry")
    assert pipe.load_embedding(path) == name
    want = assert_matches(pipe, prompt, negative, diffusers_pipeline(sd, [path], [name]))
    plain = ours(pipe, prompt.replace(name, "square"), negative.replace(name, "square"))
    assert np.abs(plain - want).max() > 4 / 255, "the embedding hardly changes the image"


def test_several_embeddings_in_prompt_and_negative(sd, pipe, tmp_path):
    """Two embeddings at once, one in each prompt, against diffusers with both loaded."""
    a = write_a1111_pt(tmp_path / "inkblot.pt", vectors(3, 6))
    b = write_diffusers(tmp_path / "b", "zigzag", vectors(2, 7))
    pipe.load_embedding(a)
    pipe.load_embedding(b)
    assert pipe.embeddings == {"inkblot": 3, "zigzag": 2}
    assert_matches(pipe, "an inkblot circle, inkblot", "zigzag",
                   diffusers_pipeline(sd, [a, b], ["inkblot", "zigzag"]))


# ---- names as tokens: chunks and weights ----------------------------------------------------
@pytest.fixture
def vocab(sd):
    return Vocabulary(sd.ours.tokenizer, {"inkblot": vectors(3, 1)})


def test_an_n_vector_name_is_n_tokens_never_split(sd, vocab):
    """As A1111's tokenize_line: the name's tokens give way to n vectors; an embedding that does
    not fit in what is left of a chunk starts the next, the first chunk ending short."""
    tok = sd.ours.tokenizer
    filler = " ".join(["cat"] * 73)
    assert len(tok.encode(filler)) == 73

    def chunk_ids(text):
        return [ids for ids, _ in prompts.chunks(tok, parse(text), 75, vocab)]
    got = chunk_ids("a inkblot b")
    assert got == [[tok.encode("a")[0], Vector("inkblot", 0), Vector("inkblot", 1),
                    Vector("inkblot", 2), tok.encode("b")[0]]]
    assert [len(c) for c in chunk_ids(filler + " inkblot")] == [73, 3]
    assert [len(c) for c in chunk_ids(filler[4:] + " inkblot")] == [75]  # 72 + 3 fit
    # the comma backtrack moves a whole embedding with the words after the comma
    text = " ".join(["cat"] * 60) + ", dog inkblot " + " ".join(["cat"] * 20)
    first, second = chunk_ids(text)
    assert len(first) == 61 and second[1:4] == [Vector("inkblot", k) for k in range(3)]
    # its weight is the weight of the text it is in
    weights = prompts.chunks(tok, parse("a (inkblot:1.3) [b]"), 75, vocab)[0][1]
    assert weights == [1.0, 1.3, 1.3, 1.3, pytest.approx(1 / 1.1)]
    # without the vocabulary the name is its words' tokens
    assert prompts.chunks(tok, parse("inkblot"), 75)[0][0] == tok.encode("inkblot")


@torch.no_grad()
def test_embedding_states_chunked_and_weighted(sd, pipe, tmp_path):
    """The states of a prompt whose embedding starts the second chunk are the two chunks'
    encodings side by side; (inkblot:1.3) multiplies its n states by 1.3, then A1111's mean
    restore (with a trained-like LayerNorm bias: a zero one gives states of mean 0)."""
    pipe.load_embedding(write_a1111_pt(tmp_path / "inkblot.pt", vectors(3, 1)))
    filler = " ".join(["cat"] * 73)
    pipe._prompt_cache.clear()
    got = pipe.encode_prompt([filler + " inkblot"])[0]  # (154, D)
    first, second = pipe.encode_prompt([filler, "inkblot"])
    assert torch.equal(got, torch.cat([first[:77], second[:77]]))
    norm = pipe.text_encoder.final_layer_norm
    bias = norm.bias.clone()
    torch.nn.init.normal_(norm.bias, std=0.5, generator=torch.Generator().manual_seed(0))
    pipe._prompt_cache.clear()
    try:
        weighted = pipe.encode_prompt(["a (inkblot:1.3) circle"])[0]  # (77, D)
        z = pipe.encode_prompt(["a inkblot circle"])[0]
    finally:
        norm.bias.copy_(bias)
        pipe._prompt_cache.clear()
    w = torch.ones(77)
    w[2:5] = 1.3  # after the start token and "a"
    want = z * w[:, None]
    torch.testing.assert_close(weighted, want * (z.mean() / want.mean()), rtol=1e-6, atol=1e-6)


# ---- the embeddings folder and TI hashes ----------------------------------------------------
def sha12(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_folder_names_and_ti_hashes(sd, pipe, tmp_path):
    """Files of the embeddings folder (subfolders too) are used by their file names; the PNG
    text has A1111's "TI hashes" of those the prompts used, the prompt's first (not of those
    loaded or in the folder but not named); the images are those of load_embedding; a file
    rewritten is read again."""
    folder = tmp_path / "embeddings"
    (folder / "neg").mkdir(parents=True)
    ink = write_a1111_pt(folder / "inkblot.pt", vectors(3, 1))
    bad = write_emb_params(folder / "neg" / "bad_hands.safetensors", vectors(2, 2))
    write_emb_params(folder / "unused.safetensors", vectors(1, 3))
    pipe.load_embedding(write_emb_params(tmp_path / "loaded.safetensors", vectors(1, 4)))
    pipe.embeddings_dir = folder
    images = pipe.generate("a inkblot circle", negative_prompt="bad_hands, green", seed=SEED,
                           steps=STEPS, sampler="euler", width=SIZE, height=SIZE)
    p = pnginfo.parse_parameters(images[0].info["parameters"])
    assert p["TI hashes"] == json.dumps(f"inkblot: {sha12(ink)}, bad_hands: {sha12(bad)}")
    assert "TI hashes" not in pnginfo.parse_parameters(pipe.generate(
        PROMPT, steps=1, width=SIZE, height=SIZE)[0].info["parameters"])
    assert pipe.embedding_list()["loaded"].keys() == {"bad_hands", "inkblot", "loaded",
                                                      "unused"}
    pipe.embeddings_dir = None
    pipe.load_embedding(ink)
    pipe.load_embedding(bad)
    assert np.array_equal(tiny_sd.as_array(images),
                          ours(pipe, "a inkblot circle", "bad_hands, green"))
    pipe.unload_embeddings()
    pipe.embeddings_dir = folder
    before = ours(pipe, "a inkblot circle", "green")
    write_a1111_pt(ink, vectors(3, 9))  # the same name, other vectors
    assert not np.array_equal(ours(pipe, "a inkblot circle", "green"), before)


def test_folder_files_this_model_cannot_use(sd, pipe, tmp_path):
    """A file of another width, an SDXL one and a broken one are left out of the folder's
    embeddings (A1111's "skipped"); a prompt that names one is an InputError naming the file;
    other prompts are not affected."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_a1111_pt(folder / "inkblot.pt", vectors(1, 1))
    wide = write_emb_params(folder / "wide.safetensors", vectors(2, 2, width=48))
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)},
              str(folder / "xl.safetensors"))
    (folder / "cut.pt").write_bytes((folder / "inkblot.pt").read_bytes()[:200])
    pipe.embeddings_dir = folder
    listed = pipe.embedding_list()
    assert listed == {"loaded": {"inkblot": {"step": 500, "sd_checkpoint": "81761151",
                                             "sd_checkpoint_name": "v1-5-pruned-emaonly",
                                             "shape": WIDTH, "vectors": 1}},
                      "skipped": {n: {"step": None, "sd_checkpoint": None,
                                      "sd_checkpoint_name": None, "shape": s, "vectors": 2}
                                  for n, s in (("wide", 48), ("xl", 2048))}}
    for name, words in (("wide", [str(wide), "48 wide", "32 wide"]), ("xl", ["SDXL"]),
                        ("cut", ["cut.pt", "not a readable"])):
        with pytest.raises(InputError) as e:
            pipe.generate(f"a {name} circle", steps=1, width=SIZE, height=SIZE)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    assert pipe.generate("a inkblot circle", steps=1, width=SIZE, height=SIZE)


def test_default_folder_is_a1111s(tmp_path):
    a1111 = tmp_path / "webui" / "models" / "Stable-diffusion"
    a1111.mkdir(parents=True)
    (a1111 / "v1-5.safetensors").touch()
    assert default_folder(a1111 / "v1-5.safetensors") == (tmp_path / "webui" / "embeddings")
    (tmp_path / "models" / "sd").mkdir(parents=True)
    assert default_folder(tmp_path / "models" / "sd") == tmp_path / "models" / "embeddings"
    assert str(default_folder(None)) == "embeddings"


# ---- bad files ------------------------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch ran-code",))


def bad_files(tmp_path):
    """(path, words the error must hold) for each way a file can be wrong."""
    good = write_a1111_pt(tmp_path / "good.pt", vectors(2, 1))
    good_st = write_emb_params(tmp_path / "good.safetensors", vectors(2, 1))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "cut.safetensors").write_bytes(good_st.read_bytes()[:100])
    torch.save({"string_to_param": {"*": vectors(1, 1)}, "x": RunsCode()}, tmp_path / "evil.pt")
    save_file({"a": vectors(1, 1), "b": vectors(1, 2)}, str(tmp_path / "two.safetensors"))
    torch.save({"string_to_param": {"*": vectors(1, 1), "#": vectors(1, 2)}},
               tmp_path / "two-terms.pt")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
              str(tmp_path / "sdxl.safetensors"))
    nan = vectors(2, 1)
    nan[1, 3] = float("nan")
    return [(write_emb_params(tmp_path / "wide.safetensors", vectors(2, 1, width=1024)),
             ["1024 wide (SD 2.x)", "32 wide"]),
            (write_a1111_pt(tmp_path / "wide768.pt", vectors(1, 1, width=768)),
             ["768 wide (SD 1.x)"]),
            (write_a1111_pt(tmp_path / "long.pt", vectors(76, 1)), ["76 vectors", "75"]),
            (tmp_path / "cut.pt", ["not a readable torch checkpoint"]),
            (tmp_path / "cut.safetensors", ["not a readable safetensors"]),
            (tmp_path / "evil.pt", ["pickled code"]),
            (tmp_path / "two.safetensors", ["not a textual inversion embedding", "a, b"]),
            (tmp_path / "two-terms.pt", ["string_to_param must hold one tensor"]),
            (tmp_path / "sdxl.safetensors", ["SDXL"]),
            (write_emb_params(tmp_path / "nan.safetensors", nan), ["NaN"])]


def test_bad_files_are_refused_whole_naming_the_file(pipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = text_state(pipe)
    for path, words in bad_files(tmp_path):
        with pytest.raises(ValueError) as e:
            pipe.load_embedding(path)
        for w in [str(path), *words]:
            assert w in str(e.value), (w, str(e.value))
        assert pipe.embeddings == {}
        after = text_state(pipe)
        assert after[1] == before[1]
        assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert not (tmp_path / "ran-code").exists()
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        pipe.load_embedding(tmp_path / "nothing.pt")
    good = tmp_path / "good.pt"
    assert pipe.load_embedding(good) == "good"
    with pytest.raises(InputError, match="loaded already"):
        pipe.load_embedding(good)
    assert pipe.load_embedding(good, name="other") == "other"


# ---- the doors: the command line and the A1111 API -----------------------------------------
def test_cli_embedding_option_and_folder(sd, pipe, tmp_path):
    """`--embedding PATH` and a name found in --embeddings-dir: the image Python makes with
    both, its PNG with their TI hashes; a bad file is exit 2 naming it."""
    from front_door import run_cli
    from PIL import Image

    folder = tmp_path / "embeds"
    folder.mkdir()
    neg = write_emb_params(folder / "bad_hands.safetensors", vectors(2, 2))
    ink = write_a1111_pt(tmp_path / "inkblot.pt", vectors(3, 1))
    out = tmp_path / "out.png"
    r = run_cli("generate", "a inkblot circle", "--model", sd.folder, "--negative",
                "bad_hands", "--embedding", ink, "--embeddings-dir", folder, "--seed", SEED,
                "--steps", STEPS, "--sampler", "euler", "--width", SIZE, "--height", SIZE,
                "--out", out)
    assert r.returncode == 0, r.stderr
    pipe.load_embedding(ink)
    pipe.load_embedding(neg)
    want = ours(pipe, "a inkblot circle", "bad_hands")
    with Image.open(out) as im:
        tiny_sd.assert_close_images(tiny_sd.as_array([im.convert("RGB")]), want)
        p = pnginfo.parse_parameters(im.info["parameters"])
    assert p["TI hashes"] == json.dumps(f"inkblot: {sha12(ink)}, bad_hands: {sha12(neg)}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(neg.read_bytes()[:60])
    r = run_cli("generate", PROMPT, "--model", sd.folder, "--embedding", bad, "--steps", 1,
                "--out", tmp_path / "x.png")
    assert r.returncode == 2 and str(bad) in r.stderr and not (tmp_path / "x.png").exists()


def test_a1111_embeddings_list_and_prompts(sd, pipe, tmp_path):
    """/sdapi/v1/embeddings lists the models folder's embeddings/ as A1111 does, loaded and
    skipped; a txt2img request whose negative prompt names one makes the image the pipeline
    makes with it, with A1111's "TI hashes"; a name of a file that does not fit is a 400."""
    pytest.importorskip("fastapi")
    webuiapi = pytest.importorskip("webuiapi")
    httpx = pytest.importorskip("httpx")
    from live_server import serve

    from nanodiffusion.server import Limits
    from nanodiffusion.server.app import create_app

    (tmp_path / "sd").symlink_to(sd.folder)
    folder = tmp_path / "embeddings"
    (folder / "negatives").mkdir(parents=True)
    ink = write_a1111_pt(folder / "negatives" / "inkblot.pt", vectors(3, 1), step=1200)
    write_emb_params(folder / "wide.safetensors", vectors(2, 2, width=768))
    app = create_app(tmp_path, limits=Limits(max_side=64, max_n=2, max_steps=10))
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        assert api.get_embeddings() == {
            "loaded": {"inkblot": {"step": 1200, "sd_checkpoint": "81761151",
                                   "sd_checkpoint_name": "v1-5-pruned-emaonly",
                                   "shape": WIDTH, "vectors": 3}},
            "skipped": {"wide": {"step": None, "sd_checkpoint": None,
                                 "sd_checkpoint_name": None, "shape": 768, "vectors": 2}}}
        res = api.txt2img(prompt=PROMPT, negative_prompt="inkblot, green", seed=SEED,
                          steps=STEPS, cfg_scale=7.5, width=SIZE, height=SIZE,
                          sampler_name="Euler")
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "a wide circle", "steps": 1,
                                                         "width": SIZE, "height": SIZE},
                       timeout=60)
    assert r.status_code == 400 and "wide.safetensors" in r.json()["error"]["message"]
    assert f'TI hashes: "inkblot: {sha12(ink)}"' in res.info["infotexts"][0]
    pipe.load_embedding(ink)
    want = ours(pipe, PROMPT, "inkblot, green")
    assert np.array_equal(tiny_sd.as_array([res.image.convert("RGB")]), want)
    pipe.unload_embeddings()
    assert not np.array_equal(want, ours(pipe, PROMPT, "inkblot, green"))
