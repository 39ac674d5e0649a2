"""Golden outputs: sha256 of the pixels that fixed requests give, to show that a change which
should not change images (a refactor) does not, on this machine. Float results differ between
CPUs, so compare runs on the same machine: write the hashes before the change, check after.

    python benchmarks/golden.py --write golden.json     # before
    python benchmarks/golden.py --check golden.json     # after: exit 1 on any difference

The "before" of an older commit, on this machine: `git worktree add /tmp/old <commit>`, then
`PYTHONPATH=/tmp/old python benchmarks/golden.py --write golden.json` (that commit's package,
this script).
"""
import argparse
import hashlib
import json
import platform
import sys

import torch
from PIL import Image

import nanodiffusion
from nanodiffusion.data import shapes
from nanodiffusion.diffusion import ScheduleConfig
from nanodiffusion.models import clip, unet, vae
from nanodiffusion.models.tokenizer import CLIPTokenizer
from nanodiffusion.pipelines.sd import Defaults, Pipeline


def _tiny_sd():
    """A tiny random Stable Diffusion, the same weights on every run."""
    torch.manual_seed(0)
    return Pipeline(unet.UNet(unet.TINY), vae.VAE(vae.TINY), clip.CLIPTextModel(clip.TINY_TEXT),
                    CLIPTokenizer.default(), ScheduleConfig(), Defaults(width=32, height=32),
                    name="tiny")


def cases():
    """name -> a function that makes a list of PIL images."""
    sd, un, tiny = nanodiffusion.load("shapes"), nanodiffusion.load("shapes-unclip"), _tiny_sd()
    scene = shapes.sample(3, split="eval")[0]
    mask = Image.new("L", scene.size, 0)
    mask.paste(255, (0, 0, 32, 64))
    return {
        "shapes generate": lambda: sd.generate("a red circle above a blue square", seed=1, n=2),
        "shapes generate euler-ancestral": lambda: sd.generate("a green star", seed=2,
                                                               sampler="euler-ancestral"),
        "shapes img2img": lambda: sd.img2img("a blue circle", scene, seed=3, strength=0.6),
        "shapes inpaint": lambda: sd.inpaint("a pink star", scene, mask, seed=4),
        "shapes-unclip generate": lambda: un.generate("a purple square", seed=5),
        "shapes-unclip variations": lambda: un.variations(scene, n=2, seed=6),
        "tiny sd generate ddim": lambda: tiny.generate("a cat", seed=7, steps=4, sampler="ddim"),
        "tiny sd generate dpmpp-2m-karras": lambda: tiny.generate(
            "a cat", seed=8, steps=4, sampler="dpmpp-2m-karras", guidance_rescale=0.5),
    }


def digest(images):
    h = hashlib.sha256()
    for im in images:
        h.update(im.convert("RGB").tobytes())
    return h.hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", default=None, help="save the hashes to this JSON file")
    ap.add_argument("--check", default=None, help="compare with the hashes in this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    got = {name: digest(make()) for name, make in cases().items()}
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    for name, h in got.items():
        print(f"{h}  {name}")
    if args.write:
        with open(args.write, "w") as f:
            json.dump({"machine": machine, "hashes": got}, f, indent=2)
    if args.check:
        with open(args.check) as f:
            want = json.load(f)["hashes"]
        diff = [n for n in want if got.get(n) != want[n]]
        print(f"{len(want) - len(diff)}/{len(want)} equal" + (f"; differ: {diff}" if diff else ""))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
