"""glibc's heap and the process's resident size (the rules of low memory, pipelines/offload.py,
and of weight prepacking, models/packing.py, which let big tensors go and want their memory
back). Each does nothing where the C library is not glibc."""
import contextlib
import ctypes
import os
import sys

MMAP_THRESHOLD = 256 << 10  # bytes: blocks this large are mapped apart and unmapped when freed
HEAP_LIMIT = 32 << 20  # bytes: the blocks below it come from the heap (blocks_from_heap): the
#                        ceiling of glibc's own moving threshold on 64-bit systems
_threshold = None  # the mmap threshold set here (MMAP_THRESHOLD, HEAP_LIMIT); None: glibc's own


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
    SD 1.5's VAE decode at 512 px in bfloat16 took 15 s so, 10 s from the heap). At its end
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


def torch_huge_pages():
    """Have torch's allocator ask for transparent huge pages for its blocks of 2 MiB and more
    (torch's THP_MEM_ALLOC_ENABLE; Linux gives them where THP is "madvise" or "always"), so that
    a block mapped apart (malloc_returns_big_blocks) is paged in with one fault per 2 MiB, not
    one per 4 KiB, at the same resident size. torch reads the variable once, at its first
    allocation, so this acts only before torch is imported (the CLI calls it for --low-memory
    before it imports torch); a value the user set is kept."""
    if sys.platform == "linux" and "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
