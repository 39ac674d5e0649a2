"""Parity of the KL autoencoder with diffusers' AutoencoderKL on tiny random weights."""
import pytest
import torch

from nanodiffusion.models.vae import SD, VAE, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

CONFIGS = [((16, 32), 1), ((16, 32, 32), 2)]


def _pair(block_channels, layers_per_block, seed=0):
    """A diffusers AutoencoderKL with random weights (norms too) and ours loaded from it."""
    torch.manual_seed(seed)
    n = len(block_channels)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=block_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block, norm_num_groups=8).eval()
    with torch.no_grad():
        for p in ref.parameters():  # default GroupNorm init (1, 0) would hide mistakes
            p.add_(0.05 * torch.randn_like(p))
    cfg = VAEConfig(block_channels=block_channels, layers_per_block=layers_per_block,
                    norm_groups=8)
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("block_channels,layers_per_block", CONFIGS)
@torch.no_grad()
def test_matches_diffusers(block_channels, layers_per_block):
    ours, ref = _pair(block_channels, layers_per_block)
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    post = ours.encode(x)
    ref_post = ref.encode(x).latent_dist
    assert _maxdiff(post.mean, ref_post.mean) < 1e-4
    assert _maxdiff(post.logvar, ref_post.logvar) < 1e-4
    assert post.mode() is post.mean
    z1 = post.sample(torch.Generator().manual_seed(7))
    z2 = ref_post.sample(torch.Generator().manual_seed(7))
    assert _maxdiff(z1, z2) < 1e-4
    assert torch.allclose(post.kl(), ref_post.kl(), rtol=1e-4, atol=1e-4)
    assert post.kl().shape == (2,)
    assert _maxdiff(ours.decode(z1), ref.decode(z1).sample) < 1e-4
    recon, p = ours(x, generator=torch.Generator().manual_seed(7))
    assert recon.shape == x.shape and _maxdiff(recon, ref.decode(z2).sample) < 1e-4


def test_kl_formula_matches_diffusers_distribution():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6) * 20  # some clamped
    ref = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.allclose(DiagonalGaussian(mean, logvar).kl(), ref.kl(), rtol=1e-5)


def test_key_layout():
    keys = set(VAE(VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8))
               .state_dict())
    for k in ["encoder.down_blocks.0.downsamplers.0.conv.weight",
              "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
              "encoder.mid_block.attentions.0.to_out.0.bias",
              "decoder.up_blocks.0.upsamplers.0.conv.weight",
              "decoder.up_blocks.1.resnets.1.norm2.weight", "quant_conv.weight"]:
        assert k in keys


