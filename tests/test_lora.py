"""LoRA: files in the formats people download (kohya / A1111 with diffusers' and LDM's module
names, LoCon, diffusers / PEFT, diffusers' older layout; written by lora_files.py) loaded by
`pipe.load_lora` against diffusers' `load_lora_weights` on a tiny random model, same pixels;
several at once; the original weights back bit for bit; the bad files refused whole with their
names; `<lora:name:scale>` tags, their "Lora hashes"; the CLI's --lora and the A1111 API."""
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
import lora_files as lf  # noqa: E402
import tiny_sd  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

import nanodiffusion  # noqa: E402
from nanodiffusion import pnginfo  # noqa: E402
from nanodiffusion.errors import InputError  # noqa: E402
from nanodiffusion.pipelines.lora_tags import Tag, take_tags  # noqa: E402

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red circle on a blue square", "green", 3, 3, 16


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def files(sd, tmp_path_factory):
    """The LoRAs of the tests. sd-scripts writes one alpha for the Linear layers and one for
    the convolutions (network_alpha, conv_alpha)."""
    root = tmp_path_factory.mktemp("loras")
    ref = sd.ref
    unet = lf.random_layers(lf.unet_targets(ref.unet, locon=False), 1, alphas=(2.0,))
    locon = lf.random_layers(lf.unet_targets(ref.unet), 2, alphas=(2.0,))
    for name, (down, up, _) in locon.items():
        if down.ndim == 4 and down.shape[-1] == 3:
            locon[name] = (down, up, 1.0)
    text = lf.random_layers(lf.text_targets(ref.text_encoder), 3, alphas=(4.0,), std=0.6)
    (root / "peft").mkdir()
    return dict(unet=lf.write_kohya(root / "unet.safetensors", unet),
                text=lf.write_kohya(root / "text.safetensors", text_layers=text),
                locon=lf.write_kohya(root / "locon.safetensors", locon, text),
                locon_ldm=lf.write_kohya(root / "locon-ldm.safetensors", locon, text, ldm=True),
                peft=lf.write_peft(root / "peft", ref, 4), layers=(locon, text))


def ours(model, **kw):
    images = model.ours.generate(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS,
                                 sampler="euler", width=SIZE, height=SIZE, **kw)
    return tiny_sd.as_array(images)


def diffusers_images(model, path, scale):
    """diffusers' load_lora_weights, the scale as its pipelines take it (the UNet's and the
    text encoder's LoRA layers both). A new pipeline object over the same modules each time:
    a pipeline keeps its last call's scale and applies it to the next text encoder LoRA it
    loads."""
    ref = StableDiffusionPipeline(**model.ref.components)
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, model.scheduler_config, "euler")
    ref.load_lora_weights(str(path))
    try:
        return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   width=SIZE, height=SIZE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(SEED),
                   cross_attention_kwargs={"scale": scale}).images
    finally:
        ref.unload_lora_weights()


def weights(pipe):
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ: {differ[:5]}"


# ---- parity with diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unet", "text", "locon", "peft"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_lora_matches_diffusers(sd, files, kind, scale):
    """kohya files on the UNet, on the text encoder, LoCon on both, a PEFT file (its alphas
    from the LoraConfig diffusers saves with it): the images diffusers makes, and far from the
    images without the LoRA."""
    plain = ours(sd)
    want = diffusers_images(sd, files[kind], scale)
    model_files = {p: p.read_bytes() for p in sd.folder.glob("*/*.safetensors")}
    name = sd.ours.load_lora(files[kind], scale)
    try:
        got = ours(sd)
    finally:
        sd.ours.unload_loras()
    tiny_sd.assert_close_images(got, want)
    assert np.abs(plain - want).max() > 10 / 255, "the LoRA hardly changes the image"
    assert name == files[kind].stem
    # fused into weights that lie in the model files' mappings: the files are as they were
    assert model_files and all(p.read_bytes() == b for p, b in model_files.items())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters: meant
def test_several_loras_match_diffusers_adapters(sd, files):
    """Two LoRAs, each with its scale: diffusers' set_adapters."""
    ref = StableDiffusionPipeline(**sd.ref.components)
    ref.set_progress_bar_config(disable=True)
    tiny_sd.use_sampler(ref, sd.scheduler_config, "euler")
    ref.load_lora_weights(str(files["locon"]), adapter_name="a")
    ref.load_lora_weights(str(files["peft"]), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    try:
        want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, width=SIZE,
                   height=SIZE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(SEED)).images
    finally:
        ref.unload_lora_weights()
    sd.ours.load_lora(files["locon"], 0.7)
    sd.ours.load_lora(files["peft"], 0.3)
    try:
        assert sd.ours.loras == {"locon": (0.7, 0.7), "pytorch_lora_weights": (0.3, 0.3)}
        got = ours(sd)
    finally:
        sd.ours.unload_loras()
    tiny_sd.assert_close_images(got, want)


