"""AUTOMATIC1111's LoRA routes: the LoRA files of the server's models folder, in its Lora/
subfolder (A1111's models/Lora), which `<lora:name:multiplier>` tags in prompts name
(pipelines/lora_tags.py); a server of the bundled models has none."""
from fastapi import APIRouter, Request

from ..pipelines.lora_tags import LoraFolder, describe

router = APIRouter()


def lora_dir(registry):
    """The folder the server's pipelines look LoRA tags up in; None without a models folder."""
    return None if registry.models_dir is None else registry.models_dir / "Lora"


@router.get("/loras")
async def loras(request: Request):
    """A1111's items {name, alias, path, metadata}, one per name (the first file of a name)."""
    folder = lora_dir(request.app.state.registry)
    if folder is None:
        return []
    items = {}
    for path in LoraFolder(folder).files():
        item = describe(path)
        items.setdefault(item["name"], item)
    return list(items.values())


@router.post("/refresh-loras")
async def refresh_loras():
    """The folder is read on every request here, so there is nothing to refresh."""
    return None
