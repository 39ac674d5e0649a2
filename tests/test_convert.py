"""formats/: config translation, LDM <-> diffusers key maps (checked against diffusers' own
single-file converters), safe reading and strict loading."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import save_file
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel

from nanodiffusion.formats import diffusers_config as configs
from nanodiffusion.formats import files, single_file
from nanodiffusion.formats.single_file import LDMHints
from nanodiffusion.models import clip, unet, vae

UNET_V1 = dataclasses.replace(unet.TINY)  # conv proj_in, attention on the second level only
UNET_V2 = unet.UNetConfig(in_channels=9, block_channels=(32, 64, 64), layers_per_block=2,
                          attention_levels=(True, True, False), num_heads=(2, 4, 4),
                          transformer_layers=2, context_dim=32, linear_projection=True,
                          upcast_attention=True, norm_groups=8)  # inpainting, linear proj_in
VAE_T = vae.TINY
TEXT_V1 = clip.CLIPTextConfig(width=32, num_layers=2, num_heads=2, mlp_dim=64)
TEXT_V2 = dataclasses.replace(TEXT_V1, activation="gelu", pad_token_id=0)
CASES = {"v1": (UNET_V1, TEXT_V1, LDMHints(unet_num_heads=(2, 2), text_num_heads=2,
                                            norm_groups=8)),
         "v2": (UNET_V2, TEXT_V2, LDMHints(unet_num_heads=(2, 4, 4), text_num_heads=2,
                                            norm_groups=8))}


def _random(model, seed):
    """Distinct random values, so a tensor moved to the wrong key of the same shape shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _build(version):
    unet_cfg, text_cfg, _ = CASES[version]
    torch.manual_seed(0)
    models = (UNet2DConditionModel.from_config(configs.unet_config_to_diffusers(unet_cfg)),
              AutoencoderKL.from_config(configs.vae_config_to_diffusers(VAE_T)),
              HFTextModel(HFTextConfig.from_dict(configs.clip_text_config_to_transformers(
                  text_cfg))))
    return models, tuple(_random(m, i) for i, m in enumerate(models))


@pytest.fixture(scope="module", params=["v1", "v2"])
def tiny(request):
    version = request.param
    models, (unet_sd, vae_sd, text_sd) = _build(version)
    ldm_sd = single_file.diffusers_to_ldm(unet_sd, vae_sd, text_sd, version)
    return SimpleNamespace(version=version, models=models, unet=unet_sd, vae=vae_sd,
                           text=text_sd, ldm=ldm_sd)


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k


def test_round_trip_is_identity_and_configs_are_inferred(tiny):
    unet_cfg, text_cfg, hints = CASES[tiny.version]
    parts = single_file.ldm_to_diffusers(tiny.ldm, hints=hints)
    assert_same(parts["unet"], tiny.unet)
    assert_same(parts["vae"], tiny.vae)
    assert_same(parts["text"], tiny.text)
    info = parts["info"]
    assert info["version"] == tiny.version and info["ema"] is False
    assert info["inpainting"] == (unet_cfg.in_channels == 9)
    assert info["unet_config"] == unet_cfg
    assert info["vae_config"] == VAE_T
    assert info["text_config"] == text_cfg


def test_ldm_layout_matches_diffusers_reference_converters(tiny):
    unet_cfg, text_cfg, _ = CASES[tiny.version]
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
               for k in tiny.ldm)
    ref = sfu.convert_ldm_unet_checkpoint(tiny.ldm, configs.unet_config_to_diffusers(unet_cfg))
    assert_same(ref, tiny.unet)
    assert_same(sfu.convert_ldm_vae_checkpoint(tiny.ldm, configs.vae_config_to_diffusers(VAE_T)),
                tiny.vae)
    if tiny.version == "v1":
        ref = sfu.convert_ldm_clip_checkpoint(tiny.ldm)
    else:  # diffusers skips only resblocks.23; our identity layer here is resblocks.2
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=text_cfg.width))
        ref = sfu.convert_open_clip_checkpoint(model, tiny.ldm)
        last = f"text_model.encoder.layers.{text_cfg.num_layers}."
        extra = {k for k in ref if k.startswith(last)}
        assert len(extra) == 16  # (it also ignores text_projection, as we do)
        ref = {k: v for k, v in ref.items() if k not in extra}
    assert_same({k.removeprefix("text_model."): v for k, v in ref.items()}, tiny.text)


