"""How an IVF-PQ index finds a vector's inverted lists: FAISS's scan of every centroid against the
HNSW graph over them that vsearch builds from 16,384 lists on (`coarse_hnsw`), searched as wide as
vsearch searches it (backends.COARSE_EF, or twice nprobe where that is wider). For each list
count: a single query's milliseconds to pick its nprobe lists (one thread) and the share of the
scan's lists the graph picked; and the seconds to pick the one list of each of `--assign` vectors
being added (every core), with the share given the scan's list.

    python benchmarks/coarse_lists.py [--lists 4096,16384] [--nprobe 16,64] [--assign 100000]
                                      [--kmeans-iterations 10]

The centroids are trained by k-means on 40 CLIP-like vectors per list, as a build trains them
(FAISS's 10 iterations by default; about 13 minutes at 16,384 lists on a 2-core machine). Centroids
drawn from the vectors' distribution instead spread differently: over those, a graph built as
FAISS builds it by default found every vector's nearest list, where over k-means centroids it
missed 0.46% of them. Prints a table and writes JSON (default benchmarks/out/coarse_lists.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from build_threads import cpu_model
from vsearch.indexes.backends import COARSE_EF, COARSE_EF_CONSTRUCTION, COARSE_HNSW_M
from vsearch.indexes.bench import clip_like


def per_query_ms(index: faiss.Index, queries: np.ndarray, k: int, params: faiss.SearchParameters | None) -> float:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as a service's query threads each run one
    try:
        started = time.perf_counter()
        for query in queries:
            index.search(query[None], k, params=params)
        return (time.perf_counter() - started) / len(queries) * 1000
    finally:
        faiss.omp_set_num_threads(threads)


def shared(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def kmeans_centroids(lists: int, dim: int, iterations: int) -> np.ndarray:
    """`lists` centroids trained as an IVF build trains them: spherical k-means on 40 vectors a list."""
    sample = np.concatenate(list(clip_like(40 * lists, dim, seed=1)))
    kmeans = faiss.Kmeans(dim, lists, niter=iterations, spherical=True, seed=1)
    kmeans.train(sample)
    return kmeans.centroids


def measure(lists: int, dim: int, probes: list[int], queries: np.ndarray, added: np.ndarray,
            iterations: int) -> dict:
    centroids = kmeans_centroids(lists, dim, iterations)
    scan = faiss.IndexFlatIP(dim)
    scan.add(centroids)
    graph = faiss.IndexHNSWFlat(dim, COARSE_HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = COARSE_EF_CONSTRUCTION
    started = time.perf_counter()
    graph.add(centroids)
    graph_seconds = time.perf_counter() - started
    search = []
    for nprobe in probes:
        ef = faiss.SearchParametersHNSW(efSearch=max(COARSE_EF, 2 * nprobe))
        search.append({"nprobe": nprobe, "scan_ms": round(per_query_ms(scan, queries, nprobe, None), 4),
                       "graph_ms": round(per_query_ms(graph, queries, nprobe, ef), 4),
                       "lists_shared": round(shared(graph.search(queries, nprobe, params=ef)[1],
                                                    scan.search(queries, nprobe)[1]), 4)})
    started = time.perf_counter()
    nearest = scan.search(added, 1)[1]
    scan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    found = graph.search(added, 1, params=faiss.SearchParametersHNSW(efSearch=COARSE_EF))[1]
    add_seconds = time.perf_counter() - started
    return {"lists": lists, "graph_build_seconds": round(graph_seconds, 3), "search": search,
            "assign": {"vectors": len(added), "scan_seconds": round(scan_seconds, 3),
                       "graph_seconds": round(add_seconds, 3), "same_list": round(float(np.mean(nearest == found)), 4)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists", default="4096,16384", help="comma-separated list counts")
    parser.add_argument("--nprobe", default="16,64", help="comma-separated lists searched per query")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--assign", type=int, default=100_000, help="vectors to find the list of, as an add does")
    parser.add_argument("--kmeans-iterations", type=int, default=10, help="k-means iterations training the centroids")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "coarse_lists.json")
    args = parser.parse_args()
    try:
        counts, probes = ([int(x) for x in value.split(",")] for value in (args.lists, args.nprobe))
    except ValueError:
        parser.error("--lists and --nprobe take comma-separated whole numbers")
    if args.kmeans_iterations < 1:
        parser.error("--kmeans-iterations must be at least 1")
    queries = next(clip_like(args.queries, args.dim, seed=2))
    added = next(clip_like(args.assign, args.dim, seed=3))
    results = [measure(lists, args.dim, probes, queries, added, args.kmeans_iterations) for lists in counts]

    table = Table(title="Finding IVF lists: a scan of the centroids against an HNSW graph "
                        f"(M={COARSE_HNSW_M}, built {COARSE_EF_CONSTRUCTION} wide)")
    for column in ("lists", "nprobe", "scan ms", "graph ms", "lists shared", "assign scan s", "assign graph s",
                   "same list"):
        table.add_column(column, justify="right")
    for result in results:
        for row in result["search"]:
            assign = result["assign"]
            table.add_row(f"{result['lists']:,}", str(row["nprobe"]), f"{row['scan_ms']:.3f}", f"{row['graph_ms']:.3f}",
                          f"{row['lists_shared']:.3f}", f"{assign['scan_seconds']:.2f}",
                          f"{assign['graph_seconds']:.2f}", f"{assign['same_list']:.3f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
                                    "dim": args.dim, "queries": args.queries, "kmeans_iterations": args.kmeans_iterations,
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
