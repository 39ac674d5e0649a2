"""Reading weights (issue 23 item 2): our safetensors reader gives what safetensors' own does,
casts each tensor to the dtype asked for as it reads it, and the module built from it holds
those very tensors (no float32 detour, no second copy); cut or malformed files are named."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodiffusion.formats.files import build, read_checkpoint, read_safetensors
from nanodiffusion.models.vae import VAE, VAEConfig
from proc_maps import linux_only, mapping

TENSORS = {
    "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 3).bfloat16(),
    "f64": torch.randn(4).double(), "i64": torch.arange(6).reshape(2, 3),
    "u8": torch.arange(5, dtype=torch.uint8), "bool": torch.tensor([True, False]),
    "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3)}


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file(TENSORS, str(p), metadata={"format": "pt"})
    return p


def test_reads_what_safetensors_reads(path):
    ours, ref = read_safetensors(path), load_file(str(path))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_floating_tensors_come_in_the_dtype_asked_for(path, dtype):
    ours = read_safetensors(path, dtype)
    for k, v in TENSORS.items():
        want = v.to(dtype) if v.is_floating_point() else v
        assert ours[k].dtype == want.dtype and torch.equal(ours[k], want), k


def test_cut_and_malformed_files_are_named(path, tmp_path):
    data = path.read_bytes()
    for i, bad in enumerate([data[:-3], data[:6], b"", (10**9).to_bytes(8, "little") + data[8:],
                             data[:8] + b"[" + data[9:]]):
        p = tmp_path / f"bad{i}.safetensors"
        p.write_bytes(bad)
        with pytest.raises(ValueError, match=f"bad{i}.safetensors: not a readable safetensors"):
            read_checkpoint(p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_built_module_holds_the_tensors_read(tmp_path, dtype):
    """An fp16 file opened in `dtype`: every weight read once, cast as read, and the module's
    parameters are those tensors (same memory), with the values of the file cast."""
    cfg = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)
    src = VAE(cfg).half()
    p = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    sd, _ = read_checkpoint(p, dtype)
    model = build(VAE, cfg, sd, str(p), "cpu", dtype)
    for k, v in model.state_dict().items():
        assert v.dtype == dtype and v.data_ptr() == sd[k].data_ptr(), k
        assert torch.equal(v, src.state_dict()[k].to(dtype)), k


BIG = {"a_f32": torch.randn(64, 33), "b_f16": torch.randn(3000).half(), "c_small": torch.randn(5),
       "d_bf16": torch.randn(4, 1000).bfloat16(), "e_i64": torch.arange(700)}


@linux_only
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapped", [False, True])
def test_tensors_over_a_page_are_mapped_or_cast_from_the_files_pages(tmp_path, dtype, mapped):
    """`mapped`: a tensor over a page that needs no cast is a view of a private mapping of the
    file (no file descriptor held for it); a write to it copies the page and leaves the file as
    it was (LoRA fusing into a loaded model must never change the user's file); a cast one, and
    any read without `mapped`, is memory of its own; the values are safetensors' either way."""
    path = tmp_path / "big.safetensors"
    save_file(BIG, str(path))
    before, fds = path.read_bytes(), len(os.listdir("/proc/self/fd"))
    ours = read_safetensors(path, dtype, mapped=mapped)
    assert len(os.listdir("/proc/self/fd")) == fds
    for k, v in BIG.items():
        want = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        assert ours[k].dtype == want.dtype and torch.equal(ours[k], want), k
        in_file = (mapping(ours[k].data_ptr()) or ("",))[0] == os.path.realpath(path)
        assert in_file == (mapped and k != "c_small" and ours[k].dtype == v.dtype), k
        ours[k].add_(1) if ours[k].is_floating_point() else ours[k].mul_(2)
    assert path.read_bytes() == before
    where = ours["a_f32"].data_ptr()
    del ours
    assert (mapping(where) or ("",))[0] != os.path.realpath(path)  # unmapped with its last tensor
