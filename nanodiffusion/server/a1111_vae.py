"""AUTOMATIC1111's VAE choice: the VAEs of the server's models folder, in its VAE/ subfolder
(A1111's models/VAE), listed by /sdapi/v1/sd-vae and chosen by the sd_vae option (POST
/sdapi/v1/options, or a request's override_settings, for that request only): "Automatic" the
server's VAE (serve --vae), else each model's own; "None" the model's own; a listed name that
VAE. The folder is read on every request, so there is nothing to refresh. The worker swaps the
VAE in for each job (pipelines/vae_swap.py); a server of the bundled models lists none."""
from fastapi import APIRouter, Request

from .params import SERVER_VAE, bad

router = APIRouter()

OPTION = "sd_vae"
AUTOMATIC, NONE = "Automatic", "None"
SUFFIXES = (".safetensors", ".ckpt", ".pt")  # the VAE files A1111 lists in models/VAE


def vae_dir(registry):
    """The server's VAE folder; None without a models folder."""
    return None if registry.models_dir is None else registry.models_dir / "VAE"


def vae_files(root):
    """{name: path} of the VAEs under `root`, by name: A1111's, a file's name with its suffix,
    anywhere below; a diffusers VAE folder (config.json) by its folder's name, its files not
    listed apart. The first of a name in path order; {} when there is no such folder."""
    if root is None or not root.is_dir():
        return {}
    found = {}
    for p in sorted(root.rglob("*")):
        parts = p.relative_to(root).parts
        if any(part.startswith(".") for part in parts):
            continue
        if p.is_dir() and (p / "config.json").is_file():
            found.setdefault(p.name, p)
        elif p.is_file() and p.suffix.lower() in SUFFIXES and \
                not any((q / "config.json").is_file() for q in p.parents[:len(parts) - 1]):
            found.setdefault(p.name, p)
    return dict(sorted(found.items()))


def choice(app, value, param):
    """An sd_vae value -> a Task's vae: SERVER_VAE for "Automatic", None for "None", a listed
    VAE's path; a 400 naming `param`, the value and what is accepted for any other."""
    if value == AUTOMATIC:
        return SERVER_VAE
    if value == NONE:
        return None
    folder = vae_dir(app.state.registry)
    files = vae_files(folder)
    if isinstance(value, str) and value in files:
        return files[value]
    where = f"the VAEs in {folder}" if folder is not None else "this server has no VAE folder"
    raise bad(param, f"{param} {value!r} is not a VAE of this server; accepted: "
                     f"{[AUTOMATIC, NONE, *files]} ({where}: /sdapi/v1/sd-vae)")


def requested(app, body, options):
    """The VAE an A1111 request runs with (a Task's vae): override_settings.sd_vae, else the
    sd_vae option /options set."""
    over = body.get("override_settings")
    over = over if isinstance(over, dict) else {}
    if over.get(OPTION) is not None:
        return choice(app, over[OPTION], f"override_settings.{OPTION}")
    return choice(app, options.get(OPTION, AUTOMATIC), OPTION)


@router.get("/sd-vae")
async def sd_vae(request: Request):
    """A1111's items {model_name, filename}."""
    files = vae_files(vae_dir(request.app.state.registry))
    return [{"model_name": name, "filename": str(path)} for name, path in files.items()]
