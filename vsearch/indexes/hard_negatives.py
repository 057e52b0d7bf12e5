"""The `cbvs10m-HNSW` file that UniCLIP's trainer reads to mine hard negatives for its
OCR-semantic head: one line per distinct OCR text of the dataset,
`ocr_text \\t neighbour_1 \\t ... \\t neighbour_10`, the 10 nearest other OCR texts found with an
HNSW index over their text vectors.

Everything streams: texts are read, deduplicated and encoded in batches and added to the graph a
window at a time, as an index build adds vectors (`InsertionWindow`: 2^18 texts, near ones one after
another once the graph holds its first 32,768), and the neighbours are searched for a window at a
time, near ones together too, and written in the texts' order, so 10 million lines need memory
for the graph, the distinct texts and one window's float16 vectors only.

A run at the real size takes hours, so it keeps its work in `<out>.partial/` and a stopped run
(Ctrl-C, a crash, `kill -9`) goes on from its last checkpoint, taken between windows, when the same
command runs again: the graph as hnswlib saves it, the float16 vectors of its texts and
`checkpoint.json`. The texts are not stored: they are the dataset's first distinct ones, read again
(not encoded) on resuming, and a digest of them says whether the dataset still begins with them.
Checkpoints are spaced as `resume.py` says (at 10M texts a save of about 20 GB), and one more is
taken when the graph holds every text. The lines are written there too (`lists.tmp`), a window at
a time, each recorded once synced, so that a run stopped in them (at 10M, more than half of the
run) searches again only the window it was in, with the same `ef_search`. The file is moved into
place once its last line is written, and the folder removed.

Before writing, `ef_search` is tuned as an index build tunes it: recall@10 of the neighbour lists
of a sample of texts against exact search over all of them, the cheapest setting that reaches the
target. OCR texts repeat with small changes, and near-duplicates are hard for a graph: on 750k
texts made from CBVS-20K queries a fixed ef_search of 200 listed 88% of the true neighbours. The
graph's M and ef_construction, and ef_search (then measured, not tuned), can be set as a build's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from vsearch.embeddings.datasets import Dataset
from vsearch.embeddings.encoders import Encoder
from vsearch.errors import VsearchError, counted
from vsearch.files import errors_naming, fsync_file
from vsearch.indexes.backends import (HnswlibBackend, InsertionWindow, exact_top_k, loaded_hnswlib_graph,
                                      new_hnswlib_graph, save_hnswlib_graph)
from vsearch.indexes.resume import CheckpointFolder
from vsearch.indexes.hugepages import huge_pages_for_new_regions
from vsearch.indexes.tuning import check_overrides, memory_bytes, recall, sample_positions, tune_search
from vsearch.overlap import in_background

NEIGHBOURS = 10
RECALL_SAMPLE = 500
EXACT_CHUNK = 65_536  # texts a step of the exact search reads (128 MiB of float32 at 512-d)
GRAPH = {"M": 32, "ef_construction": 200}  # an index build's defaults at the default target recall
FIRST_CAPACITY = 1 << 16  # texts the graph has room for before it first grows (it doubles)


@dataclass
class HardNegatives:
    texts: int  # lines written
    params: dict[str, int]  # M, ef_construction and the ef_search the lists were found at
    recall: float  # recall@10 of the neighbour lists on a sample of texts, against exact search
    checkpoints: int = 0  # graphs saved by this run, for a stopped run to go on from
    checkpoint_seconds: float = 0.0  # the time they took

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


def _chosen_ef(graph: HnswlibBackend, vectors: np.ndarray, target: float, ef_search: int | None) -> tuple[int, float]:
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
        graph.set_search({"ef_search": ef_search})
        return ef_search, recall(graph.search, queries, positions, truth, k)
    chosen, sweep = tune_search("hnsw", graph, {}, queries, positions, truth, target, k)
    ef = chosen["ef_search"]
    return ef, next(s["recall@10"] for s in sweep if s["ef_search"] == ef)


def _neighbours_of(graph: HnswlibBackend, queries: np.ndarray, batch: int,
                   on_searched: Callable[[int], None]) -> np.ndarray:
    """The labels nearest each of `queries` (itself among them, as a rule), searched `batch` at a
    time, near ones one after another as the graph inserts its later windows: they read the same
    part of the graph, still in the cache (1.3 times as fast at 550k texts, benchmarks/RESULTS.md)."""
    order = graph.near_first(queries)
    found = np.empty((len(queries), _search_width(len(graph))), np.int64)
    for start in range(0, len(queries), batch):
        part = order[start:start + batch]
        found[part] = graph.search(np.asarray(queries[part], np.float32), found.shape[1])[1]
        on_searched(len(part))
    return found


def _search_width(texts: int) -> int:
    """How many labels to search for, a text's nearest others and, as a rule, itself."""
    return min(NEIGHBOURS + 1, texts)


