"""Command line: a thin shell from arguments to the pipeline, training and evaluation functions."""
import argparse
import sys

from . import DTYPES, cli_embeddings, cli_io, cli_lora


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
                   "dpmpp-2m-karras, dpmpp-2m-sde, dpmpp-2m-sde-karras, unipc, lcm or tcd "
                   "(default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, or an accelerator torch knows "
                   "(default: cpu)")


def _add_sampling_args(p):
    _add_common_sampling(p)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="diffusers' guidance_rescale, 0..1 (0.7 for v-prediction models on a "
                   "zero-terminal-SNR schedule; Stable Diffusion models only)")
    p.add_argument("--eta", type=float, default=None, help="the sampler's noise, 0..1, for "
                   "ddim, euler-ancestral and tcd (TCD's gamma; 0: deterministic) (default: "
                   "the model's with its own sampler, else the sampler's; Stable Diffusion "
                   "models only)")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N", help="the text encoder's "
                   "N-th layer from the end (AUTOMATIC1111's Clip skip: 1, the default, is the "
                   "last; Stable Diffusion models only)")
    p.add_argument("--no-prompt-syntax", dest="prompt_syntax", action="store_false",
                   help="read prompts as literal text, not in AUTOMATIC1111's syntax of "
                   "(word:1.3), [word], BREAK (docs/prompts.md)")
    p.add_argument("--deepcache", type=int, default=None, metavar="N", help="DeepCache, an "
                   "approximate path: the UNet's deep blocks run every N-th step only, its "
                   "shallow ones on the steps between (faster, and the images change: "
                   "docs/deepcache.md); 1 or none: exact (Stable Diffusion models only)")
    p.add_argument("--tome", type=float, default=None, metavar="RATIO", help="token merging, "
                   "an approximate path: the share RATIO (0..0.9) of the tokens at the UNet's "
                   "finest attention level merged before its self-attention (AUTOMATIC1111's "
                   "Token merging ratio; faster at large sizes, and the images change: "
                   "docs/tome.md); 0 or none: exact (Stable Diffusion models only)")
    p.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--out", default="out.png", help="output PNG (default out.png; OUT-1.png, "
                   "OUT-2.png ... when several)")
    p.add_argument("--grid", action="store_true", help="also write a contact sheet")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations "
                   "of a Stable Diffusion model (bfloat16: about 2x faster on CPUs with "
                   "AVX-512 BF16 or AMX, half the weights' memory everywhere, computed in "
                   "float32 on AVX2-only CPUs; float16: half the memory too, computed in "
                   "float32 on CPUs without AMX-FP16, a little slower than float32)")
    p.add_argument("--low-memory", action="store_true", help="keep the text encoder's, the "
                   "UNet's and the VAE's weights on disk except while each runs (same images, "
                   "but latents above 64 per side, 512 px for SD, are decoded in tiles; for "
                   "machines with little memory; Stable Diffusion models only)")
    p.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNet of a single-file checkpoint predicts, which the file "
                   "does not record (default: found as diffusers finds it, or from a "
                   "MODEL.yaml beside the file)")
    _add_tiny_decoder(p)
    _add_vae(p)
    cli_lora.add_args(p)
    cli_embeddings.add_args(p)


def _add_vae(p):
    p.add_argument("--vae", default=None, metavar="PATH", help="a VAE to use in place of the "
                   "model's own (AUTOMATIC1111's --vae-path): a single file as downloaded "
                   "(vae-ft-mse-840000-ema-pruned.safetensors, .ckpt, .pt) or a diffusers VAE "
                   "folder; Stable Diffusion models only")


def _add_tiny_decoder(p):
    p.add_argument("--vae-decoder", default="full", choices=("full", "tiny"),
                   help="what decodes the final image: the model's VAE, or its tiny decoder "
                   "(TAESD; live previews use it whenever the model has one) (default full)")
    p.add_argument("--tiny-decoder", default=None, metavar="PATH", help="a tiny decoder to "
                   "attach: diffusers' AutoencoderTiny folder, madebyollin's "
                   "taesd_decoder.safetensors, or ours (default: the model's own, if any)")


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
    _add_sd_commands(sub)
    _add_unclip_commands(sub)
    _add_model_commands(sub)
    i = sub.add_parser("info", help="the generation parameters PNGs carry")
    i.add_argument("images", nargs="+")
    i.add_argument("--json", action="store_true", help="print them parsed, as JSON")
    return ap


def _add_sd_commands(sub):
    """generate (either kind of model), img2img and inpaint."""
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


# ---- unCLIP: variations, text-diff edits, interpolation, captions --------------------------
def _add_unclip_commands(sub):
    """vary, edit, interpolate and describe."""
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


