"""Command line: a thin shell from arguments to the pipeline, training and evaluation functions."""
import argparse
import os
import sys
from pathlib import Path

from . import DTYPES, cli_io


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _add_common_sampling(p, model_help="model folder, single file, hub id, or a bundled name "
                         "(default: the bundled shapes model)"):
    """The settings every image command takes; each default is the model's own."""
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--seed", type=int, default=None, help="random seed, 0 .. 2**63-1 (default: "
                   "a random one; the PNG records it)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the "
                   "model's; the bundled models: 15 and 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance "
                   "scale, 0 .. 100; 1 turns it off (default: the model's)")
    p.add_argument("--sampler", default=None, help="ddim, ddpm, pndm, plms, euler, "
                   "euler-karras, euler-exponential, euler-ancestral, heun, lms, dpmpp-2m, "
                   "dpmpp-2m-karras, dpmpp-2m-sde, dpmpp-2m-sde-karras or unipc (default: the "
                   "model's)")
    p.add_argument("--device", default="cpu", help="cpu, or an accelerator torch knows "
                   "(default: cpu)")


def _add_sampling_args(p):
    _add_common_sampling(p)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="diffusers' guidance_rescale, 0..1 (0.7 for v-prediction models on a "
                   "zero-terminal-SNR schedule; Stable Diffusion models only)")
    p.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--out", default="out.png", help="output PNG (default out.png; OUT-1.png, "
                   "OUT-2.png ... when several)")
    p.add_argument("--grid", action="store_true", help="also write a contact sheet")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations "
                   "of a Stable Diffusion model (bfloat16: about 2x faster on CPUs with "
                   "AVX-512 BF16 or AMX; float16 for GPUs)")
    p.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNet of a single-file checkpoint predicts, which the file "
                   "does not record (default: found as diffusers finds it, or from a "
                   "MODEL.yaml beside the file)")


def _port(text):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text!r}")
    return port


def _at_least_one(text):
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return k


def _add_save_steps(p):
    p.add_argument("--save-steps", type=_at_least_one, default=None, metavar="K",
                   help="also write OUT-steps.png: the decoded estimate of every K-th step "
                   "and the final image, side by side")


def _parser():
    ap = argparse.ArgumentParser(prog="nanodiffusion", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    for side in ("width", "height"):
        g.add_argument(f"--{side}", type=int, default=None, help=f"image {side} in pixels, a "
                       "multiple of 8 (of 4 for the bundled models) (default: the model's; "
                       "the bundled models: 64)")
    g.add_argument("--pipeline", choices=["sd", "unclip"], default=None,
                   help="the kind of model --model must be; unclip with no --model uses the "
                   "bundled shapes-unclip (default: whatever --model is)")
    g.add_argument("--best-of", type=int, default=1, metavar="N", help="make N candidates "
                   "per image (seeds SEED .. SEED+N-1) and keep the one CLIP ranks highest "
                   "for the prompt; needs a model with a CLIP image encoder")
    _add_sampling_args(g)
    _add_save_steps(g)
    for name in ("img2img", "inpaint"):
        s = sub.add_parser(name, help=f"{name} from an init image")
        s.add_argument("prompt")
        s.add_argument("--image", required=True, help="the init image (PNG, JPEG, WebP), "
                       "resized down to a multiple of the model's size step")
        if name == "inpaint":
            s.add_argument("--mask", required=True, help="mask image: white = repaint, "
                           "black = keep")
            s.add_argument("--keep-unmasked", action="store_true", help="paste the input's "
                           "exact pixels back outside the mask (AUTOMATIC1111's overlay); "
                           "without it they are the VAE's, as in diffusers")
        strength = 0.6 if name == "img2img" else 1.0
        s.add_argument("--strength", type=float, default=strength, help="how far the init "
                       f"image is noised before denoising, (0, 1]; 1 repaints it all "
                       f"(default {strength})")
        _add_sampling_args(s)
        _add_save_steps(s)
    _add_unclip_commands(sub)
    t = sub.add_parser("train", help="train one part (clip, vae, unet, prior, decoder) from "
                       "zero, or distil a model into a few-step one (lcm)")
    t.add_argument("part", choices=["clip", "vae", "unet", "prior", "decoder", "lcm"])
    t.add_argument("--teacher", default=None, help="lcm: the model to distil (a name, folder "
                   "or file; default <out>/model)")
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
    e.add_argument("--device", default="cpu")
    e.add_argument("--best-of", type=int, default=1,
                   help="also score single objects with best-of-N CLIP reranking")
    e.add_argument("--best-of-prompts", type=int, default=None, metavar="K",
                   help="the best-of-N comparison on the first K single prompts (default --n)")
    e.add_argument("--out", default=None, help="report path (default <model>/report.json)")
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
    v.add_argument("--port", type=_port, default=8000, help="(default 8000)")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                   "(default: $NANODIFFUSION_API_KEY, else none)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtype", default="float32", choices=DTYPES, help="Stable Diffusion "
                   "models' precision (unCLIP models stay float32)")
    v.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNets of the single-file checkpoints served predict "
                   "(default: found per file, as diffusers finds it)")
    v.add_argument("--max-queue", type=int, default=8, help="waiting jobs per model")
    v.add_argument("--max-side", type=int, default=1024)
    v.add_argument("--max-n", type=int, default=8)
    v.add_argument("--max-steps", type=int, default=150)
    i = sub.add_parser("info", help="the generation parameters PNGs carry")
    i.add_argument("images", nargs="+")
    i.add_argument("--json", action="store_true", help="print them parsed, as JSON")
    return ap


