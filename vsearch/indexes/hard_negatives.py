"""The `cbvs10m-HNSW` file that UniCLIP's trainer reads to mine hard negatives for its
OCR-semantic head: one line per distinct OCR text of the dataset,
`ocr_text \\t neighbour_1 \\t ... \\t neighbour_10`, the 10 nearest other OCR texts found with an
HNSW index over their text vectors.

Everything streams: texts are read, deduplicated, encoded and added to the graph in batches, and
the neighbours are written batch by batch, so 10 million lines need memory for the graph and the
distinct texts only (and, until the file is written, 1 KB of disk per text for their vectors).

Before writing, `ef_search` is tuned as an index build tunes it: recall@10 of the neighbour lists
of a sample of texts against exact search over all of them, the cheapest setting that reaches the
target. OCR texts repeat with small changes, and near-duplicates are hard for a graph: on 750k
texts made from CBVS-20K queries a fixed ef_search of 200 listed 88% of the true neighbours. The
graph's M and ef_construction, and ef_search (then measured, not tuned), can be set as a build's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from vsearch.embeddings.datasets import Dataset
from vsearch.embeddings.encoders import Encoder
from vsearch.errors import VsearchError
from vsearch.files import fsync_file
from vsearch.indexes.backends import exact_top_k
from vsearch.indexes.hugepages import huge_pages_for_new_regions
from vsearch.indexes.tuning import check_overrides, recall, sample_positions, tune_search
from vsearch.overlap import in_background

NEIGHBOURS = 10
RECALL_SAMPLE = 500
EXACT_CHUNK = 65_536  # texts a step of the exact search reads (128 MiB of float32 at 512-d)
GRAPH = {"M": 32, "ef_construction": 200}  # an index build's defaults at the default target recall


@dataclass
class HardNegatives:
    texts: int  # lines written
    params: dict[str, int]  # M, ef_construction and the ef_search the lists were found at
    recall: float  # recall@10 of the neighbour lists on a sample of texts, against exact search

    @property
    def ef_search(self) -> int:
        return self.params["ef_search"]


def graph_params(overrides: dict[str, int]) -> dict[str, int]:
    """The graph's parameters with the user's `overrides` (M, ef_construction, ef_search) applied."""
    check_overrides(overrides, [*GRAPH, "ef_search"], "the cbvs10m-hnsw layout")
    return {**GRAPH, **overrides}


def distinct_ocr_texts(dataset: Dataset) -> Iterator[str]:
    """Each distinct OCR text once, in file order; `\\N`, empty and malformed lines are skipped."""
    seen: set[str] = set()
    for row in dataset.rows():
        if row.ocr and row.ocr not in seen:
            seen.add(row.ocr)
            yield row.ocr


def read_as_trained(encoder: Encoder) -> Encoder:
    """`encoder`, set to read OCR texts as UniCLIP's semantic head did in training (20 tokens, not a
    query's 12); encoders without a context length are returned as they are."""
    if hasattr(encoder, "context_length"):
        from vsearch.embeddings.uniclip import SEMANTIC_CONTEXT

        encoder.context_length = SEMANTIC_CONTEXT
    return encoder


