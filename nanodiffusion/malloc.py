"""glibc's heap and the process's resident size (the rules of low memory, pipelines/offload.py,
and of weight prepacking, models/packing.py, which let big tensors go and want their memory
back). Each does nothing where the C library is not glibc (the file mappings' rule: where the
system is not Linux)."""
import contextlib
import ctypes
import mmap
import os
import sys
from pathlib import Path

MMAP_THRESHOLD = 256 << 10  # bytes: blocks this large are mapped apart and unmapped when freed
HEAP_LIMIT = 4 << 20  # bytes: the blocks below it come from the heap (blocks_from_heap); larger
#   ones are mapped apart (with torch's huge pages where the CLI asked: torch_huge_pages). With
#   low memory's mapped weights, at 32 MiB (glibc's own ceiling) the VAE decode's heap left free
#   chunks that the next UNet run's small blocks spread over: SD 1.5, 512 px, bfloat16, a 2-core
#   Zen 3, bench_cpu's warm call 59.8 s at 2.34 GB peak; 16 MiB 65.2 s at 2.33 GB; 4 MiB 73.4 s
#   at 2.28 GB (the weights read, not mapped, at 32 MiB: 74.3 s at 2.28 GB)
_threshold = None  # the mmap threshold set here (MMAP_THRESHOLD, HEAP_LIMIT); None: glibc's own
PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4  # Linux's
_mapped = {}  # first byte -> (past the last, clean): file_mapped's private file mappings


