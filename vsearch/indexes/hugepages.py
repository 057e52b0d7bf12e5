"""Huge pages for the graph hnswlib allocates.

An HNSW insert reads thousands of vectors scattered over the whole graph. With 4 KiB pages nearly
every read also misses the TLB and walks the page tables, which for a 22 GB graph (10M x 512) are
44 MB and miss the cache too; with 2 MiB pages they are 88 KB and stay in it. Most Linux systems
hand out huge pages only to memory that asks for them (`/sys/kernel/mm/transparent_hugepage/enabled`
is `madvise`). numpy asks for its large arrays; hnswlib's `malloc` of the graph never does, so
vsearch asks for it before hnswlib touches the pages. A graph loaded from a file has been written
by the time vsearch sees it, so its pages are moved onto huge ones afterwards, on a thread
(benchmarks/RESULTS.md has the gains).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from pathlib import Path

MAPS = Path("/proc/self/maps")
ROLLUP = Path("/proc/self/smaps_rollup")
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1 and later
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


def huge_page_bytes() -> int:
    """How much of this process's anonymous memory is on huge pages (0 where /proc does not say)."""
    lines = ROLLUP.read_text().splitlines() if ROLLUP.exists() else []
    return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("AnonHugePages:"))


def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


@contextlib.contextmanager
def huge_pages_for_new_regions(least_bytes: int) -> Iterator[list[tuple[int, int]]]:
    """Ask for huge pages for every anonymous mapping of at least `least_bytes` made inside the
    block: a library's one big allocation. Yields a list, filled with those (start, end) when the
    block ends. Pages it has touched already keep their size (`collapse_in_background` moves
    them). Where the system cannot (no /proc, no transparent huge pages), nothing changes and
    nothing fails. An allocation that malloc serves from memory the process holds already (a
    long-lived one that has freed more than that) is no new mapping and keeps its pages' size.
    One smaller than a huge page is left alone unread: it could not fill one, and in a process
    with torch loaded each read of its mappings takes about 2 ms (3 s of the 6 an update-heavy
    test spent on its thousand small graphs)."""
    advised: list[tuple[int, int]] = []
    if least_bytes < HUGE_PAGE:
        yield advised
        return
    before = anonymous_regions()
    yield advised
    advised += [(start, end) for start, end in anonymous_regions() - before if end - start >= least_bytes]
    if advised:
        madvise = _madvise()
        for start, end in advised:
            madvise(start, end - start, MADV_HUGEPAGE)  # EINVAL without THP: the pages stay small


def _collapse(regions: list[tuple[int, int]], owner: object) -> None:
    """MADV_COLLAPSE each region; `owner` is only held, so that the memory outlives the calls."""
    madvise = _madvise()
    for start, end in regions:
        madvise(start, end - start, MADV_COLLAPSE)  # ctypes lets go of the GIL meanwhile


def collapse_in_background(regions: list[tuple[int, int]], owner: object) -> threading.Thread | None:
    """Move the pages already written in `regions` onto huge pages, on a daemon thread that holds
    `owner` (the object whose memory they are) until it is done: about a second a GB, during which
    searches go on and speed up. None when there is nothing to move; on kernels before 6.1 the
    thread ends at once and the pages stay as they are."""
    if not regions:
        return None
    thread = threading.Thread(target=_collapse, args=(regions, owner), name="vsearch-huge-pages", daemon=True)
    thread.start()
    return thread
