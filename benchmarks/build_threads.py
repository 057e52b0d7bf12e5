"""HNSW build rate against build threads: vectors/s of vsearch's hnsw build (reading the Parquet
vectors, inserting them, measuring recall, saving, and the checkpoints it saves on the way, which
are counted with their time) and of hnswlib's `add_items` alone on the same vectors, at each thread
count, with how well each scales over the fewest threads tried.

    python benchmarks/build_threads.py [--count 100000] [--threads 1,2] [--dim 512]

The 10M×512 goal (20 minutes on 16 cores) needs about 8,300 vectors/s at that size; this shows
how a machine's cores scale towards it, at a size that takes minutes, not half an hour. Prints a
table and writes JSON (default benchmarks/out/build_threads.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np
from rich.console import Console
from rich.table import Table

from vsearch.indexes import BuildConfig, build_index
from vsearch.indexes.bench import write_synthetic


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def raw_insert_rate(vectors: np.ndarray, params: dict[str, int], threads: int) -> float:
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=params["M"], ef_construction=params["ef_construction"])
    started = time.perf_counter()
    index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)
    return len(vectors) / (time.perf_counter() - started)


def vsearch_build_rate(source, scratch: Path, threads: int) -> tuple[float, dict]:
    """Vectors/s of the whole build, and its manifest (the parameters it chose, its checkpoints)."""
    started = time.perf_counter()
    info = build_index(BuildConfig(type="hnsw", threads=threads), source, scratch / f"index-{threads}")
    return info["count"] / (time.perf_counter() - started), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="comma-separated thread counts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/build_threads.json"))
    args = parser.parse_args()
    counts = sorted({int(t) for t in args.threads.split(",")})
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        source = write_synthetic(Path(scratch) / "vectors", args.count, args.dim, seed=0)
        # The same vectors as the build reads: float16 in the Parquet files, float32 to hnswlib.
        vectors = np.concatenate([batch for _, batch in source.batches()])
        for threads in counts:
            build, info = vsearch_build_rate(source, Path(scratch), threads)
            params = info["params"]
            rows.append({"threads": threads, "vsearch_build_vectors_per_s": round(build, 1),
                         "hnswlib_add_items_vectors_per_s": round(raw_insert_rate(vectors, params, threads), 1),
                         "checkpoints": info["checkpoints"]["saved"],
                         "checkpoint_seconds": info["checkpoints"]["seconds"]})
    first = rows[0]
    table = Table(title=f"hnsw build, {args.count:,} × {args.dim}, M={params['M']}, "
                        f"ef_construction={params['ef_construction']} ({os.cpu_count()} × {cpu_model()})")
    for column in ("threads", "vsearch build (vectors/s)", "scaling", "hnswlib add_items (vectors/s)", "scaling",
                   "vsearch / hnswlib", "checkpoints (s)"):
        table.add_column(column, justify="right")
    for row in rows:
        ours, theirs = row["vsearch_build_vectors_per_s"], row["hnswlib_add_items_vectors_per_s"]
        # Scaling: the rate over the fewest threads' rate, per added thread (1.0 is linear).
        scale = row["threads"] / first["threads"]
        row["vsearch_scaling"] = round(ours / first["vsearch_build_vectors_per_s"] / scale, 3)
        row["hnswlib_scaling"] = round(theirs / first["hnswlib_add_items_vectors_per_s"] / scale, 3)
        table.add_row(str(row["threads"]), f"{ours:,.0f}", f"{row['vsearch_scaling']:.2f}", f"{theirs:,.0f}",
                      f"{row['hnswlib_scaling']:.2f}", f"{ours / theirs:.2f}",
                      f"{row['checkpoints']} ({row['checkpoint_seconds']:.1f})")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(),
                                    "cores": os.cpu_count(), "count": args.count, "dim": args.dim, "params": params,
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