def cmd_sample(args):
    from .pipelines.unclip import UnCLIPPipeline

    best_of = getattr(args, "best_of", 1)
    if args.save_steps and best_of != 1:
        raise ValueError(f"--save-steps shows one image's steps, so it does not go with "
                         f"--best-of {best_of} (several candidates per image)")
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, getattr(args, "pipeline", "sd"), args.dtype,
                 args.prediction_type)
    callback, frames = cli_io.progress(), None
    if args.save_steps:
        callback, frames = cli_io.step_frames(callback)
    common = dict(negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                  guidance=args.guidance, sampler=args.sampler, n=args.n, callback=callback,
                  preview=args.save_steps or False)
    if isinstance(pipe, UnCLIPPipeline):
        if common.pop("preview"):
            raise ValueError("--save-steps is for Stable Diffusion models, not unCLIP ones")
        if args.guidance_rescale:
            raise ValueError("--guidance-rescale is for Stable Diffusion models, not unCLIP ones")
    else:
        common["guidance_rescale"] = args.guidance_rescale
    if args.command == "generate":
        images = pipe.generate(args.prompt, width=args.width, height=args.height,
                               best_of=best_of, **common)
    elif args.command == "img2img":
        images = pipe.img2img(args.prompt, cli_io.open_image(args.image),
                              strength=args.strength, **common)
    else:
        images = pipe.inpaint(args.prompt, cli_io.open_image(args.image),
                              cli_io.open_image(args.mask), strength=args.strength,
                              keep_unmasked=args.keep_unmasked, **common)
    paths = cli_io.save_images(images, args.out, args.grid)
    if frames is not None:
        cli_io.save_strips(frames, images, paths)


def cmd_info(args):
    """Print the parameters of each image; 1 when one has none, 2 when one is unreadable."""
    import json

    from .pnginfo import parse_parameters, read_parameters

    rc, found = 0, []
    for path in args.images:
        try:
            text = read_parameters(path)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 2
            continue
        if text is None:
            print(f"{path}: no generation parameters (no 'parameters' text chunk)",
                  file=sys.stderr)
            rc = max(rc, 1)
        elif args.json:
            found.append({"file": path, **parse_parameters(text)})
        else:
            print(f"{path}:\n{text}\n" if len(args.images) > 1 else text)
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
    return rc


