"""The lora part: a LoRA (Hu et al. 2021, low-rank adaptation) of a pretrained Stable Diffusion
model, trained DreamBooth-style on a folder of captioned images and written as a kohya /
AUTOMATIC1111 file, the layout A1111, ComfyUI, diffusers and `--lora` here load.

- The base (`base`: any model the loader opens) is frozen and never written. What trains is a
  LoraNetwork: for each targeted module, sd-scripts' LoRA module (lora_down, then lora_up, times
  alpha / rank), whose output a forward hook adds to the module's. lora_up starts at zero, so
  the run starts from the base exactly.
- The UNet's targets (lora_targets): "transformer", sd-scripts' default, every Linear and 1x1
  conv of the transformer blocks (proj_in, attn1 and attn2's to_q, to_k, to_v, to_out.0,
  ff.net.0.proj, ff.net.2, proj_out); or "attention", to_q, to_k, to_v and to_out.0 alone
  (diffusers' train_dreambooth_lora). The text encoder's (lora_text_encoder_rank > 0): every
  Linear of its attention and MLP blocks, as sd-scripts.
- The loss is the unet part's (unet_loss) on the base's schedule and prediction type; with a
  text encoder LoRA the captions are encoded again, with gradients, at every step.
- The network's state dict is the kohya file's (`lora_unet_..._lora_down.weight`, ...): the
  checkpoint holds the LoRA alone, and export() writes <out>/lora/<name of out>.safetensors
  with formats/lora.save_kohya and sd-scripts' ss_* metadata.
"""
import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..formats.lora import LoraLayer, kohya_name, save_kohya
from ..pipelines.images import make_grid
from .common import folder_captions, load_base, source
from .unet import encoded_batch, sample_prompts, unet_loss, vae_posterior

ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")


class LoraModule(nn.Module):
    """sd-scripts' LoRA of one Linear or 1x1 conv: x -> lora_up(lora_down(x)) * alpha / rank,
    lora_down as nn.Linear initialises it, lora_up zero."""

    def __init__(self, module, rank, alpha):
        super().__init__()
        if isinstance(module, nn.Linear):
            self.lora_down = nn.Linear(module.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, module.out_features, bias=False)
        else:  # a 1x1 conv: SD 1.x's proj_in and proj_out
            self.lora_down = nn.Conv2d(module.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, module.out_channels, 1, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # written to the file
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.to(module.weight.device)

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * self.scale


class LoraNetwork(nn.Module):
    """The LoRA being trained: a LoraModule per targeted module ({"unet.<name>" /
    "text_encoder.<name>": module}), registered under its kohya name, so that the state dict is
    a kohya file's, and added to the module's output by a forward hook on it. `metadata`: the
    file's text metadata."""

    def __init__(self, targets, ranks, alphas, metadata=None):
        super().__init__()
        self.names, self.metadata = {}, metadata or {}  # kohya name -> ours
        for ours, module in targets.items():
            part, name = ours.split(".", 1)
            lora = LoraModule(module, ranks[part], alphas[part])
            self.add_module(kohya_name(part, name), lora)
            self.names[kohya_name(part, name)] = ours
            module.register_forward_hook(lambda m, args, out, lora=lora: out + lora(args[0]))

    def layers(self, state=None):
        """{ours: formats.lora.LoraLayer} of `state` (a state dict of this network, such as the
        EMA's; default its own weights)."""
        state = self.state_dict() if state is None else state
        return {ours: LoraLayer(state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"],
                                float(state[f"{k}.alpha"])) for k, ours in self.names.items()}


def lora_targets(cfg, pipe):
    """{ours: module} of the base `pipe` that the LoRA changes (the module docstring says
    which)."""
    def unet_wants(name, m):
        if ".attentions." not in name:
            return False
        if cfg.lora_targets == "attention":
            return isinstance(m, nn.Linear) and name.endswith(ATTENTION)
        return isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    out = {f"unet.{n}": m for n, m in pipe.unet.named_modules() if unet_wants(n, m)}
    if not out:
        raise ValueError(f"base {cfg.base!r}: its UNet has no attention blocks to put a LoRA on")
    if cfg.lora_text_encoder_rank:
        out.update({f"text_encoder.{n}": m for n, m in pipe.text_encoder.named_modules()
                    if isinstance(m, nn.Linear) and (".self_attn." in n or ".mlp." in n)})
    return out


def lora_file(cfg):
    """Where the LoRA is written: <out>/lora/<name of out>.safetensors (its <lora:name> tag)."""
    return cfg.run_dir / f"{Path(cfg.out).resolve().name or 'lora'}.safetensors"


def kohya_metadata(cfg, pipe, captions):
    """sd-scripts' ss_* keys that A1111's and ComfyUI's LoRA lists show, from the run's
    settings (no clock time: the same run writes the same file)."""
    ranks = {"unet": cfg.lora_rank, "te": cfg.lora_text_encoder_rank}
    version = {768: "sd_v1", 1024: "sd_v2"}.get(pipe.unet.config.context_dim)
    tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": ranks["unet"],
            "ss_network_alpha": cfg.lora_alpha or ranks["unet"],
            "ss_network_train_unet_only": not ranks["te"], "ss_output_name": lora_file(cfg).stem,
            "ss_sd_model_name": Path(cfg.base).name, "ss_num_train_images": len(captions),
            "ss_resolution": f"({cfg.image_size}, {cfg.image_size})",
            "ss_max_train_steps": cfg.steps, "ss_learning_rate": cfg.lr, "ss_unet_lr": cfg.lr,
            "ss_text_encoder_lr": cfg.lr if ranks["te"] else 0.0, "ss_lr_scheduler": "cosine",
            "ss_lr_warmup_steps": cfg.warmup, "ss_batch_size_per_device": cfg.batch_size,
            "ss_gradient_accumulation_steps": cfg.grad_accum, "ss_seed": cfg.seed,
            "ss_caption_dropout_rate": cfg.caption_dropout,
            "ss_training_comment": "nanodiffusion train lora"}
    if version:
        meta.update(ss_base_model_version=version, ss_v2=version == "sd_v2")
    if captions:
        meta["ss_tag_frequency"] = json.dumps({Path(cfg.data).name: dict(tags)})
    return {k: str(v) for k, v in meta.items()}


