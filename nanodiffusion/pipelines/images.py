"""PIL images <-> tensors, contact sheets, and masks: what every pipeline reads and returns."""
import math

import numpy as np
import torch
from PIL import Image


def to_pil(x):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (rounded like diffusers)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in x]


def from_pil(image, width=None, height=None):
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos, as diffusers) when asked."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    if width and height and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3)
    return x.permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W)


def make_grid(images, rows=None):
    """Paste equal-sized PIL images into a rows x cols contact sheet."""
    n = len(images)
    rows = rows or int(math.floor(math.sqrt(n)))
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def paste_unmasked(images, init, mask):
    """The input image's pixels (init (1, 3, H, W) in [-1, 1]) where the binary `mask` (1, 1, H,
    W) is 0, the generated ones where it is 1; each image keeps its parameters."""
    original = to_pil(init)[0]  # exact: from_pil's v / 255 rounds back to v
    alpha = Image.fromarray((mask[0, 0].cpu().numpy() * 255).astype(np.uint8))  # (H, W)
    out = []
    for im in images:
        pasted = Image.composite(im, original, alpha)
        pasted.info.update(im.info)
        out.append(pasted)
    return out


def mask_input(mask, width, height):
    """PIL mask -> (1, 1, H, W) binary float, white = repaint (diffusers binarizes at 0.5)."""
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask must be a PIL.Image, got {type(mask).__name__}")
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    return (m >= 0.5).float()
