"""CLIP tokenizer: parity with transformers' CLIPTokenizer (reference) on the same files."""
import json
import time
import warnings

import pytest
import torch

from nanodiffusion.models.tokenizer import CLIPTokenizer, train_bpe

transformers = pytest.importorskip("transformers")

WHITESPACE = "".join(map(chr, [0x0B, 0x0C, 0x1C, 0x1F, 0x85, 0xA0, 0x1680, 0x2000, 0x200A,
                               0x2028, 0x202F, 0x205F, 0x3000, 0x200B, 0xFEFF]))
PROMPTS = [
    "A photo of an astronaut riding a horse on Mars!",
    "", "   ", "tab\tnew\nline\r\n  spaces",
    "it's don't we'll I'D they're 'quoted' \"double\" `tick`",
    "“Curly quotes” & <b>html</b> &amp; stuff",
    "Café naïve résumé, e\u0301 (combining) vs é",
    "日本語のテキスト 中文 한국어 ΟΔΟΣ İstanbul ß ẞ ǅ ﬁ",
    "🙂🚀 emoji 👩‍👩‍👧 family 🇫🇷 flag",
    "12345 3.14159 1,000,000 ½ ² ٣ 2024-01-01",
    "x" * 300, "wow!!! ???..., a - b — c … d",
    "hello" + WHITESPACE + "world", "\x00\x01 control",
    "<|startoftext|> inside <|endoftext|> text <|StartOfText|>",
    "masterpiece, best quality, 8k, (photorealistic:1.4), RAW photo, [[detailed]], {x|y}",
    "a photo of " + " ".join(f"cat{i}" for i in range(60)),  # truncated
]


@pytest.fixture(scope="module")
def default():
    return CLIPTokenizer.default()


def hf_ids(hf, texts, max_length=77):
    return hf(texts, padding="max_length", max_length=max_length, truncation=True,
              return_tensors="pt")["input_ids"]


def encode_quietly(tok, texts, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(texts, **kwargs)


def test_default_vocabulary(default):
    start = time.perf_counter()
    tok = CLIPTokenizer.default()
    assert time.perf_counter() - start < 1.0
    assert tok.vocab_size == 49408 and len(tok.merges) == 48894
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    ids = default("A photo of an astronaut riding a horse on Mars!")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :13].tolist() == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525,
                                    7496, 256, 49407]
    assert (ids[0, 13:] == 49407).all()


def test_parity_with_transformers(default, tmp_path):
    default.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert hf.pad_token_id == 49407 and hf.model_max_length == 77
    assert torch.equal(encode_quietly(default, PROMPTS), hf_ids(hf, PROMPTS))
    assert torch.equal(encode_quietly(default, PROMPTS, max_length=20), hf_ids(hf, PROMPTS, 20))
    for text in PROMPTS[:8]:
        assert default.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


def test_sd2_pad_zero(default, tmp_path):
    sd2 = CLIPTokenizer.default(pad_token_id=0)
    sd2.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert hf.pad_token == "!" and hf.pad_token_id == 0
    assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 0
    plain = [p for p in PROMPTS if "!" not in p]
    assert torch.equal(encode_quietly(sd2, plain), hf_ids(hf, plain))
    # transformers turns every literal "!" into the pad token; hf_pad_quirk reproduces that,
    # the default keeps "!" ordinary text (OpenCLIP, which SD 2 was trained with).
    quirk = CLIPTokenizer.from_folder(tmp_path, hf_pad_quirk=True)
    assert torch.equal(encode_quietly(quirk, PROMPTS), hf_ids(hf, PROMPTS))
    ids = sd2("Mars!")[0].tolist()
    assert ids[:4] == [49406, 7496, 256, 49407] and set(ids[4:]) == {0}


def test_truncation_keeps_end_token_and_warns(default):
    text = PROMPTS[-1]
    n = len(default.encode(text))
    with pytest.warns(UserWarning, match=f"the last {n - 75} tokens were dropped"):
        ids = default(text)
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 and ids[0, 0] == 49406
    assert ids[0, 1:-1].tolist() == default.encode(text)[:75]


def test_decode(default):
    ids = default(["A photo of an astronaut, riding!", "日本 🙂 café"])
    assert default.decode(ids[0]) == "a photo of an astronaut , riding !"
    assert default.decode(ids[1]) == "日本 🙂 café"
    assert CLIPTokenizer.default(pad_token_id=0).decode([49406, 1125, 49407, 0, 0]) == "photo"


def test_tokenizer_json_layout(default, tmp_path):
    default.save(tmp_path / "files")
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path / "files")
    hf.save_pretrained(tmp_path / "json")  # writes a single tokenizer.json
    assert not (tmp_path / "json" / "vocab.json").exists()
    tok = CLIPTokenizer.from_folder(tmp_path / "json")
    assert tok.vocab_size == 49408 and tok.merges == default.merges
    assert torch.equal(encode_quietly(tok, PROMPTS), hf_ids(hf, PROMPTS))
    # merges written as "a b" strings (older tokenizers), no tokenizer_config: pad from padding
    data = json.loads((tmp_path / "json" / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    data["padding"] = {"pad_token": "!", "pad_id": 0}
    (tmp_path / "str").mkdir()
    (tmp_path / "str" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = CLIPTokenizer.from_folder(tmp_path / "str")
    assert tok.merges == default.merges and tok.pad_token_id == 0


def test_missing_folder_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CLIPTokenizer.from_folder(tmp_path)


CAPTIONS = ["a red circle above a blue square", "two green triangles on a white background",
            "a small yellow star left of a big purple circle", "three red squares!",
            "a blue hexagon below an orange triangle"] * 3


def test_train_bpe_round_trip(tmp_path):
    tok = train_bpe(CAPTIONS, 60)
    assert train_bpe(CAPTIONS, 60).merges == tok.merges  # deterministic
    assert len(tok.merges) <= 60 and tok.vocab_size == 512 + len(set(map("".join, tok.merges))) + 2
    assert tok.eot_token_id == tok.vocab_size - 1 and tok.sot_token_id == tok.vocab_size - 2
    assert tok.decode(tok(CAPTIONS[2])[0]) == CAPTIONS[2]
    tok.save(tmp_path)
    loaded = CLIPTokenizer.from_folder(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = CAPTIONS[:5] + ["an unseen Word, ü 🙂 42", "a red circle " * 30]
    ours = encode_quietly(tok, texts)
    assert torch.equal(ours, encode_quietly(loaded, texts))
    assert torch.equal(ours, hf_ids(hf, texts))
    # common words became single tokens
    assert len(tok.encode("a red circle")) == 3


def test_train_bpe_stops_when_every_word_is_one_token():
    tok = train_bpe(["ab ab abc"], 100)
    assert tok.merges == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]
    assert tok.encode("ab abc") == [tok.encoder["ab</w>"], tok.encoder["abc</w>"]]


def test_openai_cleanup():
    tok = CLIPTokenizer.default(clean="openai")
    assert tok.encode("Fish &amp; Chips") == CLIPTokenizer.default().encode("fish & chips")
    with pytest.raises(ValueError, match="clean"):
        CLIPTokenizer.default(clean="none")
