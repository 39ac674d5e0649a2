"""--low-memory (issue 23 item 2): the text encoder's, the UNet's and the VAE's weights stay on
disk except while they run, never two of them in memory together (a low-memory load included),
and every image is the one the default makes: txt2img, img2img, inpainting, best-of-N, a
text-encoder LoRA fused and taken off, through Python, the CLI and `serve --low-memory`; but for
latents larger than offload.TILE per side, decoded in tiles."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nanodiffusion
import tiny_sd
from front_door import run_cli, served
from proc_maps import linux_only, mapping
from nanodiffusion import malloc
from nanodiffusion.pipelines import offload

PROMPT = "a red circle above a blue square"


def held(module):
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def pair():
    return nanodiffusion.load("shapes"), nanodiffusion.load("shapes", low_memory=True)


def test_a_low_memory_load_builds_one_part_at_a_time(monkeypatch, pair):
    """Each module goes to disk as it is built, before the next is read (the whole CLIP and
    the tiny decoder come back after: not parts); a call reads one part at a time (no LoRA
    to fuse: the text encoder and the UNet are not read in together)."""
    from nanodiffusion import loading

    built, in_memory = [], []
    to_disk, load, read_parts = offload.to_disk, offload.DiskWeights._load, loading.read_parts

    def spy_to_disk(module):
        if not offload.on_disk(module):
            in_memory.append([held(m) > 0 for m in built])  # those built before
            built.append(module)
        to_disk(module)

    def spy_read_parts(*args):
        parts = read_parts(*args)
        assert len(built) == 4 and not any(map(any, in_memory)), in_memory
        assert all(held(m) == 0 for m in built)  # clip, UNet, VAE, tiny decoder
        return parts

    def spy_load(self):
        load(self)
        in_memory.append([held(getattr(low, k)) > 0 for k in offload.PARTS].count(True) == 1)

    monkeypatch.setattr(offload, "to_disk", spy_to_disk)
    monkeypatch.setattr(loading, "read_parts", spy_read_parts)
    low = nanodiffusion.load("shapes", low_memory=True)
    assert low.low_memory and all(held(getattr(low, k)) == 0 for k in offload.PARTS)
    assert held(low.clip.vision_model) > 0 and held(low.tiny_decoder) > 0
    in_memory.clear()
    monkeypatch.setattr(offload.DiskWeights, "_load", spy_load)
    image = low.generate(PROMPT, seed=3)[0]
    assert len(in_memory) == 3 and all(in_memory), in_memory  # text encoder, UNet, VAE
    assert image.tobytes() == pair[0].generate(PROMPT, seed=3)[0].tobytes()


def test_bfloat16_the_same_in_their_layouts():
    """In bfloat16 the UNet's convolutions run channels-last too (models/unet.for_inference):
    each part is read back in the layout it was given, so the images are the same."""
    plain = nanodiffusion.load("shapes", dtype=torch.bfloat16)
    low = nanodiffusion.load("shapes", dtype=torch.bfloat16, low_memory=True)
    a, b = (p.generate(PROMPT, seed=5, n=2) for p in (plain, low))
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert held(low.unet) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_low_memory_load_writes_each_part_once(monkeypatch, dtype):
    """The UNet and the VAE are laid out for inference (channels-last where their
    for_inference says) before they first go to disk, so the pipeline does not read them back
    to lay them out and write them again: each part's file is written once and none is read
    back while the pipeline is built (SD 1.5 in bfloat16 on a 2-core Zen 3: the load
    13.5-13.8 -> 7.6-8.3 s); the weights are read back in that layout when they run."""
    written, loads = [], []
    write, load = offload._File.write, offload.DiskWeights._load

    def spy(self, tensors):
        written.append(sorted(tensors)[0])
        return write(self, tensors)

    monkeypatch.setattr(offload._File, "write", spy)
    monkeypatch.setattr(offload.DiskWeights, "_load", lambda self, **kw: (
        loads.append(self), load(self, **kw))[1])
    low = nanodiffusion.load("shapes", dtype=getattr(torch, dtype), low_memory=True)
    assert len(written) == len(set(written)), written  # each part's file once
    assert not {id(vars(getattr(low, k))[offload._ATTR]) for k in offload.PARTS} & {
        id(w) for w in loads}
    for part, conv, channels_last in ((low.unet, "conv_in", dtype == "bfloat16"),
                                      (low.vae, "decoder.conv_in", True)):
        with offload.resident(part):
            weight = part.get_submodule(conv).weight
            assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last


@linux_only
def test_a_part_runs_on_its_files_pages(pair):
    """A part in memory is its file's pages, mapped (offload._File.read), not a copy of them:
    the mapping goes when the part goes back to disk."""
    low = pair[1]
    with offload.resident(low.unet):
        addr = low.unet.conv_in.weight.data_ptr()
        assert "nanodiffusion-offload-" in mapping(addr)[0]
    assert "nanodiffusion-offload-" not in (mapping(addr) or ("",))[0]


@linux_only
def test_a_packed_convolution_gives_its_files_pages_back(pair):
    """With low memory the UNet is packed for each loop: a packed
    convolution lets its dense weight go, and with it that weight's pages of the part's
    mapping (malloc.let_go), so the weights are not held twice while the UNet runs."""
    from nanodiffusion.models.packing import PackedConv2d, available

    if not available():
        pytest.skip("this torch has no oneDNN convolution ops: nothing is packed")
    low, seen = pair[1], []

    def after_a_call(unet, *_):
        disk = vars(unet)[offload._ATTR]
        packed = [m for m in unet.modules() if type(m) is PackedConv2d and m._packed is not None]
        dense = sum(m._dense[0].numel() * m._packed.dtype.itemsize for m in packed)
        seen.append((mapping(disk.mapping.data_ptr())[1], disk.file.size, dense, len(packed)))

    handle = low.unet.register_forward_hook(after_a_call)
    try:
        low.generate(PROMPT, seed=1, steps=6)
    finally:
        handle.remove()
    resident, size, dense, n = seen[-1]
    assert n > 0 and dense > size / 4, seen
    assert resident <= size - dense + 2 * n * offload.PAGE, seen


def test_weights_written_in_place_keep_their_pages():
    """A weight changed in place (LoRA fusing, which sets `dirty`) lives in pages of its own,
    copied from the file's: letting it go must not drop them, or anything still holding it
    would read the file's old bytes."""
    from nanodiffusion.models import packing

    if not packing.available():
        pytest.skip("this torch has no oneDNN convolution ops: nothing is packed")
    low = nanodiffusion.load("shapes", low_memory=True)
    with offload.resident(low.unet) as disk:
        conv = max((m for m in low.unet.modules() if packing._packable(m)),
                   key=lambda m: m.weight.numel())  # pages of its own
        assert conv.weight.numel() * 4 > 4 * offload.PAGE
        w = conv.weight.data
        w.mul_(2)
        disk.dirty = True
        want = w.clone()
        with packing.packed_weights(low.unet), torch.no_grad():
            conv(torch.randn(1, conv.in_channels, 8, 8))  # packs it: the dense weight let go
            assert conv._packed is not None
        assert torch.equal(w, want)