def _glibc(function, *args):
    """Call glibc's `function` (mallopt, malloc_trim) with `args`; whether it was there."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


def _mallopt(param, value):
    return _glibc("mallopt", param, value)


def trim():
    """Give the freed memory back to the system (glibc keeps freed blocks below its mmap
    threshold in its heap, where they still count in the process's resident size)."""
    _glibc("malloc_trim", 0)


def malloc_returns_big_blocks():
    """glibc's mmap threshold fixed at MMAP_THRESHOLD for this process (a fixed one is never
    raised): every block that large is unmapped, its memory returned, as soon as it is freed.
    Nothing where the C library is not glibc."""
    global _threshold
    if _mallopt(-3, MMAP_THRESHOLD):  # M_MMAP_THRESHOLD
        _mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: a free heap top past it goes
        _threshold = MMAP_THRESHOLD


def mmap_threshold():
    """The mmap threshold in force, as set here (MMAP_THRESHOLD, or HEAP_LIMIT inside
    blocks_from_heap); None where it is glibc's own (or the C library is not glibc)."""
    return _threshold


@contextlib.contextmanager
def blocks_from_heap():
    """A context in which, where malloc_returns_big_blocks is in force, glibc takes the blocks
    below HEAP_LIMIT from its heap, where a freed block is reused with its pages, instead of
    mapping each apart (a mapping's pages are faulted in anew at every use: on a 2-core Zen 3
    SD 1.5's VAE decode at 512 px in bfloat16 took 15 s so, 10 s from the heap below 32 MiB;
    HEAP_LIMIT says why it is lower now). At its end
    the blocks are mapped apart again and the heap's free pages given back (trim). For the
    stretches of low memory whose peak is far below the process's (pipelines/offload.py).
    Nothing where the rule is not in force."""
    global _threshold
    if _threshold != MMAP_THRESHOLD:  # glibc's own, or inside blocks_from_heap already
        yield
        return
    _mallopt(-3, HEAP_LIMIT)
    _threshold = HEAP_LIMIT
    try:
        yield
    finally:
        _mallopt(-3, MMAP_THRESHOLD)
        _threshold = MMAP_THRESHOLD
        trim()


BLOCK_POOL_SOURCE = Path(__file__).with_name("block_pool.cpp")
BLOCK_POOL_CAP = 256 << 20  # bytes of freed blocks the pool keeps at most (block_pool.cpp)
BLOCK_POOL_STATS = ("mapped", "kept", "reused", "resized", "fresh", "on")


def block_pool():
    """The block pool's library (block_pool.cpp: built with g++ against torch's c10 headers,
    in the kernels' cache, and loaded once: models/fused_attention.load), or None where it does
    not run: not Linux, no compiler, or its build failed (one warning)."""
    if not sys.platform.startswith("linux"):
        return None
    import torch  # here: the CLI imports this module before torch (torch_huge_pages)

    from .models.fused_attention import load
    root = Path(torch.__file__).parent
    return load(None, BLOCK_POOL_SOURCE, ["nd_block_pool", "nd_block_pool_stats"],
                [ctypes.c_int64], "the block pool not built: low memory maps its big blocks "
                "anew", extra=[f"-I{root / 'include'}", f"-L{root / 'lib'}", "-lc10",
                               f"-Wl,-rpath,{root / 'lib'}",
                               f"-DND_TORCH_VERSION={torch.__version__}"])  # in the cache key


def block_pool_stats():
    """The block pool's counters (BLOCK_POOL_STATS: bytes mapped and kept; requests served by a
    kept block as it was, resized, or by a new mapping; whether it is on), or None where it does
    not run (block_pool)."""
    lib = block_pool()
    if lib is None:
        return None
    out = (ctypes.c_int64 * len(BLOCK_POOL_STATS))()
    lib.nd_block_pool_stats(ctypes.addressof(out))
    return dict(zip(BLOCK_POOL_STATS, out))


@contextlib.contextmanager
def pooled_blocks(cap=BLOCK_POOL_CAP):
    """A context in which torch's CPU blocks of MMAP_THRESHOLD bytes and more come from the
    block pool (block_pool.cpp): the blocks freed in it, up to `cap` bytes of them, serve the
    next requests with their pages resident, instead of each block being mapped and its pages
    faulted in and zeroed anew (malloc_returns_big_blocks), and without glibc's heap, whose
    freed blocks stay resident as it grows. At its end the kept blocks are unmapped. For low
    memory's runs of each part (Pipeline.unet_loop, whose peak is the process's, and
    Pipeline.running). Nothing where the pool does not run (block_pool) or inside another such
    context."""
    lib = block_pool()
    if lib is None or block_pool_stats()["on"]:
        yield
        return
    lib.nd_block_pool(cap)
    try:
        yield
    finally:
        lib.nd_block_pool(0)


def torch_huge_pages():
    """Have torch's allocator ask for transparent huge pages for its blocks of 2 MiB and more
    (torch's THP_MEM_ALLOC_ENABLE; Linux gives them where THP is "madvise" or "always"), so that
    a block mapped apart (malloc_returns_big_blocks) is paged in with one fault per 2 MiB, not
    one per 4 KiB, at the same resident size. torch reads the variable once, at its first
    allocation, so this acts only before torch is imported (the CLI calls it for --low-memory
    before it imports torch); a value the user set is kept."""
    if sys.platform == "linux" and "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def file_mapped(storage, clean):
    """Register `storage`, a private mapping of a file (low memory's weights, offload._File),
    until file_unmapped(storage): `clean()` says whether its pages are still the file's (none
    written since it was mapped), so that let_go may drop them."""
    _mapped[storage.data_ptr()] = (storage.data_ptr() + storage.nbytes(), clean)


def file_unmapped(storage):
    _mapped.pop(storage.data_ptr(), None)


def let_go(t):
    """Drop from the resident size the whole pages of `t`, a tensor being let go, where it lies
    in a registered clean file mapping (file_mapped) that stays mapped for other tensors (a
    packed convolution's dense weight: models/packing.py): the file keeps its bytes, and a
    read of them faults them back in. Nothing for other tensors, or where the system is not
    Linux (madvise(MADV_DONTNEED) on a private mapping discards written pages)."""
    if not in_clean_mapping(t):
        return
    first = -(-t.data_ptr() // PAGE) * PAGE
    last = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
    if first < last:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                  MADV_DONTNEED)


def in_clean_mapping(t):
    """Whether `t` lies in a registered file mapping (file_mapped) that is still clean, on
    Linux: its bytes are the file's, so that its pages may be dropped (let_go) and are read
    back from the file when it is read."""
    start = t.untyped_storage().data_ptr()
    end, clean = _mapped.get(start, (0, None))
    return (sys.platform == "linux" and clean is not None and clean()
            and start <= t.data_ptr() <= t.data_ptr() + t.numel() * t.element_size() <= end)
