"""Prompts as AUTOMATIC1111 users write them (docs/prompts.md): its emphasis syntax, prompts
longer than the text encoder's window encoded in chunks, and the token weights applied to the
token states as A1111 applies them. Written from A1111's documentation (the wiki's Features
page, "Attention/emphasis" and "Infinite prompt length") and its documented examples.

    (text)  x 1.1     ((text))  x 1.21     (text:1.3)  x 1.3     [text]  / 1.1
    \\( \\) \\[ \\] \\\\  the character itself     BREAK  the next tokens start a new chunk

Brackets never closed weight the rest of the prompt; a closing bracket with no open one, and
`(text:word)`, are text, as in A1111. Chunks hold `max_positions - 2` tokens (75 for SD's 77)
between the start and end tokens; a full chunk breaks after its last comma when that comma is
among its last 20 tokens (A1111's default "comma padding backtrack"), the tokens after the
comma starting the next chunk. Each chunk is encoded alone; the states of a chunk whose
weights are not all 1 are multiplied by them and then rescaled to the chunk's unweighted mean
(A1111's "Original" emphasis); a prompt's chunks are concatenated along the sequence.

Textual inversion embeddings (docs/embeddings.md) are found in the tokens as A1111 finds them:
where the tokens of an embedding's name start, its n vectors take the place of those tokens,
n tokens of the chunk, all with the weight of the text they are in; an embedding that does
not fit in what is left of a chunk starts the next one (the rest padded), never split.
"""
import math
import re
from collections import namedtuple

import torch

from .errors import InputError

EMPHASIS = 1.1           # (text) and [text]
COMMA_BACKTRACK = 20     # A1111's comma_padding_backtrack default
CACHE_SIZE = 256         # prompts kept encoded: a server sees endless prompts