def _line(texts: list[str], label: int, found: np.ndarray) -> str:
    """The file's line of text `label`: it and the nearest others of the labels `found` for it."""
    return "\t".join([texts[label], *[texts[j] for j in found if j != label][:NEIGHBOURS]]) + "\n"


def lists_bytes(graph: HnswlibBackend, queries: np.ndarray, texts: list[str]) -> int:
    """About the size of the file: the lines of a sample of the texts, scaled up. Not from the texts'
    average length: the texts most often listed as neighbours are shorter (16% over at 60k texts)."""
    positions = sample_positions(len(texts), RECALL_SAMPLE, seed=2)
    found = graph.search(np.asarray(queries[positions], np.float32), _search_width(len(texts)))[1]
    sample = sum(len(_line(texts, int(label), row).encode()) for label, row in zip(positions, found))
    return sample * len(texts) // len(positions)


def _write_lists(run: _PartialRun, graph: HnswlibBackend, queries: np.ndarray, texts: list[str],
                 listed: dict[str, Any], batch: int, on_written: Callable[[int], None]) -> None:
    """Write the lines of `texts` to `run.lists` from line `listed["lines"]` on (those before are in it
    already), a window at a time, each recorded once written for a stopped run to go on from."""
    with errors_naming(run.lists), open(run.lists, "r+b" if listed["lines"] else "w+b") as handle:
        if listed["lines"]:
            handle.truncate(listed["bytes"])  # a window a stop cut short
            handle.seek(listed["bytes"])
            on_written(listed["lines"])
        for start in range(listed["lines"], len(texts), graph.insertion_window):
            found = _neighbours_of(graph, queries[start:start + graph.insertion_window], batch, on_written)
            for label, row in enumerate(found, start):
                handle.write(_line(texts, label, row).encode())
            listed = {**listed, "lines": start + len(found), "bytes": handle.tell()}
            run.record_lines(handle, listed)


