"""Choosing index parameters, as autofaiss does: build parameters from the vector count, the
dimension, a memory budget and a target recall; search parameters from recall measured on the
built index.

Recall@10 is the share of a query's exact 10 nearest vectors that the index returns, where any
vector scoring as high as the exact 10th counts as one of them: a dataset with repeated covers has
many vectors tied at a score, any of which is a right answer, and counting by label alone marked a
correct index wrong and sent the tuning after a recall it could not reach. A build, and an
append, measure it on rows held out of the index until then (see `store.build_index`): queries
the index has not seen, as real queries are. Where nothing can be held out (an index of a few
vectors, an append that only retires some), a sample of the vectors the index shows serve, read
back from it and searched for among all of them, each one's own label left out of both lists;
that leave-one-out figure is optimistic for graphs, whose search starts next to a query that is
itself in the graph.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from vsearch.errors import TooLargeForMemory, VsearchError, human_size
from vsearch.indexes.backends import COARSE_HNSW_M, exact_top_k, merged_top_k
from vsearch.indexes.vectors import VectorFile, VectorSource
from vsearch.memory import machine_memory

RECALL_K = 10
# Two scores of one pair of float16 vectors, summed in different orders by different libraries,
# differ by float32 rounding only; closer than this, scores are ties.
TIE_TOLERANCE = 1e-5
# The exact pass reads at most this many files at once, in batches of this many rows: a reader
# holds two batches of vectors and one of scores, about 200 MB at 500 queries.
EXACT_THREADS = 8
EXACT_BATCH = 16_384
EF_SWEEP = (16, 32, 64, 128, 256, 512, 1024)
NPROBE_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PQ_BYTES = (8, 16, 32, 48, 64, 96, 128, 192, 256)
# From this many IVF lists on (N about 10M), an HNSW graph finds a query's lists (backends.COARSE_HNSW_M);
# at 4,096 lists (1M) it saved nothing over a scan of the centroids.
COARSE_HNSW_LISTS = 16_384

T = TypeVar("T")


# Each parameter's least (and greatest, where it has one) value; every other parameter is at least
# 1. The libraries fail badly outside them: hnswlib crashes the process on M=0.
PARAM_RANGES: dict[str, tuple[int, int | None]] = {"M": (2, None), "opq": (0, 1), "nbits": (1, 16),
                                                   "coarse_hnsw": (0, 1)}


def check_params(params: dict[str, int]) -> None:
    for key, value in params.items():
        low, high = PARAM_RANGES.get(key, (1, None))
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise VsearchError(f"parameter {key}={value} is out of range: {key} must be {allowed}")


def check_overrides(overrides: dict[str, int], known: list[str], what: str) -> None:
    """Refuse a user's parameter that `what` does not take (`known` are those it does), or one out of range."""
    unknown = set(overrides) - set(known)
    if unknown:
        raise VsearchError(f"unknown parameter {', '.join(sorted(unknown))} for {what} "
                           f"(known: {', '.join(known) or 'none'})")
    check_params(overrides)


@dataclass
class Choice:
    params: dict[str, int]
    reasons: list[str] = field(default_factory=list)


def memory_bytes(index_type: str, count: int, dim: int, params: dict[str, int]) -> int:
    """Estimated resident size of the index once loaded (IVF-PQ's float16 vectors stay on disk)."""
    if index_type == "flat":
        return count * dim * 4
    if index_type == "hnsw":
        return count * (dim * 4 + params["M"] * 2 * 4 + 64)
    rotation = dim * dim * 4 if params.get("opq") else 0
    graph = 2 * COARSE_HNSW_M * 4 if params.get("coarse_hnsw") else 0  # a list's links at the graph's base level
    centroids = params["nlist"] * (dim * 4 + graph)
    return count * (params["m"] + 8) + centroids + rotation


def refinement_bytes(index_type: str, count: int, dim: int) -> int:
    """Size of the float16 vectors IVF-PQ keeps on disk beside its index, for refinement."""
    return count * dim * 2 if index_type == "ivfpq" else 0


def _power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(value, 1))))


