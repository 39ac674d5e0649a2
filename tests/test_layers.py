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


def test_norm_silu_and_residual_in_place_only_without_gradients():
    """Inference writes SiLU and the residual add into the fresh tensors (page faults saved);
    with gradients recorded they are out of place, so training's backward works."""
    from nanodiffusion.models.layers import norm_silu, residual

    gn = torch.nn.GroupNorm(2, 4)
    x, h = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    want_silu, want_sum = torch.nn.functional.silu(gn(x)), x + h
    with torch.no_grad():
        assert torch.equal(norm_silu(gn, x), want_silu)
        h2 = h.clone()
        out = residual(x, h2)
        assert out is h2 and torch.equal(out, want_sum)
        assert residual(x, h[:, :1]).shape == (1, 4, 3, 3)  # a broadcast: never in place
    xg = x.clone().requires_grad_(True)
    hg = h.clone()
    out = residual(xg, norm_silu(gn, xg) * hg)
    out.sum().backward()
    assert xg.grad is not None and torch.equal(hg, h)


def _ops(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def test_blocked_attention_is_torch_attention_within_rounding(monkeypatch):
    """Inference over >= BLOCKED_MIN_KEYS keys on the CPU runs layers.blocked_attention (float32
    scores on oneDNN's product, a block of queries at a time: more queries than a block here,
    and cross-attention with T != S). Its error against float64 is the kernel's or near it, in
    float32 and bfloat16 (where the fused kernel does not run: turned off here); a mask or
    gradients keep torch's kernel, and so does a CPU where it loses (blocked_here: AVX2 only)."""
    import torch.nn.functional as F

    from nanodiffusion.models import layers
    monkeypatch.setattr(layers.fused_attention, "supports", lambda *a: False)
    monkeypatch.setattr(layers, "blocked_here", lambda: True)
    torch.manual_seed(0)
    S = layers.BLOCKED_MIN_KEYS + 76
    T = layers.BLOCKED_SCORES // S + 300  # two blocks of queries
    q, k, v = torch.randn(2, 3, T, 24) * 2, torch.randn(2, 3, S, 24) * 2, torch.randn(2, 3, S, 24)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        a, b, c = q.to(dtype), k.to(dtype), v.to(dtype)
        with torch.no_grad():
            out, ops = _ops(lambda: layers.attention(a, b, c))
        kernel = F.scaled_dot_product_attention(a, b, c)
        assert out.dtype == dtype and out.shape == kernel.shape
        assert "aten::_softmax" in ops and not any("scaled_dot_product" in o for o in ops)
        err, kernel_err = (out.double() - ref).abs(), (kernel.double() - ref).abs()
        assert err.max() <= max(tol, kernel_err.max()) and err.mean() <= kernel_err.mean() * 1.5
        # the caller's transpose back to (B, T, nh, hs) is a free view
        assert out.transpose(1, 2).is_contiguous()
    # fewer keys, a mask, or gradients: torch's kernel
    with torch.no_grad():
        _, ops = _ops(lambda: layers.attention(q[:, :, :10], k[:, :, :layers.BLOCKED_MIN_KEYS - 1],
                                               v[:, :, :layers.BLOCKED_MIN_KEYS - 1]))
        assert "aten::_softmax" not in ops
        mask = torch.zeros(T, S, dtype=torch.bool)
        mask[:, :5] = True
        _, ops = _ops(lambda: layers.attention(q, k, v, mask))
        assert "aten::_softmax" not in ops
        with monkeypatch.context() as m:
            m.setattr(layers, "blocked_here", lambda: False)
            _, ops = _ops(lambda: layers.attention(q, k, v))
            assert "aten::_softmax" not in ops
            assert any("scaled_dot_product" in o for o in ops)
    qg = q.clone().requires_grad_()
    out, ops = _ops(lambda: layers.attention(qg, k, v))
    assert "aten::_softmax" not in ops
    out.sum().backward()
    assert qg.grad is not None


def test_attention_module_takes_the_blocked_path_at_inference(monkeypatch):
    """An SD-sized self-attention (1024 tokens, 320 wide, 8 heads) through the module: the
    blocked path under no_grad where the fused kernel does not run (turned off here), and the
    same output as torch's kernel within float32 rounding."""
    from nanodiffusion.models import layers
    monkeypatch.setattr(layers.fused_attention, "supports", lambda *a: False)
    monkeypatch.setattr(layers, "blocked_here", lambda: True)
    torch.manual_seed(0)
    attn = Attention(320, num_heads=8).eval()
    x = torch.randn(1, 1024, 320)
    with torch.no_grad():
        out, ops = _ops(lambda: attn(x))
        old, layers.BLOCKED_MIN_KEYS = layers.BLOCKED_MIN_KEYS, 10**9
        try:
            ref, ref_ops = _ops(lambda: attn(x))
        finally:
            layers.BLOCKED_MIN_KEYS = old
    assert "aten::_softmax" in ops and "aten::_softmax" not in ref_ops
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_geglu_at_inference_is_two_products_and_in_place_gelu():
    """Without gradients GEGLU runs its halves as two products, GELU and the product in place
    (no out-of-place gelu or mul), with the one-product path's values; in bfloat16 on oneDNN
    (where it has bfloat16: winograd.onednn_bfloat16) the GELU and the product run inside the
    two products (no gelu or mul op at all), and on AMX CPUs as one product of small_gemm's
    kernel of many rows; a hooked layer (LoRA training's) keeps its hook."""
    from nanodiffusion.models import small_gemm, winograd
    from nanodiffusion.models.layers import GEGLU
    from nanodiffusion.models.packing import onednn_linears

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for onednn in (False, True):
            g = GEGLU(64, 96).to(dtype)
            if onednn:
                assert onednn_linears(g) == 1
            x = torch.randn(2, 300, 64, dtype=dtype)
            ref = g(x)  # gradients on: the one product, out of place
            assert ref.requires_grad
            with torch.no_grad(), torch.profiler.profile() as prof:
                out = g(x)
            names = [e.name for e in prof.events()]
            if onednn and dtype == torch.bfloat16 and small_gemm.linear_takes(x, 96, 64, 600):
                # AMX: GEGLU whole in one product of the kernel of many rows
                assert names.count("nanodiffusion::small_linear") == 1, names
                assert "mkldnn::_linear_pointwise" not in names, names
                assert not {"aten::gelu_", "aten::mul_"} & set(names), names
            elif onednn and dtype == torch.bfloat16 and winograd.onednn_bfloat16():
                assert names.count("mkldnn::_linear_pointwise") == 2, names
                assert not {"aten::gelu_", "aten::mul_"} & set(names), names
            else:
                assert "aten::gelu_" in names and "aten::mul_" in names, names
            assert "aten::gelu" not in names and "aten::mul" not in names, names
            assert out.shape == (2, 300, 96) and out.dtype == dtype and out.is_contiguous()
            scale = ref.detach().float().abs().max()
            assert (out.float() - ref.detach().float()).abs().max() <= tol * scale

    g = GEGLU(16, 8)
    x = torch.randn(3, 16)
    plain = g(x).detach()
    g.proj.register_forward_hook(lambda m, args, out: out + 1.0)
    with torch.no_grad():
        hooked = g(x)
    h, gate = g.proj(x).chunk(2, dim=-1)
    assert torch.allclose(hooked, h * torch.nn.functional.gelu(gate))
    assert not torch.allclose(hooked, plain)


def test_upcast_attention_is_float32_for_float16_only(monkeypatch):
    """`upcast` computes float16 heads in float32 (their range overflows); bfloat16 heads, with
    float32's range, run as they are (the kernels sum in float32), within bfloat16 rounding of
    the float32 attention; float32 stays float32."""
    from nanodiffusion.models import layers
    from nanodiffusion.models.layers import Attention

    seen = []
    real = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, k, v, *a, **kw: (
        seen.append(q.dtype), real(q, k, v, *a, **kw))[1])
    torch.manual_seed(0)
    attn = Attention(64, num_heads=1, qkv_bias=True, upcast=True).eval()
    x = torch.randn(1, 300, 64)
    with torch.no_grad():
        ref = attn(x)
        outs = {dt: attn.to(dt)(x.to(dt)) for dt in (torch.bfloat16, torch.float16)}
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    for dt, out in outs.items():
        assert out.dtype == dt
        assert (out.float() - ref).abs().max() <= 0.03 * ref.abs().max(), dt


