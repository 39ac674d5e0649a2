"""AUTOMATIC1111's prompt syntax (prompts.py): the parser on A1111's documented examples; the
chunked, weighted encoding (weight 1 is the plain encoding bit for bit, a 150-token prompt is
its two chunks' encodings side by side, commas and BREAK end chunks, prompt and negative
padded to the same chunks); CLIP skip against transformers' hidden states and diffusers'
clip_skip (A1111's N is diffusers' N - 1) on a tiny random Stable Diffusion."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion import prompts
from nanodiffusion.errors import InputError
from nanodiffusion.prompts import parse

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline  # noqa: E402

PROMPT, NEGATIVE, SEED, STEPS, W, H = "a red circle on a blue square", "green", 3, 6, 24, 16
WORDS = ("cat dog red blue green house tree sky sun moon star car boat fish bird road hill "
         "lake city river").split()  # one CLIP token each


def words(n, start=0):
    """n words of one token each, no commas."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd"))


# ---- the parser -------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    # the examples of A1111's documentation of its parser
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # the wiki's cheat sheet
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.2100000000000002)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
    ("a \\[b\\] \\\\ c", [("a [b] \\ c", 1.0)]),
    # what A1111 does with the rest
    ("a (b: 1.3 ) c", [("a ", 1.0), ("b", 1.3), (" c", 1.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # closing brackets with no open one: text
    ("a:1.3) b", [("a:1.3) b", 1.0)]),
    ("(style:anime)", [("style:anime", 1.1)]),  # not a weight: text, in brackets
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("", []),
    ("a\\b", [("a\\b", 1.0)]),  # a backslash that escapes nothing stays
])
def test_parse_documented_examples(text, want):
    assert parse(text) == [want]


def test_break_starts_a_section():
    assert parse("a red circle BREAK (a blue square)") == [[("a red circle", 1.0)],
                                                           [("a blue square", 1.1)]]
    assert parse("BREAKFAST BREAK") == [[("BREAKFAST", 1.0)], []]
    assert parse("(a BREAK b)") == [[("a", 1.1)], [("b", 1.1)]]
    assert parse("a BREAK BREAK b") == [[("a", 1.0)], [], [("b", 1.0)]]


@pytest.mark.parametrize("text,shown", [("a (b:1.2.3) c", "'(b:1.2.3)'"), ("(a:.)", "'(a:.)'"),
                                        ("(a:" + "9" * 400 + ")", "'(a:999")])
def test_a_weight_that_is_not_a_number_is_an_input_error(text, shown):
    with pytest.raises(InputError, match=r"prompt weight .* in " + re.escape(shown)):
        parse(text)


# ---- chunks -----------------------------------------------------------------------------
def test_chunks_break_at_the_last_comma_of_the_final_20_tokens(sd):
    tok, comma = sd.ours.tokenizer, sd.ours.tokenizer.encode(",")[0]

    def sizes(text):
        return [len(ids) for ids, _ in prompts.chunks(tok, parse(text), 75)]
    assert sizes(words(150)) == [75, 75]
    assert sizes(words(151)) == [75, 75, 1]
    assert sizes(words(75)) == [75]
    # a comma at index 60 of a full chunk (within its last 20): the chunk ends after it
    assert sizes(words(60) + ", " + words(30)) == [61, 30]
    ids = prompts.chunks(tok, parse(words(60) + ", " + words(30)), 75)
    assert ids[0][0][-1] == comma and ids[1][0] == tok.encode(words(30))
    # at index 54 (21 from the end): no backtrack, a plain cut at 75
    assert sizes(words(54) + ", " + words(30)) == [75, 10]
    assert sizes(words(10) + " BREAK " + words(5)) == [10, 5]
    assert sizes("BREAK") == [0] and sizes("") == [0] and sizes("a BREAK") == [1]
    weights = prompts.chunks(tok, parse("(red:1.5) circle"), 75)[0][1]
    assert weights == [1.5, 1.0]


# ---- weighted, chunked encoding ---------------------------------------------------------
def plain(pipe, texts):
    """What the pipeline gave before prompts.py: the tokenizer's rows, one batch."""
    ids = pipe.tokenizer(texts, max_length=pipe.text_encoder.config.max_positions)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def test_weight_one_is_the_plain_encoding_bit_for_bit(sd):
    pipe = sd.ours
    for text in (PROMPT, "", "a cat, a dog, (sky:1.0)", words(75)):
        pipe._prompt_cache.clear()
        got = pipe.encode_prompt([text])
        want = plain(pipe, [text.replace("(sky:1.0)", "sky")])
        assert torch.equal(got, want), text
    # literal text (prompt_syntax=False) is the plain encoding of the brackets too
    pipe._prompt_cache.clear()
    assert torch.equal(pipe.encode_prompt(["a (red) cat"], prompt_syntax=False),
                       plain(pipe, ["a (red) cat"]))
    assert not torch.equal(pipe.encode_prompt(["a (red) cat"]), plain(pipe, ["a (red) cat"]))


@torch.no_grad()
def test_a_150_token_prompt_is_its_two_chunks_side_by_side(sd):
    pipe = sd.ours
    long, first, second = words(150), words(75), words(75, start=75)
    assert len(pipe.tokenizer.encode(long)) == 150
    pipe._prompt_cache.clear()
    got = pipe.encode_prompt([long])  # (1, 154, D)
    assert got.shape[1] == 2 * 77
    want = plain(pipe, [first, second])  # (2, 77, D), one batch as the chunks are
    assert torch.equal(got[0], torch.cat([want[0], want[1]]))
    # a BREAK gives the same chunks whatever their length
    pipe._prompt_cache.clear()
    broken = pipe.encode_prompt([f"{PROMPT} BREAK {NEGATIVE}"])[0]
    assert torch.equal(broken, torch.cat(list(plain(pipe, [PROMPT, NEGATIVE]))))


@torch.no_grad()
def test_weights_scale_the_token_states_and_keep_the_chunks_mean(sd):
    """With the final LayerNorm's bias of a trained encoder (a fresh zero bias gives states
    of mean 0, which A1111's rescale divides by)."""
    pipe = sd.ours
    norm = pipe.text_encoder.final_layer_norm
    bias = norm.bias.clone()
    torch.nn.init.normal_(norm.bias, std=0.5, generator=torch.Generator().manual_seed(0))
    pipe._prompt_cache.clear()
    try:
        got = pipe.encode_prompt(["a (red:1.5) [circle]"])[0]  # (77, D)
        z = plain(pipe, ["a red circle"])[0]
    finally:
        norm.bias.copy_(bias)
        pipe._prompt_cache.clear()
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1  # after the start token and "a"
    want = z * w[:, None]
    want = want * (z.mean() / want.mean())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got.mean(), z.mean())
    assert not torch.allclose(got, z)