def choose_build_params(index_type: str, defaults: dict[str, int], count: int, dim: int, overrides: dict[str, int],
                        memory_budget: int | None, target_recall: float) -> Choice:
    """Build parameters with the reason for each; the user's own settings always win."""
    check_overrides(overrides, list(defaults), index_type)
    choice = Choice(dict(defaults))
    if index_type == "hnsw":
        _choose_hnsw(choice, target_recall)
    elif index_type == "ivfpq":
        _choose_ivfpq(choice, count, dim, memory_budget, target_recall, overrides.get("nlist"))
    for key, value in overrides.items():
        choice.params[key] = value
        choice.reasons.append(f"{key}={value}: set by you")
    size = memory_bytes(index_type, count, dim, choice.params)
    if memory_budget is not None and size > memory_budget:
        raise VsearchError(f"{_needs(index_type, count, dim, size)}, over the memory budget of "
                           f"{human_size(memory_budget)}{_smaller(index_type)}")
    choice.reasons.append(f"estimated memory {human_size(size)} for {count:,} vectors")
    if memory_budget is None:  # this machine's memory is the budget: past it, a build of hours is killed
        choice.reasons += check_machine_memory(index_type, count, dim, choice.params, "to build it for a larger "
                                               "machine, give its --memory-budget")
    return choice


def _needs(index_type: str, count: int, dim: int, size: int) -> str:
    return f"{index_type} with {count:,} x {dim}-d vectors needs about {human_size(size)}"


def _smaller(index_type: str) -> str:
    return "; ivfpq fits far more vectors in the same memory" if index_type != "ivfpq" else ""


def check_machine_memory(index_type: str, count: int, dim: int, params: dict[str, int], otherwise: str) -> list[str]:
    """Refuse an index of `count` vectors larger than this machine's memory (saying what to do
    `otherwise`); the note to give where it is larger than the memory free now."""
    size = memory_bytes(index_type, count, dim, params)
    total, available = machine_memory()
    if size > total:
        raise TooLargeForMemory(f"{_needs(index_type, count, dim, size)}, more than this machine's {human_size(total)} "
                           f"of memory{_smaller(index_type)}; {otherwise}")
    if available is not None and size > available:
        return [f"that is more than the {human_size(available)} of memory free now (of {human_size(total)}): it "
                "may slow down, or be stopped for memory"]
    return []


def _choose_hnsw(choice: Choice, target: float) -> None:
    m = 16 if target <= 0.9 else 32 if target <= 0.97 else 48
    choice.params["M"] = m
    choice.params["ef_construction"] = 200 if target <= 0.97 else 400
    choice.reasons.append(f"M={m}, ef_construction={choice.params['ef_construction']}: graph degree for "
                          f"target recall@10 {target}")


