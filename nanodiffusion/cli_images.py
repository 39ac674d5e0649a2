"""The command line's image commands: generate, img2img and inpaint (either kind of model),
unCLIP's vary, edit, interpolate and describe, and info (the parameters PNGs carry). The
parser is cli.py's; what is read and written, cli_io.py's."""
import sys
from pathlib import Path

from . import cli_embeddings, cli_io, cli_lora


def cmd_sample(args):
    from .pipelines.unclip import UnCLIPPipeline

    best_of = getattr(args, "best_of", 1)
    if args.save_steps and best_of != 1:
        raise ValueError(f"--save-steps shows one image's steps, so it does not go with "
                         f"--best-of {best_of} (several candidates per image)")
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, getattr(args, "pipeline", "sd"), args.dtype,
                 args.prediction_type, args.tiny_decoder, args.low_memory)
    cli_lora.attach(pipe, args)
    cli_embeddings.attach(pipe, args)
    callback, frames = cli_io.progress(), None
    if args.save_steps:
        callback, frames = cli_io.step_frames(callback)
    common = dict(negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                  guidance=args.guidance, sampler=args.sampler, n=args.n, callback=callback,
                  preview=args.save_steps or False, clip_skip=args.clip_skip,
                  prompt_syntax=args.prompt_syntax)
    if isinstance(pipe, UnCLIPPipeline):
        if common.pop("preview"):
            raise ValueError("--save-steps is for Stable Diffusion models, not unCLIP ones")
        if args.guidance_rescale:
            raise ValueError("--guidance-rescale is for Stable Diffusion models, not unCLIP ones")
        if args.eta is not None:
            raise ValueError("--eta is for Stable Diffusion models, not unCLIP ones")
        if args.vae_decoder != "full":
            raise ValueError("--vae-decoder tiny is for Stable Diffusion models, not unCLIP ones")
        if args.vae is not None:
            raise ValueError("--vae is for Stable Diffusion models, not unCLIP ones")
        if args.deepcache is not None:
            raise ValueError("--deepcache is for Stable Diffusion models, not unCLIP ones")
        if args.tome is not None:
            raise ValueError("--tome is for Stable Diffusion models, not unCLIP ones")
    else:
        common.update(eta=args.eta, guidance_rescale=args.guidance_rescale,
                      vae_decoder=args.vae_decoder,
                      deepcache=args.deepcache, tome=args.tome)
        if args.vae is not None:
            pipe.load_vae(args.vae)
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


KINDS = {"sd": "a Stable Diffusion model", "unclip": "an unCLIP model"}


def _load(model, device, kind=None, dtype="float32", prediction_type=None, tiny_decoder=None,
          low_memory=False):
    """The model at `model` (None: the bundled default of `kind`); with `kind` ("sd" or
    "unclip"), a model of the other kind is refused before its weights are read.
    `prediction_type`: for single files, which do not record it; `tiny_decoder`: a path to
    attach one from; `low_memory`: loaded so (its parts never all in memory together)."""
    import torch

    from .loading import load_pipeline, model_kind

    model = model or ("shapes-unclip" if kind == "unclip" else "shapes")
    actual = kind and model_kind(model)
    if actual != kind:
        hint = " (model.json kind \"unclip\", as a training run's model-unclip folder)"
        raise ValueError(f"{model!r} is {KINDS[actual]}; this needs {KINDS[kind]}"
                         + (hint if kind == "unclip" else ""))
    if (dtype != "float32" or low_memory) and (actual or model_kind(model)) == "unclip":
        raise ValueError("--low-memory is for Stable Diffusion models, not unCLIP ones"
                         if low_memory else f"--dtype {dtype}: unCLIP models run in float32 only")
    return load_pipeline(model, device=device, dtype=getattr(torch, dtype),
                         prediction_type=prediction_type, tiny_decoder=tiny_decoder,
                         low_memory=low_memory)


def _unclip_kwargs(args):
    """The sampling options of vary, edit and interpolate, as their pipeline methods take them
    (None: the model's default, which the pipeline fills in)."""
    return dict(seed=args.seed, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                callback=cli_io.progress())


def cmd_vary(args):
    image = cli_io.open_image(args.image)
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, "unclip")
    images = pipe.variations(image, n=args.n, caption=args.caption, **_unclip_kwargs(args))
    cli_io.save_images(images, args.out, args.grid)


def cmd_edit(args):
    image = cli_io.open_image(args.image)
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, "unclip")
    images = pipe.edit(image, args.source, args.target, strength=args.strength, n=args.n,
                       **_unclip_kwargs(args))
    cli_io.save_images(images, args.out, args.grid)


def cmd_interpolate(args):
    """The frames as one strip (up to 8 a row) at --out, carrying the first frame's parameters
    as AUTOMATIC1111's grids do; with --save-frames each frame too."""
    from .pipelines.images import make_grid

    a, b = cli_io.open_image(args.a), cli_io.open_image(args.b)
    cli_io.check_out(args.out)
    pipe = _load(args.model, args.device, "unclip")
    frames = pipe.interpolate(a, b, frames=args.frames, **_unclip_kwargs(args))
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


HANDLERS = {"generate": cmd_sample, "img2img": cmd_sample, "inpaint": cmd_sample,
            "info": cmd_info, "vary": cmd_vary, "edit": cmd_edit,
            "interpolate": cmd_interpolate, "describe": cmd_describe}
