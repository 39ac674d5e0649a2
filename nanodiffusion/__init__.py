"""nanodiffusion: Stable Diffusion and DALL-E 2 (unCLIP) in plain PyTorch."""

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """Load a pipeline: a diffusers folder, a single-file checkpoint, a hub id, or (no argument)
    the bundled default model. See `nanodiffusion.pipeline.load`."""
    from .pipeline import load as _load

    return _load(path, **kwargs)
