"""The command line's textual inversion options of generate, img2img and inpaint: `--embedding
PATH` (repeatable) and `--embeddings-dir`, the folder whose embeddings prompts name (A1111's
embeddings/). The parser's half imports no torch (cli.py builds the parser without it)."""


def add_args(p):
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual inversion embedding (AUTOMATIC1111 .pt / .safetensors, "
                   "diffusers learned_embeds), used by its file name in the prompt and the "
                   "negative prompt; repeat for several. Stable Diffusion models only")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR", help="the folder whose "
                   "embeddings prompts name by their file names (A1111's embeddings/) "
                   "(default: embeddings/ in the folder that holds --model, A1111's "
                   "embeddings/ for a model in models/Stable-diffusion/, else ./embeddings)")


def attach(pipe, args):
    """Load args.embedding into `pipe` and give it its embeddings folder; --embedding on an
    unCLIP model is an error."""
    from .pipelines.embeddings import default_folder
    from .pipelines.sd import Pipeline

    if not isinstance(pipe, Pipeline):
        if args.embedding:
            raise ValueError("--embedding is for Stable Diffusion models, not unCLIP ones")
        return
    pipe.embeddings_dir = args.embeddings_dir or default_folder(args.model)
    for path in args.embedding:
        pipe.load_embedding(path)
