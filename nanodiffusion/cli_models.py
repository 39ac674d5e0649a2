"""The command line's model commands: train a part, eval a run or model, export a model in
another format, serve models over HTTP. The parser is cli.py's."""
import os
import sys


def cmd_train(args):
    import signal

    from .train import TrainConfig, WriteFailed, load_recipe, main_ddp, train

    over = {"data": args.data, "out": args.out, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "device": args.device,
            "num_workers": args.workers, "teacher": args.teacher, "base": args.base,
            "image_size": args.size, "lora_rank": args.rank, "lora_alpha": args.alpha,
            "lora_text_encoder_rank": args.text_encoder_rank, "lora_targets": args.lora_targets}
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

    report(args.path, n=args.n, seed=args.seed, device=args.device, best_of=args.best_of,
           best_of_prompts=args.best_of_prompts, out=args.out, vae_decoder=args.vae_decoder,
           tiny_decoder=args.tiny_decoder, steps=args.steps, sampler=args.sampler,
           guidance=args.guidance, eta=args.eta, deepcache=args.deepcache, tome=args.tome,
           dtype=args.dtype)


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
                    max_queue=args.max_queue, max_batch=args.max_batch)
    serve(models_dir=args.models_dir, host=args.host, port=args.port, device=args.device,
          api_key=args.api_key or os.environ.get("NANODIFFUSION_API_KEY") or None,
          limits=limits, dtype=args.dtype, prediction_type=args.prediction_type, vae=args.vae,
          low_memory=args.low_memory)


HANDLERS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "serve": cmd_serve}
