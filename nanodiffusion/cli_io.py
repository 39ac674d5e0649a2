"""What the command line reads and writes: images in, PNGs out (with their parameters, and
kept somewhere when the output cannot be written), and progress bars."""
import tempfile
from pathlib import Path


def check_out(out):
    """Fail before any work (exit 2) when `out`'s folder cannot be made or written: a regular
    file in the path, a read-only filesystem, no permission."""
    folder = Path(out).parent
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"cannot write --out {out}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write --out {out}: {e.strerror or e} ({folder})") from None


class OutputError(OSError):
    """The output could not be written; exit code 1 after the images were saved elsewhere."""


def save_images(images, out, grid):
    """Write the images (and a grid); if `out` fails now (disk full, folder gone), the
    finished images go to a temporary folder instead, and the error says where."""
    out = Path(out)
    try:
        return write_images(images, out, grid)
    except OSError as e:
        rescue = Path(tempfile.mkdtemp(prefix="nanodiffusion-"))
        write_images(images, rescue / out.name, grid)
        raise OutputError(f"cannot write {out}: {e.strerror or e}; the images are saved in "
                          f"{rescue} instead") from None


def write_images(images, out, grid):
    from .pnginfo import save_png

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [
        out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(images))]
    for im, p in zip(images, paths):
        save_png(im, p)
        print(p)
    if grid and len(images) > 1:
        from .pipelines.images import make_grid

        g = out.with_name(f"{out.stem}-grid{out.suffix}")
        save_png(make_grid(images), g)
        print(g)
    return paths


def step_frames(callback):
    """`callback` plus the keeping of the previews the pipeline decodes (preview=K): a list,
    one entry per kept step, of the n images' estimates. The last step's is left out: the
    final image stands at the end of the strip."""
    frames = []

    def cb(info):
        callback(info)
        if "preview" in info and info["step"] < info["total"] - 1:
            frames.append(info["preview"])
    return cb, frames


def save_strips(frames, images, paths):
    """OUT-steps.png per image: its estimate at every kept step, then the final image; it
    carries the image's parameters too."""
    from .pipelines.images import make_grid
    from .pnginfo import save_png

    for i, (im, p) in enumerate(zip(images, paths)):
        strip = make_grid([f[i] for f in frames] + [im], rows=1)
        strip.info["parameters"] = im.info.get("parameters")
        path = p.with_name(f"{p.stem}-steps{p.suffix}")
        save_png(strip, path)
        print(path)


def progress(desc="denoise", unit="step"):
    """A step callback that shows a progress bar (on a terminal) for each run it sees."""
    from tqdm import tqdm

    bar = {}

    def cb(info):
        if "bar" not in bar:
            bar["bar"] = tqdm(total=info["total"], desc=desc, unit=unit, leave=False,
                              disable=None)
        bar["bar"].update(1)
        if info["step"] + 1 >= info["total"]:
            bar.pop("bar").close()
    return cb


def open_image(path):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image file at {path!r}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path!r} is not an image file PIL can read ({e})") from None
    return image
