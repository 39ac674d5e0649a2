"""An independent judge of `shapes` images: does this image show what this prompt says?

It knows only the contract (its user's page: docs/shapes.md), not the generator's code: the
tables below are copied from it on purpose (a test checks they agree with data/shapes.py), and
shapes are recognised by fitting this file's own rasterisation of each shape's definition. So a
bug in the generator shows up as a judging failure instead of being shared by both.

Pipeline: non-white pixels -> connected blobs (tiny fragments merged or dropped) -> per blob,
the colour (nearest table colour), a soft coverage map, and the best fitting shape template,
which gives the box side d and box centre (cx, cy) -> size, grid cell, relations -> compare
with only what the prompt states.
"""

import math
import re

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 210, 30),
    "green": (40, 160, 60), "cyan": (40, 190, 210), "blue": (40, 80, 220),
    "purple": (140, 60, 190), "pink": (240, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star")
HELD_OUT = (("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"))
POSITIONS = {
    "in the top left corner": "top left", "at the top": "top",
    "in the top right corner": "top right", "on the left": "left", "in the center": "center",
    "on the right": "right", "in the bottom left corner": "bottom left",
    "at the bottom": "bottom", "in the bottom right corner": "bottom right",
}
CELLS = list(POSITIONS.values())  # row-major 3x3
GRID = (0.22, 0.50, 0.78)
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_AXES = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
                 "below": (1, 1)}
# area of each shape as a fraction of d^2, and its centroid's offset below the box centre / d
AREA = {"circle": math.pi / 4, "square": 0.64, "triangle": 0.5,
        "star": 5 * 0.5 * 0.2 * math.sin(math.pi / 5)}
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "star": 0.0}

# Thresholds, chosen to tolerate generated images (soft edges, off colours, some noise).
FG_DARKNESS = 50  # largest ink over channels; the palest colour (pink) has 135, noise ~15
MIN_OBJECT_AREA = 0.005  # * S^2; the smallest real object (small star) covers ~0.0155 S^2
MERGE_DISTANCE = 0.06  # * S; a smaller fragment this close to an object is part of it
SMALL_LARGE_SPLIT = 0.32  # * S; small d <= 0.27 S, large d >= 0.368 S (with +-8 % jitter)
MAX_FIT_ERROR = 0.4  # L1 misfit of the best template; worse is "unrecognised" (data: <0.25)
BLURS = (0.0, 0.6, 1.2, 1.8)  # pixels; template blurs tried, the judge takes the best fit
SHARP_FIT = 0.2  # a sharp template fitting this well needs no blurred tries (clean images)
MIN_APART = 0.2  # * S; relation needs this lead along its axis (the data has >= 0.35)


def _as_rgb(image):
    """PIL image or (H, W, 3) array (uint8, or float in [0, 1]) -> float array 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image array must be (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if a.min() < 0 or a.max() > 1:
        raise ValueError("a float image array must hold values in [0, 1]")
    return a.astype(np.float64) * 255


def parse_prompt(prompt):
    """Prompt of the shapes grammar -> dict(objects=[dict(colour, shape, size, position)],
    relation, held_out). size/position are None where not stated. ValueError otherwise."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    colour, shape = "|".join(COLOURS), "|".join(SHAPES)
    np_re = rf"an? (?:(small|large) )?({colour}) ({shape})"
    m = re.fullmatch(rf"{np_re}(?: ({'|'.join(POSITIONS)}))?", text)
    if m:
        size, c, s, pos = m.groups()
        objects = [dict(colour=c, shape=s, size=size, position=POSITIONS.get(pos))]
        relation = None
    else:
        plain = rf"an? ({colour}) ({shape})"  # pair captions state no size
        m = re.fullmatch(rf"{plain} ({'|'.join(RELATIONS)}) {plain}", text)
        if not m:
            raise ValueError(f"prompt is outside the shapes grammar (docs/shapes.md): {prompt!r}")
        c1, s1, relation, c2, s2 = m.groups()
        objects = [dict(colour=c1, shape=s1, size=None, position=None),
                   dict(colour=c2, shape=s2, size=None, position=None)]
    held = any((o["colour"], o["shape"]) in HELD_OUT for o in objects)
    return dict(objects=objects, relation=relation, held_out=held)


