"""UNet parity with diffusers' UNet2DConditionModel on tiny random weights, and the presets'
architectures against diffusers' full-size configs (slow)."""
import dataclasses

import pytest
import torch

from nanodiffusion.models.unet import SD15, SD2_INPAINT, SD21, TINY, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")


def ours_from_diffusers(c):
    """Translate a diffusers UNet2DConditionModel config into a UNetConfig (test helper; the
    library's own translation belongs to formats/diffusers_config.py)."""
    n = len(c.block_out_channels)
    heads = c.attention_head_dim  # misnamed in diffusers: a number of heads
    heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
    image = c.encoder_hid_dim_type == "image_proj"
    return UNetConfig(
        in_channels=c.in_channels, out_channels=c.out_channels,
        block_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
        attention_levels=tuple(t.startswith("CrossAttn") for t in c.down_block_types),
        num_heads=heads, transformer_layers=c.transformer_layers_per_block,
        context_dim=c.cross_attention_dim, linear_projection=c.use_linear_projection,
        upcast_attention=c.upcast_attention, norm_groups=c.norm_num_groups, norm_eps=c.norm_eps,
        image_embed_dim=c.encoder_hid_dim if image else None,
        image_tokens=32 if image else 4,  # diffusers' ImageProjection default token count
        pooled_text_dim=(c.projection_class_embeddings_input_dim
                         if c.class_embed_type == "projection" else None),
    )


def tiny_pair(**kw):
    """A random diffusers UNet and ours with its weights loaded strictly."""
    torch.manual_seed(0)
    base = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=32)
    ref = diffusers.UNet2DConditionModel(**{**base, **kw}).eval()
    # randomise the zero/one-initialised norms and biases too, so they are exercised
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(ours_from_diffusers(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def assert_parity(ref, ours, x, ts, context=None, image_embeds=None, text_embeds=None):
    added = {} if image_embeds is None else {"image_embeds": image_embeds}
    with torch.no_grad():
        for t in ts:
            want = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                       class_labels=text_embeds).sample
            got = ours(x, t, context=context, image_embeds=image_embeds, text_embeds=text_embeds)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4, t


# a fractional scalar (Karras sigmas map to such timesteps) and different ones per sample
TIMESTEPS = [500.5, torch.tensor([1.0, 731.25])]


def test_parity_conv_projection_attention_then_plain_odd_size():
    ref, ours = tiny_pair(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                          layers_per_block=2, attention_head_dim=4)
    g = torch.Generator().manual_seed(1)
    # 9 x 10 latents: odd height makes the upsampler follow the skip tensor's size
    x, ctx = torch.randn(2, 4, 9, 10, generator=g), torch.randn(2, 7, 32, generator=g)
    assert_parity(ref, ours, x, TIMESTEPS, context=ctx)


def test_parity_linear_projection_per_level_heads_upcast_inpaint():
    ref, ours = tiny_pair(
        block_out_channels=(32, 64, 64), in_channels=9,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True,
        transformer_layers_per_block=2)
    assert ours.config.num_heads == (2, 4, 8)
    assert ours.mid_block.attentions[0].transformer_blocks[0].attn1.num_heads == 8
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    assert_parity(ref, ours, x, TIMESTEPS, context=ctx)


def image_pair():
    return tiny_pair(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
                     out_channels=8, encoder_hid_dim_type="image_proj", encoder_hid_dim=24,
                     addition_embed_type="image")


def test_parity_unclip_image_conditioning():
    ref, ours = image_pair()
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 24, generator=g)
    assert_parity(ref, ours, x, TIMESTEPS, image_embeds=e)


def test_image_tokens_follow_text_tokens():
    torch.manual_seed(0)
    ours = UNet(UNetConfig(block_channels=(32, 64), layers_per_block=1, num_heads=(2, 2),
                           attention_levels=(False, True), context_dim=32, norm_groups=8,
                           out_channels=8, image_embed_dim=24, image_tokens=32)).eval()
    g = torch.Generator().manual_seed(4)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 24, generator=g)
    ctx = torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        both = ours(x, 10, context=ctx, image_embeds=e)
        alone = ours(x, 10, image_embeds=e)
    assert both.shape == alone.shape == (2, 8, 8, 8)
    assert not torch.allclose(both, alone)  # the text tokens are seen
    _, tokens = ours._condition(torch.zeros(2, 128), ctx, e, None)
    assert tokens.shape == (2, 6 + 32, 32) and torch.equal(tokens[:, :6], ctx)
    with pytest.raises(ValueError, match="image_embeds"):
        ours(x, 10, context=ctx)


def test_tiny_channels_last_backward_and_errors():
    torch.manual_seed(0)
    model = UNet(TINY)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32)
    y = model(x, torch.tensor([1, 2]), ctx)
    assert y.shape == x.shape
    cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last),
                                                      torch.tensor([1, 2]), ctx)
    assert torch.allclose(y, cl, atol=1e-5)
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, 1)
    with pytest.raises(ValueError, match="num_heads"):
        UNet(UNetConfig(num_heads=(8, 8)))


def diffusers_full(**kw):
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**kw)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


SD2_KW = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
              use_linear_projection=True)


@pytest.mark.slow
@pytest.mark.parametrize("ours_cfg, kw, count", [
    (SD15, dict(cross_attention_dim=768), 859_520_964),
    (SD21, dict(SD2_KW, upcast_attention=True), None),
    (SD2_INPAINT, dict(SD2_KW, in_channels=9), None),
])
def test_full_size_presets_match_diffusers(ours_cfg, kw, count):
    ref = diffusers_full(**kw)  # diffusers' defaults are otherwise the SD 1.x UNet
    with torch.device("meta"):
        ours = UNet(ours_cfg)
    assert shapes(ours) == shapes(ref)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    if count is not None:
        assert n == count


def test_parity_pooled_text_in_the_time_embedding():
    """pooled_text_dim is diffusers' class_embed_type="projection": the pooled text state
    through an MLP, added to the time embedding."""
    ref, ours = tiny_pair(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                          class_embed_type="projection", projection_class_embeddings_input_dim=24)
    assert ours.config.pooled_text_dim == 24
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    pooled = torch.randn(2, 24, generator=g)
    assert_parity(ref, ours, x, TIMESTEPS, context=ctx, text_embeds=pooled)
    with torch.no_grad():  # the pooled state is seen, and required
        assert not torch.allclose(ours(x, 10, ctx, text_embeds=pooled),
                                  ours(x, 10, ctx, text_embeds=pooled.flip(0)))
    with pytest.raises(ValueError, match="text_embeds"):
        ours(x, 10, ctx)
    with pytest.raises(ValueError, match="text_embeds"):
        UNet(dataclasses.replace(ours.config, pooled_text_dim=None))(x, 10, ctx,
                                                                     text_embeds=pooled)
