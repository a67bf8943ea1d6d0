"""Resource caps for the worker processes that run hostile input (parsers, the tool sandbox)."""

from __future__ import annotations

import resource

# A worker's exit status when it ran out of memory under its cap (it says so, then exits).
OUT_OF_MEMORY = 3


def cap_memory(extra_mb: int) -> None:
    """Cap this process's address space at what it maps now plus `extra_mb`: past it, an
    allocation raises MemoryError instead of growing until the machine swaps."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * resource.getpagesize() + extra_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
