"""glibc's heap and the process's resident size (the rules of low memory, pipelines/offload.py,
and of weight prepacking, models/packing.py, which let big tensors go and want their memory
back). Each does nothing where the C library is not glibc."""
import ctypes

MMAP_THRESHOLD = 256 << 10  # bytes: blocks this large are mapped apart and unmapped when freed


def trim():
    """Give the freed memory back to the system (glibc keeps freed blocks below its mmap
    threshold in its heap, where they still count in the process's resident size)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def malloc_returns_big_blocks():
    """glibc's mmap threshold fixed at MMAP_THRESHOLD for this process (a fixed one is never
    raised): every block that large is unmapped, its memory returned, as soon as it is freed.
    Nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: a free heap top past it goes
    except (OSError, AttributeError):
        pass
