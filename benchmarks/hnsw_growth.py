"""HNSW insertion rate as one graph grows: vectors/s over each step of a build, for hnswlib and for
FAISS's HNSW over float32, float16 and 8-bit vectors, with recall@10 at the end.

    python benchmarks/hnsw_growth.py [--count 1000000] [--step 250000] [--threads N] [--dim 512]
                                     [--engines hnswlib,faiss,faiss-fp16,faiss-sq8] [--M 32] [--ef-construction 200]

On a lent 16-core machine hnswlib's rate fell from 24,000 vectors/s over the first 250k to 7,600
by 1.5M (benchmarks/RESULTS.md): past the cache, every step of an insert's search reads a vector
from memory, and 16 cores share its bandwidth. A graph over float16 or 8-bit vectors reads a half
or a quarter of the bytes for each distance. vsearch builds neither (`faiss-fp16` and `faiss-sq8`
are candidates); this says whether their rate holds up as the graph grows, and what recall they
give before any refinement. The vectors are made in memory, not read from Parquet. Prints a table
and writes JSON (default benchmarks/out/hnsw_growth.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import hnswlib
import numpy as np
from rich.console import Console
from rich.table import Table

from build_threads import cpu_model
from vsearch.indexes.backends import exact_top_k
from vsearch.indexes.bench import clip_like

ENGINES = ("hnswlib", "faiss", "faiss-fp16", "faiss-sq8")
EF_SEARCH = (64, 128)
TRAINING_ROWS = 100_000  # what the 8-bit quantiser learns each dimension's range from


def new_index(engine: str, dim: int, args: argparse.Namespace, sample: np.ndarray) -> Any:
    if engine == "hnswlib":
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=args.count, M=args.M, ef_construction=args.ef_construction)
        index.set_num_threads(args.threads)
        return index
    quantiser = {"faiss-fp16": faiss.ScalarQuantizer.QT_fp16, "faiss-sq8": faiss.ScalarQuantizer.QT_8bit}
    if engine == "faiss":
        index = faiss.IndexHNSWFlat(dim, args.M, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWSQ(dim, quantiser[engine], args.M, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
    index.hnsw.efConstruction = args.ef_construction
    return index


def insert(index: Any, vectors: np.ndarray, start: int) -> None:
    if isinstance(index, hnswlib.Index):
        index.add_items(vectors, np.arange(start, start + len(vectors)))
    else:
        index.add(vectors)


def search(index: Any, queries: np.ndarray, ef: int) -> np.ndarray:
    if isinstance(index, hnswlib.Index):
        index.set_ef(ef)
        return index.knn_query(queries, k=10)[0].astype(np.int64)
    index.hnsw.efSearch = ef
    return index.search(queries, 10)[1]


def chunks(vectors: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels, vectors) `rows` at a time, as `exact_top_k` takes them."""
    for start in range(0, len(vectors), rows):
        part = vectors[start:start + rows]
        yield np.arange(start, start + len(part)), part


def grow(engine: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
         args: argparse.Namespace) -> dict[str, Any]:
    """One build of `engine` over `vectors`, a step at a time: the rate of each step, and recall@10."""
    index = new_index(engine, vectors.shape[1], args, vectors[:TRAINING_ROWS])
    steps, started = [], time.perf_counter()
    for start in range(0, len(vectors), args.step):
        chunk = vectors[start:start + args.step]
        began = time.perf_counter()
        insert(index, chunk, start)
        steps.append({"up_to": start + len(chunk), "vectors_per_s": round(len(chunk) / (time.perf_counter() - began))})
    seconds = time.perf_counter() - started
    recall = {ef: float(np.mean([len(set(found) & set(best)) / 10 for found, best in zip(search(index, queries, ef), truth)]))
              for ef in EF_SEARCH}
    return {"steps": steps, "seconds": round(seconds, 1), "recall_at_10": {str(ef): round(r, 4) for ef, r in recall.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=250_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--M", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "hnsw_growth.json")
    args = parser.parse_args()
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine {unknown[0]}: use {', '.join(ENGINES)}")
    faiss.omp_set_num_threads(args.threads)

    vectors = np.concatenate(list(clip_like(args.count, args.dim, seed=0)))
    queries = np.concatenate(list(clip_like(args.queries, args.dim, seed=1)))
    truth = exact_top_k(queries, chunks(vectors, args.step), 10)[1]
    results = {engine: grow(engine, vectors, queries, truth, args) for engine in engines}

    table = Table(title=f"HNSW insertion, vectors/s, {args.threads} threads, M={args.M}, "
                        f"ef_construction={args.ef_construction}, {args.dim}-d")
    table.add_column("up to", justify="right")
    for engine in engines:
        table.add_column(engine, justify="right")
    for row, up_to in enumerate(step["up_to"] for step in results[engines[0]]["steps"]):
        table.add_row(f"{up_to:,}", *(f"{results[e]['steps'][row]['vectors_per_s']:,}" for e in engines))
    table.add_row("seconds", *(f"{results[e]['seconds']:,}" for e in engines))
    for ef in EF_SEARCH:
        table.add_row(f"recall@10, ef {ef}", *(f"{results[e]['recall_at_10'][str(ef)]:.3f}" for e in engines))
    Console().print(table)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
              "count": args.count, "step": args.step, "dim": args.dim, "M": args.M,
              "ef_construction": args.ef_construction, "queries": args.queries, "engines": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
