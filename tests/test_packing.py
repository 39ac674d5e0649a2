"""oneDNN weight prepacking of the bfloat16 UNet's convolutions for a sampling loop (issue 23
item 1, models/packing.py): the same outputs bit for bit, the dense weights let go while packed
and put back as they were (values and layout) when the loop ends or fails, float32 untouched,
and a pipeline's images unchanged, low memory and LoRA fusing included."""
import pytest
import torch

import nanodiffusion
from nanodiffusion.models import packing
from nanodiffusion.models.unet import UNet, UNetConfig, for_inference

pytestmark = pytest.mark.skipif(not packing.available(), reason="this torch has no oneDNN")

PROMPT = "a red circle above a blue square"
CFG = UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                 num_heads=(2, 2), context_dim=32, norm_groups=8)


def _unet(dtype):
    torch.manual_seed(0)
    return for_inference(UNet(CFG).to(dtype))


def _call(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g).to(unet.conv_in.weight.dtype)
    ctx = torch.randn(2, 7, 32, generator=g).to(x.dtype)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), context=ctx)


def _convs(unet):
    return [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]


def test_packed_calls_equal_and_weights_come_back_as_they_were():
    unet = _unet(torch.bfloat16)
    before = {k: (v.clone(), v.stride()) for k, v in unet.state_dict().items()}
    want = _call(unet)
    with packing.packed_convs(unet) as n:
        assert n == len(_convs(unet)) > 0
        assert all(type(m) is packing.PackedConv2d and m.weight.numel() == 0
                   for m in _convs(unet))  # the dense copies are let go
        got = [_call(unet), _call(unet)]
        assert _call(unet, seed=2).shape == want.shape
    assert all(torch.equal(g, want) for g in got)
    after = unet.state_dict()
    assert all(type(m) is torch.nn.Conv2d for m in _convs(unet))
    for k, (v, stride) in before.items():
        assert torch.equal(after[k], v) and after[k].stride() == stride, k
    assert torch.equal(_call(unet), want)


def test_weights_come_back_when_the_loop_fails():
    unet = _unet(torch.bfloat16)
    w = unet.conv_in.weight.detach().clone()
    with pytest.raises(KeyboardInterrupt):
        with packing.packed_convs(unet):
            raise KeyboardInterrupt
    assert type(unet.conv_in) is torch.nn.Conv2d and torch.equal(unet.conv_in.weight, w)


def test_float32_and_disabled_pack_nothing():
    unet = _unet(torch.float32)
    with packing.packed_convs(unet) as n:
        assert n == 0 and type(unet.conv_in) is torch.nn.Conv2d
    bf = _unet(torch.bfloat16)
    with packing.packed_convs(bf, enabled=False) as n:
        assert n == 0 and bf.conv_in.weight.numel() > 0


@pytest.mark.parametrize("low_memory", [False, True])
def test_pipeline_images_unchanged(monkeypatch, low_memory):
    """A bfloat16 pipeline packs for a loop of more than two steps and gives the images it
    gives unpacked; its UNet is dense again after the call (two calls in a row agree)."""
    pipe = nanodiffusion.load("shapes", dtype=torch.bfloat16, low_memory=low_memory)
    packed = []
    real = packing.packed_convs

    def spy(module, enabled=True):
        cm = real(module, enabled)
        packed.append(enabled)
        return cm

    monkeypatch.setattr("nanodiffusion.pipelines.sd.packed_convs", spy)
    a = pipe.generate(PROMPT, seed=4, steps=5, n=2)
    b = pipe.generate(PROMPT, seed=4, steps=2)
    assert packed == [True, False]
    monkeypatch.setattr(packing, "available", lambda: False)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in
                                       pipe.generate(PROMPT, seed=4, steps=5, n=2)]
    assert b[0].tobytes() == pipe.generate(PROMPT, seed=4, steps=2)[0].tobytes()
    assert all(m.weight.numel() > 0 for m in _convs(pipe.unet)) or low_memory
