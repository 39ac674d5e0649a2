"""The procedural captioned `shapes` dataset. Its grammar, for users, is docs/shapes.md; every
number of the contract (sizes, jitter, grid, relations) is in this file's constants, and the
independent judge (eval/judge.py) checks the pictures against the same contract.

A sample is `(image, caption, attributes)`, deterministic in `(seed, split, index)`: each sample
draws from its own `np.random.default_rng([seed, split_id, index])`, never global state, so
workers, machines and runs agree bit for bit.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 210, 30),
    "green": (40, 160, 60),
    "cyan": (40, 190, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star")
# colour-shape pairs that never appear in the train split (unless asked), to measure composition
HELD_OUT = (("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"))
SIZES = {"small": 0.25, "large": 0.40}  # box side d as a fraction of the canvas side S
SIZE_JITTER = 0.08
GRID = (0.22, 0.50, 0.78)  # cell centres on each axis, as a fraction of S
CELL_JITTER = 0.03
# cell name -> caption phrase; row-major, so cell k sits at (GRID[k % 3], GRID[k // 3])
POSITIONS = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
# relation -> (axis 0=x 1=y, sign of centre1 - centre2 along that axis)
RELATION_AXES = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
                 "below": (1, 1)}
MIN_APART, MAX_ACROSS = 0.35, 0.15  # pair centres: along the relation axis / across it, * S
SPLITS = {"train": 0, "eval": 1}
SUPERSAMPLE = 4


def check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size % 8 \
            or not 32 <= size <= 512:
        raise ValueError(f"size must be a multiple of 8 from 32 to 512, got {size!r}")


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")


def objects(include_held_out=True):
    """All (colour, shape) pairs in table order, less the held-out ones if asked."""
    return [(c, s) for c in COLOURS for s in SHAPES
            if include_held_out or (c, s) not in HELD_OUT]


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(colour, shape, size=None):
    words = ([size] if size else []) + [colour, shape]
    return " ".join([article(words[0])] + words)


def pair_caption(first, second, relation):
    """The caption of a pair scene: `first` and `second` are (colour, shape)."""
    return f"{noun_phrase(*first)} {relation} {noun_phrase(*second)}"


def cell_name(cx, cy, size):
    """Name of the grid cell whose centre is nearest to (cx, cy) on each axis."""
    col = int(np.argmin([abs(cx / size - g) for g in GRID]))
    row = int(np.argmin([abs(cy / size - g) for g in GRID]))
    return list(POSITIONS)[3 * row + col]


def enumerate_captions(kind="all", include_held_out=True):
    """Every caption of the grammar, in a fixed order. kind: "object" (`a red circle`, 32),
    "single" (with every size and position option, 960), "pair" (3968) or "all"."""
    kinds = ("object", "single", "pair", "all")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    objs = objects(include_held_out)
    if kind == "object":
        return [noun_phrase(c, s) for c, s in objs]
    single = [noun_phrase(c, s, size) + (" " + POSITIONS[cell] if cell else "")
              for c, s in objs for size in (None, *SIZES) for cell in (None, *POSITIONS)]
    pair = [pair_caption(a, b, rel) for a in objs for b in objs if a != b for rel in RELATIONS]
    return {"single": single, "pair": pair, "all": single + pair}[kind]


def _single_scene(rng, size, objs):
    colour, shape = objs[rng.integers(len(objs))]
    size_name = "large" if rng.random() < 0.5 else "small"
    d = SIZES[size_name] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    cell = int(rng.integers(9))
    centre = []
    for g in (GRID[cell % 3], GRID[cell // 3]):
        # jitter within +-0.03 S, restricted to where the box of side d stays on the canvas
        lo = max((g - CELL_JITTER) * size, d / 2)
        hi = min((g + CELL_JITTER) * size, size - d / 2)
        centre.append(rng.uniform(lo, hi))
    mention_size, mention_position = rng.random() < 0.5, rng.random() < 0.5
    cell_key = list(POSITIONS)[cell]
    obj = dict(colour=colour, shape=shape, size=size_name, cell=cell_key,
               cx=float(centre[0]), cy=float(centre[1]), d=float(d))
    caption = noun_phrase(colour, shape, size_name if mention_size else None)
    if mention_position:
        caption += " " + POSITIONS[cell_key]
    mentions = {"size": bool(mention_size), "position": bool(mention_position)}
    return caption, dict(objects=[obj], relation=None, mentions=mentions)


def _pair_centres(rng, size, d1, d2, relation):
    """Rejection-sample two centres meeting the relation's constraints. Draws come in batches
    from the sample's own generator, so the result stays deterministic."""
    axis, sign = RELATION_AXES[relation]
    margin = 0.04 * size  # boxes keep at least this gap, so blobs never touch
    while True:
        u = rng.random((256, 4))  # columns: x1, y1, x2, y2 in [0, 1)
        c1 = d1 / 2 + u[:, :2] * (size - d1)
        c2 = d2 / 2 + u[:, 2:] * (size - d2)
        delta = c1 - c2  # (N, 2)
        along, across = sign * delta[:, axis], np.abs(delta[:, 1 - axis])
        gap = np.abs(delta) - (d1 + d2) / 2  # per axis: > 0 means the boxes are apart on it
        ok = ((along >= MIN_APART * size) & (across <= MAX_ACROSS * size)
              & (gap.max(axis=1) >= margin))
        if ok.any():
            k = int(np.argmax(ok))
            return c1[k], c2[k]


