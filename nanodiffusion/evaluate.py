"""Measures of quality: shapes fidelity (the judge, GenEval-style: an image counts only if all
the prompt says is right), CLIP caption-to-image retrieval, VAE reconstruction PSNR."""
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import shapes
from .judge import judge, score


def eval_prompts(n, seed=0):
    """n single-object and n two-object prompts from the eval split (held-out pairs included)."""
    singles, pairs, i = [], [], 0
    while len(singles) < n or len(pairs) < n:
        _, caption, attrs = shapes.sample(i, "eval", seed)
        (pairs if attrs["relation"] else singles).append(caption)
        i += 1
    return singles[:n] + pairs[:n]


def fidelity(pipe, prompts, seed=0, best_of=1, **settings):
    """Generate one image per prompt (seed + i) and judge it -> score() dict + timing."""
    images, t0 = [], time.perf_counter()
    for i, p in enumerate(prompts):
        if best_of > 1:
            images.append(pipe.generate(p, seed=seed + i, best_of=best_of, **settings)[0])
        else:
            images.append(pipe.generate(p, seed=seed + i, **settings)[0])
    out = score(images, prompts)
    out["seconds_per_image"] = (time.perf_counter() - t0) / max(1, len(prompts))
    out["images"] = images
    return out


@torch.no_grad()
def clip_retrieval(clip, tokenizer, n=100, seed=0, size=64):
    """Caption-to-image top-1 among n eval images. `exact`: the top image is the caption's own;
    `matching`: the top image's ground truth satisfies the caption (several images can)."""
    samples = [shapes.sample(i, "eval", seed, size) for i in range(n)]
    images = torch.stack([shapes.to_tensor(im) for im, _, _ in samples])  # (n, 3, S, S)
    captions = [c for _, c, _ in samples]
    ids = tokenizer(captions, max_length=clip.text_model.config.max_positions)
    device = next(clip.parameters()).device
    t = torch.nn.functional.normalize(clip.encode_text(ids.to(device)), dim=-1)
    pixels = clip.preprocess((images.to(device) + 1) / 2)
    v = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
    top = (t @ v.T).argmax(dim=1).tolist()
    exact = float(np.mean([j == i for i, j in enumerate(top)]))
    matching = float(np.mean([judge(samples[j][0], captions[i])["correct"]
                              for i, j in enumerate(top)]))
    return {"exact": exact, "matching": matching, "n": n}


@torch.no_grad()
def vae_psnr(vae, n=256, seed=0, size=64):
    """Mean PSNR (dB) of VAE reconstructions (posterior mode) of n eval images."""
    x = torch.stack([shapes.to_tensor(shapes.sample(i, "eval", seed, size)[0]) for i in range(n)])
    x = x.to(next(vae.parameters()).device)
    recon = torch.cat([vae.decode(vae.encode(b).mode()) for b in x.split(64)]).clamp(-1, 1)
    mse = ((recon - x) ** 2).mean(dim=(1, 2, 3))  # (n,)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())


def _model_folder(path):
    path = Path(path)
    return path / "model" if (path / "model" / "model.json").exists() else path


def report(path, n=200, seed=0, out=None, device="cpu"):
    """Evaluate a run folder (runs/shapes) or a model folder; print and write report.json."""
    from .loading import load_pipeline

    folder = _model_folder(path)
    pipe = load_pipeline(folder, device=device)
    result = {"model": str(folder), "settings": vars(pipe.defaults).copy()}
    if pipe.clip is not None:
        result["clip_retrieval"] = clip_retrieval(pipe.clip, pipe.tokenizer, seed=seed)
    result["vae_psnr_db"] = vae_psnr(pipe.vae, seed=seed)
    fid = fidelity(pipe, eval_prompts(n, seed), seed=seed)
    fid.pop("images")
    fid.pop("results")
    result["fidelity"] = fid
    text = json.dumps(result, indent=2)
    print(text)
    target = Path(out) if out else folder / "report.json"
    checkpoint.atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return result
