"""ANN benchmark (`vsearch bench`, `benchmarks/ann.py`).

For each size N and index type: build time, peak memory of the build (anonymous, with the resident
peak, which counts the pages of mapped files too, beside it), size on disk and in memory,
time to open it; then, over sweeps of ef_search (hnsw) and nprobe (ivfpq), recall@1/10/100 against
exact search, batch QPS and single-query latency p50/p99; and, at the parameters the build chose,
vsearch's `Index.search` against calling the library directly on the same loaded index, as a ratio.

Vectors resemble CLIP embeddings: unit-norm, clustered, with a low intrinsic dimension (a 64-d
latent mixture mapped to `dim` dimensions plus a little noise); queries are fresh draws from the
same distribution. Real shards can be used instead (`--embeddings`); queries are then a sample of
their own vectors, so each query's nearest neighbour is itself.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import queue
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vsearch.embeddings.shards import write_vectors_parquet
from vsearch.errors import TooLargeForMemory, VsearchError
from vsearch.indexes.backends import ENGINES, HnswlibBackend, IvfPqBackend
from vsearch.indexes.index import Index, load_index
from vsearch.indexes.store import BuildConfig, build_index
from vsearch.indexes.tuning import exact_neighbours, gather, recall_at, sample_positions
from vsearch.indexes.vectors import VectorSource, open_source
from vsearch.memory import proc_bytes
from vsearch.overlap import exit_with_parent

SWEEPS = {"hnsw": [{"ef_search": ef} for ef in (16, 32, 64, 128, 256, 512)],
          "ivfpq": [{"nprobe": p} for p in (4, 8, 16, 32, 64, 128)], "flat": [{}]}
CHUNK = 100_000
LATENT = 64
TOPICS = 256


MIN_SIZE = 1000


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    dim: int = 512
    queries: int = 1000
    latency_queries: int = 200
    indexes: list[str] = field(default_factory=lambda: ["flat", "hnsw", "hnsw:faiss", "ivfpq"])
    embeddings: Path | None = None
    out: Path = Path("benchmarks/out/ann")
    seed: int = 0


def clip_like(count: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """`count` CLIP-like unit vectors in float32 chunks, the same for the same seed. (float32, as users
    pass queries: given float64, the raw library calls convert them, and their timing with it.)"""
    for number, start in enumerate(range(0, count, CHUNK)):
        yield clip_like_chunk(min(CHUNK, count - start), dim, seed, number)


def clip_like_chunk(rows: int, dim: int, seed: int, number: int) -> np.ndarray:
    """Chunk `number` of `clip_like`: each chunk draws from its own stream, so that chunks can be
    made in parallel and still be the same for the same seed."""
    return clip_like_topics(rows, dim, seed, number)[0]


def clip_like_topics(rows: int, dim: int, seed: int, number: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `number` of `clip_like`, and the topic (one of TOPICS centres) each vector was drawn around."""
    model = np.random.default_rng(1234)  # the distribution is fixed; seed only picks the draws
    mixing = (model.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
    centres = 1.5 * model.standard_normal((TOPICS, LATENT)).astype(np.float32)
    rng = np.random.default_rng((seed, number))
    topics = rng.integers(0, TOPICS, rows)
    latent = centres[topics] + rng.standard_normal((rows, LATENT), np.float32)
    vectors = latent @ mixing + 0.15 * rng.standard_normal((rows, dim), np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), topics


def clip_like_table(ids: list[str], dim: int, seed: int, number: int) -> pa.Table:
    """`ids` with the vectors of chunk `number` of `clip_like`, as vsearch shards store them (float16)."""
    chunk = clip_like_chunk(len(ids), dim, seed, number).astype(np.float16)
    return pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), dim)})


def _write_synthetic_part(folder: Path, count: int, dim: int, seed: int, number: int) -> None:
    start = number * CHUNK
    ids = [f"v{i}" for i in range(start, min(start + CHUNK, count))]
    write_vectors_parquet(clip_like_table(ids, dim, seed, number), folder / f"part-{number:05d}.parquet")


