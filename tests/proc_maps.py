"""This process's memory mappings, from /proc/self/smaps (Linux): which one holds an address
and how much of it is resident (test_low_memory.py, test_loading.py)."""
import sys
from pathlib import Path

import pytest

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")


def mapping(addr):
    """(file name, resident bytes) of this process's mapping that holds `addr`, or None."""
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            name = (head[5] if len(head) > 5 else "") if lo <= addr < hi else None
        elif name is not None and line.startswith("Rss:"):
            return name, int(line.split()[1]) * 1024
    return None
