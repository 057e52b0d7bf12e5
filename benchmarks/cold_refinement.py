"""What an IVF-PQ search costs before its float16 vectors are in memory, and why vsearch maps them
without advice: a freshly loaded index, the page cache dropped, answering single queries.
Refinement reads 1 KB rows scattered over a file of N KB. vsearch maps the file as `np.load`
does, so each row a read faults in makes Linux read ahead around it (up to the disk's
read_ahead_kb); "advised random" maps the same file with `madvise(MADV_RANDOM)`, which reads only
the pages the rows are on. Each round drops the page cache (root only), loads the index and times
each query; the two sides alternate, each going first in every other round. Reported: the median
round's queries a second and p50/p99 latency, and what each round read from the disk.

    sudo python benchmarks/cold_refinement.py [--count 1000000] [--queries 300] [--rounds 3]

Prints a table and writes JSON (default benchmarks/out/cold_refinement.json).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vsearch.indexes import BuildConfig, build_index, load_index
from vsearch.indexes.bench import clip_like, write_synthetic

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def disk_read_bytes() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines()
                if line.startswith("read_bytes:"))


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def advised_random(path: Path) -> np.ndarray:
    """The .npy file at `path` mapped read-only with MADV_RANDOM."""
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        offset = handle.tell()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def cold_round(path: Path, queries: np.ndarray, advised: bool) -> dict:
    drop_page_cache()
    index = load_index(path)
    if advised:
        index.backend.segments = [advised_random(p) for p in sorted(path.glob("vectors-*.npy"))]
    read_before, times, found = disk_read_bytes(), [], []
    for query in queries:
        started = time.perf_counter()
        found.append(index.search(query[None], 10)[1][0])
        times.append(time.perf_counter() - started)
    return {"qps": len(times) / sum(times), "p50_ms": float(np.percentile(times, 50) * 1000),
            "p99_ms": float(np.percentile(times, 99) * 1000), "read_mib": (disk_read_bytes() - read_before) / 2**20,
            "ids": np.array(found)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/cold_refinement.json"))
    args = parser.parse_args()
    if not os.access(DROP_CACHES, os.W_OK):
        raise SystemExit(f"cold_refinement.py drops the page cache through {DROP_CACHES}: run it as root")
    queries = next(clip_like(args.queries, args.dim, seed=7))
    rounds: dict[str, list[dict]] = {"vsearch": [], "advised": []}
    with tempfile.TemporaryDirectory() as scratch:
        source = write_synthetic(Path(scratch) / "vectors", args.count, args.dim, seed=0)
        path = Path(scratch) / "index"
        info = build_index(BuildConfig(type="ivfpq"), source, path)
        read_ahead = _read_ahead_kb(path)
        for number in range(args.rounds):
            order = ["vsearch", "advised"] if number % 2 == 0 else ["advised", "vsearch"]
            for side in order:
                rounds[side].append(cold_round(path, queries, advised=side == "advised"))
    if any((a["ids"] != b["ids"]).any() for a, b in zip(rounds["vsearch"], rounds["advised"])):
        raise SystemExit("the two sides found different results: the comparison is void")
    summary = {}
    for side, runs in rounds.items():
        middle = sorted(runs, key=lambda run: run["qps"])[len(runs) // 2]
        summary[side] = {key: value for key, value in middle.items() if key != "ids"}
        summary[side]["read_mib_each_round"] = [round(run["read_mib"], 1) for run in runs]
    result = {"date": time.strftime("%Y-%m-%d"), "count": args.count, "dim": args.dim, "queries": args.queries,
              "rounds": args.rounds, "params": {k: info["params"][k] for k in ("nlist", "nprobe", "k_factor")},
              "read_ahead_kb": read_ahead, "sides": summary,
              "qps_ratio": summary["vsearch"]["qps"] / summary["advised"]["qps"]}
    table = Table(title=f"ivfpq, {args.count:,} × {args.dim}, cold page cache: {args.queries} single queries a round")
    for column in ("vectors mapped", "QPS", "p50 ms", "p99 ms", "read from disk MiB"):
        table.add_column(column, justify="right")
    for side, row in summary.items():
        table.add_row("np.load's map (vsearch)" if side == "vsearch" else "MADV_RANDOM", f"{row['qps']:,.0f}",
                      f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['read_mib']:,.0f}")
    Console().print(table)
    Console().print(f"vsearch / advised random, queries a second: {result['qps_ratio']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def _read_ahead_kb(path: Path) -> int | None:
    """The read-ahead of the disk holding `path`, where sysfs shows it (a partition's is its disk's)."""
    device = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve()
    for folder in (block, block.parent):
        if (folder / "queue" / "read_ahead_kb").exists():
            return int((folder / "queue" / "read_ahead_kb").read_text())
    return None


if __name__ == "__main__":
    main()