_TOKEN = re.compile(r"""
    \\[()\[\]\\]             # an escape: \( \) \[ \] \\
  | [(\[]                    # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)   # a weight that closes a round bracket: ":1.3)"
  | [)\]]                    # a closing bracket
  | [^\\()\[\]:]+            # text
  | [\\:]                    # a colon, a backslash that escapes nothing: text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(text):
    """A prompt -> its sections (split at BREAK), each a list of (text, weight) fragments in
    order, neighbours of equal weight merged as A1111 merges them ("(a)(b)": one "ab").
    A weight that is not a number (`(a:1.2.3)`) is an InputError."""
    frags = []  # [text, weight], or None where a BREAK is
    round_open, square_open = [], []  # where each open bracket's fragments start
    where = []  # where each open round bracket is in `text`, for errors
    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if len(token) == 2 and token[0] == "\\":
            frags.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(frags))
            where.append(m.start())
        elif token == "[":
            square_open.append(len(frags))
        elif weight is not None and round_open:
            _scale(frags, round_open.pop(), _number(weight, text[where.pop():m.end()]))
        elif token == ")" and round_open:
            _scale(frags, round_open.pop(), EMPHASIS)
            where.pop()
        elif token == "]" and square_open:
            _scale(frags, square_open.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                frags += [None, [part, 1.0]] if i else [[part, 1.0]]
    for start in round_open:  # unclosed brackets reach the end, round ones first as in A1111
        _scale(frags, start, EMPHASIS)
    for start in square_open:
        _scale(frags, start, 1 / EMPHASIS)
    return _sections(frags)


def _number(weight, bracket):
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        if len(bracket) > 60:
            weight, bracket = weight[:20] + "...", bracket[:40] + "..."
        raise InputError(f"prompt weight {weight!r} in {bracket!r} is not a finite number; "
                         f"write a weight as a decimal number, (text:1.3), or escape the "
                         f"brackets to keep them as text: \\(text\\)")
    return value


def _scale(frags, start, factor):
    for frag in frags[start:]:
        if frag is not None:  # a BREAK stays a BREAK inside brackets
            frag[1] *= factor


def _sections(frags):
    sections = [[]]
    for frag in frags:
        section = sections[-1]
        if frag is None:
            sections.append([])
        elif not frag[0]:
            continue
        elif section and section[-1][1] == frag[1]:
            section[-1] = (section[-1][0] + frag[0], frag[1])
        else:
            section.append((frag[0], frag[1]))
    return sections


def plain_text(prompt):
    """The text of a prompt without its syntax (BREAK read as a space), for what reads the
    words and not the weights: CLIP reranking, unCLIP's prior."""
    return " ".join("".join(text for text, _ in section) for section in parse(prompt))


def escape(text):
    """Literal text -> the prompt this syntax (and A1111's) reads as that text: brackets and
    backslashes escaped. The PNG parameters of an image made with prompt_syntax=False."""
    return re.sub(r"[\\()\[\]]", lambda m: "\\" + m.group(0), text)


class Vocabulary:
    """Textual inversion embeddings by the token ids of their names, found in a prompt as
    A1111's EmbeddingDatabase finds them: at each token, the longest name whose tokens start
    there. `vectors`: {name: (n, D)}; `refused`: {name: why} for names a prompt may not use
    (files that do not fit the model), an InputError when one is found."""

    def __init__(self, tokenizer, vectors, refused=None):
        self.vectors = dict(vectors)
        self.refused = {k: v for k, v in (refused or {}).items() if k not in self.vectors}
        self._starts = {}  # first token id -> [(ids, name)], the longest first
        for name in [*self.vectors, *self.refused]:
            ids = tuple(tokenizer.encode(name))
            if ids:
                self._starts.setdefault(ids[0], []).append((ids, name))
        for found in self._starts.values():
            found.sort(key=lambda item: -len(item[0]))

    def match(self, tokens, i):
        """(name, number of tokens it spans) of the embedding named at tokens[i], or None."""
        for ids, name in self._starts.get(tokens[i], ()):
            if tuple(tokens[i:i + len(ids)]) == ids:
                if name in self.refused:
                    raise InputError(f"the prompt names the embedding {name!r}, which cannot "
                                     f"be used: {self.refused[name]}")
                return name, len(ids)
        return None


# An embedding's k-th vector in a chunk's ids, in the place of a token id.
Vector = namedtuple("Vector", "name index")


def chunks(tokenizer, sections, size, vocabulary=None):
    """Sections of (text, weight) -> chunks: (token ids, weights) of at most `size` tokens
    each, without start and end tokens, as A1111 makes them: each section starts a chunk, a
    full chunk moves the tokens after its last comma to the next when that comma is among
    its last COMMA_BACKTRACK tokens. A prompt of no tokens is one empty chunk. The names of
    the embeddings of `vocabulary` (a Vocabulary) become their vectors, a Vector(name, k)
    each in the ids."""
    comma = tokenizer.encode(",")
    comma = comma[0] if len(comma) == 1 else None
    out = []
    for k, section in enumerate(sections):
        ids, weights, last_comma = [], [], -1
        for text, weight in section:
            found, i = tokenizer.encode(text), 0
            while i < len(found):
                token = found[i]
                if token == comma:
                    last_comma = len(ids)
                elif len(ids) == size and last_comma >= 0 and \
                        len(ids) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    out.append((ids[:cut], weights[:cut]))
                    ids, weights, last_comma = ids[cut:], weights[cut:], -1
                if len(ids) == size:
                    out.append((ids, weights))
                    ids, weights, last_comma = [], [], -1
                named = vocabulary.match(found, i) if vocabulary is not None else None
                if named is None:
                    ids.append(token)
                    weights.append(weight)
                    i += 1
                    continue
                n = vocabulary.vectors[named[0]].shape[0]
                if len(ids) + n > size:  # never split: the chunk ends here, padded
                    out.append((ids, weights))
                    ids, weights, last_comma = [], [], -1
                ids += [Vector(named[0], j) for j in range(n)]
                weights += [weight] * n
                i += named[1]
        if ids or k < len(sections) - 1 or not out:  # a BREAK ends a chunk, even an empty one
            out.append((ids, weights))
    return out


def embeddings_used(tokenizer, prompt, vocabulary, syntax=True):
    """The names of the embeddings of `vocabulary` that `prompt` uses, in order, once each."""
    sections = parse(prompt) if syntax else [[(prompt, 1.0)]]
    return list(dict.fromkeys(t.name for ids, _ in chunks(tokenizer, sections, 10**9,
                                                          vocabulary)
                              for t in ids if isinstance(t, Vector)))


def tokens(tokenizer, prompt, length, syntax=True, vocabulary=None):
    """A prompt -> (ids (C, length), weights (C, length), vectors): its chunks, each [start,
    tokens, end, padding] as the tokenizer makes a prompt that fits; weight 1 off the
    prompt's tokens. syntax=False reads the prompt as literal text (still chunked). Where an
    embedding's vectors go the ids hold 0 (as in A1111) and `vectors` lists (chunk, position,
    Vector)."""
    sections = parse(prompt) if syntax else [[(prompt, 1.0)]]
    rows = [_row(tokenizer, ids, weights, length)
            for ids, weights in chunks(tokenizer, sections, length - 2, vocabulary)]
    vectors = [(c, t, v) for c, (ids, _) in enumerate(rows) for t, v in enumerate(ids)
               if isinstance(v, Vector)]
    return (torch.tensor([[0 if isinstance(i, Vector) else i for i in ids] for ids, _ in rows],
                         dtype=torch.long),
            torch.tensor([weights for _, weights in rows]), vectors)


def _row(tokenizer, ids, weights, length):
    """[start, ids, end, padding] of `length`, and its weights (1 off the prompt's tokens)."""
    pad = length - 2 - len(ids)
    return ([tokenizer.sot_token_id, *ids, tokenizer.eot_token_id]
            + [tokenizer.pad_token_id] * pad, [1.0, *weights, 1.0] + [1.0] * pad)


def apply_weights(states, weights):
    """Token states (C, T, D) of C chunks, weights (C, T) -> the states multiplied by their
    weights, each chunk then rescaled to its unweighted mean (over tokens and channels), in
    float32; chunks whose weights are all 1 are returned as they are."""
    weighted = (weights != 1).any(dim=1)  # (C,)
    if not weighted.any():
        return states
    z = states[weighted].float()  # (c, T, D)
    mean = z.mean(dim=(1, 2), keepdim=True)  # (c, 1, 1)
    z = z * weights[weighted, :, None].to(z.device)
    z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
    out = states.clone()
    out[weighted] = z.to(states.dtype)
    return out


def check_options(text_encoder, clip_skip, syntax):
    """clip_skip in [1, the text encoder's layers], prompt_syntax True or False."""
    layers = text_encoder.config.num_layers
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or \
            not 1 <= clip_skip <= layers:
        raise InputError(f"clip_skip must be an integer in [1, {layers}] (1: the text "
                         f"encoder's last layer; this one has {layers}), got {clip_skip!r}")
    if not isinstance(syntax, bool):
        raise InputError(f"prompt_syntax must be True or False, got {syntax!r}")


def encode(text_encoder, tokenizer, prompts, clip_skip=1, syntax=True, vocabulary=None):
    """list of str -> one (token states (C * T, D), pooled (D,)) per prompt: its C chunks of
    T = max_positions tokens, encoded with the others' as one batch; pooled from its first
    chunk (unweighted, as A1111's SDXL takes it). The embeddings of `vocabulary` named in the
    prompts enter as token embeddings where their names were."""
    check_options(text_encoder, clip_skip, syntax)
    T = text_encoder.config.max_positions
    made = [tokens(tokenizer, p, T, syntax, vocabulary) for p in prompts]
    ids = torch.cat([i for i, _, _ in made])  # (N, T): every prompt's chunks
    device = next(text_encoder.parameters()).device
    embeds = _token_embeddings(text_encoder, ids.to(device), made, vocabulary)
    hidden, pooled = text_encoder(ids.to(device), clip_skip=clip_skip,
                                  token_embeds=embeds)  # (N, T, D), (N, D)
    hidden = apply_weights(hidden, torch.cat([w for _, w, _ in made]))
    out, start = [], 0
    for i, _, _ in made:
        c = i.shape[0]
        out.append((hidden[start:start + c].reshape(c * T, -1), pooled[start]))  # (C * T, D)
        start += c
    return out


def _token_embeddings(text_encoder, ids, made, vocabulary):
    """The token embeddings (N, T, D) of `ids` with the embeddings' vectors in their places,
    or None when no prompt of `made` (tokens() of each) names one."""
    rows, cols, vectors, start = [], [], [], 0
    for i, _, placed in made:
        for c, t, v in placed:
            rows.append(start + c)
            cols.append(t)
            vectors.append(vocabulary.vectors[v.name][v.index])  # (D,)
        start += i.shape[0]
    if not vectors:
        return None
    table = text_encoder.embeddings.token_embedding
    embeds = table(ids)  # (N, T, D)
    embeds[rows, cols] = torch.stack(vectors).to(embeds.device, embeds.dtype)  # (V, D)
    return embeds


def encode_cached(cache, text_encoder, tokenizer, prompts, clip_skip=1, syntax=True,
                  vocabulary=None):
    """encode() through `cache` (a dict: (prompt, clip_skip, syntax) -> its encoding, least
    recently used first, CACHE_SIZE kept) -> (token states (B, S, D), pooled (B, D)). Prompts
    of fewer chunks than the longest are padded with chunks of the empty prompt (A1111's
    padding of the prompt and negative prompt to the same length). The cache holds the
    encodings of one `vocabulary`: its owner clears it when the embeddings change."""
    def fill(keys):  # encode what is missing, in one batch; mark all as just used
        missing = [k for k in dict.fromkeys(keys) if k not in cache]
        if missing:
            encoded = encode(text_encoder, tokenizer, [k[0] for k in missing], clip_skip, syntax,
                             vocabulary)
            cache.update(zip(missing, encoded))
        for key in dict.fromkeys(keys):
            cache[key] = cache.pop(key)

    check_options(text_encoder, clip_skip, syntax)  # before the cache: True == 1 there
    keys = [(p, clip_skip, syntax) for p in prompts]
    fill(keys)
    states = [cache[k][0] for k in keys]  # each (C * T, D)
    S = max(s.shape[0] for s in states)
    if any(s.shape[0] < S for s in states):
        empty = ("", clip_skip, syntax)
        fill([empty])
        pad = cache[empty][0]  # (T, D): one chunk
        states = [torch.cat([s, pad.repeat((S - s.shape[0]) // pad.shape[0], 1)])
                  for s in states]
    out = torch.stack(states), torch.stack([cache[k][1] for k in keys])
    while len(cache) > CACHE_SIZE:  # what this call used is last: never evicted here
        cache.pop(next(iter(cache)))
    return out
