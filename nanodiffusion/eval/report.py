"""Measures of quality: shapes fidelity (the judge, GenEval-style: an image counts only if all
the prompt says is right), CLIP caption-to-image retrieval, VAE reconstruction PSNR, and a
tiny decoder's PSNR against the VAE decoder."""
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import check_dtype
from ..data import shapes
from ..formats import checkpoint
from .judge import check_objects, find_objects, judge, parse_prompt, score


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
    `matching`: the top image's ground truth satisfies the caption (several images can);
    `ambiguous`: the share of captions that more than one of the n images satisfies (half the
    captions leave out size or position), which bounds `exact` below 1."""
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
    ambiguous = float(np.mean([sum(check_objects(a["objects"], parse_prompt(c), size)[0]
                                   for _, _, a in samples) > 1 for c in captions]))
    return {"exact": exact, "matching": matching, "ambiguous": ambiguous, "n": n}


@torch.no_grad()
def vae_psnr(vae, n=256, seed=0, size=64):
    """Mean PSNR (dB) of VAE reconstructions (posterior mode) of n eval images."""
    x = torch.stack([shapes.to_tensor(shapes.sample(i, "eval", seed, size)[0]) for i in range(n)])
    like = next(vae.parameters())  # in the VAE's dtype (eval --dtype), measured in float32
    x = x.to(like.device)
    recon = torch.cat([vae.decode(vae.encode(b.to(like.dtype)).mode()).float()
                       for b in x.split(64)]).clamp(-1, 1)
    mse = ((recon - x) ** 2).mean(dim=(1, 2, 3))  # (n,)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def tiny_decoder_psnr(vae, tiny, n=256, seed=0, size=64):
    """Mean PSNR (dB) of the tiny decoder's images of n eval images' latents (the VAE
    posterior's mode) against the VAE decoder's images of the same latents, both in 8 bits."""
    from ..pipelines.decoders import tiny_decode
    from ..pipelines.images import to_pil

    x = torch.stack([shapes.to_tensor(shapes.sample(i, "eval", seed, size)[0]) for i in range(n)])
    like = next(vae.parameters())
    psnr = []
    for b in x.split(64):
        z = vae.encode(b.to(like.device, like.dtype)).mode() * vae.config.scaling_factor
        full = np.stack(to_pil(vae.decode(z / vae.config.scaling_factor))).astype(np.float32)
        small = np.stack(to_pil(tiny_decode(tiny, z))).astype(np.float32)
        mse = ((full - small) ** 2).mean(axis=(1, 2, 3))  # (b,)
        psnr += (10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))).tolist()
    return float(np.mean(psnr))


def _kept_objects(image, attributes):
    """Does `image` hold the same objects (colour and shape; position free) as the scene?"""
    want = sorted((o["colour"], o["shape"]) for o in attributes["objects"])
    return sorted((o["colour"], o["shape"] or "?") for o in find_objects(image)) == want


def variations_score(pipe, n=100, seed=0, size=64, caption="auto"):
    """DALL·E 2 variations of n eval images (one each, seed + i; `caption` as in
    UnCLIPPipeline.variations): `kept`, the share that keep every object's colour and shape
    (and no more objects); `mean_abs_diff`, the mean absolute pixel difference from the input
    (0..1); `copies`, the share within 1/255 of it."""
    kept, diffs = [], []
    for i in range(n):
        image, _, attributes = shapes.sample(i, "eval", seed, size)
        out = pipe.variations(image, n=1, seed=seed + i, caption=caption)[0]
        kept.append(_kept_objects(out, attributes))
        diffs.append(float(np.abs(np.asarray(out, np.float32) - np.asarray(image, np.float32))
                           .mean() / 255))
    return {"kept": float(np.mean(kept)), "mean_abs_diff": float(np.mean(diffs)),
            "copies": float(np.mean([d < 1 / 255 for d in diffs])), "n": n}


def text_diff_score(pipe, n=100, seed=0, size=64, strength=1.0):
    """DALL·E 2 text diffs on n single-object eval images, alternately changing the colour and
    the shape ("a red circle" -> "a blue circle" / "a red star"): `changed`, the share whose
    output holds exactly one object with the target colour and shape (the other attribute
    kept); by kind, and `position_kept`, how many of those stayed in their grid cell."""
    rng = np.random.default_rng(seed)
    results, i = {"colour": [], "shape": []}, 0
    position = []
    while sum(map(len, results.values())) < n:
        image, _, attributes = shapes.sample(i, "eval", seed, size)
        i += 1
        if attributes["relation"] is not None:
            continue
        obj = attributes["objects"][0]
        kind = "colour" if len(results["colour"]) <= len(results["shape"]) else "shape"
        choices = [c for c in (shapes.COLOURS if kind == "colour" else shapes.SHAPES)
                   if c != obj[kind]]
        new = dict(obj, **{kind: choices[rng.integers(len(choices))]})
        source = shapes.noun_phrase(obj["colour"], obj["shape"])
        target = shapes.noun_phrase(new["colour"], new["shape"])
        out = pipe.edit(image, source=source, target=target, strength=strength,
                        seed=seed + i)[0]
        ok = _kept_objects(out, {"objects": [new]})
        results[kind].append(ok)
        if ok:
            position.append(find_objects(out)[0]["cell"] == obj["cell"])
    flat = results["colour"] + results["shape"]
    return {"changed": float(np.mean(flat)), "colour": float(np.mean(results["colour"])),
            "shape": float(np.mean(results["shape"])),
            "position_kept": float(np.mean(position)) if position else 0.0,
            "strength": strength, "n": len(flat)}


def _model_folder(path):
    path = Path(path)
    return path / "model" if (path / "model" / "model.json").exists() else path


def report(path, n=200, seed=0, out=None, device="cpu", best_of=1, best_of_prompts=None,
           vae_decoder="full", tiny_decoder=None, steps=None, sampler=None, guidance=None,
           eta=None, deepcache=None, tome=None, dtype="float32"):
    """Evaluate a run folder (runs/shapes, its model/ or model-unclip/) or a model folder;
    print and write report.json (or `out`). An unCLIP model also gets variations (for a
    decoder that reads text, also from the image embedding alone) and text diffs scored;
    best_of > 1 adds the single-object fidelity of best-of-N CLIP reranking on the first
    `best_of_prompts` (default n) single-object prompts, beside best-of-1 on the same
    prompts. `vae_decoder` "tiny" judges images from the model's tiny decoder (or the one
    at `tiny_decoder`); a model with one also gets its PSNR against the VAE decoder. `steps`,
    `sampler`, `guidance` and `eta` override the model's defaults (a few-step model at 1, 2
    and 4 steps);
    `deepcache` N judges DeepCache's approximate path (pipelines/deepcache.py), `tome` r
    token merging's (pipelines/tome.py); `dtype` ("bfloat16") the model loaded in it, as
    `generate --dtype` runs it (the judge is not the model's: it stays as it is)."""
    from ..loading import load_pipeline, resolve

    folder = _model_folder(resolve(path))  # a bundled name too
    check_dtype(dtype)
    pipe = load_pipeline(folder, device=device, dtype=getattr(torch, dtype),
                         tiny_decoder=tiny_decoder)
    decode = {} if vae_decoder == "full" else {"vae_decoder": vae_decoder}
    decode.update({k: v for k, v in (("steps", steps), ("sampler", sampler),
                                     ("guidance", guidance), ("eta", eta),
                                     ("deepcache", deepcache), ("tome", tome))
                   if v is not None})
    if (decode or dtype != "float32") and hasattr(pipe, "variations"):
        raise ValueError(f"vae_decoder {vae_decoder!r}, steps, sampler, guidance, eta, "
                         f"deepcache, tome, dtype {dtype!r}: "
                         "unCLIP models are evaluated at their defaults")
    result = {"model": str(folder), "seed": seed,
              "settings": {**vars(pipe.defaults), **decode,
                           **({"dtype": dtype} if dtype != "float32" else {})}}
    if pipe.clip is not None:
        result["clip_retrieval"] = clip_retrieval(pipe.clip, pipe.tokenizer, seed=seed)
    result["vae_psnr_db"] = vae_psnr(pipe.vae, seed=seed)
    if pipe.tiny_decoder is not None:
        result["tiny_decoder_psnr_db"] = tiny_decoder_psnr(pipe.vae, pipe.tiny_decoder,
                                                           seed=seed)
    fid = fidelity(pipe, eval_prompts(n, seed), seed=seed, **decode)
    fid.pop("images")
    results = fid.pop("results")
    result["fidelity"] = fid
    if best_of > 1:
        k = n if best_of_prompts is None else best_of_prompts
        if not 1 <= k <= n:
            raise ValueError(f"best_of_prompts must be between 1 and n={n}, got {k}")
        singles = eval_prompts(n, seed)[:k]  # singles come first
        best = fidelity(pipe, singles, seed=seed, best_of=best_of, **decode)
        result[f"best_of_{best_of}_single"] = best["accuracy"]
        result["best_of_1_single"] = float(np.mean([r["correct"] for r in results[:k]]))
        result["best_of_prompts"] = k
    if hasattr(pipe, "variations"):
        size = pipe.defaults.width  # the scenes at the size the model makes
        result["variations"] = variations_score(pipe, n=n, seed=seed, size=size)
        if pipe.decoder_text:  # the default reads CLIP's caption; also the embedding alone
            result["variations_image_only"] = variations_score(pipe, n=n, seed=seed,
                                                               size=size, caption="")
        result["text_diffs"] = text_diff_score(pipe, n=n, seed=seed, size=size)
    text = json.dumps(result, indent=2)
    print(text)
    target = Path(out) if out else folder / "report.json"
    checkpoint.atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return result
