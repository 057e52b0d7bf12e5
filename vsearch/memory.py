"""How much memory this machine has (what an index may take), and figures of it from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def machine_memory() -> tuple[int, int | None]:
    """This machine's memory, in bytes, and how much of it is free now (None where the system does
    not say), within the memory limit of the container it runs in: a pod on a large host has its
    share only."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            bytes_ = int(Path(limit).read_text(encoding="ascii"))
        except (OSError, ValueError):  # none, or v2's "max": no limit
            continue
        total = min(total, bytes_)
        available = None if available is None else min(available, bytes_)
        break
    return total, available


def proc_bytes(path: str, field: str) -> int | None:
    """A figure in kB of a /proc file (`MemAvailable` of /proc/meminfo, `RssAnon` of
    /proc/self/status), in bytes; None where the file or the field is missing (no /proc: macOS)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:  # a process name may be any text
            return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(f"{field}:")), None)
    except OSError:
        return None
