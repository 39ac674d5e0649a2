"""CLIP: text transformer, vision transformer, contrastive loss (state-dict layout of
transformers' CLIPTextModel / CLIPVisionModel / CLIPModel)."""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import packing
from .layers import attention, linear_residual


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"     # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP ViT-H)
    norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pad_token_id: int = 49407          # SD 1.x pads with the end token, SD 2.x with 0
    projection_dim: int | None = None  # width of text_projection (CLIPModel only)


@dataclass
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    channels: int = 3
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    projection_dim: int | None = None


SD15_TEXT = CLIPTextConfig()
# OpenCLIP ViT-H text as SD 2.x uses it: the penultimate of 24 layers, then the final LayerNorm.
SD2_TEXT = CLIPTextConfig(width=1024, num_layers=23, num_heads=16, mlp_dim=4096,
                          activation="gelu", pad_token_id=0)
TINY_TEXT = CLIPTextConfig(vocab_size=49408, width=32, num_layers=2, num_heads=2, mlp_dim=64)
TINY_VISION = CLIPVisionConfig(image_size=32, patch_size=8, width=32, num_layers=2, num_heads=2,
                               mlp_dim=64, projection_dim=16)


# OpenAI CLIP's image normalisation (transformers' CLIPImageProcessor uses the same numbers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x), written as
    silu(1.702 x) / 1.702 (the same function): one fused kernel each way instead of three
    elementwise passes. Forward and backward of a (14690, 512) tensor on one CPU thread:
    26 ms against 83 ms; CLIP training steps were 40% activation before."""
    return F.silu(1.702 * x) / 1.702


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (transformers' names)."""

    def __init__(self, width, num_heads):
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False, residual=None):
        """The heads' output projected (plus `residual` where given: linear_residual)."""
        B, T, C = x.shape
        nh = self.num_heads
        q = self.q_proj(x).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        y = attention(q, k, v, causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y) if residual is None else linear_residual(self.out_proj, y, residual)


class CLIPMLP(nn.Module):
    def __init__(self, width, mlp_dim, activation):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation, self.act = activation, ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x, residual=None):
        """fc2(act(fc1(x))) (plus `residual` where given); at inference on small_gemm's kernel
        the activation runs in fc1's epilogue (packing.fused_linear) and the residual in fc2's."""
        h = None if torch.is_grad_enabled() else packing.fused_linear(self.fc1, x, self.activation)
        if h is None:
            h = self.act(self.fc1(x))
        return self.fc2(h) if residual is None else linear_residual(self.fc2, h, residual)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.num_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, x, causal=False):
        x = self.self_attn(self.layer_norm1(x), causal=causal, residual=x)
        return self.mlp(self.layer_norm2(x), residual=x)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers)])
        init_encoder(self, cfg)

    def forward(self, x, causal=False, layers=slice(None)):
        """x through the layers, or only through `layers` (a slice of them)."""
        for layer in self.layers[layers]:
            x = layer(x, causal=causal)
        return x


def init_encoder(encoder, cfg):
    """OpenAI CLIP's initialisation (as transformers' _init_weights with factor 1): attention
    input std width^-0.5, residual outputs scaled down by (2 * num_layers)^-0.5, zero biases."""
    attn_std = cfg.width ** -0.5
    out_std = attn_std * (2 * cfg.num_layers) ** -0.5
    for layer in encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        stds = ((attn.q_proj, attn_std), (attn.k_proj, attn_std), (attn.v_proj, attn_std),
                (attn.out_proj, out_std), (mlp.fc1, (2 * cfg.width) ** -0.5), (mlp.fc2, out_std))
        for linear, std in stds:
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids, token_embeds=None):
        T = input_ids.shape[1]
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding.weight[:T]  # (B, T, C)


class CLIPTextModel(nn.Module):
    """CLIP's causal text transformer; keys as transformers' CLIPTextModel (>= 5.6, no prefix).

    forward(input_ids (B, T)) -> (hidden (B, T, C) after the final LayerNorm, pooled (B, C)),
    pooled being the hidden state at the first end token. No padding mask, as SD uses none.
    clip_skip N (AUTOMATIC1111's "Clip skip"; diffusers' clip_skip is N - 1) takes `hidden`
    from the N-th layer from the end, through the final LayerNorm as both do; 1 is the last
    layer. `pooled` is always the last layer's (SDXL's pooled embedding is, whatever the skip).
    `token_embeds` (B, T, C): the token embeddings to use instead of those of input_ids (which
    still place the end token), with textual inversion vectors in them (prompts.py).
    """

    def __init__(self, config: CLIPTextConfig):  # formats/checkpoint.py calls it with config=...
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, input_ids, clip_skip=1, token_embeds=None):
        B, T = input_ids.shape
        if T > self.config.max_positions:
            raise ValueError(f"input_ids has {T} tokens, more than max_positions="
                             f"{self.config.max_positions}")
        if not 1 <= clip_skip <= self.config.num_layers:
            raise ValueError(f"clip_skip must be in [1, {self.config.num_layers}] (the number "
                             f"of layers), got {clip_skip}")
        kept = self.config.num_layers - (clip_skip - 1)  # the layers the token states go through
        x = self.embeddings(input_ids, token_embeds)  # (B, T, C)
        x = self.encoder(x, causal=True, layers=slice(kept))  # (B, T, C)
        hidden = self.final_layer_norm(x)  # (B, T, C)
        last = hidden if clip_skip == 1 else self.final_layer_norm(
            self.encoder(x, causal=True, layers=slice(kept, None)))  # (B, T, C)
        # argmax returns the first maximum: the first end token (padding may repeat it).
        eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = last[torch.arange(B, device=x.device), eos]  # (B, C)
        return hidden, pooled


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of "
                             f"patch_size {cfg.patch_size}")
        self.image_size = cfg.image_size
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        # an init, not an op: on the meta device (files.on_meta) an op such as randn(...) * s
        # goes through torch's prims wrappers, which import torch._dynamo (~1 s, ~70 MB)
        nn.init.normal_(self.class_embedding, std=cfg.width ** -0.5)
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_positions, cfg.width)
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixels):
        B, _, H, W = pixels.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"pixels are {H}x{W}, the model takes {self.image_size}x"
                             f"{self.image_size}; use preprocess() to resize")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N+1, C)


