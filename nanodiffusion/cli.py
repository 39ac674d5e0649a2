"""Command line: a thin shell from arguments to the pipeline, training and evaluation functions."""
import argparse
import os
import sys
from pathlib import Path


def _add_sampling_args(p):
    p.add_argument("--model", default=None, help="model folder, single file, hub id, or a "
                   "bundled name (default: the bundled shapes model)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("-n", type=int, default=1, help="number of images")
    p.add_argument("--out", default="out.png")
    p.add_argument("--grid", action="store_true", help="also write a contact sheet")
    p.add_argument("--device", default="cpu")


def _parser():
    ap = argparse.ArgumentParser(prog="nanodiffusion", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    _add_sampling_args(g)
    for name in ("img2img", "inpaint"):
        s = sub.add_parser(name, help=f"{name} from an init image")
        s.add_argument("prompt")
        s.add_argument("--image", required=True)
        if name == "inpaint":
            s.add_argument("--mask", required=True, help="white = repaint")
        s.add_argument("--strength", type=float, default=0.6 if name == "img2img" else 1.0)
        _add_sampling_args(s)
    t = sub.add_parser("train", help="train one part (clip, vae, unet, prior, decoder) from zero")
    t.add_argument("part", choices=["clip", "vae", "unet", "prior", "decoder"])
    t.add_argument("--data", default=None, help="'shapes' or a folder of captioned images")
    t.add_argument("--recipe", default=None, help="a TOML recipe (see recipes/)")
    t.add_argument("--out", default=None, help="run folder (default runs/shapes)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default=None)
    t.add_argument("--workers", type=int, default=None, help="data worker processes")
    e = sub.add_parser("eval", help="fidelity report of a run folder or model")
    e.add_argument("path")
    e.add_argument("--n", type=int, default=200, help="prompts per category")
    x = sub.add_parser("export", help="write a model in another format")
    x.add_argument("model")
    x.add_argument("out")
    x.add_argument("--format", choices=["nanodiffusion", "diffusers", "single-file"],
                   default="diffusers")
    x.add_argument("--half", action="store_true", help="store weights in float16")
    v = sub.add_parser("serve", help="HTTP server: OpenAI Images API, A1111 API, web page")
    v.add_argument("--models-dir", default=None, help="serve every model in this folder "
                   "(default: the bundled models)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                   "(default: $NANODIFFUSION_API_KEY, else none)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--max-queue", type=int, default=8, help="waiting jobs per model")
    v.add_argument("--max-side", type=int, default=1024)
    v.add_argument("--max-n", type=int, default=8)
    v.add_argument("--max-steps", type=int, default=150)
    return ap


def _save_images(images, out, args, grid):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [
        out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(images))]
    for im, p in zip(images, paths):
        from .pnginfo import save_png

        save_png(im, p)
        print(p)
    if grid and len(images) > 1:
        from .pipeline import make_grid

        g = out.with_name(f"{out.stem}-grid{out.suffix}")
        make_grid(images).save(g)
        print(g)


def _progress(total_hint="steps"):
    from tqdm import tqdm

    bar = {}

    def cb(info):
        if "bar" not in bar:
            bar["bar"] = tqdm(total=info["total"], desc="denoise", unit="step", leave=False,
                              disable=None)
        bar["bar"].update(1)
        if info["step"] + 1 >= info["total"]:
            bar.pop("bar").close()
    return cb


def cmd_sample(args):
    import nanodiffusion
    from PIL import Image

    pipe = nanodiffusion.load(args.model, device=args.device)
    common = dict(negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                  guidance=args.guidance, sampler=args.sampler, n=args.n, callback=_progress())
    if args.command == "generate":
        images = pipe.generate(args.prompt, width=args.width, height=args.height, **common)
    elif args.command == "img2img":
        images = pipe.img2img(args.prompt, Image.open(args.image), strength=args.strength,
                              **common)
    else:
        images = pipe.inpaint(args.prompt, Image.open(args.image), Image.open(args.mask),
                              strength=args.strength, **common)
    _save_images(images, args.out, args, args.grid)


def cmd_train(args):
    from .train import TrainConfig, load_recipe, main_ddp, train

    over = {"data": args.data, "out": args.out, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "device": args.device,
            "num_workers": args.workers}
    if args.recipe:
        cfg = load_recipe(args.recipe, args.part, **over)
    else:
        cfg = TrainConfig(part=args.part, **{k: v for k, v in over.items() if v is not None})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        main_ddp(cfg)
    else:
        train(cfg)


def cmd_eval(args):
    from .evaluate import report

    report(args.path, n=args.n)


def cmd_export(args):
    import torch

    import nanodiffusion

    pipe = nanodiffusion.load(args.model)
    dtype = torch.float16 if args.half else None
    if args.format == "nanodiffusion":
        from .loading import save_pipeline

        save_pipeline(pipe, args.out, dtype=dtype)
    else:
        from .convert_folders import save_diffusers_folder, save_single_file

        fn = save_diffusers_folder if args.format == "diffusers" else save_single_file
        fn(pipe, args.out, dtype=dtype)
    print(args.out)


def cmd_serve(args):
    try:
        from .server import Limits, serve
    except ImportError as e:
        raise ValueError(f"the server needs its extra: pip install 'nanodiffusion[server]' "
                         f"({e})") from None
    limits = Limits(max_side=args.max_side, max_n=args.max_n, max_steps=args.max_steps,
                    max_queue=args.max_queue)
    serve(models_dir=args.models_dir, host=args.host, port=args.port, device=args.device,
          api_key=args.api_key or os.environ.get("NANODIFFUSION_API_KEY") or None,
          limits=limits)


def main(argv=None):
    args = _parser().parse_args(argv)
    handlers = {"generate": cmd_sample, "img2img": cmd_sample, "inpaint": cmd_sample,
                "train": cmd_train, "eval": cmd_eval, "export": cmd_export,
                "serve": cmd_serve}
    try:
        handlers[args.command](args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
