"""What a training run is: TrainConfig (one part of a run folder: its data, optimiser,
schedule and objectives), the TOML recipes that fill it, and the functions of the config and
the step that make a run exactly resumable: the learning rate (lr_at) and the samples a step
sees (chunk_indices)."""
import dataclasses
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..pipelines.checks import check_eta
from .parts import PARTS


@dataclass
class TrainConfig:
    part: str = "unet"
    data: str = "shapes"            # "shapes" or a folder of captioned images
    out: str = "runs/shapes"        # the run folder; each part writes <out>/<part>/
    image_size: int = 64
    steps: int = 1000
    batch_size: int = 64            # global batch (split over DDP ranks), per optimizer step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    # warm restarts of the cosine: before restarts[0] it decays as if training ended there,
    # then as if it ended at the next entry, the last stage at `steps` (what resuming a
    # 2,000-step run with --steps 3600 and again with --steps 5000 does: [2000, 3600])
    restarts: list[int] = field(default_factory=list)
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)  # AdamW's (beta1, beta2)
    grad_clip: float = 1.0
    ema_decay: float = 0.999        # 0 turns EMA off
    log_every: int = 25
    sample_every: int = 500         # 0: never
    ckpt_every: int = 250
    seed: int = 0
    include_held_out: bool = False
    device: str = "cpu"
    compile: bool = False
    # bf16 autocast of the forward pass: None = on accelerators only; true on CPUs with
    # native bf16 (AVX512-BF16, AMX); ignored, with a note, on CPUs without bfloat16
    # arithmetic (AVX2 only: loop._autocast). On a CPU it also takes attention's math kernel over the
    # flash one, whose bf16 backward is slow there. Forward + backward on this project's
    # 2-core CPU, float32 -> bf16: shapes UNet (batch 64, 2 threads) 1.12 -> 0.58 s, CLIP
    # (batch 128 + twins, 1 thread) 1.94 -> 1.18 s, VAE (batch 32, 1 thread) 1.03 -> 0.69 s
    autocast: bool | None = None
    num_workers: int = 0            # processes that draw the data of the next steps ahead
    # objectives
    prediction_type: str = "epsilon"
    # share of samples trained without their condition, for classifier-free guidance: the
    # caption for the unet and the prior, the CLIP image embedding (zeroed) for the decoder
    caption_dropout: float = 0.1
    min_snr_gamma: float = 0.0      # 0: plain MSE; 5 is the min-SNR paper's choice
    latent_pool: int = 0            # unet/decoder/prior: cycle N samples, encoded once
    zero_terminal_snr: bool = False  # unet/decoder: pure noise at the last timestep, trailing
    kl_weight: float = 1e-6
    ink_weight: float = 0.0         # vae: extra loss weight of non-white pixels (shapes' objects)
    model: dict = field(default_factory=dict)  # overrides of the part's model preset
    hard_negatives: bool = False    # clip: captions with spatial words mirrored as negatives
    swap_negatives: bool = False    # clip (shapes): pairs bring their colour-swapped twin too
    pooled_text: bool = False       # unet: the pooled text state joins the time embedding too
    decoder_text: bool = False      # decoder: start from <out>/unet, read the caption too
    text_dropout: float = 0.5       # decoder_text: share of samples without the caption
                                    # (DALL·E 2: 50%); the image-only tasks train on these
    bpe_merges: int = 150           # clip: size of the caption BPE learned for small models
    # lcm (consistency distillation, train/lcm.py)
    teacher: str = ""               # the model to distil (name, folder, file); "": <out>/model
    guidance_range: tuple[float, float] = (2.0, 4.0)  # CFG scales the student learns to embed
    solver_steps: int = 50          # the teacher's DDIM grid: one step is T / solver_steps
    huber_c: float = 0.001          # pseudo-Huber constant of the loss (0: MSE)
    # () : LCM, every point consistent with t = 0; (N, ...): multistep consistency, each point
    # consistent with the next timestep of an N-step lcm/tcd schedule below it (N drawn per
    # sample), sampled by tcd
    segments: tuple[int, ...] = ()
    eta: float = 0.0                # a multistep student's default tcd eta (TCD's gamma)
    # dmd (distribution matching, train/dmd.py; teacher, guidance_range, solver_steps,
    # segments and eta as above; base: the student, default <out>/model-lcm)
    fake_updates: int = 2           # the fake score network's updates per student update
    # tiny-decoder (train/tiny_decoder.py): the share of samples that are the model's own
    # generated latents, how many distinct ones, and the step counts they are sampled with
    generated_share: float = 0.0
    generated_pool: int = 2000
    generated_steps: tuple[int, ...] = ()  # cycled; empty: the model's default
    # fine-tuning a pretrained model (lora; unet from it instead of from zero): its schedule
    # and prediction type are the base's, and the base is never written
    base: str = ""                  # any model the loader opens (name, folder, file)
    lora_rank: int = 16             # the UNet's LoRA rank (kohya's network_dim)
    lora_alpha: float | None = None  # kohya's network_alpha (scale alpha / rank); None: rank
    lora_text_encoder_rank: int = 0  # 0: the text encoder stays as it is
    lora_targets: str = "transformer"  # the UNet's modules: "transformer" (kohya's: every
                                    # Linear and 1x1 conv of the transformer blocks) or
                                    # "attention" (to_q, to_k, to_v, to_out.0 only)

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part {self.part!r} is not one of {tuple(PARTS)}")
        for name in ("steps", "batch_size", "grad_accum", "fake_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        betas = self.adam_betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = tuple(betas)  # a TOML recipe gives a list
        g = self.guidance_range
        if not isinstance(g, (list, tuple)) or len(g) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in g) or \
                not 1 <= g[0] <= g[1] <= 100:
            raise ValueError(f"guidance_range must be two numbers lo <= hi in [1, 100], "
                             f"got {g!r}")
        self.guidance_range = (float(g[0]), float(g[1]))
        if not isinstance(self.solver_steps, int) or not 1 <= self.solver_steps <= 1000:
            raise ValueError(f"solver_steps must be an integer in [1, 1000], got "
                             f"{self.solver_steps!r}")
        seg = self.segments
        if not isinstance(seg, (list, tuple)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= self.solver_steps
                for n in seg):
            raise ValueError(f"segments must be a list of step counts in [1, solver_steps = "
                             f"{self.solver_steps}], got {seg!r}")
        self.segments = tuple(seg)
        if self.segments:  # the default of the tcd sampler a multistep student gets
            check_eta(self.eta, "tcd")
        elif self.eta:
            raise ValueError(f"eta {self.eta!r} is a multistep student's tcd default (with "
                             "segments); an LCM student samples with lcm, which has no eta")
        if self.huber_c < 0:
            raise ValueError(f"huber_c must be >= 0, got {self.huber_c}")
        self._check_finetuning()
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be between 0 and 1, got {self.text_dropout}")
        ends = [*self.restarts, self.steps]
        if any(not isinstance(r, int) for r in self.restarts) or any(
                a >= b for a, b in zip(ends, ends[1:])) or (self.restarts and
                                                            self.restarts[0] <= self.warmup):
            raise ValueError(f"restarts must be increasing whole steps between warmup "
                             f"({self.warmup}) and steps ({self.steps}), got {self.restarts}")
        if self.swap_negatives and self.data != "shapes":
            raise ValueError(f"swap_negatives needs data = 'shapes' (it redraws the scene), "
                             f"got data = {self.data!r}")
        if not 0.0 <= self.generated_share < 1.0:
            raise ValueError(f"generated_share must be in [0, 1), got {self.generated_share}")
        if self.generated_share and self.part != "tiny-decoder":
            raise ValueError(f"generated_share is for the tiny-decoder part, not {self.part!r}")
        if self.generated_pool < 1:
            raise ValueError(f"generated_pool must be >= 1, got {self.generated_pool}")
        gs = self.generated_steps
        if not isinstance(gs, (list, tuple)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1000 for n in gs):
            raise ValueError(f"generated_steps must be a list of step counts in [1, 1000], "
                             f"got {gs!r}")
        self.generated_steps = tuple(gs)
        if self.latent_pool < 0:
            raise ValueError(f"latent_pool must be >= 0 (0: no pool), got {self.latent_pool}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(f"zero_terminal_snr needs prediction_type='v_prediction', got "
                             f"{self.prediction_type!r}: at zero SNR there is no noise to "
                             "predict from")

    def _check_finetuning(self):
        if self.base and self.part not in ("unet", "lora", "dmd"):
            raise ValueError(f"base is for the unet, lora and dmd parts, not {self.part!r}")
        for name, low in (("lora_rank", 1), ("lora_text_encoder_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 (or unset: the rank), got "
                             f"{self.lora_alpha!r}")
        if self.lora_targets not in ("transformer", "attention"):
            raise ValueError(f"lora_targets must be 'transformer' or 'attention', got "
                             f"{self.lora_targets!r}")

    def out_path(self, part):
        return Path(self.out) / part

    @property
    def run_dir(self):
        return self.out_path(self.part)


def load_recipe(path, part, **overrides):
    """A recipe TOML has a [common] table and one table per part; overrides win. The recipe
    is checked as written first; a `steps` override shorter than it then takes the recipe's
    schedule along (_fit_steps)."""
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no recipe file at {path}") from None
    except (OSError, ValueError) as e:  # a folder, bad UTF-8, bad TOML
        raise ValueError(f"{path}: not a readable TOML recipe ({e})") from None
    if part not in recipe:
        raise ValueError(f"{path}: no [{part}] table; it has {sorted(recipe)}")
    values = {**recipe.get("common", {}), **recipe[part], "part": part}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; accepted: {sorted(names)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        TrainConfig(**values)
        if isinstance(given.get("steps"), int):
            values.update(_fit_steps(values, given["steps"]))
        return TrainConfig(**{**values, **given})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _fit_steps(values, steps):
    """The recipe's restarts and warmup for a shorter run (a trial with --steps 2): restarts
    at or past `steps` are dropped, and a warmup as long as the run shrinks to the recipe's
    share of it; one note on stderr says what changed."""
    planned = values.get("steps", TrainConfig.steps)
    restarts, warmup = values.get("restarts", []), values.get("warmup", TrainConfig.warmup)
    if steps >= planned:
        return {}
    fitted, changes = {"restarts": [r for r in restarts if r < steps]}, []
    if fitted["restarts"] != restarts:
        changes.append(f"restarts {restarts} -> {fitted['restarts']}")
    if warmup >= steps:
        fitted["warmup"] = warmup * steps // planned
        changes.append(f"warmup {warmup} -> {fitted['warmup']}")
    if changes:
        print(f"note: steps {steps} ends before the recipe's {planned}: {', '.join(changes)}",
              file=sys.stderr)
    return fitted


def lr_at(cfg, step):
    """Linear warmup, then cosine decay to min_lr_ratio * lr, towards the first of
    cfg.restarts past `step` (cfg.steps after the last)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    end = next((r for r in cfg.restarts if r > step), cfg.steps)
    progress = min(1.0, (step - cfg.warmup) / max(1, end - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(
        math.pi * progress)))


def chunk_indices(cfg, step, chunk, rank, world):
    """The sample indices of one rank's gradient-accumulation chunk of a step."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    first = step * cfg.batch_size + (chunk * world + rank) * micro
    return list(range(first, first + micro))