@torch.no_grad()
def test_prompt_and_negative_are_padded_with_empty_chunks(sd):
    pipe = sd.ours
    pipe._prompt_cache.clear()
    states = pipe.encode_prompt([NEGATIVE, words(100)])  # (2, 154, D)
    assert states.shape[1] == 154
    neg, empty = plain(pipe, [NEGATIVE]), plain(pipe, [""])
    assert torch.equal(states[0], torch.cat([neg[0], empty[0]]))


def test_a_long_prompt_reaches_the_unet(sd):
    """The UNet's cross-attention takes any context length: the tokens past 75 change the
    image (they were cut before)."""
    kw = dict(seed=SEED, steps=2, width=W, height=H, sampler="euler")
    base = words(75)
    a = sd.ours.generate(base + " " + words(20, start=3), **kw)[0]
    b = sd.ours.generate(base + " " + words(20, start=7), **kw)[0]
    assert a.tobytes() != b.tobytes()


# ---- CLIP skip --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref_text_model(sd):
    """diffusers 0.42's clip_skip reads text_encoder.text_model.final_layer_norm, a name
    transformers' CLIPTextModel no longer has (5.x: no text_model prefix): give it that name,
    outside the module tree (no cycle in state_dict)."""
    te = sd.ref.text_encoder
    if not hasattr(te, "text_model"):
        object.__setattr__(te, "text_model", SimpleNamespace(
            final_layer_norm=te.final_layer_norm))
    return te


@torch.no_grad()
def test_clip_skip_matches_transformers_hidden_states(sd, ref_text_model):
    ref, ours = ref_text_model, sd.ours.text_encoder
    ids = sd.ours.tokenizer([PROMPT, NEGATIVE])
    out = ref(ids, output_hidden_states=True)
    for n in (1, 2):
        want = ref.text_model.final_layer_norm(out.hidden_states[-n])
        hidden, pooled = ours(ids, clip_skip=n)
        torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled, out.pooler_output, rtol=1e-5, atol=1e-5)


