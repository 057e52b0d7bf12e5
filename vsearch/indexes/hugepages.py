"""Huge pages for the graph hnswlib allocates.

An HNSW insert reads thousands of vectors scattered over the whole graph. With 4 KiB pages nearly
every read also misses the TLB and walks the page tables, which for a 22 GB graph (10M x 512) are
44 MB and miss the cache too; with 2 MiB pages they are 88 KB and stay in it. Most Linux systems
hand out huge pages only to memory that asks for them (`/sys/kernel/mm/transparent_hugepage/enabled`
is `madvise`). numpy asks for its large arrays; hnswlib's `malloc` of the graph never does, so
vsearch asks for it before hnswlib touches the pages (benchmarks/RESULTS.md has the gain).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from pathlib import Path

MAPS = Path("/proc/self/maps")
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20  # a smaller mapping, a thread's stack say, cannot hold one


def anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of this process's anonymous mappings; empty where /proc is not there."""
    if not MAPS.exists():
        return set()
    regions = set()
    for line in MAPS.read_text().splitlines():
        fields = line.split()
        if len(fields) == 5:  # no path: anonymous
            start, end = (int(part, 16) for part in fields[0].split("-"))
            regions.add((start, end))
    return regions


def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


@contextlib.contextmanager
def huge_pages_for_new_regions(least_bytes: int) -> Iterator[None]:
    """Ask for huge pages for every anonymous mapping of at least `least_bytes` made inside the
    block: a library's one big allocation. Pages it has touched already keep their size. Where the
    system cannot (no /proc, no transparent huge pages), nothing changes and nothing fails."""
    before = anonymous_regions()
    yield
    least = max(least_bytes, HUGE_PAGE)
    grown = [(start, end) for start, end in anonymous_regions() - before if end - start >= least]
    if grown:
        madvise = _madvise()
        for start, end in grown:
            madvise(start, end - start, MADV_HUGEPAGE)  # EINVAL without THP: the pages stay small