def label_components(mask):
    """8-connected components of a boolean mask -> int labels (-1 off the mask). Each pixel
    takes the least index in its 3x3 neighbourhood, and jumps to its label's label, until
    nothing changes: a few dozen numpy passes, no scipy."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([p[i:i + h, j:j + w] for i in range(3) for j in range(3)])
        new = np.where(mask, nb, big).ravel()
        fg = new < big
        new[fg] = new[new[fg]]  # pointer jumping: the label of my label is also mine
        new = new.reshape(h, w)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def nearest_colour(rgb):
    """Nearest table colour to an interior colour, measured to the segment from a 60 % tint of
    each table colour to the colour itself, so a slightly pale interior still reads right."""
    best, best_d = None, np.inf
    rgb = np.asarray(rgb, dtype=np.float64)
    for name, c in COLOURS.items():
        v = 255 - np.asarray(c, dtype=np.float64)
        t = np.clip(np.dot(255 - rgb, v) / np.dot(v, v), 0.6, 1.0)
        dist = np.linalg.norm((255 - rgb) - t * v)
        if dist < best_d:
            best, best_d = name, dist
    return best


def _dilate(mask, r):
    """Grow a mask by r pixels (a square), rows then columns: O(r) passes, not O(r^2)."""
    h, w = mask.shape
    p = np.pad(mask, r)
    rows = np.logical_or.reduce([p[:, j:j + w] for j in range(2 * r + 1)])  # (h + 2r, w)
    return np.logical_or.reduce([rows[i:i + h] for i in range(2 * r + 1)])  # (h, w)


def _inside(shape, px, py, cx, cy, d):
    """Which points lie inside the shape with box side d centred at (cx, cy), per the shapes
    contract."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        return dx * dx + dy * dy <= (d / 2) ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.4 * d) & (np.abs(dy) <= 0.4 * d)
    if shape == "triangle":
        t = dy + d / 2  # 0 at the apex, d at the base; half-width grows as t / 2
        return (t >= 0) & (t <= d) & (np.abs(dx) <= t / 2)
    # star: fold the angle from straight up into [0, 36] degrees, where the boundary is the
    # edge from the outer point (radius d/2, 0 deg) to the inner one (0.2 d, 36 deg)
    sector = math.pi / 5
    phi = np.mod(np.arctan2(dx, -dy), 2 * sector)
    phi = np.minimum(phi, 2 * sector - phi)
    rho = np.hypot(dx, dy)
    ox, oy = d / 2, 0.0
    ix, iy = 0.2 * d * math.cos(sector), 0.2 * d * math.sin(sector)
    qx, qy = rho * np.cos(phi) - ox, rho * np.sin(phi) - oy
    cross = (ix - ox) * qy - (iy - oy) * qx  # the centre itself has a positive cross
    return cross >= 0


def template(shape, cx, cy, d, x0, y0, x1, y1, ss=4):
    """Coverage of pixels [y0:y1, x0:x1] by the shape, from ss x ss samples per pixel."""
    offs = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x1)[:, None] + offs).ravel()
    ys = (np.arange(y0, y1)[:, None] + offs).ravel()
    inside = _inside(shape, xs[None, :], ys[:, None], cx, cy, d)  # (H*ss, W*ss)
    return inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))