def test_openclip_export_packs_qkv_and_adds_an_identity_layer():
    _, (unet_sd, vae_sd, text_sd) = _build("v2")
    sd = single_file.diffusers_to_ldm(unet_sd, vae_sd, text_sd, "v2")
    packed = sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(packed[32:64], text_sd["encoder.layers.1.self_attn.k_proj.weight"])
    last = "cond_stage_model.model.transformer.resblocks.2."
    assert not sd[last + "attn.out_proj.weight"].any() and not sd[last + "mlp.c_proj.weight"].any()
    assert torch.equal(sd["cond_stage_model.model.text_projection"], torch.eye(32))
    text_keys = [k for k in sd if k.startswith("cond_stage_model.")]
    assert len(text_keys) == 4 + 3 * 12 + 1  # top-level, 2 + identity layers, text_projection


def test_ema_weights_are_used_when_present(tiny):
    _, _, hints = CASES[tiny.version]
    sd = dict(tiny.ldm)
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) > 100
    for k in unet_keys:  # ldm's LitEma: the key after `model.` without dots
        sd["model_ema." + k.removeprefix("model.").replace(".", "")] = sd[k] + 1
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)})
    parts = single_file.ldm_to_diffusers(sd, hints=hints)
    assert parts["info"]["ema"] is True
    assert torch.equal(parts["unet"]["conv_in.weight"], tiny.unet["conv_in.weight"] + 1)
    parts = single_file.ldm_to_diffusers(sd, use_ema=False, hints=hints)
    assert parts["info"]["ema"] is False
    assert_same(parts["unet"], tiny.unet)


def test_ignored_keys_pass_and_unknown_keys_are_named(tiny):
    _, _, hints = CASES[tiny.version]
    extra = {"alphas_cumprod": torch.ones(10), "posterior_mean_coef1": torch.ones(10),
             "cond_stage_model.transformer.text_model.embeddings.position_ids":
             torch.arange(77)[None]} if tiny.version == "v1" else {"betas": torch.ones(10)}
    single_file.ldm_to_diffusers({**tiny.ldm, **extra}, hints=hints)
    bad = {"model.diffusion_model.input_blocks.1.0.bogus.weight": torch.ones(1),
           "something_else": torch.ones(1)}
    with pytest.raises(ValueError, match="2 keys .* not used: model.diffusion_model.input_blocks"
                                         r".1.0.bogus.weight, something_else"):
        single_file.ldm_to_diffusers({**tiny.ldm, **bad}, hints=hints)


def test_unsupported_checkpoints_are_refused(tiny):
    with pytest.raises(ValueError, match="SDXL"):
        single_file.ldm_to_diffusers({**tiny.ldm, "conditioner.embedders.1.model.ln_final.weight":
                                  torch.ones(1)})
    with pytest.raises(ValueError, match="SDXL"):
        single_file.diffusers_to_ldm(tiny.unet, tiny.vae, tiny.text, "xl")
    with pytest.raises(ValueError, match="UNet: 1 keys .* encoder_hid_proj.image_embeds.weight"):
        single_file.diffusers_to_ldm({**tiny.unet, "encoder_hid_proj.image_embeds.weight":
                                  torch.ones(1)}, None, None, tiny.version)


def test_check_state_dict_loads_strictly_and_names_problems(tiny):
    model = tiny.models[1]
    files.check_state_dict(model, tiny.vae, "vae.safetensors")
    loaded = model.state_dict()["decoder.conv_out.bias"]
    assert torch.equal(loaded, tiny.vae["decoder.conv_out.bias"])
    sd = dict(tiny.vae)
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:, :2]
    with pytest.raises(ValueError, match=r"vae\.safetensors: the weights do not fit the \w+: "
                                         r"1 with the wrong shape \(weights != model\): "
                                         r"encoder\.conv_in\.weight \(16, 2, 3, 3\) != "
                                         r"\(16, 3, 3, 3\)$"):
        files.check_state_dict(model, sd, "vae.safetensors")
    sd = dict(tiny.vae)
    sd["extra.weight"] = sd.pop("quant_conv.bias")
    with pytest.raises(ValueError, match=r"vae\.safetensors: the weights do not fit the \w+: "
                                         r"1 missing: quant_conv\.bias; "
                                         r"1 unexpected: extra\.weight$"):
        files.check_state_dict(model, sd, "vae.safetensors")


# ---------------------------------------------------------------- config translation

SD15_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD21_UNET_JSON = {**SD15_UNET_JSON, "attention_head_dim": [5, 10, 20, 20],
                  "cross_attention_dim": 1024, "use_linear_projection": True,
                  "upcast_attention": True, "dual_cross_attention": False, "sample_size": 96,
                  "only_cross_attention": False, "num_class_embeds": None}


