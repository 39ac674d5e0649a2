"""How much the unCLIP prior loses, by retrieval: for eval captions, sample the prior's image
embedding and find the nearest of a gallery of eval images (cosine, the caption's own image
left out); the judge says whether that image fits the caption. The same with the caption's
CLIP text embedding is the reference: a prior as good as CLIP's text tower matches it.
Pairs are listed too, but few gallery images fit a pair caption exactly, so read the singles.

    python benchmarks/prior_nearest.py [MODEL=shapes-unclip] [--captions 200] [--gallery 1000]
"""
import argparse

import torch

import nanodiffusion
from nanodiffusion.data import shapes
from nanodiffusion.eval.judge import judge


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="shapes-unclip")
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--gallery", type=int, default=1000)
    a = ap.parse_args()
    pipe = nanodiffusion.load(a.model)
    samples = [shapes.sample(i, "eval", 0, 64) for i in range(a.gallery)]
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        gallery = norm(torch.cat([pipe.encode_image([s[0] for s in samples[j:j + 200]])
                                  for j in range(0, a.gallery, 200)]), dim=-1)  # (N, E)
    counts = {"single": [0, 0, 0], "pair": [0, 0, 0]}
    for i in range(min(a.captions, a.gallery)):
        caption, attributes = samples[i][1], samples[i][2]
        c = counts["pair" if attributes["relation"] else "single"]
        with torch.no_grad():
            prior = norm(pipe.prior_embeds(caption, "", 1, torch.Generator().manual_seed(i)), dim=-1)
            text = norm(pipe.encode_text([caption])[1], dim=-1)
        for k, e in enumerate((prior, text)):
            sims = (e @ gallery.T)[0]
            sims[i] = -2.0  # not its own image
            c[k] += judge(samples[int(sims.argmax())][0], caption)["correct"]
        c[2] += 1
    for kind, (p, t, n) in counts.items():
        print(f"{kind}: {n} captions, nearest to the prior's embedding fits {p / n:.0%}, "
              f"nearest to the text embedding {t / n:.0%}")


if __name__ == "__main__":
    main()
