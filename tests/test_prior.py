"""The DALL·E 2 prior: parity with diffusers' PriorTransformer, the learned null condition,
normalisation statistics, checkpoint round trip, and seeded sampling."""
import pytest
import torch

from nanodiffusion.diffusion import PRIOR_SCHEDULE
from nanodiffusion.formats import checkpoint
from nanodiffusion.models.prior import TINY, Prior, PriorConfig
from nanodiffusion.pipelines.unclip import sample_prior


def _inputs(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.embed_dim, generator=g), torch.tensor([1, 500, 999][:B]),
            torch.randn(B, cfg.text_tokens, cfg.text_dim or cfg.embed_dim, generator=g),
            torch.randn(B, cfg.embed_dim, generator=g))


def test_parity_with_diffusers_prior_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                     embedding_dim=16, num_embeddings=7,
                                     additional_embeddings=4).eval()
    with torch.no_grad():
        for p in ref.parameters():  # diffusers zero-inits some; make every weight matter
            p.normal_(0, 0.3)
    cfg = PriorConfig(embed_dim=16, text_tokens=7, width=16, num_layers=2, num_heads=2,
                      learned_null=False)
    ours = Prior(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, states, emb = _inputs(cfg)
    with torch.no_grad():
        # diffusers applies its causal mask only when given a text mask
        want = ref(x, t, emb, states, attention_mask=torch.ones(3, 7, dtype=torch.bool))
        got = ours(x, t, states, emb)
    torch.testing.assert_close(got, want.predicted_image_embedding, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.denormalize(got), ref.post_process_latents(got))


def test_output_shape_and_bad_inputs():
    model = Prior(TINY).eval()
    x, t, states, emb = _inputs(TINY)
    assert model(x, t, states, emb).shape == (3, TINY.embed_dim)
    assert model(x, 7.5, states, emb).shape == (3, TINY.embed_dim)  # scalar, fractional t
    with pytest.raises(ValueError, match="text_states must be"):
        model(x, t, states[:, :5], emb)


def test_drop_text_uses_the_learned_null_condition():
    model = Prior(TINY)
    with torch.no_grad():
        model.null_text_states.normal_()
        model.null_text_emb.normal_()
    _, _, states, emb = _inputs(TINY)
    s, e = model.drop_text(states, emb, torch.tensor([True, False, True]))
    assert torch.equal(s[1], states[1]) and torch.equal(e[1], emb[1])
    assert torch.equal(s[0], model.null_text_states[0])
    assert torch.equal(e[2], model.null_text_emb[0])
    with pytest.raises(ValueError, match="learned_null"):
        Prior(PriorConfig(**{**TINY.__dict__, "learned_null": False})).null_condition(2)


def test_stats_and_checkpoint_round_trip(tmp_path):
    model = Prior(TINY).eval()
    data = torch.randn(64, TINY.embed_dim) * 3 + 1
    model.set_stats(data)
    z = model.normalize(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(TINY.embed_dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.denormalize(z), data)
    checkpoint.save_model(model, tmp_path / "prior.safetensors")
    loaded = checkpoint.load_model(tmp_path / "prior.safetensors")
    assert loaded.config == TINY
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, t, states, emb = _inputs(TINY)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, states, emb), model(x, t, states, emb))


@pytest.mark.parametrize("sampler", ["ddim", "euler-ancestral"])
def test_sampling_is_deterministic_per_seed(sampler):
    torch.manual_seed(0)
    model = Prior(TINY).eval()
    _, _, states, emb = _inputs(TINY, B=2)
    uncond = model.null_condition(2)

    def draw(seed):
        return sample_prior(model, PRIOR_SCHEDULE, (states, emb), uncond, steps=4, guidance=3.0,
                            sampler=sampler, generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(1), draw(1), draw(2)
    assert a.shape == (2, TINY.embed_dim) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
