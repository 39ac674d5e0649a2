"""CLIP parity with transformers (reference implementation) on tiny random weights."""
import math

import pytest
import torch

from nanodiffusion.models.clip import (
    SD2_TEXT, SD15_TEXT, TINY_TEXT, TINY_VISION, CLIPModel, CLIPTextConfig, CLIPTextModel,
    CLIPVisionConfig, CLIPVisionModel, contrastive_loss, preprocess,
)

transformers = pytest.importorskip("transformers")

VOCAB = 100
TEXT = CLIPTextConfig(vocab_size=VOCAB, max_positions=16, width=32, num_layers=2, num_heads=4,
                      mlp_dim=48, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
VISION = CLIPVisionConfig(image_size=32, patch_size=8, width=24, num_layers=2, num_heads=2,
                          mlp_dim=40)


def hf_text_config(cfg):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation,
        layer_norm_eps=cfg.norm_eps, bos_token_id=cfg.vocab_size - 2,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


def hf_vision_config(cfg):
    return transformers.CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_channels=cfg.channels, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act=cfg.activation, layer_norm_eps=cfg.norm_eps)


def random_ids(cfg, B=3, T=16, seed=0):
    """Ids with the end token at different places, padded with it after (as SD 1.x)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 2, (B, T), generator=g)
    for b, end in enumerate([5, T - 1, 9][:B]):
        ids[b, end:] = cfg.eos_token_id
    ids[:, 0] = cfg.vocab_size - 2
    return ids


def assert_close(a, b, tol=1e-4):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_text_model_matches_transformers(activation):
    cfg = CLIPTextConfig(**{**TEXT.__dict__, "activation": activation})
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(hf_text_config(cfg)).eval()
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ids = random_ids(cfg)
    with torch.no_grad():
        out = ref(input_ids=ids)
        hidden, pooled = ours(ids)
    assert_close(hidden, out.last_hidden_state)
    assert_close(pooled, out.pooler_output)


def test_vision_model_matches_transformers():
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(hf_vision_config(VISION)).eval()
    ours = CLIPVisionModel(VISION).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(pixel_values=pixels)
        hidden, pooled = ours(pixels)
    assert_close(hidden, out.last_hidden_state)
    assert_close(pooled, out.pooler_output)


def test_clip_model_matches_transformers():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=hf_text_config(TEXT).to_dict(),
                                     vision_config=hf_vision_config(VISION).to_dict(),
                                     projection_dim=16)
    ref = transformers.CLIPModel(config).eval()
    ours = CLIPModel(TEXT, VISION, projection_dim=16).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = random_ids(TEXT)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels, return_loss=True)
        text_emb, image_emb = ours.encode_text(ids), ours.encode_image(pixels)
        loss = ours(ids, pixels)
    # transformers returns normalised embeddings from forward(); ours are raw projections.
    assert_close(torch.nn.functional.normalize(text_emb, dim=-1), out.text_embeds)
    assert_close(torch.nn.functional.normalize(image_emb, dim=-1), out.image_embeds)
    assert_close(loss, out.loss)


def test_no_position_ids_in_state_dict():
    for model in (CLIPTextModel(TINY_TEXT), CLIPModel(TINY_TEXT, TINY_VISION)):
        assert not any("position_ids" in k for k in model.state_dict())
    keys = CLIPModel(TINY_TEXT, TINY_VISION).state_dict()
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight",
            "vision_model.pre_layrnorm.weight", "text_model.final_layer_norm.weight"} <= set(keys)


def test_contrastive_loss_properties():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 8, generator=g)
    aligned = contrastive_loss(emb, emb * 3.0, math.log(100))
    shuffled = contrastive_loss(emb, emb.roll(1, dims=0), math.log(100))
    assert aligned < shuffled
    # the temperature is capped at 100: a larger logit_scale changes nothing
    assert torch.equal(contrastive_loss(emb, emb, torch.tensor(10.0)),
                       contrastive_loss(emb, emb, torch.tensor(math.log(100))))
    # symmetric in its two arguments
    other = torch.randn(6, 8, generator=g)
    assert torch.allclose(contrastive_loss(emb, other, 1.0), contrastive_loss(other, emb, 1.0))


def test_loss_decreases_with_adam():
    torch.manual_seed(0)
    model = CLIPModel(TEXT, VISION, projection_dim=16)
    ids = random_ids(TEXT, B=3)
    ids = torch.cat([ids, random_ids(TEXT, B=3, seed=1)])  # (6, T)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, pixels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_preprocess():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    a = preprocess(images, 32)
    b = preprocess(images.float() / 255, 32)
    assert a.shape == (2, 3, 32, 32) and torch.allclose(a, b)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    grey = preprocess(mean.expand(1, 3, 48, 64).clone(), 32)  # resize + centre crop
    assert grey.shape == (1, 3, 32, 32) and grey.abs().max() < 1e-4
    assert CLIPModel(TINY_TEXT, TINY_VISION).preprocess(images[0]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="3, H, W"):
        preprocess(torch.zeros(1, 4, 8, 8), 32)


def test_input_validation():
    with pytest.raises(ValueError, match="max_positions"):
        CLIPTextModel(TEXT)(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="preprocess"):
        CLIPVisionModel(VISION)(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="activation"):
        CLIPTextModel(CLIPTextConfig(**{**TEXT.__dict__, "activation": "relu6"}))


@pytest.mark.slow
@pytest.mark.parametrize("cfg, expected", [(SD15_TEXT, 123_060_480), (SD2_TEXT, 340_387_840)])
def test_full_size_parameter_counts(cfg, expected):
    with torch.device("meta"):  # shapes only, no memory
        ours = CLIPTextModel(cfg)
        ref = transformers.CLIPTextModel(hf_text_config(cfg))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == expected
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_hard_negatives_enter_the_image_to_text_side():
    from nanodiffusion.models.clip import contrastive_loss

    g = torch.Generator().manual_seed(0)
    t, i = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    base = contrastive_loss(t, i, 2.0)
    assert torch.equal(contrastive_loss(t, i, 2.0, torch.zeros(0, 8)), base)
    # a negative equal to image 0's own caption makes that image's choice harder
    assert contrastive_loss(t, i, 2.0, t[:1]) > base
    # a negative pointing away from every image changes almost nothing
    far = -i.sum(0, keepdim=True)
    assert abs(contrastive_loss(t, i, 2.0, far) - base) < 0.05 * base


def test_mirrored_caption():
    from nanodiffusion.data.shapes import mirrored_caption

    assert mirrored_caption("a red star in the top left corner") == \
        "a red star in the bottom right corner"
    assert mirrored_caption("a blue circle to the left of a green square") == \
        "a blue circle to the right of a green square"
    assert mirrored_caption("a pink square above an orange star") == \
        "a pink square below an orange star"
    assert mirrored_caption("a large red circle in the center") == \
        "a large red circle in the center"


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_bfloat16_inference_fuses_the_activation_and_residuals(activation, monkeypatch):
    """The text model in bfloat16 as pipelines run it (packing.onednn_linears): where
    small_gemm's kernel takes its few rows (AMX), fc1's activation and the residual adds after
    out_proj and fc2 run in the products' epilogues (packing.fused_linear), and the result is
    no further from transformers' float32 than the same model's unfused bfloat16 steps
    (NANODIFFUSION_SMALL_GEMM=0: oneDNN's products, torch's activation and adds)."""
    from nanodiffusion.models import packing, small_gemm
    # wide enough for oneDNN (packing.ONEDNN_LINEAR_MIN_MACS), K and N multiples of 32
    cfg = CLIPTextConfig(**{**TEXT.__dict__, "width": 128, "mlp_dim": 256, "activation": activation})
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(hf_text_config(cfg)).eval()
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.to(torch.bfloat16)
    packing.onednn_linears(ours)
    ids = random_ids(cfg)
    here = small_gemm.library() is not None  # AMX, and the kernel built
    calls = []
    real = small_gemm.linear
    monkeypatch.setattr(small_gemm, "linear", lambda *a, **k: calls.append(
        (k.get("act", "none"), k.get("op", "none"))) or real(*a, **k))
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state.double()
        fused = ours(ids)[0].double()
        monkeypatch.setenv("NANODIFFUSION_SMALL_GEMM", "0")
        unfused = ours(ids)[0].double()
    if here:  # per layer: q, k, v; out_proj + residual; fc1 + activation; fc2 + residual
        assert sorted(calls) == sorted(([("none", "none")] * 3 + [("none", "add")] * 2
                                        + [(activation, "none")]) * cfg.num_layers)
    else:
        assert calls == []
    err, err_unfused = (fused - want).abs(), (unfused - want).abs()
    assert err.mean() <= err_unfused.mean() * 1.1
    assert err.max() <= 0.05 * want.abs().max()
