"""A folder of captioned images as a dataset, in either common layout:

- `cat.png` beside `cat.txt` holding its caption (searched recursively), or
- a `metadata.jsonl` at the root with one `{"file_name": ..., "text": ...}` per line, the
  Hugging Face `imagefolder` convention (`file_name` relative to the root).

Each item is dict(image=float tensor (3, S, S) in [-1, 1], caption=str): the shortest side is
resized to S (bicubic), then a centre crop (or a random one) of S x S, optionally flipped.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .shapes import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _from_metadata(root, meta):
    items = []
    with open(meta, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{line_no}: not valid JSON ({e})") from None
            if "file_name" not in row or not isinstance(row.get("text"), str):
                raise ValueError(f"{meta}:{line_no}: needs a 'file_name' and a string 'text'")
            path = root / row["file_name"]
            if not path.is_file():
                raise FileNotFoundError(f"{meta}:{line_no}: image {path} does not exist")
            items.append((path, row["text"].strip()))
    listed = {p.resolve() for p, _ in items}
    for path in _image_files(root):
        if path.resolve() not in listed:
            raise ValueError(f"image {path} has no caption: it is not listed in {meta}")
    return items


def _image_files(root):
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _from_text_files(root):
    items = []
    for path in _image_files(root):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise ValueError(f"image {path} has no caption: expected {txt} or a metadata.jsonl")
        items.append((path, txt.read_text(encoding="utf-8").strip()))
    return items


def load_rgb(path):
    """Open an image as RGB; transparent parts become white, not black."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, im).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


class ImageFolderDataset(torch.utils.data.Dataset):
    """Captioned images from `root`, as dict(image=(3, size, size) in [-1, 1], caption).

    Random crops and flips draw from a generator seeded with (seed, epoch, index): the same
    item is the same tensor every time within an epoch; call `set_epoch` to vary it across
    epochs (as with DistributedSampler)."""

    def __init__(self, root, size, center_crop=True, random_flip=False, seed=0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        meta = self.root / "metadata.jsonl"
        self.items = _from_metadata(self.root, meta) if meta.is_file() else \
            _from_text_files(self.root)
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def _crop(self, image, rng):
        w, h = image.size
        scale = self.size / min(w, h)
        # max(): rounding must never leave the short side a pixel short of `size`
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        if self.center_crop:
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
        else:
            left, top = int(rng.integers(nw - self.size + 1)), int(rng.integers(nh - self.size + 1))
        return image.crop((left, top, left + self.size, top + self.size))

    def __getitem__(self, index):
        index = range(len(self.items))[index]  # IndexError out of range; negatives wrap
        path, caption = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self._crop(load_rgb(path), rng)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return dict(image=to_tensor(image), caption=caption)
