"""nanodiffusion: Stable Diffusion and DALL-E 2 (unCLIP) in plain PyTorch."""

__version__ = "0.1.0"
# The precisions a Stable Diffusion pipeline runs in (CLI --dtype, serve --dtype); here, not
# in loading.py, so that the CLI parser is built without importing torch.
DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype):
    """The one rule for a dtype's name (serve's and eval's): one of DTYPES, else a ValueError
    naming it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got "
                         f"{dtype!r}")


def load(path=None, **kwargs):
    """Load a pipeline: a diffusers folder, a single-file checkpoint, a hub id, or (no argument)
    the bundled default model. See `nanodiffusion.loading.load_pipeline`."""
    from .loading import load_pipeline

    return load_pipeline(path, **kwargs)
