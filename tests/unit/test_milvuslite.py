"""Milvus Lite's server keeps the memory a search frees for the next one (`keep_freed_memory`):
a dense search at 100k chunks copies 150 MB of vectors, and fresh memory for that copy on every
search made searches slower and their times spread three times wider (BENCHMARKS.md)."""

import subprocess
import sys

from tests.conftest import ROOT

# Allocate and free a block as large as a search's copy of the vectors; print how much of it is
# still mapped afterwards (MiB).
PROBE = """
import os, sys
from services.milvuslite import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
import numpy as np
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
block = np.ones(50_000_000, dtype=np.float32)
del block
print((resident() - before) // 2**20)
"""


def still_mapped_mib(allocator: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, allocator],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout.strip())


def test_the_server_keeps_a_freed_search_sized_block_for_the_next_search() -> None:
    assert still_mapped_mib("kept") >= 150  # of 190 MiB: reused by the next search as it is
    assert still_mapped_mib("plain") < 50  # glibc's default: unmapped, faulted in anew next time


# The server's entry point, with the allocator setting replaced by a report of what had loaded
# by the time it ran.
ORDER = """
import sys
import services.milvuslite as server
def report():
    print("milvus_lite" in sys.modules)
    raise SystemExit(0)
server.keep_freed_memory = report
server.main(["--data-dir", "unused", "--engine", "lite3"])
"""


def test_the_server_sets_its_allocator_before_milvus_lite_loads() -> None:
    # Set after Milvus Lite's libraries were imported, the same setting gained nothing
    # (BENCHMARKS.md, "Milvus Lite's allocator").
    out = subprocess.run(
        [sys.executable, "-c", ORDER], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr[-2000:]