class _Graph:
    """The hnswlib index as `tune_search` sees an index backend."""

    def __init__(self, index):
        self.index = index

    def set_search(self, setting: dict[str, int]) -> None:
        self.index.set_ef(setting["ef_search"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        labels, distances = self.index.knn_query(queries, k=k)
        return 1 - distances, labels.astype(np.int64)  # hnswlib's "ip" distance is 1 - inner product


def _chosen_ef(index, vectors: np.ndarray, target: float, ef_search: int | None) -> tuple[int, float]:
    """`ef_search`, or where that is None the cheapest whose neighbour lists reach `target` recall@10
    on a sample of the indexed `vectors` (else the best tried); and the recall at it. Each text is
    left out of its own list."""
    count = len(vectors)
    k = min(NEIGHBOURS, count - 1)
    positions = sample_positions(count, RECALL_SAMPLE)
    queries = np.asarray(vectors[positions], np.float32)
    chunks = ((np.arange(start, min(start + EXACT_CHUNK, count)), vectors[start:start + EXACT_CHUNK])
              for start in range(0, count, EXACT_CHUNK))
    truth = exact_top_k(queries, chunks, k + 1)
    if ef_search is not None:
        index.set_ef(ef_search)
        return ef_search, recall(_Graph(index).search, queries, positions, truth, k)
    chosen, sweep = tune_search("hnsw", _Graph(index), {}, queries, positions, truth, target, k)
    ef = chosen["ef_search"]
    return ef, next(s["recall@10"] for s in sweep if s["ef_search"] == ef)


def write_hard_negatives(dataset: Dataset, encoder: Encoder, out: Path, batch: int = 2048, target_recall: float = 0.95,
                         params: dict[str, int] | None = None, threads: int = -1,
                         on_lines: Callable[[int], None] = lambda n: None,
                         on_line_count: Callable[[int], None] = lambda n: None,
                         on_texts: Callable[[int], None] = lambda n: None,
                         on_written: Callable[[int], None] = lambda n: None) -> HardNegatives:
    """Write the file for `dataset` to `out` (via a temporary file). Progress: `on_lines(n)` as lines
    of the dataset are read and their new texts encoded, `on_line_count(n)` once with the lines of a
    local file (counted on another thread), `on_texts(n)` once with the number of distinct texts,
    `on_written(n)` as their neighbour lines are written (at 10M, minutes of graph search).
    `params` as `graph_params` takes them; `threads` as a build's (-1: every core)."""
    import hnswlib

    if not dataset.has_text:
        raise VsearchError(f"dataset {dataset.name} has no OCR texts (format {dataset.format})")
    params = graph_params(params or {})
    index = hnswlib.Index(space="ip", dim=encoder.dim)
    with huge_pages_for_new_regions((1 << 16) * encoder.dim * 4):
        index.init_index(max_elements=1 << 16, M=params["M"], ef_construction=params["ef_construction"])
    index.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    # The vectors again, for the queries and the exact search that tunes them: hnswlib hands them
    # back only as Python lists (get_items, about 23 µs a vector: 4 minutes at 10M), a float16 file
    # beside the output in a few seconds. The graph holds the same float16 values, so that exact and
    # graph scores of a pair agree. The file has no name (10 GB at 10M texts), so a job killed
    # outright leaves nothing of it behind.
    texts: list[str] = []
    lines_reported = 0
    try:
        with tempfile.TemporaryFile(dir=out.parent) as spilled:
            counting = in_background(dataset.expected_rows, on_line_count)
            stream = distinct_ocr_texts(dataset)
            while chunk := list(islice(stream, batch)):
                if len(texts) + len(chunk) > index.get_max_elements():
                    with huge_pages_for_new_regions(2 * index.get_max_elements() * encoder.dim * 4):
                        index.resize_index(2 * index.get_max_elements())
                vectors = encoder.encode_texts(chunk).astype(np.float16)
                index.add_items(vectors.astype(np.float32), np.arange(len(texts), len(texts) + len(chunk)))
                spilled.write(vectors.tobytes())
                texts += chunk
                on_lines(dataset.read - lines_reported)
                lines_reported = dataset.read
            on_lines(dataset.read - lines_reported)
            counting.join()  # a count arriving after the last line would empty the filled bar again
            if len(texts) < 2:
                raise VsearchError(f"dataset {dataset.name} has {len(texts)} distinct OCR text(s): need at least 2")
            on_texts(len(texts))
            spilled.flush()
            queries = np.memmap(spilled, np.float16, mode="r", shape=(len(texts), encoder.dim))
            params["ef_search"], reached = _chosen_ef(index, queries, target_recall, params.get("ef_search"))
            with open(temporary, "w", encoding="utf-8") as handle:
                for start in range(0, len(texts), batch):
                    found, _ = index.knn_query(np.asarray(queries[start:start + batch], np.float32),
                                               k=min(NEIGHBOURS + 1, len(texts)))
                    for label, row in enumerate(found, start):
                        others = [texts[j] for j in row if j != label][:NEIGHBOURS]
                        handle.write("\t".join([texts[label], *others]) + "\n")
                    on_written(len(found))
        fsync_file(temporary)
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return HardNegatives(len(texts), params, reached)