# ---- the formats read the same --------------------------------------------------------------
def test_ldm_names_load_as_diffusers_names(sd, files):
    """`lora_unet_input_blocks_1_1_proj_in` ... and `lora_unet_down_blocks_0_attentions_0_
    proj_in` ... are the same LoRA: the same fused weights, exactly."""
    sd.ours.load_lora(files["locon"])
    want = weights(sd.ours)
    sd.ours.unload_loras()
    base = weights(sd.ours)
    sd.ours.load_lora(files["locon_ldm"])
    got = weights(sd.ours)
    sd.ours.unload_loras()
    assert_same_weights(got, want)
    assert sum(not torch.equal(got[k], base[k]) for k in base) == len(files["layers"][0]) + \
        len(files["layers"][1])  # every layer of the file changed its module


def test_diffusers_old_layout_loads_as_peft(sd, tmp_path):
    old, new = lf.write_old_diffusers(tmp_path / "old.safetensors", sd.ref, 5)
    sd.ours.load_lora(new)
    want = weights(sd.ours)
    sd.ours.unload_loras()
    base = weights(sd.ours)
    sd.ours.load_lora(old)
    got = weights(sd.ours)
    sd.ours.unload_loras()
    assert_same_weights(got, want)
    assert any(not torch.equal(got[k], base[k]) for k in base if k.startswith("text_encoder"))


def test_fused_weight_is_the_original_plus_the_scaled_product(sd, tmp_path):
    """Per-module alphas (none: scale 1), a LoCon 3x3 conv and a 1x1 conv LoRA on a Linear."""
    unet, text = sd.ours.unet, sd.ours.text_encoder
    conv = "down_blocks.0.resnets.0.conv1"
    layers = lf.random_layers({conv: unet.get_submodule(conv).weight}, 6, alphas=(2.0,))
    q = "encoder.layers.1.self_attn.q_proj"
    (down, up, _), = lf.random_layers({q: text.get_submodule(q).weight}, 7).values()
    text_layers = {q: (down[:, :, None, None], up[:, :, None, None], None)}
    path = lf.write_kohya(tmp_path / "x.safetensors", layers, text_layers, dtype=torch.float32)
    before = weights(sd.ours)
    sd.ours.load_lora(path, 0.8, text_encoder_scale=0.25)
    after = weights(sd.ours)
    sd.ours.unload_loras()
    down, up, _ = layers[conv]
    product = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # (out, in, 3, 3)
    want = before[f"unet.{conv}.weight"] + 0.8 * 2.0 / 4 * product
    torch.testing.assert_close(after[f"unet.{conv}.weight"], want)
    want = before[f"text_encoder.{q}.weight"] + 0.25 * text_layers[q][1][:, :, 0, 0] @ \
        text_layers[q][0][:, :, 0, 0]
    torch.testing.assert_close(after[f"text_encoder.{q}.weight"], want)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"unet.{conv}.weight", f"text_encoder.{q}.weight"}


# ---- fuse and unfuse ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unloading_restores_the_original_weights_bit_for_bit(sd, files, dtype):
    pipe = nanodiffusion.load(sd.folder, dtype=dtype)
    original = weights(pipe)
    pipe.load_lora(files["locon"], 0.9)
    pipe.load_lora(files["peft"], 0.4)
    assert weights(pipe).keys() == original.keys()
    assert any(not torch.equal(v, original[k]) for k, v in weights(pipe).items())
    pipe.unload_lora("locon")
    pipe.unload_lora("pytorch_lora_weights")
    assert_same_weights(weights(pipe), original)
    pipe.load_lora(files["locon"], 0.9)
    pipe.unload_loras()
    assert_same_weights(weights(pipe), original)
    assert pipe.loras == {}


def test_an_image_depends_only_on_its_own_loras(sd, files, tmp_path):
    """The same call gives the same bytes before and after other LoRAs came and went, and the
    prompts encoded with the LoRA's text encoder are not reused without it."""
    first = ours(sd)
    sd.ours.load_lora(files["text"], 1.0)
    with_text = ours(sd)
    sd.ours.unload_loras()
    sd.ours.load_lora(files["locon"], 0.3)
    sd.ours.unload_loras()
    assert np.array_equal(ours(sd), first)
    assert not np.array_equal(with_text, first)


# ---- bad files ------------------------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch ran-code",))


