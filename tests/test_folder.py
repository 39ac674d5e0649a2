"""ImageFolderDataset on temporary folders in both caption layouts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.data.folder import ImageFolderDataset


def _image(w, h, colour=(200, 30, 30)):
    a = np.full((h, w, 3), 255, np.uint8)
    a[:, : w // 2] = colour  # left half coloured, so crops and flips are visible
    return Image.fromarray(a)


@pytest.fixture
def txt_folder(tmp_path):
    _image(80, 40).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide red image\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    _image(30, 60, (20, 200, 20)).save(sub / "tall.jpg", quality=95)
    (sub / "tall.txt").write_text("a tall green image")
    return tmp_path


def test_text_file_layout(txt_folder):
    ds = ImageFolderDataset(txt_folder, size=32)
    assert len(ds) == 2
    items = [ds[0], ds[1]]
    assert {it["caption"] for it in items} == {"a wide red image", "a tall green image"}
    for it in items:
        assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.float32
        assert -1 <= it["image"].min() and it["image"].max() <= 1
    assert ds[-1]["caption"] == ds[1]["caption"]
    with pytest.raises(IndexError):
        ds[2]


def test_center_crop_of_wide_image(txt_folder):
    ds = ImageFolderDataset(txt_folder, size=32)
    wide = next(it for it in (ds[0], ds[1]) if it["caption"].startswith("a wide"))
    x = wide["image"]
    # 80x40 -> 64x32, centre 32 columns: left 16 red, right 16 white
    assert x[:, :, :14].mean() < 0 and (x[:, :, 18:] > 0.95).all()


def test_metadata_layout_with_rgba(tmp_path):
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))  # fully transparent: must become white
    rgba.save(tmp_path / "a.png")
    _image(64, 64).save(tmp_path / "b.webp")
    rows = [{"file_name": "a.png", "text": "nothing"}, {"file_name": "b.webp", "text": "half"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ImageFolderDataset(tmp_path, size=16)
    assert [ds[i]["caption"] for i in range(2)] == ["nothing", "half"]
    assert (ds[0]["image"] == 1).all()


def test_random_crop_and_flip_are_seeded(txt_folder):
    def first(seed, epoch):
        ds = ImageFolderDataset(txt_folder, size=32, center_crop=False, random_flip=True,
                                seed=seed)
        ds.set_epoch(epoch)
        return torch.stack([ds[i % 2]["image"] for i in range(2)])

    assert torch.equal(first(0, 0), first(0, 0))
    variants = {tuple(first(s, e).flatten()[::37].tolist()) for s in range(3) for e in range(3)}
    assert len(variants) > 1


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", size=32)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, size=32)
    _image(40, 40).save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match="lonely.png has no caption"):
        ImageFolderDataset(tmp_path, size=32)
    (tmp_path / "lonely.txt").write_text("ok")
    with pytest.raises(ValueError, match="size"):
        ImageFolderDataset(tmp_path, size=0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "broken.txt").write_text("broken")
    ds = ImageFolderDataset(tmp_path, size=32)
    index = [p.name for p, _ in ds.items].index("broken.jpg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        ds[index]


def test_metadata_errors(tmp_path):
    _image(40, 40).save(tmp_path / "a.png")
    _image(40, 40).save(tmp_path / "extra.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="extra.png has no caption"):
        ImageFolderDataset(tmp_path, size=32)
    meta.write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ImageFolderDataset(tmp_path, size=32)
    meta.write_text("{not json\n")
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        ImageFolderDataset(tmp_path, size=32)
