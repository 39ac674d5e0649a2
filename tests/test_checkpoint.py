"""Our checkpoint format: a safetensors file rebuilds its model alone, exactly; writes are
atomic; a bad file is refused with an error that names the file and the problem."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodiffusion.formats import checkpoint
from nanodiffusion.models import clip, unet, vae


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def _unet():
    return unet.UNet(unet.TINY)


def _vae():
    return vae.VAE(vae.TINY)


def _clip_text():
    return clip.CLIPTextModel(clip.TINY_TEXT)


def _clip():
    return clip.CLIPModel(clip.TINY_TEXT, clip.TINY_VISION)


def _run(model):
    """A forward pass that touches every part of the model, on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(model, unet.UNet):
            c = model.config
            x = torch.randn(2, c.in_channels, 8, 8, generator=g)
            ctx = torch.randn(2, 5, c.context_dim, generator=g)
            return [model(x, torch.tensor([10, 900]), ctx)]
        if isinstance(model, vae.VAE):
            x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
            post = model.encode(x)
            return [post.mean, post.logvar, model.decode(post.mean)]
        ids = torch.randint(0, 1000, (2, 7), generator=g)
        if isinstance(model, clip.CLIPTextModel):
            return list(model(ids))
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        return [model.encode_text(ids), model.encode_image(pixels), model(ids, pixels)]


MODELS = {"UNet": _unet, "VAE": _vae, "CLIPTextModel": _clip_text, "CLIPModel": _clip}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_exact(tmp_path, name):
    model = _seeded(MODELS[name])
    path = tmp_path / "m.safetensors"
    checkpoint.save_model(model, path, extra={"note": "kept"})
    loaded = checkpoint.load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    _, args = checkpoint._model_args(model)
    _, loaded_args = checkpoint._model_args(loaded)
    assert loaded_args == args  # tuples come back as tuples: the configs compare equal
    for a, b in zip(_run(model), _run(loaded)):
        assert torch.equal(a, b)
    assert json.loads(checkpoint.read_metadata(path)["extra"]) == {"note": "kept"}


def test_config_tuples_and_none_survive(tmp_path):
    cfg = dataclasses.replace(unet.TINY, num_heads=(1, 2), mid_num_heads=4,
                              image_embed_dim=None)
    checkpoint.save_model(unet.UNet(cfg), tmp_path / "u.safetensors")
    back = checkpoint.load_model(tmp_path / "u.safetensors").config
    assert back == cfg
    assert isinstance(back.block_channels, tuple) and isinstance(back.attention_levels, tuple)
    assert back.image_embed_dim is None and back.mid_num_heads == 4


def test_a_config_built_with_lists_loads_with_tuples(tmp_path):
    """Recipes give lists; the file rebuilds the same model with tuples."""
    cfg = dataclasses.replace(vae.TINY, block_channels=[16, 32])
    model = _seeded(lambda: vae.VAE(cfg))
    checkpoint.save_model(model, tmp_path / "v.safetensors")
    back = checkpoint.load_model(tmp_path / "v.safetensors")
    assert back.config.block_channels == (16, 32)
    assert all(torch.equal(a, b) for a, b in zip(_run(model), _run(back)))


def test_half_storage_loads_as_float32(tmp_path):
    model = _seeded(_vae)
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    checkpoint.save_model(model, full)
    checkpoint.save_model(model, half, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(half).values()
               if v.is_floating_point())
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = checkpoint.load_model(half)
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, v, rtol=1e-3, atol=1e-4)  # fp16: 11-bit mantissa
    for a, b in zip(_run(model), _run(loaded)):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)


class _Compiled(torch.nn.Module):
    """What torch.compile returns, as far as saving goes: the model as `_orig_mod`."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model


def test_wrappers_are_saved_unwrapped(tmp_path):
    model = _seeded(_vae)
    checkpoint.save_model(_Compiled(model), tmp_path / "v.safetensors")
    assert not any(k.startswith("_orig_mod") for k in load_file(tmp_path / "v.safetensors"))
    assert checkpoint.read_metadata(tmp_path / "v.safetensors")["class"] == "VAE"


def test_save_refuses_a_foreign_module(tmp_path):
    with pytest.raises(TypeError, match="Linear"):
        checkpoint.save_model(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, {"step": 1, "w": torch.ones(3)})

    def half_written(tmp):
        with open(tmp, "wb") as f:
            f.write(b"garbage")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.atomic_write(path, half_written)
    state = checkpoint.load_state(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary left


def test_interrupted_model_save_keeps_the_old_model(tmp_path, monkeypatch):
    path = tmp_path / "v.safetensors"
    model = _seeded(_vae)
    checkpoint.save_model(model, path)
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(_seeded(_unet), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


# ---------------------------------------------------------------- bad files

@pytest.fixture
def vae_file(tmp_path):
    path = tmp_path / "v.safetensors"
    checkpoint.save_model(_seeded(_vae), path)
    return path


def _rewrite(path, edit_tensors=None, edit_meta=None):
    tensors, meta = load_file(path), checkpoint.read_metadata(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    out = path.with_name("edited.safetensors")
    save_file(tensors, out, metadata=meta)
    return out


def test_unknown_class_is_refused(vae_file):
    bad = _rewrite(vae_file, edit_meta=lambda m: m.update({"class": "Transformer"}))
    with pytest.raises(ValueError, match=r"edited\.safetensors.*unknown model class 'Transformer'"):
        checkpoint.load_model(bad)


def test_foreign_file_is_refused(vae_file):
    bad = _rewrite(vae_file, edit_meta=lambda m: m.clear())
    with pytest.raises(ValueError, match=r"edited\.safetensors.*not a nanodiffusion model file"):
        checkpoint.load_model(bad)


def test_unknown_config_field_is_refused(vae_file):
    def edit(m):
        cfg = json.loads(m["config"])
        cfg["config"]["depth"] = 3
        m["config"] = json.dumps(cfg)
    with pytest.raises(ValueError, match="unknown config fields.*depth"):
        checkpoint.load_model(_rewrite(vae_file, edit_meta=edit))


def test_missing_key_is_refused(vae_file):
    bad = _rewrite(vae_file, edit_tensors=lambda t: t.pop("quant_conv.weight"))
    with pytest.raises(ValueError, match=r"edited\.safetensors: the weights do not fit "
                                         r"the VAE: 1 missing: quant_conv\.weight$"):
        checkpoint.load_model(bad)


def test_unexpected_key_is_refused(vae_file):
    bad = _rewrite(vae_file, edit_tensors=lambda t: t.update({"extra.weight": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"edited\.safetensors: .*1 unexpected: extra\.weight$"):
        checkpoint.load_model(bad)


def test_wrong_shape_is_refused(vae_file):
    def edit(t):
        t["post_quant_conv.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"edited\.safetensors: .*1 with the wrong shape "
                                         r"\(weights != model\): "
                                         r"post_quant_conv\.bias \(5,\) != \(4,\)$"):
        checkpoint.load_model(_rewrite(vae_file, edit_tensors=edit))


@pytest.mark.parametrize("keep", [0.5, 0.999, 20])
def test_truncated_file_is_refused(vae_file, keep):
    data = vae_file.read_bytes()
    cut = vae_file.with_name("cut.safetensors")
    cut.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        checkpoint.load_model(cut)


def test_truncated_state_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, {"step": 3, "w": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"state\.pt"):
        checkpoint.load_state(path)