def test_unet_config_translation():
    assert configs.unet_config_from_diffusers(SD15_UNET_JSON) == unet.SD15
    assert configs.unet_config_from_diffusers(SD21_UNET_JSON) == unet.SD21
    image = dataclasses.replace(unet.TINY, image_embed_dim=24, image_tokens=32)
    pooled = dataclasses.replace(unet.TINY, pooled_text_dim=32)
    for cfg in (unet.SD15, unet.SD21, unet.SD2_INPAINT, UNET_V1, UNET_V2, image, pooled):
        assert configs.unet_config_from_diffusers(configs.unet_config_to_diffusers(cfg)) == cfg
    d = configs.unet_config_to_diffusers(image)
    assert (d["encoder_hid_dim_type"], d["addition_embed_type"], d["encoder_hid_dim"]) == (
        "image_proj", "image", 24)
    d = configs.unet_config_to_diffusers(pooled)
    assert (d["class_embed_type"], d["projection_class_embeddings_input_dim"]) == (
        "projection", 32)
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        configs.unet_config_from_diffusers({**d, "class_embed_type": "timestep"})
    weights = unet.UNet(pooled).state_dict()  # the architecture read off the weights alone
    assert single_file.infer_unet_config(weights, "v1", single_file.LDMHints(
        norm_groups=8, unet_num_heads=(2, 2), upcast_attention=False)) == pooled


def test_unet_heads_are_numbers_of_heads_in_diffusers():
    model = UNet2DConditionModel.from_config(configs.unet_config_to_diffusers(UNET_V2))
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in model.down_blocks[:2]]
    assert heads == [2, 4] and model.mid_block.attentions[0].transformer_blocks[0].attn2.heads == 4


@pytest.mark.parametrize("change, message", [
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "SimpleCrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"transformer_layers_per_block": [1, 2, 10, 1]}, "transformer_layers_per_block"),
    ({"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 8}, "'text_proj'"),
    ({"brand_new_option": 1}, "unknown options brand_new_option"),
    ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
])
def test_unet_config_unsupported_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        configs.unet_config_from_diffusers({**SD15_UNET_JSON, **change})


def test_unet_config_inexpressible_in_diffusers():
    with pytest.raises(ValueError, match="mid_num_heads=3"):
        configs.unet_config_to_diffusers(dataclasses.replace(unet.TINY, mid_num_heads=3))
    with pytest.raises(ValueError, match="image_tokens=4"):
        configs.unet_config_to_diffusers(dataclasses.replace(unet.TINY, image_embed_dim=8))


def test_vae_config_translation():
    sd_vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.0", "act_fn": "silu",
              "block_out_channels": [128, 256, 512, 512],
              "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
              "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
              "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert configs.vae_config_from_diffusers(sd_vae) == vae.SD
    for cfg in (vae.SD, VAE_T, dataclasses.replace(VAE_T, mid_attention=False,
                                                   scaling_factor=0.5)):
        assert configs.vae_config_from_diffusers(configs.vae_config_to_diffusers(cfg)) == cfg
    with pytest.raises(ValueError, match="latents_mean"):
        configs.vae_config_from_diffusers({**sd_vae, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="up_block_types"):
        configs.vae_config_from_diffusers({**sd_vae, "up_block_types": ["UpDecoderBlock2D"]})


def test_clip_text_config_translation():
    clip_l = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2,
              "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
              "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
              "model_type": "clip_text_model", "num_attention_heads": 12,
              "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
              "vocab_size": 49408, "torch_dtype": "float32"}
    assert configs.clip_text_config_from_transformers(clip_l) == clip.SD15_TEXT
    open_h = {**clip_l, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
              "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
    assert configs.clip_text_config_from_transformers(open_h) == clip.SD2_TEXT
    with_proj = dataclasses.replace(TEXT_V1, projection_dim=16)
    for cfg in (clip.SD15_TEXT, clip.SD2_TEXT, TEXT_V1, with_proj):
        d = configs.clip_text_config_to_transformers(cfg)
        assert configs.clip_text_config_from_transformers(d) == cfg
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        configs.clip_text_config_from_transformers({**clip_l, "hidden_act": "relu"})


# ---------------------------------------------------------------- reading files


def test_read_safetensors_and_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(1000.0)}, str(path))
    assert torch.equal(files.read_state_dict(path)["a"], torch.arange(1000.0))
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors"):
        files.read_state_dict(bad)
    with pytest.raises(ValueError, match="unknown weight format"):
        files.read_state_dict(tmp_path / "w.gguf")


def test_read_ckpt_unwraps_state_dict(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 10}, path)
    assert list(files.read_state_dict(path)) == ["w"]
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.ckpt"):
        files.read_state_dict(cut)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would run open(marker, "w") and create the file
        return open, (self.marker, "w")


