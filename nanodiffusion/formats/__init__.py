"""Every weight format nanodiffusion reads and writes. Readers return a `Parts` (the modules
and settings of one model) and never import the pipelines: loading.py builds those.

files.py        weight files (safetensors, .ckpt/.pt/.pth/.bin) and the one strict loader
checkpoint.py   our model files (config in the metadata), training state, atomic writes
ours.py         our model folder (model.json), kinds "sd" and "unclip"
diffusers.py    diffusers folders; diffusers_config.py their config.json <-> our configs
single_file.py  original (LDM / CompVis) single files; ldm_keys.py their key rename tables
taesd.py        tiny autoencoders (TAESD) in diffusers' and madebyollin's layouts (a module)
"""
from dataclasses import dataclass


@dataclass
class Parts:
    """One model as read from disk. `modules`: for kind "sd" unet, vae, text_encoder and clip
    (None where absent); for kind "unclip" prior, decoder, vae, clip. `defaults` is a dict of
    the pipeline's Defaults (UnCLIPDefaults for unclip) fields, turned into one by loading.py.
    """
    kind: str
    name: str
    source: str
    modules: dict
    tokenizer: object
    schedule: object
    defaults: dict
    prior_schedule: object = None
    decoder_text: bool = False
