"""CLIP byte-level BPE tokenizer.

Semantics follow OpenAI CLIP's `simple_tokenizer.py` as transformers' `CLIPTokenizer` runs it
(the ids are identical to transformers 5.x for the same vocabulary): text is NFC-normalised,
whitespace runs collapse to one space, it is lower-cased, split into words by CLIP's pattern,
each word's UTF-8 bytes are mapped to printable characters (GPT-2's byte map), `</w>` marks the
word's last symbol, and the merges are applied lowest rank first.

A prompt becomes `[<|startoftext|>, tokens..., <|endoftext|>, pad...]` of length 77.
"""
import gzip
import html
import json
import unicodedata
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import regex
import torch

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END = "</w>"
VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894  # 49408 tokens = 256 bytes + 256 bytes</w> + merges + SOT + EOT
MAX_LENGTH = 77
# CLIP's word pattern: English contractions, letter runs, single digits, punctuation runs.
WORD_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
SPACE_RE = regex.compile(r"\s+")


@lru_cache(maxsize=None)
def bytes_to_unicode():
    """GPT-2's reversible byte -> character map: printable latin-1 bytes map to themselves,
    the 68 others (controls, space, soft hyphen...) to chr(256), chr(257), ... in byte order."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_symbols():
    """The 256 byte symbols in CLIP's vocabulary order (printable first, i.e. by code point)."""
    return sorted(bytes_to_unicode().values())


def build_vocab(merges):
    """CLIP's vocabulary layout: bytes, bytes + </w>, one token per merge, then SOT and EOT.
    A merge whose result already exists (a+bc and ab+c) adds no second token."""
    base = byte_symbols()
    tokens = dict.fromkeys(base + [s + END for s in base] + list(map("".join, merges)) + [SOT, EOT])
    return dict(zip(tokens, range(len(tokens))))


def clean_hf(text):
    """transformers 5.x CLIPTokenizer normaliser: NFC, collapse whitespace, lower-case."""
    # tokenizers lower-cases char by char: a final capital sigma becomes σ, not Python's ς.
    text = unicodedata.normalize("NFC", text).replace("\u03a3", "\u03c3")
    return SPACE_RE.sub(" ", text).lower()


def clean_openai(text):
    """OpenAI CLIP's cleanup: ftfy.fix_text, double html-unescape, whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return SPACE_RE.sub(" ", text).strip().lower()


def merge_pair(parts, pair):
    """Replace every non-overlapping occurrence of `pair`, left to right, by its join."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