def check_clip_skip_parity(sd, n, guidance, task="generate", ref=None, **kw):
    """diffusers (`ref`, default StableDiffusionPipeline) with clip_skip = n - 1 against our
    `task` with clip_skip n; kw in our names (image, mask, strength). diffusers skips layers
    for the prompt only, A1111 (and we) for the negative prompt too: with guidance the
    reference gets the negative's states from diffusers' own encode_prompt with the same
    clip_skip."""
    ref = ref or sd.ref
    tiny_sd.use_sampler(ref, sd.scheduler_config, "euler")
    skip = n - 1 or None
    negative = dict(negative_prompt=NEGATIVE)
    if guidance != 1.0:
        neg, _ = ref.encode_prompt(NEGATIVE, "cpu", 1, False, clip_skip=skip)
        negative = dict(negative_prompt_embeds=neg)
    ref_kw = {("mask_image" if k == "mask" else k): v for k, v in kw.items()}
    with tiny_sd.latents_of(ref.vae) as want_latents:
        want = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, width=W,
                   height=H, num_images_per_prompt=2, output_type="np", clip_skip=skip,
                   generator=torch.Generator("cpu").manual_seed(SEED), **negative,
                   **ref_kw).images
    with tiny_sd.latents_of(sd.ours.vae) as got_latents:
        got = getattr(sd.ours, task)(PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS,
                                     guidance=guidance, sampler="euler", n=2, width=W,
                                     height=H, clip_skip=n, **kw)
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want, (got_latents, want_latents))
    return got


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_clip_skip_matches_diffusers(sd, ref_text_model, guidance):
    skipped = check_clip_skip_parity(sd, 2, guidance)
    last = check_clip_skip_parity(sd, 1, guidance)
    assert skipped[0].tobytes() != last[0].tobytes()
    assert "Clip skip: 2," in skipped[0].info["parameters"] + ","
    assert "Clip skip" not in last[0].info["parameters"]


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_clip_skip_img2img_and_inpaint_match_diffusers(sd, ref_text_model, task):
    rng = np.random.default_rng(0)
    kw = dict(image=Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
              strength=0.75)
    cls = StableDiffusionImg2ImgPipeline
    if task == "inpaint":
        mask = np.zeros((H, W), np.uint8)
        mask[3:12, 5:17] = 255
        kw["mask"], cls = Image.fromarray(mask), StableDiffusionInpaintPipeline
    ref = cls(**sd.ref.components)
    ref.set_progress_bar_config(disable=True)
    got = check_clip_skip_parity(sd, 2, 7.5, task, ref, **kw)
    assert "Clip skip: 2," in got[0].info["parameters"]


@pytest.mark.parametrize("bad", [0, 3, 1.5, "2", True])
def test_clip_skip_out_of_range_is_an_input_error(sd, bad):
    with pytest.raises(InputError, match=r"clip_skip must be an integer in \[1, 2\].*got "):
        sd.ours.generate(PROMPT, clip_skip=bad, steps=1, width=W, height=H)


# ---- unCLIP -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unclip():
    import nanodiffusion

    return nanodiffusion.load("shapes-unclip")


def test_unclip_reads_the_prompt_without_its_syntax(unclip):
    """unCLIP's prior takes one window of the last layer: the syntax is taken out (no
    weights), the PNG keeps the prompt as written; clip skip is refused."""
    kw = dict(seed=2, steps=2, prior_steps=2)
    weighted = unclip.generate("a (red:1.3) circle BREAK [above] a blue square", **kw)[0]
    words = unclip.generate("a red circle above a blue square", **kw)[0]
    assert weighted.tobytes() == words.tobytes()
    assert weighted.info["parameters"].startswith("a (red:1.3) circle BREAK [above]")
    literal = unclip.generate("a (red) circle", prompt_syntax=False, **kw)[0]
    assert literal.tobytes() != unclip.generate("a (red) circle", **kw)[0].tobytes()
    assert literal.info["parameters"].startswith("a \\(red\\) circle\n")
    with pytest.raises(InputError, match="clip_skip 2: unCLIP models take only 1"):
        unclip.generate("a red circle", clip_skip=2, **kw)
