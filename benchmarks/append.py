"""What an append costs against a rebuild. An index of --count CLIP-like vectors (files of 100k, and
a last file of --last rows, as a dataset's last shard is partly filled) is brought up to date with
a dataset that grew: that last file made again with --grown more rows (as `vsearch embed` remakes
a grown dataset's last shard) and a new file of --added rows. `append_index` does it in place;
`build_index` makes a fresh index from the same files. For each: seconds, the search settings it
chose and the recall@10 its manifest reports, and recall@10 measured alike for both: new queries
against exact search over the vectors the files now hold, by id. With --retitled, every file is
instead written again with a new title column, its ids and vectors as they were (as `vsearch
embed` rewrites shards whose titles were edited, or whose covers moved): the append takes up their
rows in place.

    python benchmarks/append.py [--count 200000] [--last 5000] [--grown 5000] [--added 20000] [--type hnsw]
                                [--retitled]

Prints a table and writes JSON (default benchmarks/out/append.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from vsearch.embeddings.shards import write_vectors_parquet
from vsearch.indexes import BuildConfig, append_index, build_index, load_index
from vsearch.indexes.backends import backend_class, exact_top_k
from vsearch.indexes.bench import clip_like, clip_like_table, write_synthetic
from vsearch.indexes.tuning import recall_at
from vsearch.indexes.vectors import VectorSource, open_source


def grow(source: VectorSource, grown: int, added: int, seed: int) -> None:
    """Remake the last file of `source` with `grown` more rows, and write a new file of `added` rows."""
    last = source.files[-1].path
    write_vectors_parquet(pa.concat_tables([pq.read_table(last), _table(grown, source.dim, seed, 1, "grown-")]), last)
    write_vectors_parquet(_table(added, source.dim, seed, 2, "new-"), source.directory / "part-99999.parquet")


def retitle(source: VectorSource) -> None:
    """Write every file of `source` again with a title column added, its rows otherwise as they were."""
    for file in source.files:
        table = pq.read_table(file.path)
        write_vectors_parquet(table.append_column("title", pa.array([f"title {file.name}"] * len(table))), file.path)


def _table(rows: int, dim: int, seed: int, number: int, prefix: str) -> pa.Table:
    return clip_like_table([f"{prefix}{i}" for i in range(rows)], dim, seed, number)


def exact_ids(source: VectorSource, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of each query's k nearest vectors in `source`, by exact inner product."""
    ids: list[np.ndarray] = []

    def chunks():
        start = 0
        for rows, vectors in source.batches():
            ids.append(rows.column("id").to_numpy(zero_copy_only=False))
            yield np.arange(start, start + len(vectors)), vectors
            start += len(vectors)

    scores, positions = exact_top_k(queries, chunks(), k)
    return scores, np.concatenate(ids)[positions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--last", type=int, default=5_000)
    parser.add_argument("--grown", type=int, default=5_000)
    parser.add_argument("--added", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--type", default="hnsw")
    parser.add_argument("--retitled", action="store_true", help="Every file retitled instead of the dataset grown.")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/append.json"))
    args = parser.parse_args()
    queries = next(clip_like(args.queries, args.dim, seed=7))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "vectors"
        write_synthetic(folder, args.count, args.dim, seed=0)
        write_vectors_parquet(_table(args.last, args.dim, 1, 0, "last-"), folder / "part-90000.parquet")
        source = open_source(folder)
        appended, rebuilt = Path(scratch) / "appended", Path(scratch) / "rebuilt"
        build_index(BuildConfig(type=args.type), source, appended)
        if args.retitled:
            retitle(source)
        else:
            grow(source, args.grown, args.added, seed=1)
        grown = open_source(source.directory)
        started = time.perf_counter()
        append_info = append_index(appended, grown)
        append_seconds = time.perf_counter() - started
        started = time.perf_counter()
        build_info = build_index(BuildConfig(type=args.type), grown, rebuilt)
        build_seconds = time.perf_counter() - started
        truth = exact_ids(grown, queries, 10)
        measured = {name: recall_at(10, load_index(path).search(queries, 10), truth)
                    for name, path in (("append", appended), ("rebuild", rebuilt))}
    report = {"date": time.strftime("%Y-%m-%d"), "type": args.type, "count": args.count, "last": args.last,
              "retitled": args.retitled, "grown": args.grown,
              "refreshed_files": len(append_info["appends"][-1].get("refreshed", [])),
              "added": args.added, "dim": args.dim, "append_seconds": round(append_seconds, 2),
              "rebuild_seconds": round(build_seconds, 2), "append_over_rebuild": round(append_seconds / build_seconds, 3),
              "search_params": {name: {key: info["params"][key] for key in backend_class(args.type).search_params}
                                for name, info in (("append", append_info), ("rebuild", build_info))},
              "reported_recall@10": {"append": append_info["recall"]["recall@10"],
                                     "rebuild": build_info["recall"]["recall@10"]},
              "measured_recall@10": {name: round(value, 4) for name, value in measured.items()}}
    change = ("every file retitled" if args.retitled
              else f"last file of {args.last:,} +{args.grown:,} rows, new file of {args.added:,}")
    table = Table(title=f"{args.type}, {args.count + args.last:,} × {args.dim}; {change}")
    for column in ("", "seconds", "search", "recall@10 reported", "recall@10 measured"):
        table.add_column(column, justify="right")
    for name, seconds in (("append", append_seconds), ("rebuild", build_seconds)):
        search = " ".join(f"{key}={value}" for key, value in report["search_params"][name].items())
        table.add_row(name, f"{seconds:.1f}", search, f"{report['reported_recall@10'][name]:.3f}",
                      f"{measured[name]:.3f}")
    Console().print(table)
    print(f"append / rebuild: {report['append_over_rebuild']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
