"""LoRA files in the formats people download, written here for the tests (test_lora.py) the way
their tools write them, independently of nanodiffusion's reader:
- kohya / AUTOMATIC1111 (sd-scripts): one `lora_unet_...` / `lora_te_...` name per module, the
  module's path with its dots made underscores (sd-scripts names CLIP's modules under
  `text_model.`; transformers 5 no longer has that level), `.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; LoCon convolutions: a k x k conv down, a 1 x 1 conv up. With
  ldm=True the UNet's modules under their original LDM names (written from the LDM layout of
  the tiny UNet below, not from nanodiffusion's tables).
- PEFT / diffusers: peft's LoRA layers injected into copies of diffusers' modules, saved by
  diffusers' own `save_lora_weights` (with the LoraConfig as its metadata).
- diffusers' older layout (`processor.to_q_lora.down.weight`, `lora_linear_layer`), renamed
  from a PEFT state dict.
"""
import copy
import json
import re

import torch
from safetensors.torch import save_file

# The tiny UNet of tiny_sd.py in LDM's numbering: 2 levels of 1 ResBlock, attention at level 0
# on the way down and at the mirrored up level (diffusers' names -> LDM's, longest first).
LDM = [("down_blocks.0.resnets.0.", "input_blocks.1.0."),
       ("down_blocks.0.attentions.0.", "input_blocks.1.1."),
       ("down_blocks.0.downsamplers.0.conv.", "input_blocks.2.0.op."),
       ("down_blocks.1.resnets.0.", "input_blocks.3.0."),
       ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
       ("mid_block.resnets.1.", "middle_block.2."),
       ("up_blocks.0.resnets.0.", "output_blocks.0.0."), ("up_blocks.0.resnets.1.",
                                                          "output_blocks.1.0."),
       ("up_blocks.0.upsamplers.0.", "output_blocks.1.1."),
       ("up_blocks.1.resnets.0.", "output_blocks.2.0."),
       ("up_blocks.1.attentions.0.", "output_blocks.2.1."),
       ("up_blocks.1.resnets.1.", "output_blocks.3.0."),
       ("up_blocks.1.attentions.1.", "output_blocks.3.1.")]
LDM_RESNET = {"conv1.": "in_layers.2.", "conv2.": "out_layers.3.",
              "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}


def ldm_name(name):
    for ours, ldm in LDM:
        if (name + ".").startswith(ours):
            rest = (name + ".")[len(ours):]
            return (ldm + (LDM_RESNET.get(rest, rest) if ".resnets." in ours else rest))[:-1]
    raise KeyError(name)


def modules(root, wanted):
    """{name: weight} of the Linear and Conv2d modules of `root` whose name `wanted` accepts."""
    return {n: m.weight for n, m in root.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and wanted(n)}


def unet_targets(unet, locon=True):
    """sd-scripts' targets: the transformer blocks' Linear and 1x1 conv layers, and with LoCon
    the ResBlocks' (3x3 convs, time projection, shortcut) and the down/upsamplers."""
    attn = lambda n: ".attentions." in n  # noqa: E731
    conv = lambda n: ".resnets." in n or "samplers." in n  # noqa: E731
    return modules(unet, lambda n: attn(n) or (locon and conv(n)))


def text_targets(text_encoder):
    return modules(text_encoder, lambda n: ".self_attn." in n or ".mlp." in n)


def random_layers(weights, seed, rank=4, std=0.3, alphas=(1.0, 2.0, 4.0, None)):
    """{name: (down, up, alpha)} for `weights`, down a k x k conv where the weight is one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, w) in enumerate(sorted(weights.items())):
        down = torch.randn(rank, *w.shape[1:], generator=g) * std  # (r, in[, kh, kw])
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * std
        out[name] = (down, up, alphas[i % len(alphas)])
    return out


def write_kohya(path, unet_layers=None, text_layers=None, ldm=False, metadata=None,
                dtype=torch.float16):
    """A kohya / A1111 file, its tensors in `dtype` as sd-scripts saves them (fp16)."""
    sd = {}
    for prefix, layers in (("lora_unet_", unet_layers), ("lora_te_", text_layers)):
        for name, (down, up, alpha) in (layers or {}).items():
            if prefix == "lora_te_":
                name = "text_model." + name
            elif ldm:
                name = ldm_name(name)
            key = prefix + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = down.to(dtype)
            sd[key + ".lora_up.weight"] = up.to(dtype)
            if alpha is not None:
                sd[key + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(sd, str(path), metadata=metadata)
    return path


UNET_PEFT = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
             "ff.net.2", "conv1", "conv2"]
TEXT_PEFT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_state(ref, seed, std=0.3):
    """PEFT LoRA layers on copies of `ref`'s (a diffusers pipeline) UNet and text encoder ->
    (unet state, text state, unet LoraConfig, text LoraConfig); random A and B."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    configs = (LoraConfig(r=4, lora_alpha=8, target_modules=UNET_PEFT,
                          alpha_pattern={"proj_in": 2}, init_lora_weights=False),
               LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_PEFT, init_lora_weights=False))
    states = []
    for model, config in zip((ref.unet, ref.text_encoder), configs):
        model = inject_adapter_in_model(config, copy.deepcopy(model))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        states.append(get_peft_model_state_dict(model))
    return (*states, *configs)


def write_peft(folder, ref, seed):
    """diffusers' save_lora_weights of peft_state: folder/pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusionPipeline

    unet, text, ucfg, tcfg = peft_state(ref, seed)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet, text_encoder_lora_layers=text,
        unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


OLD_ATTENTION = re.compile(r"^(.*\.(?:attn1|attn2))\.(to_q|to_k|to_v|to_out)(?:\.0)?\.lora_(A|B)")
OLD_TEXT = re.compile(r"^(.*\.self_attn)\.(q|k|v|out)_proj\.lora_(A|B)")


def write_old_diffusers(path, ref, seed):
    """peft_state's layers in diffusers' older layout, alpha = rank (no metadata); and the same
    tensors as a PEFT file without metadata, to compare with: -> (old path, peft path)."""
    unet, text, _, _ = peft_state(ref, seed)
    old, new = {}, {}
    for prefix, state in (("unet.", unet), ("text_encoder.", text)):
        for key, value in state.items():
            new[prefix + key] = value
            role = "down" if ".lora_A." in key else "up"
            a, t = OLD_ATTENTION.match(key), OLD_TEXT.match(key)
            if a:
                key = f"{a[1]}.processor.{a[2]}_lora.{role}.weight"
            elif t:  # the text encoder's attention, named as diffusers' converter names it
                key = f"text_model.{t[1]}.to_{t[2]}_lora.{role}.weight"
            else:
                module = key.split(".lora_")[0]
                layer = "lora_linear_layer" if prefix == "text_encoder." else "lora"
                key = ("text_model." if prefix == "text_encoder." else "") + \
                    f"{module}.{layer}.{role}.weight"
            old[prefix + key] = value
    save_file(old, str(path))
    peft_path = path.with_name(path.stem + "-peft.safetensors")
    save_file(new, str(peft_path))
    return path, peft_path


def json_metadata(**kw):
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in kw.items()}