def bad_files(sd, files, tmp_path):
    """(path, words the error must hold) for each way a file can be wrong."""
    locon, text = files["layers"]
    unknown = dict(locon, **{"down_blocks.7.attentions.0.proj_in": locon[next(iter(locon))]})
    wide = {k: (torch.randn(4, 2 * d.shape[1], *d.shape[2:]), u, a)
            for k, (d, u, a) in locon.items()}  # an SD 2.x-like LoRA: other widths
    data = files["locon"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    torch.save({"x": RunsCode()}, tmp_path / "evil.pt")
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)}
    from safetensors.torch import save_file
    save_file(loha, str(tmp_path / "loha.safetensors"))
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    return [(lf.write_kohya(tmp_path / "unknown.safetensors", unknown, text),
             ["match no module", "lora_unet_down_blocks_7_attentions_0_proj_in"]),
            (lf.write_kohya(tmp_path / "wide.safetensors", wide, text), ["do not fit",
                                                                          "proj_in"]),
            (tmp_path / "cut.safetensors", ["not a readable safetensors"]),
            (tmp_path / "evil.pt", ["pickled code"]),
            (tmp_path / "loha.safetensors", ["LoHa"]),
            (tmp_path / "sdxl.safetensors", ["SDXL"])]


def test_bad_files_are_refused_whole_naming_the_file(sd, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = weights(sd.ours)
    for path, words in bad_files(sd, files, tmp_path):
        with pytest.raises(ValueError) as e:
            sd.ours.load_lora(path)
        for w in [str(path), *words]:
            assert w in str(e.value), (w, str(e.value))
        assert sd.ours.loras == {}
        assert_same_weights(weights(sd.ours), original)
    assert not (tmp_path / "ran-code").exists()
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        sd.ours.load_lora(tmp_path / "nothing.safetensors")


# ---- prompt tags and Lora hashes ------------------------------------------------------------
def test_tags_are_read_as_a1111_reads_them():
    text, tags = take_tags("a <lora:x:0.5> cat, <lora:y> <lora:z:0.2:0.7>, <lyco:w:unet=0.3>")
    assert text == "a  cat,  , "
    assert tags == [Tag("x", 0.5, 0.5), Tag("y", 1.0, 1.0), Tag("z", 0.2, 0.7),
                    Tag("w", 1.0, 0.3)]
    for bad in ("<lora:x:abc>", "<lora::1>", "<lora:x:te=0.5@0,1@10>", "<lora:x:1:1:8>"):
        with pytest.raises(InputError, match="lora"):
            take_tags(bad)


def addnet_hash(path):
    """sha256 of a safetensors file after its header: kohya's and A1111's LoRA hash."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_prompt_tags_apply_the_named_loras(sd, files, tmp_path):
    folder = tmp_path / "Lora"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "style.safetensors").write_bytes(files["locon"].read_bytes())
    meta = lf.json_metadata(ss_output_name="fancy", sshs_model_hash="AB" * 32)
    lf.write_kohya(folder / "other.safetensors", *files["layers"], metadata=meta)
    sd.ours.load_lora(files["peft"], 0.5)
    sd.ours.lora_dir = folder
    try:
        got = sd.ours.generate(PROMPT + " <lora:style:0.6> <lora:fancy:0.3>", seed=SEED,
                               steps=STEPS, sampler="euler", width=SIZE, height=SIZE)
        sd.ours.load_lora(folder / "sub" / "style.safetensors", 0.6)
        sd.ours.load_lora(folder / "other.safetensors", 0.3)
        want = sd.ours.generate(PROMPT, seed=SEED, steps=STEPS, sampler="euler", width=SIZE,
                                height=SIZE)
        with pytest.raises(InputError, match="no LoRA named 'nothing'.*style"):
            sd.ours.generate(PROMPT + " <lora:nothing:1>", steps=1, width=SIZE, height=SIZE)
    finally:
        sd.ours.unload_loras()
        sd.ours.lora_dir = None
    assert np.array_equal(tiny_sd.as_array(got), tiny_sd.as_array(want))
    assert not np.array_equal(tiny_sd.as_array(got), tiny_sd.as_array(sd.ours.generate(
        PROMPT, seed=SEED, steps=STEPS, sampler="euler", width=SIZE, height=SIZE)))
    p = pnginfo.parse_parameters(got[0].info["parameters"])
    assert p["prompt"] == PROMPT + " <lora:style:0.6> <lora:fancy:0.3> " \
                                   "<lora:pytorch_lora_weights:0.5>"
    h = addnet_hash(folder / "sub" / "style.safetensors")
    assert p["Lora hashes"] == json.dumps(f"pytorch_lora_weights: {addnet_hash(files['peft'])}, "
                                          f"style: {h}, fancy: {'ab' * 6}")


def test_tags_without_a_lora_folder_are_an_input_error(sd):
    with pytest.raises(InputError, match="no LoRA folder"):
        sd.ours.generate(PROMPT + " <lora:style:0.6>", steps=1, width=SIZE, height=SIZE)
    literal = sd.ours.generate("<lora:style:0.6>", steps=1, width=SIZE, height=SIZE,
                               prompt_syntax=False)  # literal text: no tags read
    assert literal[0].info["parameters"].startswith("<lora:style:0.6>")


# ---- the doors: the command line and the A1111 API -----------------------------------------
def test_cli_lora_option_and_tags(sd, files, tmp_path):
    """`--lora PATH:SCALE` and a tag found in --lora-dir: the image Python makes with both,
    its PNG naming both with their hashes; a bad file is exit 2 naming it."""
    from front_door import run_cli
    from PIL import Image

    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(files["text"].read_bytes())
    out = tmp_path / "out.png"
    r = run_cli("generate", PROMPT + " <lora:style:0.8>", "--model", sd.folder, "--negative",
                NEGATIVE, "--lora", f"{files['locon']}:0.6", "--lora-dir", folder, "--seed", SEED,
                "--steps", STEPS, "--sampler", "euler", "--width", SIZE, "--height", SIZE,
                "--out", out)
    assert r.returncode == 0, r.stderr
    sd.ours.load_lora(files["locon"], 0.6)
    sd.ours.load_lora(folder / "style.safetensors", 0.8)
    try:
        want = ours(sd)
    finally:
        sd.ours.unload_loras()
    assert np.abs(want - ours(sd)).max() > 10 / 255
    with Image.open(out) as im:
        tiny_sd.assert_close_images(tiny_sd.as_array([im.convert("RGB")]), want)
        p = pnginfo.parse_parameters(im.info["parameters"])
    assert p["prompt"] == PROMPT + " <lora:style:0.8> <lora:locon:0.6>"
    assert p["Lora hashes"] == json.dumps(f"locon: {addnet_hash(files['locon'])}, "
                                          f"style: {addnet_hash(files['text'])}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(files["locon"].read_bytes()[:100])
    r = run_cli("generate", PROMPT, "--model", sd.folder, "--lora", bad, "--steps", 1,
                "--out", tmp_path / "x.png")
    assert r.returncode == 2 and str(bad) in r.stderr and not (tmp_path / "x.png").exists()


def test_a1111_lora_tags_and_list(sd, files, tmp_path):
    """A txt2img request with a <lora:...> tag makes the image the pipeline makes with that
    LoRA, its infotext with A1111's "Lora hashes"; /loras lists the models folder's Lora/;
    an unknown name is a 400 naming it."""
    pytest.importorskip("fastapi")
    webuiapi = pytest.importorskip("webuiapi")
    httpx = pytest.importorskip("httpx")
    from live_server import serve

    from nanodiffusion.server import Limits
    from nanodiffusion.server.app import create_app

    (tmp_path / "sd").symlink_to(sd.folder)
    (tmp_path / "Lora" / "styles").mkdir(parents=True)
    meta = lf.json_metadata(ss_output_name="fancy", ss_tag_frequency={"a": {"b": 1}})
    path = lf.write_kohya(tmp_path / "Lora" / "styles" / "ink.safetensors", *files["layers"],
                          metadata=meta)
    app = create_app(tmp_path, limits=Limits(max_side=64, max_n=2, max_steps=10))
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        assert api.get_loras() == [{"name": "ink", "alias": "fancy", "path": str(path),
                                    "metadata": {"ss_output_name": "fancy",
                                                 "ss_tag_frequency": {"a": {"b": 1}}}}]
        res = api.txt2img(prompt=PROMPT + " <lora:ink:0.7>", negative_prompt=NEGATIVE,
                          seed=SEED, steps=STEPS, cfg_scale=7.5, width=SIZE, height=SIZE,
                          sampler_name="Euler")
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "<lora:nothing:1>",
                                                         "steps": 1, "width": SIZE,
                                                         "height": SIZE}, timeout=60)
    assert r.status_code == 400 and "nothing" in r.json()["error"]["message"]
    assert f'Lora hashes: "ink: {addnet_hash(path)}"' in res.info["infotexts"][0]
    sd.ours.load_lora(path, 0.7)
    try:
        want = ours(sd)
    finally:
        sd.ours.unload_loras()
    assert np.array_equal(tiny_sd.as_array([res.image.convert("RGB")]), want)
    assert not np.array_equal(want, ours(sd))
