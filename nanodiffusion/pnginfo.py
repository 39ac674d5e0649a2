"""Generation parameters in PNG text chunks, in the format AUTOMATIC1111 writes ("parameters"):

    <prompt>
    Negative prompt: <negative>
    Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5

so that its PNG Info tab, ComfyUI and `nanodiffusion info` read them back.
"""
import json
import re

from PIL import Image, PngImagePlugin, UnidentifiedImageError

# Our sampler names -> the names A1111 shows (and accepts in its API).
A1111_SAMPLERS = {
    "euler": "Euler", "euler-ancestral": "Euler a", "heun": "Heun", "lms": "LMS",
    "ddim": "DDIM", "pndm": "PLMS", "plms": "PLMS", "ddpm": "DDPM", "dpmpp-2m": "DPM++ 2M",
    "dpmpp-2m-karras": "DPM++ 2M Karras", "dpmpp-2m-sde": "DPM++ 2M SDE",
    "dpmpp-2m-sde-karras": "DPM++ 2M SDE Karras", "euler-karras": "Euler Karras",
    "lms-karras": "LMS Karras", "unipc": "UniPC", "lcm": "LCM",
}
# Fields of `extra` that A1111 writes right after Model (a VAE file's, pipelines/vae_swap.py).
AFTER_MODEL = ("VAE hash", "VAE")


def format_parameters(p):
    """dict with prompt, negative_prompt, steps, sampler, guidance, seed, width, height and
    optionally model, strength, clip_skip, batch_pos, extra (a dict of further fields, e.g.
    Task) -> the A1111 text. A1111 writes "Clip skip" only where it is not 1."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p["steps"]), ("Sampler", A1111_SAMPLERS.get(p["sampler"], p["sampler"])),
              ("CFG scale", p["guidance"]), ("Seed", p["seed"]),
              ("Size", f"{p['width']}x{p['height']}")]
    if p.get("model"):
        fields.append(("Model", p["model"]))
    extra = dict(p.get("extra") or {})
    fields += [(k, _quote(str(extra.pop(k)))) for k in AFTER_MODEL if k in extra]
    if p.get("strength") is not None:
        fields.append(("Denoising strength", p["strength"]))
    if p.get("clip_skip", 1) != 1:
        fields.append(("Clip skip", p["clip_skip"]))
    if p.get("batch_size", 1) > 1:
        fields += [("Batch size", p["batch_size"]), ("Batch pos", p.get("batch_pos", 0))]
    fields += [(k, _quote(str(v))) for k, v in extra.items()]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def _quote(value):
    """A value holding a separator is written JSON-quoted, as A1111 does."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def parse_parameters(text):
    """The A1111 text -> dict(prompt, negative_prompt, and every `Key: value` field)."""
    lines = text.strip().split("\n")
    out = {"prompt": "", "negative_prompt": ""}
    last = lines[-1] if lines and _FIELD.match(lines[-1]) and "Steps:" in lines[-1] else None
    body = lines[:-1] if last is not None else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["prompt"], out["negative_prompt"] = "\n".join(prompt), "\n".join(negative)
    if last is not None:
        for key, value in _FIELD.findall(last):
            out[key.strip()] = value.strip()
    return out


def save_png(image, path):
    """Save a PIL image as PNG, keeping its "parameters" text (from image.info) in a tEXt chunk."""
    info = PngImagePlugin.PngInfo()
    params = image.info.get("parameters")
    if params:
        info.add_text("parameters", params)
    image.save(path, format="PNG", pnginfo=info)


def read_parameters(path):
    """The "parameters" text an image file carries, or None when it has none. A file that is
    missing or not an image raises an error naming it."""
    try:
        with Image.open(path) as im:
            im.load()  # text chunks after the image data are read only here
            text = im.info.get("parameters")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return text if isinstance(text, str) and text.strip() else None