def test_pickle_with_code_is_refused(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1), "x": _Evil(str(marker))}}, path)
    with pytest.raises(ValueError, match="evil.ckpt: the file contains pickled code"):
        files.read_state_dict(path)
    assert not marker.exists()
    # the payload is live: an unsafe load of the same kind of file runs it
    torch.save({"x": _Evil(str(control))}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert control.exists()


# ---------------------------------------------------------------- full size (slow)


def _meta_parts(unet_cfg, text_cfg):
    with torch.device("meta"):
        models = (UNet2DConditionModel.from_config(configs.unet_config_to_diffusers(unet_cfg)),
                  AutoencoderKL.from_config(configs.vae_config_to_diffusers(vae.SD)),
                  HFTextModel(HFTextConfig.from_dict(
                      configs.clip_text_config_to_transformers(text_cfg))))
    return [m.state_dict() for m in models]


@pytest.mark.slow
@pytest.mark.parametrize("version, unet_cfg, text_cfg, text_keys", [
    ("v1", unet.SD15, clip.SD15_TEXT, 196), ("v2", unet.SD21, clip.SD2_TEXT, 293)])
def test_full_size_layout(version, unet_cfg, text_cfg, text_keys):
    """Shapes only (meta tensors): the SD 1.5 / 2.1 single-file key sets and back."""
    unet_sd, vae_sd, text_sd = _meta_parts(unet_cfg, text_cfg)
    sd = single_file.diffusers_to_ldm(unet_sd, vae_sd, text_sd, version)
    count = lambda p: sum(k.startswith(p) for k in sd)  # noqa: E731
    assert (count("model.diffusion_model."), count("first_stage_model."),
            count("cond_stage_model.")) == (686, 248, text_keys)
    assert len(sd) == 686 + 248 + text_keys  # 1130 for SD 1.5
    if version == "v1":  # real SD 1.x files also hold the position_ids buffer
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)
        assert len(sd) == 1131
    parts = single_file.ldm_to_diffusers({**sd, "alphas_cumprod": torch.ones(1000)})
    for got, want in zip((parts["unet"], parts["vae"], parts["text"]), (unet_sd, vae_sd, text_sd)):
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    info = parts["info"]
    assert (info["unet_config"], info["vae_config"], info["text_config"]) == (
        unet_cfg, vae.SD, text_cfg)
    ref = sfu.convert_ldm_unet_checkpoint(sd, configs.unet_config_to_diffusers(unet_cfg))
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in unet_sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize("version, unet_cfg, text_cfg, prediction", [
    ("v1", unet.SD15, clip.SD15_TEXT, "epsilon"), ("v2", unet.SD21, clip.SD2_TEXT, "v_prediction")])
def test_full_size_single_file_loads_strictly(tmp_path, version, unet_cfg, text_cfg, prediction):
    """A whole SD 1.5 / 2.1 original single file with random float16 weights, written to disk
    and opened by load_pipeline: every weight arrives where it belongs, and it generates."""
    from nanodiffusion.loading import load_pipeline

    def rand16(module, seed):  # distinct values per tensor, stored as real files store them
        g = torch.Generator().manual_seed(seed)
        return {k: (torch.randn(v.shape, generator=g) * 0.02).half()
                for k, v in module.state_dict().items()}

    with torch.device("meta"):
        parts = (unet.UNet(unet_cfg), vae.VAE(vae.SD), clip.CLIPTextModel(text_cfg))
    unet_sd, vae_sd, text_sd = (rand16(m, i) for i, m in enumerate(parts))
    sd = single_file.diffusers_to_ldm(unet_sd, vae_sd, text_sd, version)
    assert len(sd) == {"v1": 1130, "v2": 686 + 248 + 293}[version]
    path = tmp_path / f"sd-{version}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    del sd
    pipe = load_pipeline(path, prediction_type=prediction)
    for model, want in ((pipe.unet, unet_sd), (pipe.vae, vae_sd),
                        (pipe.text_encoder, text_sd)):
        got = model.state_dict()
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert torch.equal(got[k], v.float()), k
    assert pipe.schedule.config.prediction_type == prediction
    image = pipe.generate("a cat", seed=0, steps=1, width=64, height=64, guidance=1.0)[0]
    assert image.size == (64, 64)
