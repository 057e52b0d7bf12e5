"""An hnswlib index as vsearch loads it, its graph moved onto huge pages on a thread after the
file is read (vsearch/indexes/hugepages.py), against hnswlib's own load of the same file: seconds
to open, seconds until the move is done, and vsearch's search time over hnswlib's `knn_query`, as
a batch and as single queries, at the ef_search the build tuned, k = 10.

    python benchmarks/loaded_hnsw.py [--count 1000000] [--ef-construction 100] [--index DIR]

Without `--index` it builds one over CLIP-like 512-d vectors (ef_construction 100, to build it
sooner; the graph's size, not how it was built, is what the page size matters for). The two loads
are separate copies in memory, so the ratio holds vsearch's own overhead too, which
benchmarks/ann.py measures alone (on one copy). Prints a table and writes JSON (default
benchmarks/out/loaded_hnsw.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import hnswlib
from rich.console import Console
from rich.table import Table

from build_threads import cpu_model
from vsearch.indexes import BuildConfig, build_index, load_index
from vsearch.indexes.backends import HnswlibBackend
from vsearch.indexes.bench import clip_like, time_ratio, write_synthetic
from vsearch.indexes.hugepages import huge_page_bytes


def compare(path: Path, queries_count: int) -> dict:
    before = huge_page_bytes()
    started = time.perf_counter()
    index = load_index(path)
    open_seconds = time.perf_counter() - started
    if not isinstance(index.backend, HnswlibBackend):
        raise SystemExit(f"{path} is not an hnswlib index (type {index.manifest['type']}, "
                         f"engine {index.manifest.get('engine')})")
    index.settle()
    settle_seconds = time.perf_counter() - started - open_seconds
    moved = huge_page_bytes() - before

    raw = hnswlib.Index(space="ip", dim=index.dim)
    started = time.perf_counter()
    raw.load_index(str(path / HnswlibBackend.file_name))
    raw_open_seconds = time.perf_counter() - started
    raw.set_ef(index.backend.ef_search)

    queries = next(clip_like(queries_count, index.dim, seed=7))
    inputs = {"batch": [queries], "single": [query[None] for query in queries[:200]]}
    ratios = {name: time_ratio(index.search, lambda q, k: raw.knn_query(q, k=k), batches, repeats=4)
              for name, batches in inputs.items()}
    return {"count": len(index), "ef_search": index.backend.ef_search, "open_seconds": round(open_seconds, 4),
            "huge_pages_seconds": round(settle_seconds, 4), "huge_page_bytes": moved,
            "hnswlib_open_seconds": round(raw_open_seconds, 4),
            "time_over_hnswlib": {name: round(ratio, 3) for name, ratio in ratios.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--index", type=Path, help="an hnsw index folder to load instead of building one")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "loaded_hnsw.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        path = args.index
        if path is None:
            source = write_synthetic(Path(scratch) / "vectors", args.count, args.dim, seed=0)
            path = Path(scratch) / "index"
            build_index(BuildConfig(type="hnsw", params={"ef_construction": args.ef_construction}), source, path)
        result = compare(path.expanduser(), args.queries)

    table = Table(title=f"hnswlib index of {result['count']:,}, ef_search {result['ef_search']}: "
                        "vsearch's load (huge pages) against hnswlib's")
    for column in ("open s", "huge pages s", "on huge pages", "hnswlib open s", "batch time / hnswlib",
                   "single query / hnswlib"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['open_seconds']:.2f}", f"{result['huge_pages_seconds']:.2f}",
                  f"{result['huge_page_bytes'] / 2**20:,.0f} MiB", f"{result['hnswlib_open_seconds']:.2f}",
                  f"{result['time_over_hnswlib']['batch']:.2f}", f"{result['time_over_hnswlib']['single']:.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
                                    **result}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
