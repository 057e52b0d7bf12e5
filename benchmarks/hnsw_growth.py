"""HNSW insertion rate as one graph grows: vectors/s over each step of a build, for each engine and
graph setting, then recall@10 and batch queries/s over a sweep of ef_search.

    python benchmarks/hnsw_growth.py [--count 1000000] [--step 250000] [--threads N] [--dim 512]
                                     [--engines hnswlib,vsearch,faiss,faiss-fp16,faiss-sq8]
                                     [--graphs 32/200,32/100] [--extrapolate 10000000]

On a lent 16-core machine hnswlib's rate fell from 24,000 vectors/s over the first 250k to 7,600
by 1.5M (benchmarks/RESULTS.md): past the cache, every step of an insert's search reads a vector
from memory. The engines:

- `hnswlib`: hnswlib's own calls;
- `vsearch`: the same graph as vsearch builds it: its memory on huge pages
  (vsearch/indexes/hugepages.py), so that the page tables stay in the cache, and its vectors
  inserted a window at a time, near ones one after another once the graph holds its skeleton
  (`HnswlibBackend.insertion_order`), so that the graph an insert reads is in the cache from the
  inserts before it;
- `faiss`, `faiss-fp16`, `faiss-sq8`: FAISS's HNSW over float32, float16 and 8-bit vectors, which read
  a half or a quarter of the bytes for each distance. vsearch builds only the first; the others are
  candidates, and this says whether their rate holds up as the graph grows, and what recall they
  give before any refinement.

A sparser graph (`--graphs M/ef_construction`, several allowed) builds faster and needs a wider
search for the same recall; the sweep says how much wider. The vectors are made in memory, not
read from Parquet. Prints a table and writes JSON (default benchmarks/out/hnsw_growth.json).

A 10M build outlasts the 15 minutes of device time a lent session has, so `--extrapolate N`
estimates each build's time at N from its steps, as a range: the low end holds the last step's
rate to the end; the high end lets the rate go on falling from there as a power law fitted to the
later half of the steps (rate ∝ n^-a), likely too steep once every insert reads from memory anyway.
They are estimates, labelled so in the table and the JSON, not measurements.
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
from vsearch.indexes.backends import HnswlibBackend, InsertionWindow, exact_top_k
from vsearch.indexes.bench import clip_like

ENGINES = ("hnswlib", "vsearch", "faiss", "faiss-fp16", "faiss-sq8")
EF_SEARCH = (32, 64, 128, 256)
TRAINING_ROWS = 100_000  # what the 8-bit quantiser learns each dimension's range from


def new_index(engine: str, graph: tuple[int, int], dim: int, args: argparse.Namespace, sample: np.ndarray) -> Any:
    m, ef_construction = graph
    if engine == "hnswlib":
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=args.count, M=m, ef_construction=ef_construction)
        index.set_num_threads(args.threads)
        return index
    if engine == "vsearch":  # hnswlib with its graph on huge pages (vsearch/indexes/hugepages.py)
        backend = HnswlibBackend.create(Path("."), dim, args.count, {"M": m, "ef_construction": ef_construction})
        backend.set_threads(args.threads)
        return backend
    quantiser = {"faiss-fp16": faiss.ScalarQuantizer.QT_fp16, "faiss-sq8": faiss.ScalarQuantizer.QT_8bit}
    if engine == "faiss":
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWSQ(dim, quantiser[engine], m, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
    index.hnsw.efConstruction = ef_construction
    return index


def insert(index: Any, vectors: np.ndarray, start: int) -> None:
    if isinstance(index, hnswlib.Index):
        index.add_items(vectors, np.arange(start, start + len(vectors)))
    elif isinstance(index, HnswlibBackend):  # as a build adds them: a window at a time, near vectors first
        window = InsertionWindow(index)
        window.add(vectors, np.arange(start, start + len(vectors)))
        window.flush()
    else:
        index.add(vectors)


def search(index: Any, queries: np.ndarray, ef: int) -> np.ndarray:
    if isinstance(index, hnswlib.Index):
        index.set_ef(ef)
        return index.knn_query(queries, k=10)[0].astype(np.int64)
    if isinstance(index, HnswlibBackend):
        index.set_search({"ef_search": ef})
        return index.search(queries, 10)[1]
    index.hnsw.efSearch = ef
    return index.search(queries, 10)[1]


def chunks(vectors: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels, vectors) `rows` at a time, as `exact_top_k` takes them."""
    for start in range(0, len(vectors), rows):
        part = vectors[start:start + rows]
        yield np.arange(start, start + len(part)), part