def _not_finite(encoder: Encoder, texts: list[str], vectors: np.ndarray) -> VsearchError:
    """The error for `encoder` giving vectors with NaN or infinite values for some of `texts`."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    more = f" (and {counted(len(bad) - 1, 'other')} in its batch of {len(texts):,})" if len(bad) > 1 else ""
    return VsearchError(f"{encoder.spec} gave a vector with NaN or infinite values for the OCR text "
                        f"{texts[bad[0]]!r}{more}: its weights may be damaged")


def _digest_of(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


class _PartialRun:
    """The run's checkpoint folder (see the module's notes) with its graph and vectors."""

    def __init__(self, out: Path, encoder: Encoder, params: dict[str, int], note: Callable[[str], None]):
        # What the graph's vectors depend on; `model` names it in messages, the fingerprint decides.
        made_with = {"model": encoder.spec, "fingerprint": encoder.fingerprint, "dim": encoder.dim,
                     "context_length": getattr(encoder, "context_length", None),
                     "M": params["M"], "ef_construction": params["ef_construction"]}
        self.folder = CheckpointFolder(out, "vsearch build-index --layout cbvs10m-hnsw", made_with, note)
        self.dim, self.params, self.note = encoder.dim, params, note
        self.graph, self.spilled = self.folder.path / "graph.hnsw", self.folder.path / "vectors.f16"
        self.lists = self.folder.path / "lists.tmp"  # the file's lines, until they are all written
        self.saved: dict[str, str] = {}  # texts in the graph on disk -> the digest of those texts
        self.listed: dict[str, Any] = {}  # the lines in `lists` of the stopped run: see `lists_to_resume`

    def resumed(self, stream: Iterator[str]) -> tuple[Any, list[str]]:
        """The graph of a stopped run and its texts, read again from `stream`; or None and the texts
        read where there is none to go on from (none saved, one that cannot be read, or the dataset no
        longer begins with its texts). A graph made with other settings is refused."""
        state = self.folder.saved() if self.graph.exists() else None
        if state is None:
            return None, []
        try:
            index, _ = loaded_hnswlib_graph(self.graph, self.dim)
        except RuntimeError as exc:  # hnswlib checks the file's length against what it lists
            self.note(f"cannot read the graph of the stopped run in {self.folder.path} ({exc}): starting over")
            return None, []
        count = index.get_current_count()
        if (self.spilled.stat().st_size if self.spilled.exists() else 0) < count * self.dim * 2:
            self.note(f"the stopped run in {self.folder.path} lacks the vectors of its graph's texts: starting over")
            return None, []
        texts = list(islice(stream, count))
        if state["saved"].get(str(count)) != _digest_of(texts):
            self.note(f"{self.folder.path} holds a stopped run over texts this dataset no longer begins with: "
                      "starting over")
            return None, texts
        self.note(f"resuming the stopped run in {self.folder.path}: {count:,} texts already in its graph")
        self.saved = {str(count): state["saved"][str(count)]}
        self.listed = state.get("lists", {})
        return index, texts

    def holds_graph_of(self, count: int) -> bool:
        """Whether the checkpoint on disk is the graph of the first `count` texts."""
        return str(count) in self.saved and self.graph.exists()

    def lists_to_resume(self, count: int, chosen_by: dict[str, Any]) -> dict[str, Any] | None:
        """What the stopped run wrote of the lines of these `count` texts, searched with the graph on
        disk and an ef_search `chosen_by` the same setting: {texts, chosen_by, ef_search, recall,
        lines, bytes}; None where it wrote none of theirs."""
        listed = self.listed
        if (not self.holds_graph_of(count) or listed.get("texts") != count or listed.get("chosen_by") != chosen_by
                or not self.lists.exists() or self.lists.stat().st_size < listed["bytes"]):
            return None
        return listed

    def record_lines(self, handle: IO[bytes], listed: dict[str, Any]) -> None:
        """Sync the lines in `handle` and record them (`listed`) beside the graph they were searched in,
        unless that graph is no longer on disk (removed to make room for the file)."""
        with errors_naming(self.lists):
            handle.flush()
            os.fsync(handle.fileno())
        if self.holds_graph_of(listed["texts"]):
            self.folder.write_state({"saved": self.saved, "lists": listed})

    def vectors(self, count: int) -> IO[bytes]:
        """The file of the graph's float16 vectors, open for adding to its first `count`."""
        handle = open(self.spilled, "r+b" if count and self.spilled.exists() else "w+b")
        handle.truncate(count * self.dim * 2)
        handle.seek(0, os.SEEK_END)
        return handle

    def checkpoint(self, index: Any, vectors: IO[bytes], texts: list[str]) -> None:
        """Save the graph holding `texts`, whose vectors are in `vectors`. The state lists the graph
        on disk and the one about to replace it, so a run stopped between the two writes finds the
        digest of its graph's texts whichever it left."""
        last = f"{int(next(iter(self.saved))):,} texts" if self.saved else None
        if not self.folder.has_room(memory_bytes("hnsw", len(texts), self.dim, self.params), last):
            return
        # Not in the save, whose failure costs only the checkpoint: vectors not written cost the run.
        with errors_naming(self.spilled):
            vectors.flush()
            os.fsync(vectors.fileno())
        temporary = self.graph.with_name(self.graph.name + ".tmp")
        with self.folder.saving(last, temporary):
            on_disk = {**self.saved, str(len(texts)): _digest_of(texts)}
            self.folder.write_state({"saved": on_disk})
            save_hnswlib_graph(index, temporary)
            fsync_file(temporary)
            os.replace(temporary, self.graph)
            self.saved = {str(len(texts)): on_disk[str(len(texts))]}