class CLIPVisionModel(nn.Module):
    """CLIP's vision transformer (ViT); keys as transformers' CLIPVisionModel.

    forward(pixels (B, 3, S, S), normalised) -> (hidden (B, N+1, C) from the last layer,
    pooled (B, C) = post_layernorm of the class token).
    """

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)  # sic, as in transformers
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, N+1, C)
        x = self.encoder(x)  # (B, N+1, C)
        return x, self.post_layernorm(x[:, 0])

    def preprocess(self, images):
        return preprocess(images, self.config.image_size)


def preprocess(images, image_size, mean=CLIP_MEAN, std=CLIP_STD):
    """Images (B, 3, H, W) or (3, H, W), uint8 in [0, 255] or float in [0, 1] -> float32
    (B, 3, S, S) normalised with CLIP's mean / std. When the size differs, the shorter side is
    resized to S (bicubic, antialiased, like CLIP's PIL resize) and the centre is cropped."""
    if images.dtype == torch.uint8:
        x = images.float() / 255
    elif images.is_floating_point():
        x = images.float()
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    H, W = x.shape[-2:]
    if (H, W) != (image_size, image_size):
        scale = image_size / min(H, W)
        size = (max(image_size, round(H * scale)), max(image_size, round(W * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        x = x[..., top:top + image_size, left:left + image_size].clamp(0, 1)  # (B, 3, S, S)
    mean = x.new_tensor(mean).view(1, 3, 1, 1)
    std = x.new_tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


def contrastive_loss(text_emb, image_emb, logit_scale, negative_emb=None):
    """CLIP's symmetric InfoNCE: pair i of the batch is the positive for row and column i.
    Embeddings (B, E) are L2-normalised here; the temperature exp(logit_scale) is capped at 100.
    negative_emb (N, E): more captions that fit none of the images (NegCLIP's hard negatives,
    Yuksekgonul et al. 2023), extra choices in the image-to-text direction."""
    text_emb = F.normalize(text_emb, dim=-1)
    image_emb = F.normalize(image_emb, dim=-1)
    scale = torch.as_tensor(logit_scale, device=text_emb.device).clamp(max=math.log(100)).exp()
    logits = scale * text_emb @ image_emb.T  # (B, B): texts x images
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_image = logits.T  # (B, B): images x texts
    if negative_emb is not None and len(negative_emb):
        negs = scale * image_emb @ F.normalize(negative_emb, dim=-1).T  # (B, N)
        per_image = torch.cat([per_image, negs], dim=1)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(per_image, labels)) / 2


class CLIPModel(nn.Module):
    """Text and vision towers with linear projections into one embedding space (keys as
    transformers' CLIPModel). `projection_dim` defaults to the configs' projection_dim."""

    def __init__(self, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig,
                 projection_dim: int | None = None):
        super().__init__()
        text_cfg, vision_cfg = text_config, vision_config
        projection_dim = projection_dim or vision_cfg.projection_dim or text_cfg.projection_dim
        if projection_dim is None:
            raise ValueError("CLIPModel needs projection_dim (argument or config field)")
        self.projection_dim = projection_dim
        # Both configs carry the width, so that a checkpoint rebuilds the model from them alone.
        self.text_config = dataclasses.replace(text_cfg, projection_dim=projection_dim)
        self.vision_config = dataclasses.replace(vision_cfg, projection_dim=projection_dim)
        self.text_model = CLIPTextModel(text_cfg)
        self.vision_model = CLIPVisionModel(vision_cfg)
        self.text_projection = nn.Linear(text_cfg.width, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_cfg.width, projection_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=text_cfg.width ** -0.5)
        nn.init.normal_(self.visual_projection.weight, std=vision_cfg.width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids):
        """(B, T) ids -> (B, E) projected text embeddings, not normalised."""
        return self.text_projection(self.text_model(input_ids)[1])

    def encode_image(self, pixels):
        """(B, 3, S, S) normalised pixels -> (B, E) projected image embeddings, not normalised."""
        return self.visual_projection(self.vision_model(pixels)[1])

    def forward(self, input_ids, pixels, negative_ids=None):
        """Contrastive loss of a batch of matching (text, image) pairs; negative_ids (N, T):
        captions that match none of the images."""
        negatives = None if negative_ids is None else self.encode_text(negative_ids)
        return contrastive_loss(self.encode_text(input_ids), self.encode_image(pixels),
                                self.logit_scale, negatives)

    def preprocess(self, images):
        return preprocess(images, self.vision_model.config.image_size)

# The shapes model's CLIP: a small caption BPE (vocab_size set from it when training), short
# captions (32 tokens), 64 px images in 8 px patches.
SHAPES_TEXT = CLIPTextConfig(vocab_size=700, max_positions=32, width=128, num_layers=4,
                             num_heads=4, mlp_dim=512)
SHAPES_VISION = CLIPVisionConfig(image_size=64, patch_size=8, width=128, num_layers=4,
                                 num_heads=4, mlp_dim=512, projection_dim=128)