def swept(index: Any, queries: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    """Recall@10 and batch queries/s at each ef_search."""
    search(index, queries[:100], EF_SEARCH[0])  # the first call's page faults are not the search's
    rows = []
    for ef in EF_SEARCH:
        began = time.perf_counter()
        found = search(index, queries, ef)
        qps = len(queries) / (time.perf_counter() - began)
        recall = np.mean([len(set(mine) & set(best)) / 10 for mine, best in zip(found, truth)])
        rows.append({"ef_search": ef, "recall_at_10": round(float(recall), 4), "qps": round(qps)})
    return rows


def grow(engine: str, graph: tuple[int, int], vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
         args: argparse.Namespace) -> dict[str, Any]:
    """One build of `engine` over `vectors`, a step at a time: the rate of each step, then the search sweep."""
    index = new_index(engine, graph, vectors.shape[1], args, vectors[:TRAINING_ROWS])
    steps, started = [], time.perf_counter()
    for start in range(0, len(vectors), args.step):
        chunk = vectors[start:start + args.step]
        began = time.perf_counter()
        insert(index, chunk, start)
        steps.append({"up_to": start + len(chunk), "vectors_per_s": round(len(chunk) / (time.perf_counter() - began))})
        # As it goes, so that a run stopped at its time limit still says how far the rates got.
        print(f"{engine} M={graph[0]} ef_construction={graph[1]}: up to {steps[-1]['up_to']:,} "
              f"at {steps[-1]['vectors_per_s']:,} vectors/s", flush=True)
    seconds = time.perf_counter() - started
    return {"engine": engine, "M": graph[0], "ef_construction": graph[1], "steps": steps,
            "seconds": round(seconds, 1), "search": swept(index, queries, truth)}


def extrapolated(run: dict[str, Any], target: int) -> dict[str, float]:
    """Seconds for `run`'s build to reach `target` vectors: `low_s` at its last step's rate, `high_s`
    with the rate falling as the power law `exponent` fitted to the later half of its steps."""
    steps = run["steps"]
    built, last_rate = steps[-1]["up_to"], steps[-1]["vectors_per_s"]
    starts = [0] + [step["up_to"] for step in steps[:-1]]
    middles = [(start + step["up_to"]) / 2 for start, step in zip(starts, steps)]
    later = slice(len(steps) // 2 if len(steps) >= 4 else -2, None)  # main() asks for two steps at least
    slope = np.polyfit(np.log(middles[later]), np.log([step["vectors_per_s"] for step in steps[later]]), 1)[0]
    low = run["seconds"] + (target - built) / last_rate
    if slope >= 0:  # the rate held up: nothing to extrapolate a fall from
        return {"to": target, "exponent": 0.0, "low_s": round(low, 1), "high_s": round(low, 1)}
    # From the last step on, rate(n) = last_rate · (n / its middle)^slope; its inverse integrated to the target.
    fall = -float(slope)
    rest = (target ** (1 + fall) - built ** (1 + fall)) / ((1 + fall) * last_rate * middles[-1] ** fall)
    return {"to": target, "exponent": round(fall, 3), "low_s": round(low, 1),
            "high_s": round(run["seconds"] + float(rest), 1)}


def graph_settings(text: str) -> list[tuple[int, int]]:
    """`32/200,16/100` as (M, ef_construction) pairs."""
    try:
        pairs = [tuple(int(part) for part in item.split("/")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 or min(pair) < 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: give M/ef_construction pairs, each at least 2, e.g. 32/200,16/100")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=250_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--graphs", type=graph_settings, default=[(32, 200)],
                        help="M/ef_construction pairs, comma-separated (default 32/200, vsearch's)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--extrapolate", type=int, default=None, metavar="N",
                        help="estimate each build's time at N vectors from its steps (see above)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "hnsw_growth.json")
    args = parser.parse_args()
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine {unknown[0]}: use {', '.join(ENGINES)}")
    if args.extrapolate is not None and (args.extrapolate <= args.count or args.count < 2 * args.step):
        parser.error("--extrapolate needs N above --count, and --count of at least two --step")
    faiss.omp_set_num_threads(args.threads)

    vectors = np.concatenate(list(clip_like(args.count, args.dim, seed=0)))
    queries = np.concatenate(list(clip_like(args.queries, args.dim, seed=1)))
    truth = exact_top_k(queries, chunks(vectors, args.step), 10)[1]
    runs = [grow(engine, graph, vectors, queries, truth, args) for graph in args.graphs for engine in engines]
    if args.extrapolate:
        for run in runs:
            run["extrapolated"] = extrapolated(run, args.extrapolate)

    table = Table(title=f"HNSW insertion, vectors/s, {args.threads} threads, {args.dim}-d; "
                        "then recall@10 / batch queries/s")
    table.add_column("up to", justify="right")
    for run in runs:
        table.add_column(f"{run['engine']}\nM={run['M']}, efc={run['ef_construction']}", justify="right")
    for row, up_to in enumerate(step["up_to"] for step in runs[0]["steps"]):
        table.add_row(f"{up_to:,}", *(f"{run['steps'][row]['vectors_per_s']:,}" for run in runs))
    table.add_row("seconds", *(f"{run['seconds']:,}" for run in runs))
    if args.extrapolate:
        table.add_row(f"estimated minutes\nto {args.extrapolate:,}",
                      *(f"{run['extrapolated']['low_s'] / 60:.0f}-{run['extrapolated']['high_s'] / 60:.0f}\n"
                        f"(n^-{run['extrapolated']['exponent']})" for run in runs))
    for row, ef in enumerate(EF_SEARCH):
        table.add_row(f"ef_search {ef}", *(f"{run['search'][row]['recall_at_10']:.3f} / {run['search'][row]['qps']:,}"
                                             for run in runs))
    Console().print(table)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
              "count": args.count, "step": args.step, "dim": args.dim, "queries": args.queries, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