def test_kept_context_projections_project_a_context_once_per_loop():
    """Inside kept_context_projections (a sampling loop) a cross-attention layer projects the
    same context tensor once and reuses its keys and values: the same output bits. A context
    written in place, another context, self-attention, gradients and hooks on to_k or to_v
    (LoRA training's) project anew; outside it nothing is kept."""
    from nanodiffusion.models.layers import kept_context_projections

    torch.manual_seed(0)
    attn = Attention(32, 4, context_dim=24).eval()
    calls = []
    real = attn.to_k.forward
    attn.to_k.forward = lambda t: calls.append(t) or real(t)  # counts, without being a hook
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        want = attn(x, context)
        assert len(calls) == 1
        with kept_context_projections():
            for _ in range(3):
                assert torch.equal(attn(x, context), want)
            assert len(calls) == 2  # once for the loop
            attn(x, torch.randn(2, 7, 24))  # another context: projected
            assert len(calls) == 3
            assert torch.equal(attn(x, context), want)  # another context in between
            assert len(calls) == 4
            context.mul_(2)  # written in place: projected anew
            assert not torch.equal(attn(x, context), want)
            assert len(calls) == 5
            with kept_context_projections():  # nested: the outer one's
                attn(x, context)
            assert len(calls) == 5
            handle = attn.to_v.register_forward_hook(lambda *a: None)
            attn(x, context)
            handle.remove()
            assert len(calls) == 6
        attn(x, context)  # after the loop: nothing kept
        assert len(calls) == 7
    with kept_context_projections():
        attn(x, context).sum()  # gradients on: projected every call
        attn(x, context)
    assert len(calls) == 9


def test_a_sampling_loop_projects_the_prompt_once_with_the_same_image(monkeypatch):
    """txt2img keeps the cross-attention's keys and values of the prompt for its loop (one
    projection per layer, not one per step), and its image is the one projecting at every
    step gives, byte for byte."""
    import contextlib

    import nanodiffusion
    from nanodiffusion.pipelines import sd

    pipe = nanodiffusion.load("shapes")
    layers = [m.attn2 for m in pipe.unet.modules() if hasattr(m, "attn2")]
    assert layers
    calls = []
    for attn in layers:
        real = attn.to_k.forward
        attn.to_k.forward = lambda t, real=real: calls.append(t) or real(t)
    kept = pipe.generate("a red circle", seed=1, steps=5)[0]
    assert len(calls) == len(layers)
    monkeypatch.setattr(sd, "kept_context_projections", contextlib.nullcontext)
    calls.clear()
    every = pipe.generate("a red circle", seed=1, steps=5)[0]
    assert len(calls) == 5 * len(layers)
    assert kept.tobytes() == every.tobytes()