def _text_with_grad(frozen):
    """text_of for unet_loss while the text encoder's LoRA trains: no cache, gradients on."""
    def encode(captions):
        text = frozen["text"]
        ids = frozen["tokenizer"](captions, max_length=text.config.max_positions)
        return text(ids.to(next(text.parameters()).device))  # (B, T, D), (B, D)
    return encode


class LoraPart:
    @staticmethod
    def build(cfg, device):
        if cfg.model:
            raise ValueError(f"lora model settings {sorted(cfg.model)}: the LoRA's are "
                             f"lora_rank, lora_alpha, lora_text_encoder_rank, lora_targets")
        get, length = source(cfg)  # first: a folder without images fails before the base loads
        pipe = load_base(cfg, device, "train lora")
        ranks = {"unet": cfg.lora_rank, "text_encoder": cfg.lora_text_encoder_rank}
        alphas = {part: cfg.lora_alpha or rank for part, rank in ranks.items()}
        captions = [] if length is None else folder_captions(cfg)
        network = LoraNetwork(lora_targets(cfg, pipe), ranks, alphas,
                              kohya_metadata(cfg, pipe, captions))
        frozen = {"source": get, "length": length, "pipe": pipe, "unet": pipe.unet,
                  "vae": pipe.vae, "text": pipe.text_encoder, "clip": pipe.clip,
                  "tokenizer": pipe.tokenizer, "schedule": NoiseSchedule(pipe.schedule_config),
                  "cache": {}}
        return network, frozen

    @staticmethod
    def batch(cfg, frozen, indices, device):
        # a folder's images are the same tensors every epoch: each is encoded once
        pool = cfg.latent_pool or frozen["length"] or 0
        return encoded_batch(cfg, frozen, indices, vae_posterior(frozen["vae"]), device, pool)

    @staticmethod
    def loss(cfg, model, frozen, batch, gens):
        text_of = _text_with_grad(frozen) if cfg.lora_text_encoder_rank else None
        return unet_loss(cfg, frozen["unet"], frozen, batch, gens, text_of), {}

    @staticmethod
    def export(cfg, model, ema):
        save_kohya(lora_file(cfg), model.layers(ema), model.metadata)

    @staticmethod
    def sample(cfg, model, frozen, path):
        pipe = frozen["pipe"]  # its modules carry the LoRA's hooks
        pipe._prompt_cache.clear()  # encoded by a text encoder whose LoRA has trained since
        images = [pipe.generate(p, seed=i, width=cfg.image_size, height=cfg.image_size)[0]
                  for i, p in enumerate(sample_prompts(cfg, 4))]
        make_grid(images, rows=1).save(path)
