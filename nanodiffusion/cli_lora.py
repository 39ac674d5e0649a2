"""The command line's LoRA options of generate, img2img and inpaint: `--lora PATH[:SCALE]`
(repeatable) and `--lora-dir`, the folder `<lora:name:scale>` tags in prompts are looked up in.
The parser's half imports no torch (cli.py builds the parser without it)."""
import argparse


def lora_spec(text):
    """PATH or PATH:SCALE -> (path, scale); a colon followed by no number stays in the path
    (C:\\loras\\x.safetensors)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    if not text:
        raise argparse.ArgumentTypeError("needs a LoRA file: PATH or PATH:SCALE")
    return text, 1.0


def add_args(p):
    p.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file (kohya / AUTOMATIC1111, LoCon, diffusers / PEFT) fused "
                   "into the model at SCALE (default 1); repeat for several. Stable Diffusion "
                   "models only")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="where <lora:name:scale> "
                   "tags in the prompt find their files (A1111's models/Lora) (default: Lora/ "
                   "in the folder that holds --model, A1111's models/Lora for a model in "
                   "models/Stable-diffusion/, else ./models/Lora)")


def attach(pipe, args):
    """Load args.lora into `pipe` and give it its LoRA folder; --lora on an unCLIP model is an
    error."""
    from .pipelines.lora_tags import default_folder
    from .pipelines.sd import Pipeline

    if not isinstance(pipe, Pipeline):
        if args.lora:
            raise ValueError("--lora is for Stable Diffusion models, not unCLIP ones")
        return
    pipe.lora_dir = args.lora_dir or default_folder(args.model)
    for path, scale in args.lora:
        pipe.load_lora(path, scale)