# ---- unCLIP: variations, text-diff edits, interpolation, captions --------------------------
def _add_unclip_commands(sub):
    v = sub.add_parser("vary", help="unCLIP variations of an image")
    v.add_argument("image", help="the image (PNG, JPEG, WebP)")
    v.add_argument("-n", type=int, default=4, help="number of variations")
    v.add_argument("--caption", default="auto", help="what a decoder that reads text is told: "
                   "auto (the caption CLIP ranks first for the image), your own, or \"\" "
                   "(the image embedding alone)")
    e = sub.add_parser("edit", help="unCLIP text diff: move an image from one caption to another")
    e.add_argument("image", help="the image (PNG, JPEG, WebP)")
    e.add_argument("--from", dest="source", default="auto", help="a caption of the image "
                   "(default: auto, the caption CLIP ranks first for it)")
    e.add_argument("--to", dest="target", required=True, help="the caption it should match")
    e.add_argument("--strength", type=float, default=1.0, help="how far to move, in [0, 1]")
    e.add_argument("-n", type=int, default=1, help="number of images")
    i = sub.add_parser("interpolate", help="unCLIP morph from one image to another")
    i.add_argument("a")
    i.add_argument("b")
    i.add_argument("--frames", type=int, default=8, help="images along the way, ends included")
    i.add_argument("--save-frames", action="store_true",
                   help="also write each frame as OUT-1.png, OUT-2.png, ...")
    unclip_model = ("an unCLIP model folder or bundled name (default: the bundled "
                    "shapes-unclip)")
    for p, out in ((v, "variations.png"), (e, "edit.png"), (i, "morph.png")):
        _add_common_sampling(p, unclip_model)
        if p is i:
            p.add_argument("--out", default=out, help=f"the frames' strip (default {out})")
        else:
            p.add_argument("--out", default=out, help=f"(default {out}; OUT-1.png, OUT-2.png "
                           "... when several)")
            p.add_argument("--grid", action="store_true", help="also write a contact sheet")
    d = sub.add_parser("describe", help="the captions CLIP ranks highest for an image")
    d.add_argument("image", help="the image (PNG, JPEG, WebP)")
    d.add_argument("--top", type=int, default=None, help="how many captions (default 5)")
    d.add_argument("--candidates", default=None, help="a text file of captions, one per line "
                   "(default: every caption of the shapes grammar)")
    d.add_argument("--model", default=None, help=unclip_model)
    d.add_argument("--device", default="cpu", help="(default: cpu)")


KINDS = {"sd": "a Stable Diffusion model", "unclip": "an unCLIP model"}


def _load(model, device, kind=None, dtype="float32", prediction_type=None):
    """The model at `model` (None: the bundled default of `kind`); with `kind` ("sd" or
    "unclip"), a model of the other kind is refused before its weights are read.
    `prediction_type`: for single files, which do not record it."""
    import torch

    from .loading import load_pipeline, model_kind

    model = model or ("shapes-unclip" if kind == "unclip" else "shapes")
    actual = kind and model_kind(model)
    if actual != kind:
        hint = " (model.json kind \"unclip\", as a training run's model-unclip folder)"
        raise ValueError(f"{model!r} is {KINDS[actual]}; this needs {KINDS[kind]}"
                         + (hint if kind == "unclip" else ""))
    if dtype != "float32" and (actual or model_kind(model)) == "unclip":
        raise ValueError(f"--dtype {dtype}: unCLIP models run in float32 only")
    return load_pipeline(model, device=device, dtype=getattr(torch, dtype),
                         prediction_type=prediction_type)


def _settings(args):
    return dict(seed=args.seed, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                callback=cli_io.progress())


def cmd_vary(args):
    image = cli_io.open_image(args.image)
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, "unclip")
    images = pipe.variations(image, n=args.n, caption=args.caption, **_settings(args))
    cli_io.save_images(images, args.out, args.grid)


def cmd_edit(args):
    image = cli_io.open_image(args.image)
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, "unclip")
    images = pipe.edit(image, args.source, args.target, strength=args.strength, n=args.n,
                       **_settings(args))
    cli_io.save_images(images, args.out, args.grid)