def _add_model_commands(sub):
    """train, eval, export and serve."""
    t = sub.add_parser("train", help="train one part (clip, vae, unet, prior, decoder) from "
                       "zero, distil a model into a few-step one (lcm) or its VAE decoder "
                       "into a tiny one (tiny-decoder), or fine-tune a model you have (unet "
                       "--base, lora)")
    t.add_argument("part", choices=["clip", "vae", "unet", "prior", "decoder", "lcm", "dmd",
                                    "tiny-decoder", "lora"])
    _add_finetune_args(t)
    t.add_argument("--teacher", default=None, help="lcm, dmd: the model to distil (a name, "
                   "folder or file; default <out>/model); tiny-decoder: the model whose VAE to "
                   "distil (default <out>/vae)")
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
    e.add_argument("--seed", type=int, default=0, help="which eval-split prompts and image "
                   "seeds (default 0; another seed judges other prompts: a second sample)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--best-of", type=int, default=1,
                   help="also score single objects with best-of-N CLIP reranking")
    e.add_argument("--best-of-prompts", type=int, default=None, metavar="K",
                   help="the best-of-N comparison on the first K single prompts (default --n)")
    e.add_argument("--out", default=None, help="report path (default <model>/report.json)")
    e.add_argument("--steps", type=int, default=None, help="sampling steps (default: the "
                   "model's)")
    e.add_argument("--sampler", default=None, help="(default: the model's)")
    e.add_argument("--guidance", type=float, default=None, help="(default: the model's)")
    e.add_argument("--eta", type=float, default=None, help="the sampler's eta (default: the "
                   "model's)")
    e.add_argument("--deepcache", type=int, default=None, metavar="N", help="evaluate "
                   "DeepCache's approximate path with interval N (default: the exact path)")
    e.add_argument("--tome", type=float, default=None, metavar="RATIO", help="evaluate "
                   "token merging's approximate path at RATIO (default: the exact path)")
    e.add_argument("--dtype", default="float32", choices=DTYPES, help="evaluate a Stable "
                   "Diffusion model loaded in this dtype, as generate --dtype runs it")
    _add_tiny_decoder(e)
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
    v.add_argument("--low-memory", action="store_true", help="Stable Diffusion models keep "
                   "their text encoder's, UNet's and VAE's weights on disk except while each "
                   "runs (images above 512 px for SD are decoded in tiles)")
    v.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNets of the single-file checkpoints served predict "
                   "(default: found per file, as diffusers finds it)")
    _add_vae(v)
    v.add_argument("--max-queue", type=int, default=8, help="waiting jobs per model")
    v.add_argument("--max-batch", type=int, default=1, help="run waiting txt2img jobs of "
                   "the same settings as one batch of up to N images: more images/s, pixels "
                   "may differ from a lone run's by a level (default 1: each job alone)")
    v.add_argument("--max-side", type=int, default=1024)
    v.add_argument("--max-n", type=int, default=8)
    v.add_argument("--max-steps", type=int, default=150)


def _add_finetune_args(t):
    t.add_argument("--base", default=None, help="lora, unet: the Stable Diffusion model to "
                   "fine-tune (a bundled name, a model folder or a single file); dmd: the "
                   "few-step student (default <out>/model-lcm); it is never written")
    t.add_argument("--size", type=int, default=None, help="the training images' side in "
                   "pixels (default: the recipe's, else 64)")
    t.add_argument("--rank", type=int, default=None, help="lora: the UNet's LoRA rank "
                   "(default 16)")
    t.add_argument("--alpha", type=float, default=None, help="lora: kohya's alpha, the LoRA "
                   "scaled by alpha / rank (default: the rank)")
    t.add_argument("--text-encoder-rank", type=int, default=None, help="lora: the text "
                   "encoder's LoRA rank (default 0: the text encoder is not trained)")
    t.add_argument("--lora-targets", default=None, choices=("transformer", "attention"),
                   help="lora: the UNet's modules: every Linear and 1x1 conv of its "
                   "transformer blocks (kohya's; the default), or to_q/to_k/to_v/to_out only")


# The commands live in two modules, imported when one of their commands runs (the parser
# above imports no torch): cli_images.py makes and reads images, cli_models.py trains,
# evaluates, exports and serves models.
MODEL_COMMANDS = ("train", "eval", "export", "serve")


def main(argv=None):
    args = _parser().parse_args(argv)
    if getattr(args, "low_memory", False):  # before torch is imported (malloc.py)
        from .malloc import torch_huge_pages

        torch_huge_pages()
    if args.command in MODEL_COMMANDS:
        from .cli_models import HANDLERS
    else:
        from .cli_images import HANDLERS
    try:
        rc = HANDLERS[args.command](args)
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
