"""Training every part of a model from zero: one loop (loop.py) over the parts (parts.py: clip,
vae, unet, prior, decoder), configured by a TrainConfig or a TOML recipe (config.py).

    from nanodiffusion.train import load_recipe, train
    train(load_recipe("recipes/shapes.toml", "vae", out="runs/shapes"))
"""
from .config import TrainConfig, chunk_indices, load_recipe, lr_at
from .loop import Records, WriteFailed, main_ddp, sample_generators, train
from .parts import PARTS, get_part

__all__ = ["PARTS", "Records", "TrainConfig", "WriteFailed", "chunk_indices", "get_part",
           "load_recipe", "lr_at", "main_ddp", "sample_generators", "train"]
