"""What deleted ids cost a search: vsearch's search time on an index with some of its ids deleted
(and so filtered out of every result) over its time on the same index with none deleted, loaded
beside it, as a batch and as single queries, at k = 10.

    python benchmarks/deletes.py [--count 100000] [--type hnsw] [--deleted 1000,10000]

Prints a table and writes JSON (default benchmarks/out/deletes.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vsearch.indexes import BuildConfig, build_index, delete_ids, load_index
from vsearch.indexes.bench import clip_like, time_ratio, write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--type", default="hnsw")
    parser.add_argument("--deleted", default="1000,10000", help="comma-separated numbers of deleted ids")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/deletes.json"))
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.deleted.split(","))
    queries = next(clip_like(args.queries, args.dim, seed=7))
    rows = []
    inputs = {"batch": [queries], "single": [query[None] for query in queries[:200]]}
    with tempfile.TemporaryDirectory() as scratch:
        source = write_synthetic(Path(scratch) / "vectors", args.count, args.dim, seed=0)
        path, intact = Path(scratch) / "index", Path(scratch) / "intact"
        build_index(BuildConfig(type=args.type), source, path)
        shutil.copytree(path, intact)
        plain = load_index(intact)
        plain.settle()
        chosen = np.random.default_rng(0).permutation(args.count)  # each count deletes the first of these
        for count in counts:
            delete_ids(path, [f"v{i}" for i in chosen[:count]])
            pruned = load_index(path)
            pruned.settle()
            rows.append({"deleted": len(pruned.deleted),
                         **{name: time_ratio(pruned.search, plain.search, batches) for name, batches in inputs.items()}})
    table = Table(title=f"{args.type}, {args.count:,} × {args.dim}: search time with deletes / without")
    for column in ("deleted ids", "batch", "single query"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['deleted']:,}", f"{row['batch']:.2f}", f"{row['single']:.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "count": args.count, "dim": args.dim,
                                    "type": args.type, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