def _pq_sizes(dim: int) -> list[int]:
    """The bytes per vector PQ may use on `dim`-d vectors: the usual code sizes the dimension allows,
    where one comes within a factor 2 of a byte per 8 dims; else any divisor of it. Of the usual
    sizes, only 8 divides 1000: each byte would code 125 dims, and a build's tuning, to reach its
    recall, probed every list of 30,000 such vectors (125 bytes: 10 of 512 lists, the same recall)."""
    usual = [m for m in PQ_BYTES if dim % m == 0 and dim // m >= 2]
    if any(dim / 16 <= m <= dim / 4 for m in usual):
        return usual
    return [m for m in range(1, dim + 1) if dim % m == 0]


def _default_pq_size(dim: int) -> int:
    """The PQ bytes per vector nearest a byte per 8 dims (64 for 512-d), the larger of two as near."""
    return min(_pq_sizes(dim), key=lambda m: (abs(math.log(8 * m / dim)), -m))


def shortfall_hint(index_type: str, params: dict[str, int], dim: int) -> str:
    """The parameters to raise when a build's measured recall falls short of its target (the search
    parameters were already swept as far as they go)."""
    if index_type == "hnsw":
        return (f"a denser graph may reach it: --param M={2 * params['M']} "
                f"--param ef_construction={2 * params['ef_construction']}")
    larger = [m for m in _pq_sizes(dim) if m > params["m"]]
    more_bytes = f"--param m={larger[0]} (more bytes per vector) or " if larger else ""
    return f"{more_bytes}--param k_factor={2 * params['k_factor']} (more candidates re-scored) may reach it"


def _choose_ivfpq(choice: Choice, count: int, dim: int, memory_budget: int | None, target: float,
                  nlist: int | None) -> None:
    """IVF-PQ's parameters for `nlist` lists (the user's), or for about 4 * sqrt(N) of them."""
    if nlist is None:
        nlist = max(1, min(_power_of_two(4 * math.sqrt(count)), 65536, _power_of_two(count / 39 / 2)))
        choice.reasons.append(f"nlist={nlist}: about 4*sqrt(N) inverted lists for N={count:,}")
    # FAISS's k-means asks for 39 points per list and warns on fewer: at 10M vectors (16,384 lists)
    # a sample capped at 500k gave it 30 (655k vectors of 512-d are 1.3 GB while training).
    train = min(count, max(40 * nlist, 50_000))
    divisors = _pq_sizes(dim)
    m = _default_pq_size(dim)
    why = f"m={m}: {m} bytes per vector ({dim // m} dims per sub-quantiser)"
    if memory_budget is not None:
        per_vector = (memory_budget - nlist * dim * 4 - dim * dim * 4) / max(count, 1) - 8
        fitting = [x for x in divisors if x <= per_vector]
        if not fitting:
            raise VsearchError(f"ivfpq cannot fit {count:,} vectors in {human_size(memory_budget)}: even PQ{divisors[0]} "
                               f"needs about {human_size(count * (divisors[0] + 8))}")
        if target > 0.95 or max(fitting) < m:
            m = max(fitting)
            why = f"m={m}: the most bytes per vector the memory budget allows"
    # Each sub-quantiser's k-means wants 39 points per centroid; small data gets fewer centroids,
    # and no OPQ rotation, which would cost more to train than it could win back.
    nbits = max(1, min(8, int(math.log2(max(train, 2) / 39)) if train >= 78 else 1))
    opq = int(nbits == 8)
    coarse_hnsw = int(nlist >= COARSE_HNSW_LISTS)
    choice.params.update(nlist=nlist, m=m, nbits=nbits, opq=opq, train_size=train, coarse_hnsw=coarse_hnsw)
    choice.reasons += [f"train_size={train:,}: vectors sampled to train the quantisers", why,
                       f"nbits={nbits}, opq={opq}: " + ("8-bit codes behind a learned OPQ rotation" if opq else
                                                        "too few vectors for 8-bit codes and an OPQ rotation"),
                       f"coarse_hnsw={coarse_hnsw}: " + (f"the {nlist:,} lists found through an HNSW graph of their "
                                                         "centroids, not a scan of them all" if coarse_hnsw else
                                                         f"the {nlist:,} lists' centroids scanned, few enough"),
                       "refinement re-scores k*k_factor candidates on the float16 vectors, read from disk"]


def sample_positions(count: int, size: int, seed: int = 0) -> np.ndarray:
    """`size` distinct row positions out of `count`, sorted, the same for the same arguments."""
    size = min(size, count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def _each_file(source: VectorSource, work: Callable[[VectorFile, int, int], T]) -> list[T]:
    """`work(file, start, rows)` for every file, where `start` is the position of its first row and
    `rows` how many it has (excluded ids left out), up to EXACT_THREADS files at once: decoding the
    vectors is most of a pass over them (1M×512 in 10 files on two cores: 20 s one file at a time,
    13 s two at a time)."""
    jobs = list(zip(source.files, source.file_starts, source.live_rows))
    with ThreadPoolExecutor(max(1, min(len(jobs), EXACT_THREADS, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda job: work(*job), jobs))


def _file_vectors(source: VectorSource, file: VectorFile) -> Iterator[tuple[int, np.ndarray]]:
    """(position within the file of the first, vectors) for each batch of the file."""
    at = 0
    for _, vectors in source.batches([file], batch_rows=EXACT_BATCH):
        yield at, vectors
        at += len(vectors)


def gather(source: VectorSource, positions: np.ndarray) -> np.ndarray:
    """The float32 vectors at `positions` (sorted), in one pass over the files that hold any."""
    out = np.empty((len(positions), source.dim), np.float32)

    def fill(file: VectorFile, start: int, rows: int) -> None:
        first, end = np.searchsorted(positions, [start, start + rows])
        if first == end:
            return
        wanted = positions[first:end] - start
        for at, vectors in _file_vectors(source, file):
            low, high = np.searchsorted(wanted, [at, at + len(vectors)])
            out[first + low:first + high] = vectors[wanted[low:high] - at]

    _each_file(source, fill)
    return out


def exact_neighbours(source: VectorSource, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and row positions of each query's k nearest vectors by exact inner product, best
    first, in one pass over the vectors."""
    def file_best(file: VectorFile, start: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        chunks = ((np.arange(start + at, start + at + len(vectors)), vectors)
                  for at, vectors in _file_vectors(source, file))
        return exact_top_k(queries, chunks, k)

    return merged_top_k(len(queries), _each_file(source, file_best), k)


def recall_at(k: int, found: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray]) -> float:
    """Mean recall@k of `found` (scores, labels) against `exact` (scores, labels), row by row, best
    first: a found label counts when it is one of the exact k or its score ties the exact k-th. A
    row with nothing to find (in an index of one vector, a query's own row left out) does not
    count; where no row has anything to find, nothing was missed: 1.0."""
    shares = []
    for found_scores, found_labels, exact_scores, exact_labels in zip(*found, *exact):
        wanted = min(k, len(exact_labels))
        if wanted == 0:
            continue
        right = set(exact_labels[:wanted])
        bar = exact_scores[wanted - 1] - TIE_TOLERANCE
        shares.append(sum(label in right or score >= bar
                          for score, label in zip(found_scores[:k], found_labels[:k])) / wanted)
    return float(np.mean(shares)) if shares else 1.0


def _without_own(scores: np.ndarray, labels: np.ndarray, own: np.ndarray, k: int) -> tuple[list, list]:
    """Each row's first k results other than its own label and the padding (-1)."""
    kept = [[(s, x) for s, x in zip(row_scores, row) if x != me and x >= 0][:k]
            for row_scores, row, me in zip(scores, labels, own)]
    return [[s for s, _ in row] for row in kept], [[x for _, x in row] for row in kept]


def recall(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray, own: np.ndarray,
           truth: tuple[np.ndarray, np.ndarray], k: int = RECALL_K) -> float:
    """Recall@k of `search(queries, k) -> (scores, labels)` against exact neighbours `truth`,
    leaving out each query's `own` label (-1 for queries not in the index)."""
    return recall_at(k, _without_own(*search(queries, k + 1), own, k), _without_own(*truth, own, k))


def tune_search(index_type: str, backend, params: dict[str, int], queries: np.ndarray, own: np.ndarray,
                truth: tuple[np.ndarray, np.ndarray], target: float,
                k: int = RECALL_K) -> tuple[dict[str, int], list[dict[str, float]]]:
    """The cheapest search parameters that reach `target` recall@10 (recall@k for a `k` below 10,
    where there are fewer neighbours to find), else the best tried, and the sweep, cheapest first.

    The sweep doubles a setting until it reaches the target, then bisects between the last two to
    within an eighth: a search costs about in proportion to ef_search or nprobe, and at 1.4M OCR
    texts the first doubling to reach 0.95 was 1024, where twice the cost of the setting below it
    was at stake."""
    def measure(setting: dict[str, int]) -> float:
        backend.set_search(setting)
        return recall(backend.search, queries, own, truth, k)

    if index_type == "hnsw":
        settings = [{"ef_search": ef} for ef in EF_SWEEP]
    elif index_type == "ivfpq":
        probes = [p for p in NPROBE_SWEEP if p <= params["nlist"]]
        settings = [{"nprobe": p, "k_factor": params["k_factor"]} for p in probes]
        settings += [{"nprobe": probes[-1], "k_factor": f} for f in (20, 40) if f > params["k_factor"]]
    else:
        return {}, [{"recall@10": measure({})}]
    sweep = []
    for setting in settings:
        sweep.append({**setting, "recall@10": measure(setting)})
        if sweep[-1]["recall@10"] >= target:
            break
    if len(sweep) > 1 and sweep[-1]["recall@10"] >= target:
        sweep += _bisected(measure, sweep[-2], sweep[-1], target)
    sweep.sort(key=lambda s: tuple(s[key] for key in settings[0]))
    best = next((s for s in sweep if s["recall@10"] >= target), max(sweep, key=lambda s: s["recall@10"]))
    chosen = {key: int(value) for key, value in best.items() if key != "recall@10"}
    backend.set_search(chosen)
    return chosen, sweep


def _bisected(measure: Callable[[dict[str, int]], float], short: dict[str, float], reached: dict[str, float],
              target: float) -> list[dict[str, float]]:
    """Settings between `short` (below `target`) and `reached` (at it), which differ in one
    parameter, measured by bisection until the two that bound the target are within an eighth of
    the lower."""
    setting = {key: int(value) for key, value in reached.items() if key != "recall@10"}
    (key,) = [name for name in setting if setting[name] != short[name]]
    low, high = int(short[key]), setting[key]
    tried = []
    while high - low > max(1, low // 8):
        middle = {**setting, key: (low + high) // 2}
        tried.append({**middle, "recall@10": measure(middle)})
        low, high = (low, middle[key]) if tried[-1]["recall@10"] >= target else (middle[key], high)
    return tried
