"""Best-of-N reranking by CLIP, for both pipelines: CLIP scores of images against a prompt,
and the choice among candidates made with consecutive seeds."""
import os

import torch
import torch.nn.functional as F

from ..errors import InputError
from .checks import check_int
from .images import from_pil
from .offload import resident

MAX_BEST_OF = 16


def image_clip(pipe):
    clip = getattr(pipe, "clip", None)
    if clip is None or not hasattr(clip, "encode_image"):
        raise InputError(f"best_of needs a CLIP image encoder to rank the candidates, and the "
                         f"model {pipe.name!r} has a text encoder only; use best_of=1, or a "
                         f"model whose folder holds a full CLIP (text and image towers)")
    return clip


@torch.no_grad()
def clip_scores(pipe, prompt, images):
    """CLIP cosine similarity of each PIL image to `prompt`, by `pipe.clip` (a CLIPModel with
    both towers) and `pipe.tokenizer`: a list of floats."""
    clip = image_clip(pipe)
    device = next(clip.parameters()).device
    ids = pipe.tokenizer([prompt], max_length=clip.text_model.config.max_positions)
    with resident(clip.text_model):  # low memory: the pipeline's text encoder, on disk
        text = F.normalize(clip.encode_text(ids.to(device)), dim=-1)  # (1, E)
    pixels = torch.cat([clip.preprocess((from_pil(im) + 1) / 2) for im in images])
    imgs = F.normalize(clip.encode_image(pixels.to(device)), dim=-1)  # (B, E)
    return (imgs.float() @ text[0].float()).tolist()


def rank_images(pipe, prompt, images):
    """(image, CLIP cosine similarity to `prompt`) pairs, most similar first."""
    return sorted(zip(images, clip_scores(pipe, prompt, images)), key=lambda p: -p[1])


def best_of_n(pipe, generate, prompt, seed, n, best_of):
    """Best-of-N reranking: `generate(s)` makes a batch of n images with seed s; candidate k
    (k = 0 .. best_of - 1) of image i is image i of the batch of seed `seed + k`, so candidate
    0 is what best_of=1 gives. Each image i keeps the candidate CLIP finds most similar to
    `prompt` (the lowest k on a tie), with that candidate's own parameters (its seed)."""
    check_int("best_of", best_of, 1, MAX_BEST_OF)
    if best_of > 1:
        image_clip(pipe)  # fail before generating anything
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    check_int("seed", seed, 0, 2**63 - best_of)  # seeds seed .. seed + best_of - 1
    batches = [generate(seed + k) for k in range(best_of)]
    if best_of == 1:
        return batches[0]
    candidates = [batch[i] for i in range(n) for batch in batches]  # image-major
    scores = clip_scores(pipe, prompt, candidates)
    picks = [max(range(best_of), key=lambda k: (scores[i * best_of + k], -k)) for i in range(n)]
    return [batches[k][i] for i, k in enumerate(picks)]