def _blur(t, sigma):
    """Separable Gaussian blur of `sigma` pixels, zero outside, as a sum of shifted copies
    (no BLAS call: its threads spin badly on a busy 2-core machine)."""
    r = int(math.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    h, w = t.shape
    p = np.zeros((h + 2 * r, w + 2 * r))
    p[r:r + h, r:r + w] = t
    rows = sum(k[i] * p[:, i:i + w] for i in range(2 * r + 1))  # (h + 2r, w)
    return sum(k[i] * rows[i:i + h] for i in range(2 * r + 1))  # (h, w)


def _candidates(alpha, size):
    """Per shape, the template with the blob's area and centroid: yields (shape, cx, cy, d,
    observed window, sharp template, mass outside the window)."""
    area = alpha.sum()
    ys, xs = np.nonzero(alpha)
    w = alpha[ys, xs]
    mx, my = (w * (xs + 0.5)).sum() / area, (w * (ys + 0.5)).sum() / area
    for shape in SHAPES:
        d = math.sqrt(area / AREA[shape])
        cx, cy = mx, my - CENTROID_DROP[shape] * d
        r = int(math.ceil(0.6 * d + 3 * max(BLURS))) + 2
        x0, y0 = max(0, int(cx) - r), max(0, int(cy) - r)
        x1, y1 = min(size, int(cx) + r + 1), min(size, int(cy) + r + 1)
        ss = 4 if d < 16 else 2 if d < 48 else 1  # samples per pixel side: finer when tiny
        win = alpha[y0:y1, x0:x1]
        yield (shape, cx, cy, d, win, template(shape, cx, cy, d, x0, y0, x1, y1, ss),
               area - win.sum())


def _fit_shape(alpha, size):
    """Best shape by L1 misfit relative to the area -> (shape, (error, cx, cy, d)). Templates
    are also tried blurred (generated images are soft), unless a sharp one already fits."""
    area = alpha.sum()
    cands = list(_candidates(alpha, size))
    fits = {}
    for sigmas in (BLURS[:1], BLURS[1:]):
        for shape, cx, cy, d, win, sharp, outside in cands:
            for sigma in sigmas:
                t = _blur(sharp, sigma) if sigma else sharp
                err = float((np.abs(win - t).sum() + outside) / area)
                if shape not in fits or err < fits[shape][0]:
                    fits[shape] = (err, float(cx), float(cy), float(d))
        best = min(fits.items(), key=lambda kv: kv[1][0])
        if best[1][0] <= SHARP_FIT:
            break
    return best


def _cell(cx, cy, size):
    col = int(np.argmin([abs(cx / size - g) for g in GRID]))
    row = int(np.argmin([abs(cy / size - g) for g in GRID]))
    return CELLS[3 * row + col]


def _ink(rgb):
    """Per-pixel ink = background colour minus pixel, per channel. The background is read from
    the border (objects never cover much of it), so an off-white generated canvas still works."""
    frame = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (4S-4, 3)
    return np.median(frame, axis=0) - rgb  # (H, W, 3)


def _blobs(ink):
    """Foreground blobs as boolean masks, with small fragments merged into a near object or
    dropped, so blur, noise and broken edges do not count as extra objects."""
    size = ink.shape[0]
    dark = ink.max(axis=2)
    labels = label_components(dark > FG_DARKNESS)
    masks = [labels == k for k in np.unique(labels) if k >= 0]
    # darkness / 135 (the palest colour) under-counts strong colours; fine for a size gate
    areas = [np.clip(dark[m] / 135, 0, 1).sum() for m in masks]
    min_area = MIN_OBJECT_AREA * size * size
    big = [m for m, a in zip(masks, areas) if a >= min_area]
    small = [m for m, a in zip(masks, areas) if a < min_area]
    reach = max(1, int(round(MERGE_DISTANCE * size)))
    grown = [_dilate(m, reach) for m in big] if small else []
    for m in small:
        for b, g in zip(big, grown):
            if (g & m).any():
                b |= m
                break
    return big, dark


def find_objects(image):
    """Objects in a shapes image: list of dict(colour, shape, size, cell, cx, cy, d, fit_error,
    area); cx, cy the box centre and d the box side in pixels, as the shapes contract defines
    them."""
    return _find(_as_rgb(image))


def _find(rgb):
    size = rgb.shape[0]
    if rgb.shape[1] != size:
        raise ValueError(f"shapes images are square, got {rgb.shape[1]}x{size}")
    ink = _ink(rgb)
    masks, dark = _blobs(ink)
    ring = 1 if size < 64 else 2  # anti-aliased fringe below the threshold belongs to the blob
    out = []
    for m in masks:
        d_in = dark[m]
        interior = ink[m][d_in >= 0.8 * np.percentile(d_in, 95)]
        colour = nearest_colour(255 - np.median(interior, axis=0))
        # coverage relative to the table colour, not the measured one: blur and pale edges
        # then keep the blob's total mass, which the shape fit relies on
        v = 255 - np.asarray(COLOURS[colour], dtype=np.float64)
        region = _dilate(m, ring)
        alpha = np.zeros(m.shape)
        alpha[region] = np.clip((ink[region] * v).sum(axis=1) / (v * v).sum(), 0, 1)
        shape, (err, cx, cy, d) = _fit_shape(alpha, size)
        out.append(dict(colour=colour, shape=shape if err <= MAX_FIT_ERROR else None,
                        size="small" if d < SMALL_LARGE_SPLIT * size else "large",
                        cell=_cell(cx, cy, size), cx=cx, cy=cy, d=d, fit_error=err,
                        area=float(alpha.sum())))
    return out


def _relation_holds(a, b, relation, size):
    axis, sign = RELATION_AXES[relation]
    delta = (a["cx"] - b["cx"], a["cy"] - b["cy"])
    along, across = sign * delta[axis], abs(delta[1 - axis])
    return along >= MIN_APART * size and along > across


def _same(found, wanted):
    return found["colour"] == wanted["colour"] and found["shape"] == wanted["shape"]


def check_objects(found, parsed, size):
    """Compare found objects with a parsed prompt, checking only what the prompt states.
    Returns (correct, reason); reason is None when correct."""
    want = parsed["objects"]
    if len(found) != len(want):
        return False, f"found {len(found)} objects, the prompt has {len(want)}"
    if len(want) == 1:
        f, w = found[0], want[0]
        if f["colour"] != w["colour"]:
            return False, f"colour is {f['colour']}, not {w['colour']}"
        if f["shape"] != w["shape"]:
            return False, f"shape is {f['shape']}, not {w['shape']}"
        if w["size"] and f["size"] != w["size"]:
            return False, f"size is {f['size']}, not {w['size']}"
        if w["position"] and f["cell"] != w["position"]:
            return False, f"position is {f['cell']}, not {w['position']}"
        return True, None
    for a, b in (found, found[::-1]):
        if _same(a, want[0]) and _same(b, want[1]):
            if _relation_holds(a, b, parsed["relation"], size):
                return True, None
            return False, f"objects found but not {parsed['relation']} each other"
    seen = ", ".join(f"{f['colour']} {f['shape']}" for f in found)
    return False, f"objects are {seen}"


def judge(image, prompt):
    """Does `image` show `prompt`? -> dict(correct, reason, parsed, objects)."""
    parsed = parse_prompt(prompt)
    rgb = _as_rgb(image)
    found = _find(rgb)
    correct, reason = check_objects(found, parsed, rgb.shape[0])
    return dict(correct=correct, reason=reason, parsed=parsed, objects=found)


def score(images, prompts):
    """Judge many images -> dict(accuracy, n, categories={name: dict(accuracy, n)}, results).
    Categories: single, pair, held_out (a prompt naming a held-out colour-shape pair), seen."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    results = [judge(im, p) for im, p in zip(images, prompts)]
    groups = {"single": [], "pair": [], "held_out": [], "seen": []}
    for r in results:
        ok = r["correct"]
        groups["pair" if r["parsed"]["relation"] else "single"].append(ok)
        groups["held_out" if r["parsed"]["held_out"] else "seen"].append(ok)
    cats = {k: dict(accuracy=float(np.mean(v)) if v else None, n=len(v))
            for k, v in groups.items()}
    acc = float(np.mean([r["correct"] for r in results])) if results else None
    return dict(accuracy=acc, n=len(results), categories=cats, results=results)