class CLIPTokenizer:
    """Byte-level BPE over `vocab` (token -> id) and `merges` (pairs, in rank order).

    `pad_token_id` fills the sequence after EOT: SD 1.x uses EOT (49407), SD 2.x uses 0 ("!").
    Special tokens written in the prompt are recognised before any cleanup (case-sensitive), as
    transformers does with its added tokens. transformers also treats a pad token of "!" (SD 2.x)
    that way, so a literal "!" in the prompt becomes id 0 whatever follows (diffusers #4153);
    `hf_pad_quirk=True` reproduces that, the default keeps "!" ordinary text as OpenCLIP does.
    `clean` is "hf" (transformers' normaliser, default) or "openai" (ftfy + html unescape).
    """

    def __init__(self, vocab, merges, pad_token_id=None, max_length=MAX_LENGTH, clean="hf",
                 hf_pad_quirk=False):
        if clean not in ("hf", "openai"):
            raise ValueError(f"clean must be 'hf' or 'openai', got {clean!r}")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merges = list(map(tuple, merges))
        # Reversed so that a pair listed twice keeps its first (lowest) rank.
        self.ranks = dict(zip(reversed(self.merges), range(len(self.merges) - 1, -1, -1)))
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.pad_token_id = self.eot_token_id if pad_token_id is None else int(pad_token_id)
        if self.pad_token_id not in self.decoder:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not in the vocabulary "
                             f"(0..{len(self.encoder) - 1})")
        self.max_length = max_length
        self.hf_pad_quirk = hf_pad_quirk
        self.specials = {SOT: self.sot_token_id, EOT: self.eot_token_id}
        if hf_pad_quirk:
            self.specials[self.decoder[self.pad_token_id]] = self.pad_token_id
        alternatives = sorted(self.specials, key=len, reverse=True)
        self.special_re = regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")
        self.clean = clean
        self._clean = clean_hf if clean == "hf" else clean_openai
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {}

    @property
    def vocab_size(self):
        return len(self.encoder)

    @classmethod
    def default(cls, pad_token_id=None, **kwargs):
        """OpenAI CLIP's 49,408-token vocabulary, bundled with the package."""
        with gzip.open(VOCAB_FILE) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = list(map(tuple, map(str.split, lines[1:1 + NUM_MERGES])))
        return cls(build_vocab(merges), merges, pad_token_id=pad_token_id, **kwargs)

    @classmethod
    def from_folder(cls, path, **kwargs):
        """Read a model folder's tokenizer: vocab.json + merges.txt, or a tokenizer.json."""
        path = Path(path)
        tokenizer_json = None
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = read_merges(path / "merges.txt")
        elif (path / "tokenizer.json").is_file():
            tokenizer_json = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
            vocab, merges = parse_tokenizer_json(tokenizer_json)
        else:
            raise FileNotFoundError(f"{path} has neither vocab.json + merges.txt "
                                    "nor tokenizer.json")
        pad = find_pad_token(path, tokenizer_json)
        if pad is not None and "pad_token_id" not in kwargs:
            if pad not in vocab:
                raise ValueError(f"pad token {pad!r} of {path} is not in its vocabulary")
            kwargs["pad_token_id"] = vocab[pad]
        return cls(vocab, merges, **kwargs)

    def save(self, folder, max_length=None):
        """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json in the
        layout transformers' CLIPTokenizer.from_pretrained reads. `max_length` (default: ours)
        is written as model_max_length, the length transformers pads and cuts prompts to: it
        must be the text encoder's number of positions, or diffusers' pipelines fail."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False),
                                           encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT,
                   "pad_token": self.decoder[self.pad_token_id]}
        max_length = self.max_length if max_length is None else max_length
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                  "do_lower_case": True, "errors": "replace", **special}
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")

    def bpe(self, word):
        """Split one byte-mapped word into vocabulary tokens (the last one ends in </w>)."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + END]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            parts = merge_pair(parts, pair)
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[word] = parts
        return parts

    def words(self, text):
        """Cleaned text -> byte-mapped words, the units BPE works on."""
        for word in WORD_RE.findall(self._clean(text)):
            yield "".join(self.byte_encoder[b] for b in word.encode("utf-8"))

    def encode(self, text):
        """Token ids of `text`, without SOT / EOT / padding."""
        ids = []
        for i, piece in enumerate(self.special_re.split(text)):
            if i % 2 == 1:  # split() puts the matched special tokens at odd positions
                ids.append(self.specials[piece])
                continue
            for word in self.words(piece):
                ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids

    def __call__(self, texts, max_length=None):
        """str or list of str -> LongTensor (B, max_length): SOT, tokens, EOT, padding.
        Longer prompts are cut to keep EOT last, with a warning naming what was dropped."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_length = self.max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for SOT and EOT), got {max_length}")
        out = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            keep = max_length - 2
            if len(ids) > keep:
                warnings.warn(f"prompt {i} has {len(ids)} tokens, more than the {keep} that fit "
                              f"in max_length={max_length}; the last {len(ids) - keep} tokens "
                              f"were dropped: {self.decode(ids[keep:])!r}", stacklevel=2)
                ids = ids[:keep]
            row = [self.sot_token_id] + ids + [self.eot_token_id]
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids):
        """Ids -> text. A leading SOT is dropped and everything from the first EOT on
        (the padding) is ignored."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.sot_token_id)
        data = bytes(self.byte_decoder[c] for c in text)
        # "</w>" is itself four byte symbols; after decoding it marks a word boundary.
        return data.decode("utf-8", errors="replace").replace(END, " ").strip()


def read_merges(path):
    """merges.txt: an optional '#version' header, then one 'a b' pair per line."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.rstrip("\r").split(" ")) for line in lines if line.rstrip("\r")]


def parse_tokenizer_json(data):
    """tokenizer.json (HF tokenizers): model.vocab, model.merges ("a b" or [a, b]), plus the
    added tokens (SOT / EOT) that may live only in `added_tokens`."""
    vocab = dict(data["model"]["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in data["model"]["merges"]]
    for token in data.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    return vocab, merges


def find_pad_token(path, tokenizer_json=None):
    """The pad token string from tokenizer_config.json, special_tokens_map.json or the
    padding section of tokenizer.json; None when none says."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = Path(path) / name
        if file.is_file():
            pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is not None:
                return pad
    padding = (tokenizer_json or {}).get("padding") or {}
    return padding.get("pad_token")


def train_bpe(texts, num_merges, pad_token_id=None, clean="hf"):
    """Learn `num_merges` byte-level BPE merges from `texts` (e.g. captions).

    Each step merges the most frequent adjacent pair over all words (weighted by word count);
    ties go to the smallest pair in string order, so the result is deterministic. Stops early
    when no pair is left. Returns a CLIPTokenizer: 512 byte tokens, merges, SOT, EOT.
    """
    cleaner = CLIPTokenizer(build_vocab([]), [], clean=clean)
    counts = Counter(word for text in texts for word in cleaner.words(text))
    corpus = [(list(w[:-1]) + [w[-1] + END], n) for w, n in counts.items()]
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for parts, n in corpus:
            for pair in zip(parts, parts[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        corpus = [(merge_pair(parts, best), n) for parts, n in corpus]
    return CLIPTokenizer(build_vocab(merges), merges, pad_token_id=pad_token_id, clean=clean)
