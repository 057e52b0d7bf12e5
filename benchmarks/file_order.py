"""Whether the order of the rows in the files matters to an HNSW build: the same CLIP-like vectors
written in random order and sorted by topic (a dataset listed category by category, or a crawl
that moves from one subject to the next), each built by vsearch from its Parquet files as
`vsearch build-index --type hnsw --embeddings DIR` builds it. For each order: the build's time,
the ef_search it tuned and the recall@10 it measured, then recall@10 of other queries against
exact search over a sweep of ef_search. With `--raw`, hnswlib's own `add_items` too, on the same
vectors in the same order and with the same M and ef_construction (vsearch's defaults).

    python benchmarks/file_order.py [--count 1000000] [--dim 512] [--queries 1000]
                                    [--engine hnswlib|faiss] [--raw] [--scratch DIR]

A graph's first vectors decide how its regions are linked: hnswlib's, and vsearch's skeleton (the
first 32,768 in the files' order, `HnswlibBackend.skeleton`), which spans the collection only
where the files mix their topics. Prints a table and writes JSON (default
benchmarks/out/file_order.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from build_threads import cpu_model
from hnsw_growth import chunks
from vsearch.embeddings.shards import write_vectors_parquet
from vsearch.indexes import BuildConfig, build_index, load_index
from vsearch.indexes.backends import HnswlibBackend, exact_top_k
from vsearch.indexes.bench import CHUNK, TOPICS, clip_like_chunk, clip_like_topics
from vsearch.indexes.tuning import RECALL_K, recall_at
from vsearch.indexes.vectors import open_source

EF_SEARCH = (16, 32, 64, 128, 256)
ORDERS = ("random", "by topic")


def collection(count: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` CLIP-like vectors, rounded to float16 as the files hold them, and each one's topic."""
    parts = [clip_like_topics(min(CHUNK, count - start), dim, 0, number)
             for number, start in enumerate(range(0, count, CHUNK))]
    vectors = np.concatenate([v for v, _ in parts]).astype(np.float16).astype(np.float32)
    return vectors, np.concatenate([t for _, t in parts])


def write_files(folder: Path, vectors: np.ndarray, order: np.ndarray) -> None:
    """The vectors in `order`, CHUNK rows a file, each keeping its id (`v` and its place in the collection)."""
    folder.mkdir(parents=True)
    for number, start in enumerate(range(0, len(order), CHUNK)):
        rows = order[start:start + CHUNK]
        table = pa.table({"id": [f"v{row}" for row in rows], "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors[rows].astype(np.float16).ravel()), vectors.shape[1])})
        write_vectors_parquet(table, folder / f"part-{number:05d}.parquet")


def ids_of(labels: np.ndarray) -> np.ndarray:
    """The ids the files give the vectors at these places in the collection."""
    return np.vectorize(lambda label: f"v{label}")(labels)


def exact(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's exact 10 nearest vectors: (scores, ids)."""
    scores, labels = exact_top_k(queries, chunks(vectors, CHUNK), RECALL_K)
    return scores, ids_of(labels)


def swept(search: Callable[[int], tuple[np.ndarray, np.ndarray]], truth: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """Recall@10 at each ef_search of `search(ef_search) -> (scores, ids)` of the queries."""
    return [{"ef_search": ef, "recall@10": round(recall_at(RECALL_K, search(ef), truth), 4)} for ef in EF_SEARCH]


def measure(order: str, folder: Path, engine: str, queries: np.ndarray, truth: tuple[np.ndarray, np.ndarray]) -> dict:
    """vsearch's build from the files in `folder / "files"` into `folder / "index"`."""
    started = time.perf_counter()
    info = build_index(BuildConfig(type="hnsw", engine=engine), open_source(folder / "files"), folder / "index")
    seconds = time.perf_counter() - started
    index = load_index(folder / "index")

    def search(ef: int) -> tuple[np.ndarray, np.ndarray]:
        index.set_search(ef_search=ef)
        return index.search(queries, RECALL_K)

    return {"order": order, "built_by": f"vsearch ({engine})", "build_seconds": round(seconds, 1),
            "tuned_ef_search": info["params"]["ef_search"], "recall@10_at_build": info["recall"]["recall@10"],
            "sweep": swept(search, truth)}


def measure_raw(order: str, vectors: np.ndarray, rows: np.ndarray, queries: np.ndarray,
                truth: tuple[np.ndarray, np.ndarray]) -> dict:
    """hnswlib's own calls: the `vectors` of `rows`, in that order, a file's worth at a time."""
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    params = HnswlibBackend.build_params
    index.init_index(max_elements=len(rows), M=params["M"], ef_construction=params["ef_construction"])
    started = time.perf_counter()
    for start in range(0, len(rows), CHUNK):
        index.add_items(vectors[rows[start:start + CHUNK]], rows[start:start + CHUNK])
    seconds = time.perf_counter() - started

    def search(ef: int) -> tuple[np.ndarray, np.ndarray]:
        index.set_ef(ef)
        labels, distances = index.knn_query(queries, k=RECALL_K)
        return 1 - distances, ids_of(labels)

    return {"order": order, "built_by": "hnswlib add_items", "build_seconds": round(seconds, 1),
            "tuned_ef_search": None, "recall@10_at_build": None, "sweep": swept(search, truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--engine", choices=("hnswlib", "faiss"), default="hnswlib")
    parser.add_argument("--raw", action="store_true", help="also build with hnswlib's own add_items")
    parser.add_argument("--scratch", type=Path, help="where the files and indexes go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "file_order.json")
    args = parser.parse_args()
    if args.count < 1000 or args.queries < 1:
        parser.error("--count must be at least 1000 and --queries at least 1")
    vectors, topics = collection(args.count, args.dim)
    queries = clip_like_chunk(args.queries, args.dim, seed=2, number=0)
    truth = exact(vectors, queries)
    orders = {"random": np.random.default_rng(3).permutation(args.count), "by topic": np.argsort(topics, kind="stable")}
    if args.scratch is not None:
        args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    results = []
    try:
        for order in ORDERS:
            folder = scratch / order.replace(" ", "-")
            write_files(folder / "files", vectors, orders[order])
            results.append(measure(order, folder, args.engine, queries, truth))
            if args.raw:
                results.append(measure_raw(order, vectors, orders[order], queries, truth))
            shutil.rmtree(folder)  # before the next order's files and index take as much room
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title=f"HNSW, {args.count:,} x {args.dim} vectors of {TOPICS} topics: "
                        f"recall@10 of {args.queries:,} queries at each ef_search")
    for column in ("order", "by", "build s", "tuned ef", *(str(ef) for ef in EF_SEARCH)):
        table.add_column(column, justify="right")
    for result in results:
        tuned = "" if result["tuned_ef_search"] is None else str(result["tuned_ef_search"])
        table.add_row(result["order"].removeprefix("by "), result["built_by"].split()[0],
                      f"{result['build_seconds']:.1f}", tuned, *(f"{row['recall@10']:.3f}" for row in result["sweep"]))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
                                    "count": args.count, "dim": args.dim, "queries": args.queries,
                                    "engine": args.engine, "topics": TOPICS, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