def _pair_scene(rng, size, objs):
    first = objs[rng.integers(len(objs))]
    others = [o for o in objs if o != first]  # the two objects differ in colour, shape or both
    second = others[rng.integers(len(others))]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    ds = [SIZES["small"] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) for _ in "12"]
    centres = _pair_centres(rng, size, ds[0], ds[1], relation)
    objs_out = []
    for (colour, shape), d, (cx, cy) in zip((first, second), ds, centres):
        objs_out.append(dict(colour=colour, shape=shape, size="small",
                             cell=cell_name(cx, cy, size), cx=float(cx), cy=float(cy),
                             d=float(d)))
    caption = pair_caption(first, second, relation)
    mentions = {"size": False, "position": False}
    return caption, dict(objects=objs_out, relation=relation, mentions=mentions)


def star_points(cx, cy, d):
    """The star's 10 vertices, outer radius d/2 and inner 0.2 d, first point straight up."""
    pts = []
    for k in range(10):
        r = d / 2 if k % 2 == 0 else 0.2 * d
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_object(draw, obj, scale):
    """Draw one object on an ImageDraw of a canvas `scale` times the nominal size. PIL puts
    pixel i's centre at coordinate i, our continuous coordinates put it at i + 0.5."""
    cx, cy, d = obj["cx"] * scale - 0.5, obj["cy"] * scale - 0.5, obj["d"] * scale
    fill = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        # PIL's ellipse box includes both end pixels, so the far edge sits one pixel in
        draw.ellipse((cx - d / 2 + 0.5, cy - d / 2 + 0.5, cx + d / 2 - 0.5, cy + d / 2 - 0.5),
                     fill=fill)
    elif obj["shape"] == "square":
        h = 0.4 * d
        draw.rectangle((round(cx - h + 0.5), round(cy - h + 0.5),
                        round(cx + h - 0.5), round(cy + h - 0.5)), fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, cy - d / 2), (cx + d / 2, cy + d / 2), (cx - d / 2, cy + d / 2)],
                     fill=fill)
    else:
        draw.polygon(star_points(cx, cy, d), fill=fill)


def render(attributes, size):
    """Draw the objects at 4x on white and box-filter down, so edges are anti-aliased and
    interiors keep their exact colour."""
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, (255, 255, 255))
    draw = ImageDraw.Draw(big)
    for obj in attributes["objects"]:
        draw_object(draw, obj, SUPERSAMPLE)
    return big.resize((size, size), Image.BOX)


MIRRORED = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
            "above": "below", "below": "above"}


def mirrored_caption(caption):
    """The caption with every spatial word turned around ("on the left" -> "on the right",
    "above" -> "below"): for an image of the caption, a hard negative. Unchanged when it has
    no spatial word."""
    return " ".join(MIRRORED.get(w, w) for w in caption.split(" "))


def rotated(attributes, size):
    """The scene turned half a turn about the canvas centre, each object kept upright: every
    centre (cx, cy) moves to (S - cx, S - cy). The grid, its jitter and the pair constraints are
    symmetric, so the result is a scene of this dataset, and the caption with every spatial word
    turned around (left <-> right, top <-> bottom, above <-> below) describes it: for CLIP, the
    hard negative image of the original caption."""
    objs = [dict(o, cx=size - o["cx"], cy=size - o["cy"],
                 cell=cell_name(size - o["cx"], size - o["cy"], size))
            for o in attributes["objects"]]
    relation = attributes["relation"]
    return dict(attributes, objects=objs,
                relation=None if relation is None else mirrored_caption(relation))


def colour_swapped(attributes, include_held_out=False):
    """(caption, attributes) of a pair scene with the two objects' colours exchanged, each
    object kept where it is ("a red circle above a blue square" -> "a blue circle above a red
    square"): for CLIP, the hard negative that only tells apart who has which colour. None for
    single objects, for pairs of one colour, and where a swapped object would be a held-out
    colour-shape pair (unless include_held_out)."""
    if attributes["relation"] is None:
        return None
    a, b = attributes["objects"]
    if a["colour"] == b["colour"]:
        return None
    swapped = [dict(a, colour=b["colour"]), dict(b, colour=a["colour"])]
    if not include_held_out and any((o["colour"], o["shape"]) in HELD_OUT for o in swapped):
        return None
    caption = pair_caption(*[(o["colour"], o["shape"]) for o in swapped], attributes["relation"])
    return caption, dict(attributes, objects=swapped)


def sample(index, split="train", seed=0, size=64, include_held_out=False):
    """Sample `index` of `split`: (PIL RGB image, caption, attributes). The eval split always
    draws from every colour-shape pair; train leaves out HELD_OUT unless include_held_out."""
    check_size(size)
    check_split(split)
    size = int(size)
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng([seed, SPLITS[split], int(index)])
    objs = objects(include_held_out or split == "eval")
    scene = _single_scene if rng.random() < 0.5 else _pair_scene
    caption, attributes = scene(rng, size, objs)
    return render(attributes, size), caption, attributes


def eval_prompts(n, seed=0, size=64):
    """A fixed list of n (caption, attributes) from the eval split, for fidelity evaluation."""
    out = []
    for i in range(n):
        _, caption, attributes = sample(i, "eval", seed, size)
        out.append((caption, attributes))
    return out


def to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    # numpy, not torch ops: torch splits these over threads, which spin on a busy 2-core box
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W)
    return torch.from_numpy(np.ascontiguousarray(x))


class ShapesDataset(torch.utils.data.Dataset):
    """`length` samples of one split; item i is `sample(i, ...)` as dict(image, caption) with
    the image a float tensor (3, S, S) in [-1, 1]. Generated on the fly: no disk, no cache."""

    def __init__(self, split="train", size=64, seed=0, length=100_000, include_held_out=False):
        check_size(size)
        check_split(split)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.size, self.seed = split, size, seed
        self.length, self.include_held_out = length, include_held_out

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        image, caption, _ = sample(index, self.split, self.seed, self.size,
                                   self.include_held_out)
        return dict(image=to_tensor(image), caption=caption)
