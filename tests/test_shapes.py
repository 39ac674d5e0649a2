"""The shapes generator against its contract (docs/shapes.md, and the numbers in shapes.py)."""

import re
import time

import numpy as np
import pytest
import torch

from nanodiffusion.data import shapes as sh


def test_tables_match_the_contract():
    assert sh.COLOURS["orange"] == (245, 140, 20) and len(sh.COLOURS) == 8
    assert sh.SHAPES == ("circle", "square", "triangle", "star")
    assert set(sh.HELD_OUT) == {("red", "star"), ("green", "triangle"), ("blue", "circle"),
                                ("yellow", "square")}
    assert len(sh.POSITIONS) == 9 and sh.POSITIONS["center"] == "in the center"
    assert sh.RELATIONS == ("to the left of", "to the right of", "above", "below")


def test_deterministic_and_split_dependent():
    a, b = sh.sample(7, "train", seed=3), sh.sample(7, "train", seed=3)
    assert a[1] == b[1] and a[2] == b[2]
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    others = [sh.sample(7, "eval", seed=3), sh.sample(7, "train", seed=4), sh.sample(8, "train")]
    assert any(o[1] != a[1] or o[2] != a[2] for o in others)
    assert sh.sample(7, "eval", seed=3)[2] != a[2]


def test_image_basics_and_exact_interior_colours():
    for size in (64, 136):
        img, caption, attrs = sh.sample(1, size=size)
        assert img.mode == "RGB" and img.size == (size, size)
        px = np.asarray(img).reshape(-1, 3)
        assert (px == 255).all(axis=1).mean() > 0.5  # mostly white background
        colours = {tuple(p) for p in px}
        for obj in attrs["objects"]:
            assert sh.COLOURS[obj["colour"]] in colours  # interiors keep the exact colour


@pytest.mark.parametrize("bad", [31, 40.0, 520, 24, 0, 65])
def test_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="multiple of 8 from 32 to 512"):
        sh.sample(0, size=bad)


def test_rejects_bad_split_and_index():
    with pytest.raises(ValueError, match="split"):
        sh.sample(0, split="test")
    with pytest.raises(ValueError, match="index"):
        sh.sample(-1)


def _grammar():
    colour, shape = "|".join(sh.COLOURS), "|".join(sh.SHAPES)
    np_ = rf"(a|an) ((small|large) )?({colour}) ({shape})"
    pos = "|".join(sh.POSITIONS.values())
    single = re.compile(rf"{np_}( ({pos}))?")
    pair = re.compile(rf"(a|an) ({colour}) ({shape}) ({'|'.join(sh.RELATIONS)}) "
                      rf"(a|an) ({colour}) ({shape})")
    return single, pair


def test_captions_and_attributes_follow_the_contract():
    single_re, pair_re = _grammar()
    n_single = held = 0
    mentions = {"size": 0, "position": 0}
    for i in range(400):
        size = 64 if i % 2 else 96
        _, cap, at = sh.sample(i, "eval", size=size)
        objs = at["objects"]
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", cap), cap
        held += any((o["colour"], o["shape"]) in sh.HELD_OUT for o in objs)
        for o in objs:
            lo, hi = (0.25, 0.25) if o["size"] == "small" else (0.40, 0.40)
            assert lo * 0.92 * size <= o["d"] <= hi * 1.08 * size
            assert o["d"] / 2 <= o["cx"] <= size - o["d"] / 2  # inside the canvas
            assert o["d"] / 2 <= o["cy"] <= size - o["d"] / 2
        if at["relation"] is None:
            n_single += 1
            assert single_re.fullmatch(cap), cap
            o = objs[0]
            col, row = list(sh.POSITIONS).index(o["cell"]) % 3, list(sh.POSITIONS).index(
                o["cell"]) // 3
            assert abs(o["cx"] - sh.GRID[col] * size) <= 0.03 * size + 1e-9
            assert abs(o["cy"] - sh.GRID[row] * size) <= 0.03 * size + 1e-9
            assert (o["size"] in cap) == at["mentions"]["size"]
            assert (sh.POSITIONS[o["cell"]] in cap) == at["mentions"]["position"]
            for k in mentions:
                mentions[k] += at["mentions"][k]
        else:
            _check_pair(cap, at, size, pair_re)
    assert 160 < n_single < 240  # half the scenes hold one object
    assert 50 < mentions["size"] < n_single - 50 and 50 < mentions["position"] < n_single - 50
    assert held > 0  # the eval split draws held-out pairs


def _check_pair(cap, at, size, pair_re):
    m = pair_re.fullmatch(cap)
    assert m, cap
    a, b = at["objects"]
    assert (a["colour"], a["shape"]) != (b["colour"], b["shape"])
    assert a["size"] == b["size"] == "small"
    assert (m.group(2), m.group(3), m.group(6), m.group(7)) == (
        a["colour"], a["shape"], b["colour"], b["shape"])
    axis, sign = sh.RELATION_AXES[at["relation"]]
    delta = (a["cx"] - b["cx"], a["cy"] - b["cy"])
    assert sign * delta[axis] >= 0.35 * size and abs(delta[1 - axis]) <= 0.15 * size
    gap = max(abs(delta[0]), abs(delta[1])) - (a["d"] + b["d"]) / 2
    assert gap > 0  # boxes apart: no overlap


def test_train_split_never_shows_held_out_pairs():
    for i in range(600):
        _, cap, at = sh.sample(i, "train")
        for o in at["objects"]:
            assert (o["colour"], o["shape"]) not in sh.HELD_OUT, cap
    seen = set()
    for i in range(600):
        seen |= {(o["colour"], o["shape"]) for o in
                 sh.sample(i, "train", include_held_out=True)[2]["objects"]}
    assert seen & set(sh.HELD_OUT)


def test_enumerate_captions():
    assert len(sh.enumerate_captions("object")) == 32
    assert "an orange circle" in sh.enumerate_captions("object")
    assert len(sh.enumerate_captions("object", include_held_out=False)) == 28
    single, pair = sh.enumerate_captions("single"), sh.enumerate_captions("pair")
    assert len(single) == 32 * 3 * 10 and len(pair) == 32 * 31 * 4
    assert len(set(single + pair)) == len(single) + len(pair)
    assert "a large blue star in the top left corner" in single
    assert "a green triangle above a pink square" in pair
    everything = set(sh.enumerate_captions("all"))
    for i in range(200):
        assert sh.sample(i, "eval")[1] in everything
    with pytest.raises(ValueError, match="kind"):
        sh.enumerate_captions("triples")


def test_eval_prompts_fixed():
    a, b = sh.eval_prompts(20), sh.eval_prompts(20)
    assert a == b and len(a) == 20 and a[3][0] == sh.sample(3, "eval")[1]


def test_dataset_items_and_throughput():
    ds = sh.ShapesDataset("train", size=64, length=1000)
    item = ds[5]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() == 1  # white background
    assert item["caption"] == sh.sample(5, "train")[1]
    with pytest.raises(IndexError):
        ds[1000]
    start = time.process_time()
    for i in range(200):
        ds[i]
    per_sample = (time.process_time() - start) / 200
    assert per_sample < 0.005  # a UNet step takes ~10 ms per sample; data must not gate it
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 64, 64) and len(batch["caption"]) == 8
