"""How much memory this machine has: what an index may take."""

from __future__ import annotations

import os
from pathlib import Path


def machine_memory() -> tuple[int, int | None]:
    """This machine's memory, in bytes, and how much of it is free now (None where the system does
    not say), within the memory limit of the container it runs in: a pod on a large host has its
    share only."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            available = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")),
                             None)
    except OSError:
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            bytes_ = int(Path(limit).read_text(encoding="ascii"))
        except (OSError, ValueError):  # none, or v2's "max": no limit
            continue
        total = min(total, bytes_)
        available = None if available is None else min(available, bytes_)
        break
    return total, available