def write_hard_negatives(dataset: Dataset, encoder: Encoder, out: Path, batch: int = 2048, target_recall: float = 0.95,
                         params: dict[str, int] | None = None, threads: int = -1,
                         on_lines: Callable[[int], None] = lambda n: None,
                         on_line_count: Callable[[int], None] = lambda n: None,
                         on_texts: Callable[[int], None] = lambda n: None,
                         on_written: Callable[[int], None] = lambda n: None,
                         note: Callable[[str], None] = lambda line: None) -> HardNegatives:
    """Write the file for `dataset` to `out` (its lines gathered in the checkpoint folder, then
    moved), going on from a stopped run's checkpoint where there is one. Progress: `on_lines(n)` as
    lines of the dataset are read and their new texts encoded (a resumed run's texts are read, not
    encoded), `on_line_count(n)` once with the lines of a local file (counted on another thread),
    `on_texts(n)` once with the number of distinct texts, `on_written(n)` as their neighbour lines
    are written (at 10M, minutes of graph search; a resumed run's written lines at once);
    `note(line)` says what became of a stopped run. `params` as `graph_params` takes them;
    `threads` as a build's (-1: every core)."""
    if not dataset.has_text:
        raise VsearchError(f"dataset {dataset.name} has no OCR texts (format {dataset.format})")
    params = graph_params(params or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    run = _PartialRun(out, encoder, params, note)
    try:
        counting = in_background(dataset.expected_rows, on_line_count)
        stream = distinct_ocr_texts(dataset)
        index, texts = run.resumed(stream)
        pending: list[str] = []
        if index is None:  # the texts read, if any, are the dataset's and go into a new graph
            index, pending, texts = new_hnswlib_graph(encoder.dim, FIRST_CAPACITY, params), texts, []
        if threads > 0:  # hnswlib reads -1 there as one thread: its few-rows check compares it unsigned
            index.set_num_threads(threads)
        # Added as an index build's graph is (`InsertionWindow`: near texts one after another once
        # the graph holds its skeleton).
        graph = HnswlibBackend(index, index.ef)
        graph.set_threads(threads)
        lines_reported = 0
        # The vectors again, beside the graph, for the queries and the exact search that tunes them:
        # hnswlib hands them back only as Python lists (get_items, about 23 µs a vector: 4 minutes at
        # 10M). The graph holds the same float16 values, so that exact and graph scores of a pair agree.
        with run.vectors(len(texts)) as spilled:

            def checkpoint_if_due() -> None:  # between windows, when the graph holds every text read
                if run.folder.due():
                    run.checkpoint(index, spilled, texts)

            window = InsertionWindow(graph, after=checkpoint_if_due)
            source = chain(pending, stream)
            while chunk := list(islice(source, batch)):
                if len(texts) + len(chunk) > index.get_max_elements():
                    with huge_pages_for_new_regions(2 * index.get_max_elements() * encoder.dim * 4):
                        index.resize_index(2 * index.get_max_elements())
                vectors = encoder.encode_texts(chunk)
                if not np.isfinite(vectors).all():  # damaged weights: they would spoil every text's neighbours
                    raise _not_finite(encoder, chunk, vectors)
                vectors = vectors.astype(np.float16)
                with errors_naming(run.spilled):
                    spilled.write(vectors.tobytes())
                texts += chunk
                on_lines(dataset.read - lines_reported)
                lines_reported = dataset.read
                window.add(vectors, np.arange(len(texts) - len(chunk), len(texts)))
            window.flush()
            on_lines(dataset.read - lines_reported)
            counting.join()  # a count arriving after the last line would empty the filled bar again
            if len(texts) < 2:
                run.folder.remove()
                raise VsearchError(f"dataset {dataset.name} has {len(texts)} distinct OCR text(s): need at least 2")
            on_texts(len(texts))
            with errors_naming(run.spilled):
                spilled.flush()
            queries = np.memmap(spilled, np.float16, mode="r", shape=(len(texts), encoder.dim))
            if not run.holds_graph_of(len(texts)) and run.folder.saves_checkpoints:
                run.checkpoint(index, spilled, texts)  # the whole graph, for a run stopped in its lists to go on from
            chosen_by = ({"ef_search": params["ef_search"]} if "ef_search" in params
                         else {"target_recall": target_recall})
            listed = run.lists_to_resume(len(texts), chosen_by)
            if listed is None:
                ef_search, reached = _chosen_ef(graph, queries, target_recall, params.get("ef_search"))
                listed = {"texts": len(texts), "chosen_by": chosen_by, "ef_search": ef_search, "recall": reached,
                          "lines": 0, "bytes": 0}
            else:
                graph.set_search({"ef_search": listed["ef_search"]})
                note(f"resuming its lists: {listed['lines']:,} of the {len(texts):,} texts' lines already written")
            params["ef_search"], reached = listed["ef_search"], listed["recall"]
            # Now rather than when the disk fills partway through the lists (minutes of search at 10M).
            # The checkpoint's graph, which the file supersedes, goes first where that makes room; its
            # vectors are the queries still, and the lines written are the file's.
            run.folder.room_for_output(lists_bytes(graph, queries, texts) - listed["bytes"], out.parent,
                                       f"the file {out}", make=True, keep=(run.spilled.name, run.lists.name))
            _write_lists(run, graph, queries, texts, listed, batch, on_written)
        os.replace(run.lists, out)
    finally:
        run.folder.close()
    run.folder.remove()
    return HardNegatives(len(texts), params, reached, run.folder.checkpoints, run.folder.checkpoint_seconds)