def write_synthetic(folder: Path, count: int, dim: int, seed: int) -> VectorSource:
    """Synthetic vectors as bring-your-own Parquet (float16 and encoded as vsearch shards are), a part
    per chunk made on every core: one core takes about 7 minutes for 10M x 512."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = range(math.ceil(count / CHUNK))
    with concurrent.futures.ProcessPoolExecutor(min(len(parts), os.cpu_count() or 1),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(functools.partial(_write_synthetic_part, folder, count, dim, seed), parts))
    return open_source(folder)


def peak_resident_bytes() -> int:
    """This process's peak resident memory. Not ru_maxrss: Linux carries that across exec, so a
    spawned child would report its parent's peak."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonymousPeak:
    """The peak of this process's anonymous resident memory while inside: the heap and the libraries'
    own allocations, the memory its work needs. Sampled every `interval` seconds, as Linux keeps no
    peak of it. The resident peak (`peak_resident_bytes`) also counts the pages of files the process
    has mapped, which the kernel takes back when it needs them: an IVF-PQ build's tuning reads its
    float16 vectors through a map, and at 10M x 512 its resident peak was 12.4 GB. Where there is no
    /proc, `bytes` is the resident peak."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, proc_bytes("/proc/self/status", "RssAnon") or 0)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "AnonymousPeak":
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()

    @property
    def bytes(self) -> int:
        return self.peak or peak_resident_bytes()  # no sample above 0: no /proc


def _build_child(index_type: str, engine: str | None, source: VectorSource, path: Path, results: Any,
                 parent: int) -> None:
    exit_with_parent(parent)
    try:
        with AnonymousPeak() as peak:
            info = build_index(BuildConfig(type=index_type, engine=engine), source, path)
    except VsearchError as exc:  # the vectors' fault (too few, an odd shape): the parent says so
        results.put(exc)
        return
    results.put((info, {"build_peak_bytes": peak.bytes, "build_peak_resident_bytes": peak_resident_bytes()}))


def _build(index_type: str, engine: str | None, source: VectorSource, path: Path
           ) -> tuple[dict[str, Any], dict[str, int]]:
    """Build in a fresh child process, so the peak memory measured is the build's alone: the info it
    returns, and its peaks of anonymous and of resident memory.

    Spawned, not forked: a fork taken after BLAS or OpenMP threads have started can deadlock.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_build_child, args=(index_type, engine, source, path, results, os.getpid()))
    child.start()
    while True:
        try:
            built = results.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"building the {index_type} index failed (exit code {child.exitcode})") from None
    child.join()
    if isinstance(built, VsearchError):
        raise built
    return built


