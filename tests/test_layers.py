import torch

from nanodiffusion.models.layers import Attention, FeedForward, timestep_embedding


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, context_dim=16)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    q = attn.to_q(x).view(2, 5, 4, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(2, 7, 4, 8).transpose(1, 2)
    v = attn.to_v(ctx).view(2, 7, 4, 8).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    ref = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(attn(x, ctx), ref, atol=1e-5)
    assert set(attn.state_dict()) >= {"to_q.weight", "to_out.0.weight", "to_out.0.bias"}


def test_feedforward_keys_and_timestep_embedding():
    ff = FeedForward(8)
    assert set(ff.state_dict()) == {"net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"}
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 6)
    assert e.shape == (2, 6)
    # flip_sin_to_cos: cos first, so t=0 gives ones then zeros
    assert torch.equal(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
