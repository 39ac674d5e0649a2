"""The trainable parts, by name: the one table the config and the loop read."""
from .clip import ClipPart
from .dmd import DmdPart
from .lcm import LcmPart
from .lora import LoraPart
from .tiny_decoder import TinyDecoderPart
from .unclip import DecoderPart, PriorPart
from .unet import UnetPart
from .vae import VaePart

PARTS = {"clip": ClipPart, "vae": VaePart, "unet": UnetPart, "prior": PriorPart,
         "decoder": DecoderPart, "lcm": LcmPart, "dmd": DmdPart,
         "tiny-decoder": TinyDecoderPart, "lora": LoraPart}


def get_part(name):
    if name not in PARTS:
        raise ValueError(f"part {name!r} cannot be trained yet; trainable: {sorted(PARTS)}")
    return PARTS[name]
