"""glibc's heap and the process's resident size (the rules of low memory, pipelines/offload.py,
and of weight prepacking, models/packing.py, which let big tensors go and want their memory
back). Each does nothing where the C library is not glibc."""
import contextlib
import ctypes

MMAP_THRESHOLD = 256 << 10  # bytes: blocks this large are mapped apart and unmapped when freed


def trim():
    """Give the freed memory back to the system (glibc keeps freed blocks below its mmap
    threshold in its heap, where they still count in the process's resident size)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# bytes: blocks below this come from the heap after blocks_apart. glibc's own moving threshold
# rises to 32 MiB; low memory's SD 1.5 txt2img at 512 px in bfloat16 (2-core Zen 3, 4 steps):
# 256 KiB (every block apart) 94-101 s at a 2.28 GB peak, 8 MiB 74-78 s at 2.30, 32 MiB 55 s
# at 2.50 (the heap's freed pages and gaps)
HEAP_MAX = 8 << 20
_apart = 0  # the depth of blocks_apart contexts


def _thresholds(mmap, trim_at):
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, mmap)     # M_MMAP_THRESHOLD (a value set is never moved by glibc)
        libc.mallopt(-1, trim_at)  # M_TRIM_THRESHOLD: a free heap top past it goes back
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def blocks_apart():
    """Inside, glibc's malloc maps every block of MMAP_THRESHOLD or more on its own and unmaps
    it as soon as it is freed: for weights being read that are to be let go later (low memory,
    pipelines/offload.py), whose memory then comes back exactly. After (the outermost context
    left), blocks below HEAP_MAX come from the heap again: activations freed and made anew
    reuse its pages, where blocks mapped apart are paged in anew at each allocation (SD 1.5's
    UNet call at 512 px in bfloat16 on a 2-core Zen 3: 11 s with glibc's own thresholds, 18 s
    with every block mapped apart). Nothing where the C library is not glibc."""
    global _apart
    _apart += 1
    if _apart == 1:
        _thresholds(MMAP_THRESHOLD, MMAP_THRESHOLD)
    try:
        yield
    finally:
        _apart -= 1
        if _apart == 0:
            _thresholds(HEAP_MAX, 2 * HEAP_MAX)