def test_best_of_in_low_memory(pair):
    """Reranking runs CLIP's text tower, which is the pipeline's text encoder (on disk)."""
    plain, low = pair
    a = plain.generate(PROMPT, seed=2, best_of=2)[0]
    assert a.tobytes() == low.generate(PROMPT, seed=2, best_of=2)[0].tobytes()
    assert held(low.text_encoder) == 0


def test_large_latents_are_decoded_in_tiles(monkeypatch, pair):
    """Above offload.TILE latents per side low memory decodes in tiles (VAE.tiled_decode);
    at TILE or less, and always without low memory, the whole decode (to float32 rounding:
    the default's decoder runs on packed weights, which on the AMX Xeon round its conv_in
    1.4e-6 apart from the dense weights low memory reads back)."""
    plain, low = pair
    z = torch.randn(1, low.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    tiny_sd.assert_float32_rounding_apart(low.decode_latents(z), plain.decode_latents(z))
    monkeypatch.setattr(offload, "TILE", 8)
    monkeypatch.setattr(offload, "TILE_OVERLAP", 2)
    tiled, whole = low.decode_latents(z)[0], plain.decode_latents(z)[0]
    assert held(low.vae) == 0
    with torch.no_grad():
        x = plain.vae.tiled_decode((z / plain.vae.config.scaling_factor).to(plain._vae_dtype),
                                   8, 2)
    want = nanodiffusion.pipelines.images.to_pil(x)[0]
    assert tiled.tobytes() == want.tobytes() and tiled.tobytes() != whole.tobytes()
    assert np.abs(np.asarray(tiled, dtype=int) - np.asarray(whole)).mean() < 8


def test_the_parts_are_on_disk_between_calls_and_the_images_are_the_same(pair):
    """The same images, to float32 rounding: the default's VAE decoder runs on weights packed
    for oneDNN (models/packing.py), the low-memory one's on the weights read back, and on some
    CPUs (AMD Zen) the two kernels round a few values differently
    (tiny_sd.assert_float32_rounding_apart)."""
    plain, low = pair
    assert low.low_memory and not plain.low_memory
    assert held(low.text_encoder) == 0 and held(low.vae) == 0 and held(low.unet) == 0
    assert held(plain.unet) > 0
    a = plain.generate(PROMPT, seed=3, n=2)
    b = low.generate(PROMPT, seed=3, n=2)
    tiny_sd.assert_float32_rounding_apart(a, b)
    assert held(low.text_encoder) == 0 and held(low.vae) == 0 and held(low.unet) == 0
    mask = Image.new("L", a[0].size, 0)
    mask.paste(255, (0, 0, a[0].size[0] // 2, a[0].size[1]))
    for call in (lambda p: p.img2img("a green star", a[0], strength=0.6, seed=4),
                 lambda p: p.inpaint("a green star", a[0], mask, seed=5)):
        tiny_sd.assert_float32_rounding_apart(call(plain), call(low))
    assert held(low.text_encoder) == 0 and held(low.vae) == 0


def test_turned_off_the_weights_come_back(tmp_path):
    """As they were, in their layouts (the VAE's channels-last convolutions), whether low
    memory was turned on after the load or the load was a low-memory one."""
    pipe = nanodiffusion.load("shapes")
    want = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    strides = {k: v.stride() for k, v in pipe.vae.state_dict().items()}
    for p in (pipe.set_low_memory(True), nanodiffusion.load("shapes", low_memory=True)):
        p.set_low_memory(False)
        assert not p.low_memory and held(p.vae) > 0 and held(p.unet) > 0
        got = p.vae.state_dict()
        assert all(torch.equal(got[k], want[k]) and got[k].stride() == strides[k] for k in want)
    with pytest.raises(ValueError, match="not unCLIP"):  # refused before a weight is read
        nanodiffusion.load("shapes-unclip", low_memory=True)


def test_a_lora_is_fused_on_disk_too(tmp_path):
    """A LoRA on the text encoder and the UNet (LoCon) fused while both are on disk: the images
    of the default, and after it is taken off those before it."""
    pytest.importorskip("diffusers")
    import lora_files as lf
    import tiny_sd

    sd = tiny_sd.build(tmp_path / "sd")
    text = lf.random_layers(lf.text_targets(sd.ref.text_encoder), 3, alphas=(4.0,), std=0.6)
    unet = lf.random_layers(lf.unet_targets(sd.ref.unet), 2, alphas=(2.0,))
    path = lf.write_kohya(tmp_path / "text.safetensors", unet, text_layers=text)
    low = nanodiffusion.load(sd.folder, low_memory=True)  # a diffusers folder, part by part
    assert low.low_memory and held(low.unet) == 0 and held(low.text_encoder) == 0
    plain = nanodiffusion.load(sd.folder)
    kw = dict(seed=1, steps=2, sampler="euler", width=16, height=16)
    before = np.asarray(low.generate(PROMPT, **kw)[0])
    for p in (plain, low):
        p.load_lora(path, 1.0)
    fused = np.asarray(low.generate(PROMPT, **kw)[0])
    assert np.array_equal(fused, np.asarray(plain.generate(PROMPT, **kw)[0]))
    assert np.abs(fused.astype(int) - before).max() > 10, "the LoRA hardly changes the image"
    low.unload_loras()
    assert np.array_equal(np.asarray(low.generate(PROMPT, **kw)[0]), before)


def test_cli_and_serve_low_memory(tmp_path):
    args = (PROMPT, "--seed", 7, "--steps", 4)
    r1 = run_cli("generate", *args, "--out", tmp_path / "a.png")
    r2 = run_cli("generate", *args, "--low-memory", "--out", tmp_path / "b.png")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    want = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(want, np.asarray(Image.open(tmp_path / "b.png")))
    import httpx

    with served("--low-memory") as (url, _):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=120, json={
            "prompt": PROMPT, "seed": 7, "steps": 4, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 3.0})
        assert r.status_code == 200, r.text
    import base64

    served_image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    plain = nanodiffusion.load("shapes").generate(PROMPT, seed=7, steps=4, sampler="euler",
                                                  guidance=3.0)[0]
    assert np.array_equal(np.asarray(served_image.convert("RGB")), np.asarray(plain))


def offload_files(folder):
    return sorted(p.name for p in folder.glob("nanodiffusion-offload-*"))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_the_weight_files_go_however_the_process_ends(tmp_path, monkeypatch, how):
    """A process killed outright (the OOM killer) and a server stopped by SIGTERM (uvicorn
    re-raises it after its shutdown, past atexit) leave no weight file in $TMPDIR."""
    import subprocess
    import sys

    import httpx

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cache = tmp_path / "cache"  # where they go if tmp_path is a RAM disk (offload_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    if how == "SIGKILL":
        code = ("import os, signal, nanodiffusion\n"
                "p = nanodiffusion.load('shapes', low_memory=True)\n"
                "p.generate('a red circle', steps=2)\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == -9, r.stderr
    else:
        with served("--low-memory") as (url, _):
            r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=120, json={
                "prompt": PROMPT, "steps": 2, "width": 64, "height": 64})
            assert r.status_code == 200, r.text
    assert offload_files(tmp_path) == []
    assert offload_files(cache / "nanodiffusion" / "offload") == []


def test_batched_requests_in_low_memory(pair):
    """The server's batches (pipelines/batch.py) run the UNet loaded for their loop too."""
    from nanodiffusion.pipelines.batch import generate_batch

    plain, low = pair
    reqs = [dict(prompt=PROMPT, seed=1), dict(prompt="a green star", seed=2, n=2)]
    a, b = generate_batch(plain, reqs), generate_batch(low, reqs)
    assert not any(isinstance(x, Exception) for x in a + b), (a, b)
    assert [[i.tobytes() for i in x] for x in a] == [[i.tobytes() for i in x] for x in b]
    assert held(low.unet) == 0


def test_the_text_encoder_and_the_vae_take_their_blocks_from_the_heap(pair):
    """Low memory maps blocks of 256 KiB and more apart (malloc.malloc_returns_big_blocks), each
    paged in anew at every use; only the UNet's run, which sets the process's peak, keeps that
    rule: the text encoder's and the VAE's take their blocks below malloc.HEAP_LIMIT from
    glibc's heap (decoding SD 1.5 at 512 px in bfloat16 on a Zen 3: 15 s mapped apart, 10 s
    from the heap). What glibc then does with a block depends on its heap's history (a free
    chunk that fits is reused whatever the threshold), so this checks the rule in force."""
    from nanodiffusion import malloc

    if malloc.mmap_threshold() is None:
        pytest.skip("the C library is not glibc: no such rule")
    plain, low = pair
    seen = {}

    def hook(name):
        def record(*_):
            seen.setdefault(name, malloc.mmap_threshold())
        return record

    handles = [low.text_encoder.register_forward_hook(hook("text encoder")),
               low.unet.register_forward_hook(hook("unet")),
               low.vae.decoder.register_forward_hook(hook("vae decoder")),
               low.vae.encoder.register_forward_hook(hook("vae encoder")),
               plain.vae.decoder.register_forward_hook(hook("default's vae decoder"))]
    try:
        low._prompt_cache.clear()
        image = low.generate(PROMPT, seed=1, steps=2)[0]
        low.img2img(PROMPT, image, strength=0.5, seed=2, steps=2)
        plain.generate(PROMPT, seed=1, steps=2)
    finally:
        for h in handles:
            h.remove()
    heap, apart = malloc.HEAP_LIMIT, malloc.MMAP_THRESHOLD
    assert seen == {"text encoder": heap, "unet": apart, "vae decoder": heap,
                    "vae encoder": heap, "default's vae decoder": apart}
    assert malloc.mmap_threshold() == apart  # the rule is back after each run


def test_the_cli_has_torch_ask_for_huge_pages_with_low_memory(tmp_path):
    """`--low-memory` sets torch's THP_MEM_ALLOC_ENABLE before torch is imported
    (malloc.torch_huge_pages), so that the UNet's blocks, mapped apart, are faulted in 2 MiB at
    a time: a big tensor then lies in huge pages where Linux's THP is "madvise". Without
    --low-memory nothing is set."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from nanodiffusion import cli\n"
            "rc = cli.main(sys.argv[1:])\n"
            "import torch\n"
            "def huge():\n"
            "    return sum(int(l.split()[1]) for l in open('/proc/self/smaps')\n"
            "               if l.startswith('AnonHugePages'))\n"
            "before = huge()\n"
            "t = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
            "print('RESULT', rc, os.environ.get('THP_MEM_ALLOC_ENABLE'), huge() - before)\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp.read_text() if thp.exists() else ""  # no THP in this kernel: none to check
    for flag, want in (("--low-memory", "1"), (None, "None")):
        args = ["generate", PROMPT, "--steps", "2", "--out", str(tmp_path / f"{want}.png")]
        r = subprocess.run([sys.executable, "-c", code, *args, *([flag] if flag else [])],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        _, rc, value, huge_kb = r.stdout.splitlines()[-1].split()
        assert (rc, value) == ("0", want)
        if "[madvise]" in thp:  # torch's madvise is the only way to them
            assert (int(huge_kb) > 0) == (want == "1"), (flag, huge_kb)


def test_the_cli_and_the_server_load_the_model_with_low_memory(tmp_path, monkeypatch):
    """`generate --low-memory` and `serve --low-memory` load the model so
    (loading.load_pipeline(low_memory=True)): each part goes to disk as soon as it is built,
    and the model is never whole in memory. They loaded it whole and then moved it to disk,
    so their peak was a default load's (SD 1.5 in bfloat16 at 512 px through the CLI: 2.66 GB
    against 2.2 GB); the same images either way."""
    import subprocess
    import sys

    from nanodiffusion import loading
    from nanodiffusion.server.models import Registry

    code = ("import sys\n"
            "from nanodiffusion import cli, loading\n"
            "build, held = loading.build_pipeline, []\n"
            "def spy(parts):\n"
            "    held.append(sum(p.numel() for p in parts.modules['unet'].parameters()))\n"
            "    return build(parts)\n"
            "loading.build_pipeline = spy\n"
            "print('RESULT', cli.main(sys.argv[1:]), held)\n")
    r = subprocess.run([sys.executable, "-c", code, "generate", PROMPT, "--seed", "7",
                        "--out", str(tmp_path / "a.png"), "--low-memory"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "RESULT 0 [0]"  # built with its UNet on disk
    want = nanodiffusion.load("shapes").generate(PROMPT, seed=7)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(want))
    r = run_cli("generate", PROMPT, "--pipeline", "unclip", "--low-memory",
                "--out", tmp_path / "b.png")
    assert r.returncode == 2 and "--low-memory is for Stable Diffusion models" in r.stderr
    assert not (tmp_path / "b.png").exists()

    built, build = [], loading.build_pipeline
    monkeypatch.setattr(loading, "build_pipeline", lambda parts: built.append(
        {k: held(m) > 0 for k, m in parts.modules.items() if k in ("unet", "decoder")})
        or build(parts))
    reg = Registry(low_memory=True)
    assert reg.pipe("shapes").low_memory
    reg.pipe("shapes-unclip")  # unCLIP models: in memory, as before
    assert built == [{"unet": False}, {"decoder": True}]



def test_the_parts_files_stay_off_a_ram_disk(tmp_path, monkeypatch):
    """Where tempfile's folder is a RAM disk (tmpfs: /tmp on Debian 13, Fedora, Arch), a part
    "on disk" would still take memory, and a 4 GB machine's /tmp holds 2 GB at most (SD 1.5's
    parts in bfloat16 take 2.1 GB): the parts' files go to the user's cache folder instead."""
    import tempfile

    if not Path("/proc/self/mountinfo").exists():
        pytest.skip("no mount table to read here: tempfile's folder is used as it is")
    assert offload.filesystem_of("/proc/self") == "proc"  # the real mount table, read
    ram, cache = tmp_path / "ram", tmp_path / "cache"
    ram.mkdir()
    real = offload.filesystem_of
    monkeypatch.setattr(tempfile, "tempdir", str(ram))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(offload, "filesystem_of",
                        lambda p: "tmpfs" if str(p).startswith(str(ram)) else real(p))
    dirs, mkstemp = [], tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp",
                        lambda **kw: dirs.append(kw.get("dir")) or mkstemp(**kw))
    low = nanodiffusion.load("shapes", low_memory=True)
    assert low.generate(PROMPT, seed=1, steps=2)[0].size == (64, 64)
    if real(cache) not in offload.RAM_FILESYSTEMS:
        assert dirs and set(dirs) == {str(cache / "nanodiffusion" / "offload")}
    monkeypatch.setattr(offload, "filesystem_of", real)
    if real(ram) not in offload.RAM_FILESYSTEMS:  # on a disk: tempfile's folder, as before
        assert offload.offload_dir() == str(ram)


def test_serve_low_memory_skips_full_vae_previews():
    """The server's live previews of a model without a tiny decoder decode with its VAE; with
    low memory that would read the VAE in beside the UNet, which low memory never holds
    together (SD 1.5 in bfloat16 at 256 px: the server's peak 2.51 GiB, against 2.10 for a CLI
    call at 512 px). So such a job runs without previews; one with a tiny decoder keeps them."""
    import time

    from nanodiffusion.server.models import Registry
    from nanodiffusion.server.params import Task

    reg = Registry(low_memory=True)
    pipe = reg.pipe("shapes")
    tiny, decodes = pipe.tiny_decoder, []
    hook = pipe.vae.decoder.register_forward_hook(
        lambda *_: decodes.append(held(pipe.unet) > 0))
    try:
        for with_tiny in (False, True):
            pipe.tiny_decoder = tiny if with_tiny else None
            decodes.clear()
            job = reg.submit(Task("shapes", "generate", dict(
                prompt=PROMPT, negative_prompt="", seed=1, n=1, width=None, height=None,
                steps=6, guidance=3.0, sampler="euler")))
            while job.status in ("queued", "running"):
                time.sleep(0.01)
            assert job.status == "done", job.error
            assert decodes == [False]  # the final image's decode alone, the UNet let go
            assert (job.preview is not None) == with_tiny, (with_tiny, job.preview)
    finally:
        hook.remove()
        pipe.tiny_decoder = tiny


@linux_only
def test_the_block_pool_serves_freed_blocks_again_and_lets_them_go():
    """malloc.pooled_blocks: torch's blocks of MMAP_THRESHOLD bytes or more come from the
    blocks freed inside it (the same one for the same size; the smallest larger one shrunk, or
    a smaller one grown, for another), at most `cap` bytes kept; smaller blocks, and every
    block outside it, are torch's own; at its end the kept blocks are unmapped, and a block
    still live then stays valid and is unmapped when it is freed."""
    assert malloc.block_pool() is not None  # built with g++ against torch's headers
    mib = 1 << 20

    def stats():
        return malloc.block_pool_stats()

    before = stats()
    outside = torch.empty(mib // 4)  # 1 MiB of float32, outside: torch's own
    assert stats()["fresh"] == before["fresh"] and not stats()["on"]
    with malloc.pooled_blocks(cap=3 * mib):
        assert stats()["on"]
        a = torch.empty(mib // 4)
        where = a.data_ptr()
        del a
        b = torch.empty(mib // 4)  # the same size: the same block
        assert b.data_ptr() == where and stats()["reused"] == before["reused"] + 1
        c = torch.empty(mib // 2)  # 2 MiB: a new block
        del c
        d = torch.empty(mib // 8)  # 512 KiB: the 2 MiB one shrunk
        assert stats()["resized"] == before["resized"] + 1 and stats()["kept"] == 0
        small = torch.empty(1000)  # below MMAP_THRESHOLD: torch's own
        assert stats()["fresh"] == before["fresh"] + 2
        many = [torch.empty(mib // 4) for _ in range(5)]
        del many  # 5 MiB freed, 3 kept at most
        assert stats()["kept"] <= 3 * mib
        with malloc.pooled_blocks(cap=100 * mib):  # inside another: nothing changes
            e = torch.empty(mib // 4)
            del e
        assert stats()["on"] and stats()["kept"] <= 3 * mib
        b.fill_(2.0)
    after = stats()
    assert not after["on"] and after["kept"] == 0
    assert float(b.sum()) == 2.0 * b.numel()  # live past the pool's end
    mapped = after["mapped"]
    del b, d
    assert stats()["mapped"] == mapped - mib - (mib // 2)
    outside.fill_(1.0)
    del outside, small


def test_low_memory_runs_each_part_on_the_block_pool(pair, monkeypatch):
    """Low memory runs the text encoder, the UNet and the VAE decoder inside the block pool
    (torch's big blocks served again from those freed, pages resident), and turns it off
    between them and after; the images are the default's."""
    plain, low = pair
    low._prompt_cache.clear()
    seen = []
    for name, owner, attr in (("text", low.text_encoder, "forward"), ("unet", low.unet, "forward"),
                              ("decode", low.vae, "decode")):
        def spy(*a, _name=name, _real=getattr(owner, attr), **k):
            seen.append((_name, malloc.block_pool_stats()["on"]))
            return _real(*a, **k)
        monkeypatch.setattr(owner, attr, spy)
    before = malloc.block_pool_stats()
    got = low.generate(PROMPT, seed=4, steps=3, width=128, height=128)[0]
    after = malloc.block_pool_stats()
    assert seen == [("text", 1)] + [("unet", 1)] * 3 + [("decode", 1)]
    assert not after["on"] and after["kept"] == 0
    assert after["reused"] + after["resized"] > before["reused"] + before["resized"]
    assert got.tobytes() == plain.generate(PROMPT, seed=4, steps=3, width=128, height=128)[0].tobytes()