def cmd_interpolate(args):
    """The frames as one strip (up to 8 a row) at --out, carrying the first frame's parameters
    as AUTOMATIC1111's grids do; with --save-frames each frame too."""
    from .pipelines.images import make_grid

    a, b = cli_io.open_image(args.a), cli_io.open_image(args.b)
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, "unclip")
    frames = pipe.interpolate(a, b, frames=args.frames, **_settings(args))
    strip = make_grid(frames, rows=-(-len(frames) // 8))
    strip.info["parameters"] = frames[0].info["parameters"]
    cli_io.save_images([strip], args.out, False)
    if args.save_frames:
        cli_io.save_images(frames, args.out, False)


def cmd_describe(args):
    """Print `score  caption` lines, the highest CLIP cosine similarity first."""
    image = cli_io.open_image(args.image)
    candidates = None
    if args.candidates is not None:
        path = Path(args.candidates)
        if not path.is_file():
            raise FileNotFoundError(f"no candidates file at {args.candidates!r}")
        candidates = [c.strip() for c in path.read_text(encoding="utf-8").splitlines()]
        candidates = [c for c in candidates if c]
        if not candidates:
            raise ValueError(f"{args.candidates!r} holds no captions (one per line expected)")
    pipe = _load(args.model, args.device, "unclip")
    top = args.top if args.top is not None else min(5, len(candidates or range(5)))
    for caption, score in pipe.describe(image, candidates, top=top,
                                        callback=cli_io.progress("encode captions", "chunk")):
        print(f"{score:.4f}  {caption}")


def cmd_train(args):
    import signal

    from .train import TrainConfig, WriteFailed, load_recipe, main_ddp, train

    over = {"data": args.data, "out": args.out, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "device": args.device,
            "num_workers": args.workers, "teacher": args.teacher}
    if args.recipe:
        cfg = load_recipe(args.recipe, args.part, **over)
    else:
        cfg = TrainConfig(part=args.part, **{k: v for k, v in over.items() if v is not None})
    try:
        records = main_ddp(cfg) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else train(cfg)
    except WriteFailed as e:  # full disk, read-only folder: the message says what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C before the loop's handler, or a second one
        print(f"error: interrupted ({e or 'SIGINT'}); the last checkpoint on disk is kept",
              file=sys.stderr)
        return 128 + signal.SIGINT
    if records.stopped_by:  # saved after SIGINT / SIGTERM: exit 128 + n, as shells report it
        if os.environ.get("RANK", "0") == "0":
            print(f"{signal.Signals(records.stopped_by).name}: saved at step "
                  f"{records[-1]['step']}; run the same command to resume", file=sys.stderr)
        return 128 + records.stopped_by


def cmd_eval(args):
    from .eval.report import report

    report(args.path, n=args.n, device=args.device, best_of=args.best_of,
           best_of_prompts=args.best_of_prompts, out=args.out)


def cmd_export(args):
    import torch

    import nanodiffusion

    pipe = nanodiffusion.load(args.model)
    dtype = torch.float16 if args.half else None
    if args.format == "nanodiffusion":
        from .formats.ours import save_pipeline

        save_pipeline(pipe, args.out, dtype=dtype)
    else:
        from .formats.diffusers import save_diffusers_folder
        from .formats.single_file import save_single_file

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
          limits=limits, dtype=args.dtype, prediction_type=args.prediction_type)


def main(argv=None):
    args = _parser().parse_args(argv)
    handlers = {"generate": cmd_sample, "img2img": cmd_sample, "inpaint": cmd_sample,
                "train": cmd_train, "eval": cmd_eval, "export": cmd_export,
                "serve": cmd_serve, "info": cmd_info, "vary": cmd_vary, "edit": cmd_edit,
                "interpolate": cmd_interpolate, "describe": cmd_describe}
    try:
        rc = handlers[args.command](args)
    except cli_io.OutputError as e:  # the work is done: only the writing failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad input, a missing or unreadable file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