@torch.no_grad()
def test_sliced_attention_equals_unsliced():
    ours, _ = _pair((16, 32), 1)
    z = torch.randn(1, 4, 9, 7)  # 63 tokens: chunks of 16 leave a ragged last chunk
    full = ours.decode(z)
    calls = {"to_q": 0, "to_k": 0, "to_v": 0}
    for attn in (ours.decoder.mid_block.attentions[0], ours.encoder.mid_block.attentions[0]):
        attn.chunk_size = 16
    for name in calls:  # the keys and values are projected once, the queries per chunk
        getattr(ours.decoder.mid_block.attentions[0], name).register_forward_hook(
            lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    assert _maxdiff(ours.decode(z), full) < 1e-6
    assert calls == {"to_q": 4, "to_k": 1, "to_v": 1}
    x = torch.rand(1, 3, 18, 14) * 2 - 1
    sliced = ours.encode(x).mean
    for attn in (ours.decoder.mid_block.attentions[0], ours.encoder.mid_block.attentions[0]):
        attn.chunk_size = 4096
    assert _maxdiff(ours.encode(x).mean, sliced) < 1e-6


@torch.no_grad()
def test_tiled_decode():
    ours, ref = _pair((16, 32), 1)
    small = torch.randn(1, 4, 12, 10)
    assert torch.equal(ours.tiled_decode(small, tile=16, overlap=4), ours.decode(small))
    z = torch.randn(1, 4, 40, 28)
    full, tiled = ours.decode(z), ours.tiled_decode(z, tile=16, overlap=8)
    assert tiled.shape == full.shape
    # Tiles see less context (GroupNorm statistics, mid attention), so a tiled decode is only
    # close; with these random weights the mean error is ~0.08 against a mean |x| of ~0.42,
    # no worse than diffusers' own tiled decode with the same tiles.
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 16, 32, 0.5
    err = (tiled - full).abs().mean()
    assert err < 0.3 * full.abs().mean()
    assert err <= (ref.tiled_decode(z).sample - full).abs().mean()
    with pytest.raises(ValueError, match="overlap"):
        ours.tiled_decode(z, tile=16, overlap=16)


@pytest.mark.slow
def test_sd_preset_param_count():
    ours = VAE(SD)
    ref = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 83_653_863
    ours.load_state_dict(ref.state_dict(), strict=True)


@torch.no_grad()
def test_activations_are_let_go_as_soon_as_they_are_used():
    """At inference each activation goes as soon as its last use is done: a block's input is
    not held by the decoder (or the encoder) while the block's later layers run (SD 1.5's
    decode at 512 px peaked 393 -> 328 MB above the loaded model in bfloat16, 787-915 ->
    655-779 in float32), and a ResBlock's conv1 output is let go once normalised, before
    conv2 runs."""
    import weakref

    vae = VAE(VAEConfig(block_channels=(16, 32, 32), layers_per_block=2, norm_groups=8)).eval()
    alive = {}

    def keep(name):
        def hook(module, args, out):
            alive[name] = weakref.ref(out)
        return hook

    def check(name, key):
        def hook(module, args):
            alive[name] = alive[key]() is not None
        return hook

    up, last = vae.decoder.up_blocks[-2], vae.decoder.up_blocks[-1]
    down, after = vae.encoder.down_blocks[0], vae.encoder.down_blocks[1]
    rb = last.resnets[0]
    hooks = [up.upsamplers[0].register_forward_hook(keep("upsampled")),
             last.resnets[1].register_forward_pre_hook(check("decoder input held", "upsampled")),
             down.downsamplers[0].register_forward_hook(keep("downsampled")),
             after.resnets[1].register_forward_pre_hook(check("encoder input held",
                                                               "downsampled")),
             rb.conv1.register_forward_hook(keep("conv1")),
             rb.conv2.register_forward_pre_hook(check("conv1 output held", "conv1"))]
    try:
        vae.decode(vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).mode())
    finally:
        for h in hooks:
            h.remove()
    assert alive["decoder input held"] is False
    assert alive["encoder input held"] is False
    assert alive["conv1 output held"] is False


@torch.no_grad()
def test_a_narrowing_resblock_normalises_its_input_in_place():
    """At inference on a channels-last CPU input (the fused GroupNorm's), a ResBlock whose
    width changes runs its shortcut first and then normalises its input in place, needed no
    more (SD 1.5's decoder at 512 px holds 128 MiB less in bfloat16 at its peak); the output
    is the plain formula's."""
    import torch.nn.functional as F

    from nanodiffusion.models import fused_norm
    from nanodiffusion.models.vae import ResBlock

    torch.manual_seed(0)
    rb = ResBlock(16, 8, 4).eval()
    for p in rb.parameters():
        p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    if not fused_norm.supports(rb.norm1, x):
        pytest.skip("the fused GroupNorm does not run here (no AVX-512 or no compiler)")
    x0 = x.clone()
    h = rb.conv1(F.silu(rb.norm1(x0)))
    want = rb.conv_shortcut(x0) + rb.conv2(F.silu(rb.norm2(h)))
    got = rb(x)
    assert _maxdiff(got, want) < 1e-5
    assert _maxdiff(x, F.silu(rb.norm1(x0))) < 1e-5  # x itself holds the normalised input