def _recalls(found: tuple[np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """recall@k for each k the found lists are long enough for (ties at the k-th score count)."""
    return {f"recall@{k}": recall_at(k, found, truth) for k in (1, 10, 100) if k <= found[1].shape[1]}


def _raw_search(index: Index):
    """The library's own search call on the loaded index, as a user of faiss or hnswlib would make it."""
    backend = index.backend
    if isinstance(backend, HnswlibBackend):
        return lambda q, k: backend.index.knn_query(q, k=k)
    if isinstance(backend, IvfPqBackend):
        return backend.search  # faiss search of k * k_factor candidates, then the exact refinement
    return lambda q, k: backend.index.search(q, k)


def time_ratio(ours, theirs, inputs: list[np.ndarray], repeats: int = 10) -> float:
    """Sum over `inputs` (query batches) of each one's best time through `ours(queries, 10)`, over the
    same through `theirs`. The two run in alternation, each going first in every other round, so that
    drift in the machine's state (page cache, allocator, other load), and whatever a call leaves
    behind for the next, reach both alike. Best per input, not per run: on a busy machine a few
    single queries in any run wait a scheduler tick (4 ms against 0.5 ms IVF-PQ queries here),
    which moved a ratio of run totals by 20%."""
    best = np.full((2, len(inputs)), math.inf)
    for turn in range(repeats):
        for side in (0, 1) if turn % 2 == 0 else (1, 0):
            call = (ours, theirs)[side]
            for i, queries in enumerate(inputs):
                started = time.perf_counter()
                call(queries, 10)
                best[side, i] = min(best[side, i], time.perf_counter() - started)
    return float(best[0].sum() / best[1].sum())


def measure(index: Index, queries: np.ndarray, truth: tuple[np.ndarray, np.ndarray], latency_queries: int,
            setting: dict[str, int]) -> dict[str, Any]:
    """Recall@1/10 and QPS from a k=10 batch search, recall@100 from a k=100 one (HNSW widens ef to k,
    so one k=100 search would hide what ef_search does at k=10), and single-query latency at k=10."""
    index.set_search(**setting)
    started = time.perf_counter()
    top10 = index.search(queries, 10)
    seconds = time.perf_counter() - started
    top100 = index.search(queries, 100)
    latencies = []
    for query in queries[:latency_queries]:
        begin = time.perf_counter()
        index.search(query[None], 10)
        latencies.append((time.perf_counter() - begin) * 1000)
    recalls = {k: v for k, v in _recalls(top10, truth).items() if k != "recall@100"}
    recalls["recall@100"] = _recalls(top100, truth)["recall@100"]
    return {**setting, **recalls, "qps": len(queries) / seconds,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}


def overhead(index: Index, queries: np.ndarray) -> dict[str, float]:
    """vsearch's search time over the raw library call's, batch and single query, at k = 10."""
    raw = _raw_search(index)
    return {"batch": time_ratio(index.search, raw, [queries]),
            "single": time_ratio(index.search, raw, [query[None] for query in queries[:200]])}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _open_seconds(path: Path, repeats: int = 3) -> float:
    """Best time to open the index, its files in the page cache as on a serving machine (not
    counting an hnswlib graph's move onto huge pages, which searches need not wait for)."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        index = load_index(path)
        best = min(best, time.perf_counter() - started)
        index.settle()  # before the next load adds a second graph's memory and work
    return best


def bench_size(config: BenchConfig, count: int, scratch: Path, say: Callable[[str], None] = print
               ) -> list[dict[str, Any]]:
    """A row of results for each index of `config` at `count` vectors; an index too large for this
    machine's memory is skipped, said why, so that the others are measured."""
    if config.embeddings:
        source = open_source(config.embeddings)
        count = source.count
        queries = gather(source, sample_positions(count, config.queries, seed=config.seed + 7))
    else:
        source = write_synthetic(scratch / f"vectors-{count}", count, config.dim, config.seed)
        queries = np.concatenate(list(clip_like(config.queries, config.dim, config.seed + 1)))
    scores, positions = exact_neighbours(source, queries, 100)
    # Exact neighbours are source row positions; an index numbers rows in its own insertion order.
    source_ids = np.asarray([i for rows, _ in source.batches() for i in rows.column("id").to_pylist()], dtype=object)
    truth = (scores, source_ids[positions])
    rows = []
    for spec in config.indexes:
        index_type, _, engine = spec.partition(":")
        path = scratch / f"index-{count}-{index_type}-{engine or 'default'}"
        try:
            info, peaks = _build(index_type, engine or None, source, path)
        except TooLargeForMemory as exc:
            say(f"skipped {spec}: {exc}")
            continue
        open_seconds = _open_seconds(path)
        index = load_index(path)
        index.settle()  # every setting timed at full speed, as a serving process runs
        chosen = {k: info["params"][k] for k in type(index.backend).search_params}
        summary = {"n": count, "dim": source.dim, "type": index_type, "engine": info["engine"],
                   "build_seconds": info["build_seconds"], **peaks, "disk_bytes": _size(path),
                   "open_seconds": open_seconds,
                   "memory_bytes": info["memory_bytes"], "params": info["params"], "chosen": chosen,
                   "build_recall@10": info["recall"]["recall@10"],
                   "sweep": [measure(index, queries, truth, config.latency_queries, {**chosen, **s})
                             for s in SWEEPS[index_type]]}
        index.set_search(**chosen)
        summary["at_chosen"] = measure(index, queries, truth, config.latency_queries, chosen)
        summary["overhead"] = overhead(index, queries)
        rows.append(summary)
        shutil.rmtree(path, ignore_errors=True)
    return rows


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| N | index | params chosen | recall@1 | recall@10 | recall@100 | QPS | p50 ms | p99 ms | build s | "
             "build peak MiB (resident) | disk MiB | in-memory MiB | open ms | vsearch / raw (batch, single) |",
             "|" + "---|" * 15]
    for r in results:
        at = r["at_chosen"]
        params = ", ".join(f"{k}={v}" for k, v in r["chosen"].items()) or "exact"
        lines.append(f"| {r['n']:,} | {r['type']} ({r['engine']}) | {params} | {at['recall@1']:.3f} | "
                     f"{at['recall@10']:.3f} | {at['recall@100']:.3f} | {at['qps']:,.0f} | {at['p50_ms']:.2f} | "
                     f"{at['p99_ms']:.2f} | {r['build_seconds']:.0f} | {r['build_peak_bytes'] / 2**20:,.0f} "
                     f"({r['build_peak_resident_bytes'] / 2**20:,.0f}) | "
                     f"{r['disk_bytes'] / 2**20:,.0f} | {r['memory_bytes'] / 2**20:,.0f} | {r['open_seconds'] * 1000:,.0f} | "
                     f"{r['overhead']['batch']:.2f}, {r['overhead']['single']:.2f} |")
    lines += ["", "Sweeps (recall@10 / QPS):", ""]
    for r in results:
        cells = [f"{'/'.join(f'{k}={v}' for k, v in s.items() if k in ('ef_search', 'nprobe')) or 'exact'}: "
                 f"{s['recall@10']:.3f} / {s['qps']:,.0f}" for s in r["sweep"]]
        lines.append(f"- {r['n']:,} {r['type']} ({r['engine']}): " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Recall@10 against QPS, one panel per N; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted({r["n"] for r in results})
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        for r in (r for r in results if r["n"] == size):
            axis.plot([s["qps"] for s in r["sweep"]], [s["recall@10"] for s in r["sweep"]], marker="o",
                      label=f"{r['type']} ({r['engine']})")
        axis.set(xscale="log", xlabel="queries per second", ylabel="recall@10", title=f"N = {size:,}")
        axis.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def run_bench(config: BenchConfig, scratch: Path, say=print) -> dict[str, Path]:
    """Run every size and write `<out>.json`, `<out>.md` and `<out>.png`; returns the paths written."""
    for spec in config.indexes:
        index_type, _, engine = spec.partition(":")
        if index_type not in ENGINES or (engine and engine not in ENGINES[index_type]):
            raise VsearchError(f"unknown index {spec!r}: use flat, hnsw, hnsw:faiss or ivfpq")
    if not config.embeddings and (not config.sizes or min(config.sizes) < MIN_SIZE):
        raise VsearchError(f"--sizes must each be at least {MIN_SIZE:,} vectors (recall@100 and IVF training need them)")
    if config.queries < 1 or config.dim < 1:
        raise VsearchError("--queries and --dim must be at least 1")
    results: list[dict[str, Any]] = []
    for count in config.sizes if not config.embeddings else [0]:
        say(f"benchmarking N={count:,}" if count else f"benchmarking {config.embeddings}")
        results += bench_size(config, count, scratch, say)
    if not results:
        raise VsearchError("no index was measured: none fits this machine's memory at these sizes")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    written = {"json": config.out.with_suffix(".json"), "markdown": config.out.with_suffix(".md")}
    meta = {"date": time.strftime("%Y-%m-%d"), "queries": config.queries, "cpus": multiprocessing.cpu_count()}
    written["json"].write_text(json.dumps({**meta, "results": results}, indent=1))
    written["markdown"].write_text(markdown(results))
    if plot(results, config.out.with_suffix(".png")):
        written["plot"] = config.out.with_suffix(".png")
    return written
