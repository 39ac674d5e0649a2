"""The CLIP part: contrastive training of the text and vision towers on captioned images, with
optional hard negatives (mirrored-scene twins for shapes, mirrored captions for folders;
colour-swapped pair twins for shapes), on a caption BPE learned from the data."""
import torch

from ..data import shapes
from ..data.shapes import mirrored_caption
from ..formats import checkpoint
from ..models.clip import SHAPES_TEXT, SHAPES_VISION, CLIPModel
from ..models.tokenizer import CLIPTokenizer, train_bpe
from .common import images_and_captions, override, save_ema, source


def twin_source(cfg):
    """index -> the list of (image, caption) hard-negative twins of sample `index`, drawn to
    match their captions: with hard_negatives, the mirrored scene (every spatial word turned
    around) where the caption has one; with swap_negatives, for pairs, the scene with the two
    colours exchanged. Only the shapes generator can draw them; for an image folder this is
    None, and mirrored captions alone are the negatives."""
    if cfg.data != "shapes":
        return None

    def twins(i):
        _, caption, attributes = shapes.sample(i, "train", cfg.seed, cfg.image_size,
                                               cfg.include_held_out)
        out = []
        if cfg.hard_negatives and (mirrored := mirrored_caption(caption)) != caption:
            out.append((shapes.rotated(attributes, cfg.image_size), mirrored))
        if cfg.swap_negatives and (swapped := shapes.colour_swapped(
                attributes, cfg.include_held_out)) is not None:
            out.append((swapped[1], swapped[0]))
        return [(shapes.to_tensor(shapes.render(a, cfg.image_size)), c) for a, c in out]
    return twins


def captions(cfg):
    """The captions a tokenizer is learned from: a large draw of shapes, or all of a folder."""
    get, length = source(cfg)
    return sorted({get(i)[1] for i in range(length or 20000)})


class ClipPart:
    @staticmethod
    def build(cfg, device):
        tok_dir = cfg.run_dir / "tokenizer"
        if (tok_dir / "vocab.json").exists():  # resuming: the ids must not change
            tok = CLIPTokenizer.from_folder(tok_dir)
        else:
            tok = train_bpe(captions(cfg), cfg.bpe_merges)
            tok.save(tok_dir)
        m = cfg.model
        text = override(SHAPES_TEXT, {**m.get("text", {}), "vocab_size": tok.vocab_size,
                                      "eos_token_id": tok.eot_token_id,
                                      "pad_token_id": tok.pad_token_id})
        vision = override(SHAPES_VISION, {"image_size": cfg.image_size, **m.get("vision", {})})
        model = CLIPModel(text, vision).to(device)
        return model, {"source": source(cfg)[0], "twin": twin_source(cfg), "tokenizer": tok,
                       "max_length": text.max_positions}

    @staticmethod
    def batch(cfg, frozen, indices, device):
        """(images, caption ids, negative caption ids or None). With hard_negatives, each
        sample with a spatial word brings its mirrored twin into the batch as one more pair
        (shapes: both sides of the loss get the hard negative), or, where no twin can be drawn
        (image folders), its mirrored caption as one more wrong caption for its image."""
        images, captions = images_and_captions(cfg, frozen, indices, device)
        tok, n = frozen["tokenizer"], frozen["max_length"]
        negatives = None
        if (cfg.hard_negatives or cfg.swap_negatives) and frozen.get("twin") is not None:
            twins = [t for i in indices for t in frozen["twin"](i)]
            if twins:
                images = torch.cat([images, torch.stack([im for im, _ in twins]).to(device)])
                captions = captions + [c for _, c in twins]
        elif cfg.hard_negatives:
            mirrored = [m for m, c in zip(map(mirrored_caption, captions), captions) if m != c]
            negatives = tok(mirrored, max_length=n).to(device) if mirrored else None
        return images, tok(captions, max_length=n).to(device), negatives

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        images, ids, negatives = batch
        pixels = checkpoint.unwrap(model).preprocess((images + 1) / 2)
        loss = model(ids, pixels, negatives)
        return loss, {}

    @staticmethod
    def export(cfg, model, ema):
        save_ema(model, ema, cfg.run_dir / "clip.safetensors")

    @staticmethod
    def sample(cfg, model, frozen, path):
        pass
