"""Building an index, appending to it, deleting from it: writing the on-disk index format.

`indexes/<name>/` holds:

    index.json       manifest: type, engine, build and search parameters and why they were chosen,
                     dim, metric, count, kind, the files it was built from (with checksums and
                     the labels of their rows), the encoder spec and fingerprint, build time and
                     id, measured recall (and the target the search parameters were tuned to),
                     appends, and the folder it was written to (`index.read_index_manifest`
                     follows the embeddings to where they moved with it)
    index.faiss | index.hnsw   the library's own file, loadable by plain faiss or hnswlib
    vectors-NNNNN.npy   (ivfpq) float16 vectors for exact refinement, memory-mapped at search time
    rows.arrow       row i: the id and metadata (title, ocr, uri, ...) of library label i, read
                     memory-mapped (see rows.py)
    deleted.parquet  the rows it holds but no longer shows: deleted ids, replaced and retired
                     vectors (see deleted.py)

An index is built (or appended to) in a temporary folder beside its destination and renamed into
place, so a failed build never replaces a good index; the next build removes what a killed one left.
An HNSW build also saves its graph as it grows to `<name>.partial/` (see resume.py), an IVF-PQ build
its index once trained, from which the same build, run again after it stopped, goes on.
`index.py` loads one for search.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vsearch.errors import VsearchError, counted
from vsearch.files import check_room, fsync_file, write_json_atomic
from vsearch.indexes.backends import Backend, InsertionWindow, backend_class
from vsearch.indexes.deleted import (DELETED, delete_by_id, deleted_again, held_labels, mark_superseded,
                                     read_deleted, retire, still_deleted, write_deleted)
from vsearch.indexes.index import FORMAT, MANIFEST, Deletes, deletes_of, read_index_manifest, search_live
from vsearch.indexes.resume import CheckpointFolder
from vsearch.indexes.rows import ROWS, Rows, RowsWriter, conform
from vsearch.indexes.tuning import (RECALL_K, check_machine_memory, choose_build_params, exact_neighbours,
                                    gather, memory_bytes, recall, refinement_bytes, sample_positions,
                                    shortfall_hint, tune_search)
from vsearch.indexes.vectors import VectorFile, VectorSource, file_entry

# Fewer held-out queries than this measure recall@10 too coarsely to tune search parameters on.
TUNING_QUERIES = 100
Notes = Callable[[str], None]


@dataclass
class BuildConfig:
    type: str = "hnsw"
    engine: str | None = None
    kind: str = "cover"
    params: dict[str, int] = field(default_factory=dict)
    memory_budget: int | None = None  # bytes
    target_recall: float = 0.95
    recall_queries: int = 500
    threads: int = -1


@dataclass
class HeldOut:
    """Rows kept out of the index until recall has been measured with them as queries."""

    positions: np.ndarray  # sorted row positions in the source
    vectors: list[np.ndarray] = field(default_factory=list)
    rows: list[pa.Table] = field(default_factory=list)


@dataclass(frozen=True)
class InIndex:
    """The labels an index holds before files are streamed into it, whose rows the stream writes
    without adding their vectors again: a new graph's skeleton, inserted first, and the first
    `others` labels outside it (a resumed build's graph, whose windows took the files' order)."""

    others: int
    skeleton: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted labels

    def holds(self, labels: np.ndarray) -> np.ndarray:
        # Outside the skeleton, a label's place among the other labels is itself less the skeleton's before it.
        return (labels - np.searchsorted(self.skeleton, labels) < self.others) | np.isin(labels, self.skeleton)


def _add(window: InsertionWindow, vectors: np.ndarray, rows: pa.Table, first_label: int,
         out: RowsWriter, origin: str, inside: InIndex) -> int:
    """Add `rows` and their `vectors` as labels from `first_label` on; returns the next label. Labels
    the backend holds already (`inside`) get their rows only, counted at once."""
    if not len(rows):  # a batch wholly held out or left out
        return first_label
    labels = np.arange(first_label, first_label + len(rows), dtype=np.int64)
    there = inside.holds(labels)
    if there.any():  # a new graph's skeleton, or a resumed graph's first labels
        window.on_rows(int(there.sum()))
        vectors, labels = vectors[~there], labels[~there]
    if len(labels):
        window.add(vectors, labels)
    out.write(rows, origin)
    return first_label + len(rows)


def _add_files(window: InsertionWindow, source: VectorSource, files: list[VectorFile],
               first_label: int, out: RowsWriter, inside: InIndex, held: HeldOut | None = None) -> int:
    """Stream `files` into the backend and the row file, one record batch at a time (float32 only
    for a chunk at a time), setting `held` rows aside; returns the next label. Labels follow the
    files' order; the rows held out, added last, are counted then."""
    label, position = first_label, 0
    for file, rows, vectors in source.file_batches(files, metadata=True):
        size = len(rows)
        held_here = held.positions[(held.positions >= position) & (held.positions < position + size)] \
            if held is not None else []
        if len(held_here):  # most batches hold none: they go in whole, with no copy
            keep = np.ones(size, bool)
            keep[held_here - position] = False
            held.vectors.append(np.asarray(vectors[~keep], np.float32))
            held.rows.append(conform(rows.filter(pa.array(~keep)), out.schema, str(file.path)))
            vectors, rows = vectors[keep], rows.filter(pa.array(keep))
        label = _add(window, vectors, rows, label, out, str(file.path), inside)
        position += size
    window.flush()
    return label


def _add_held(backend: Backend, held: HeldOut, first_label: int, out: RowsWriter,
              on_rows: Callable[[int], None]) -> None:
    """Add the rows `held` out, recall measured with them, as labels from `first_label` on."""
    window = InsertionWindow(backend, on_rows)
    _add(window, np.concatenate(held.vectors), pa.concat_tables(held.rows), first_label, out, "held-out rows",
         InIndex(first_label))
    window.flush()


def _skeleton(cls: type[Backend], count: int, held: np.ndarray) -> np.ndarray:
    """The labels of the vectors a new graph of `cls` takes before any other, `cls.skeleton` of them
    sampled across all the files, rows `held` out left out: the graph's first links span
    the collection however the files are ordered. A graph begun with the files' first vectors, in
    files sorted by topic, linked its regions poorly: at 1M, recall@10 stopped at 0.994 at
    ef_search 256, where a sampled skeleton reaches 0.999-1.000 (benchmarks/RESULTS.md)."""
    if not cls.skeleton:
        return np.empty(0, np.int64)
    return sample_positions(count - len(held), cls.skeleton, seed=2)


def _holds(folder: Path, source: VectorSource) -> bool:
    """Whether `source`'s files lie in `folder` or below it."""
    return folder.resolve() in (source.directory.resolve(), *source.directory.resolve().parents)


def _check_replaceable(destination: Path, source: VectorSource) -> None:
    """Refuse to build over a folder that holds anything but a vsearch index, or the vectors being
    indexed: the new index replaces the folder whole."""
    if _holds(destination, source):
        raise VsearchError(f"refusing to replace {destination}: it holds the embeddings being indexed "
                           f"({source.directory}); give the index a folder of its own")
    if destination.exists() and not destination.is_dir():
        raise VsearchError(f"refusing to replace {destination}: it is a file, not an index folder")
    if destination.exists() and not (destination / MANIFEST).is_file() and any(destination.iterdir()):
        raise VsearchError(f"refusing to replace {destination}: it is not empty and not a vsearch index")


def _beside(destination: Path, role: str) -> Path:
    """This process's `role` (tmp, old) folder beside `destination`, named for its host and pid."""
    return destination.with_name(f".{destination.name}.{role}-{socket.gethostname()}-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_killed_builds(destination: Path) -> None:
    """Remove the folders that builds into `destination` on this host left when they were killed:
    at 10M vectors each holds gigabytes. A live build's folder, or another host's, is left alone."""
    for role in ("tmp", "old"):
        prefix = f".{destination.name}.{role}-{socket.gethostname()}-"
        for folder in destination.parent.glob(glob.escape(prefix) + "*"):
            pid = folder.name[len(prefix):]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def _replace_dir(built: Path, destination: Path) -> None:
    """Swap `built` into `destination`; the old index is removed only after the new one is in place."""
    old = _beside(destination, "old")
    if destination.exists():
        os.replace(destination, old)
    os.replace(built, destination)
    shutil.rmtree(old, ignore_errors=True)


def _in_work_dir(destination: Path, fill: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run `fill(work)` in a fresh temporary folder, then swap it into `destination`; clean up on failure."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_builds(destination)
    work = _beside(destination, "tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        info = {**fill(work), "folder": str(destination.resolve())}
        write_json_atomic(work / MANIFEST, info)
        _replace_dir(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return info


def _report(measured: float, queries: int, method: str, sweep: list[dict[str, float]],
            target: float | None) -> dict[str, Any]:
    return {"recall@10": round(measured, 4), "queries": queries, "method": method, "target": target,
            "sweep": [{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()} for s in sweep]}


class _Live:
    """A backend searched as a loaded index searches it, `deletes` left out: what recall is measured on."""

    def __init__(self, backend: Backend, deletes: Deletes):
        self.backend, self.deletes = backend, deletes

    def set_search(self, params: dict[str, int]) -> None:
        self.backend.set_search(params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_live(self.backend, queries, k, self.deletes)


def _measured(index_type: str, searched: Backend | _Live, params: dict[str, int], queries: np.ndarray,
              own: np.ndarray, truth: tuple[np.ndarray, np.ndarray], target: float | None,
              method: str, tune: bool = True) -> dict[str, Any]:
    """Recall@10 of `queries` (`own`: each one's label in the index, -1 where it is not in it) against
    exact neighbours `truth`. `target` is the recall the search parameters are tuned to reach (None
    where they were set by hand): with `tune`, the cheapest that reach it are chosen first, into
    `params`."""
    if target is not None and tune:
        chosen, sweep = tune_search(index_type, searched, params, queries, own, truth, target)
        params.update(chosen)
    else:
        searched.set_search(params)
        sweep = []
    return _report(recall(searched.search, queries, own, truth), len(queries), method, sweep, target)


def _held_out_truth(source: VectorSource, held: HeldOut) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of the held-out rows among the rows the index holds while they are out, as
    (scores, insertion labels)."""
    scores, positions = exact_neighbours(source, np.concatenate(held.vectors), RECALL_K + len(held.positions))
    inside = ~np.isin(positions, held.positions)
    return (np.array([row[keep][:RECALL_K] for row, keep in zip(scores, inside)]),
            np.array([(row - np.searchsorted(held.positions, row))[keep][:RECALL_K]
                      for row, keep in zip(positions, inside)]))


def _leave_one_out(index_type: str, backend: Backend, dead: np.ndarray, params: dict[str, int],
                   queries: int, target: float | None) -> dict[str, Any]:
    """Recall@10 of a sample of the vectors the index shows (all but the `dead` labels) as queries,
    each one's own label left out of both lists, against exact search over all of them: an
    optimistic estimate (the queries are in the index), used where no rows could be held out."""
    live = np.setdiff1d(np.arange(len(backend)), dead)
    own = live[sample_positions(len(live), queries, seed=1)]
    vectors = backend.vectors(own)
    truth = backend.search_among(vectors, live, min(RECALL_K + 1, len(live)))
    searched = _Live(backend, deletes_of(dead, len(backend), type(backend)))
    return _measured(index_type, searched, params, vectors, own, truth, target, "leave-one-out", tune=False)


def _file_labels(rows: list[int], held: np.ndarray, first: int = 0) -> list[list[list[int]]]:
    """The labels of files of `rows` rows each, added from label `first` on, as [start, end) ranges:
    their rows went in in order, but for those `held` out to measure recall (positions among these
    files' rows), which went in last. An append retires a file's labels when it changes."""
    kept = first + sum(rows) - len(held)
    ranges = []
    for start, count in zip(np.cumsum([0] + rows[:-1]).tolist(), rows):
        before, through = np.searchsorted(held, [start, start + count]).tolist()
        spans = [(first + start - before, first + start + count - through), (kept + before, kept + through)]
        ranges.append([[begin, end] for begin, end in spans if end > begin])
    return ranges


def _insertion_order(count: int, held: np.ndarray) -> np.ndarray:
    """Each label's place among `count` rows added in order, but for those `held` out, added last."""
    return np.concatenate([np.delete(np.arange(count), held), held])


def _shown_last(count: int, dead: np.ndarray) -> np.ndarray:
    """A place for each of an index's `count` labels before an append, to find which vectors the new
    rows replace: the `dead` ones first, so that an id keeps the vector it shows. The labels' own
    order is not their files' (a build's held-out rows go in last): by it, an id could keep a
    vector it had replaced, and the one it shows be marked replaced."""
    shown = np.ones(count, bool)
    shown[dead] = False
    places = np.empty(count, np.int64)
    places[np.argsort(shown, kind="stable")] = np.arange(count)
    return places


def _labels_of(entries: list[dict[str, Any]]) -> np.ndarray:
    """The labels of the rows of the files that manifest `entries` record."""
    spans = [np.arange(first, end, dtype=np.int64) for entry in entries for first, end in entry["labels"]]
    return np.concatenate(spans) if spans else np.empty(0, np.int64)


class _BuildCheckpoints:
    """A build's checkpoint folder (see resume.py). Types whose backend can go on adding to a
    loaded index (`resumable`: the HNSW graphs, whose insertion takes most of an hour at 10M) save
    their index there as it grows; the rows need no saving, being the source's, read again on
    resuming. Types that train (IVF-PQ) save their index once trained, before a vector is added:
    at 10M its k-means over 16,384 lists and its OPQ rotation take most of the build, where adding
    the vectors again costs less than saving the codes as they grow would. Any type refuses a
    stopped build made with other settings."""

    def __init__(self, cls: type[Backend], destination: Path, source: VectorSource, params: dict[str, int],
                 note: Notes):
        made_with = {"type": cls.type, "engine": cls.engine, "dim": source.dim,
                     **{name: params[name] for name in cls.build_params}}
        self.folder = CheckpointFolder(destination, "vsearch build-index", made_with, note)
        self.cls, self.dim, self.params, self.note = cls, source.dim, params, note
        # What the labels stand for: the same files, less the same ids left out; and, for a graph
        # begun with a skeleton, that it was sampled (before 2026-12-07 a graph began with the files' first).
        self.built_from = {"shards": [file_entry(f) for f in source.files],
                           "excluded": hashlib.sha256("\n".join(sorted(source.excluded)).encode()).hexdigest(),
                           **({"skeleton": "sampled"} if cls.skeleton else {})}
        self.saved: int | None = None  # vectors in the index saved by this run

    def resumed(self) -> Backend | None:
        """The index of a stopped build of the same vectors, to go on adding to; None where there is none
        to go on from (none saved, one of other vectors, or one that cannot be read)."""
        state = self.folder.saved()  # refuses another type's too
        if (state is None or not (self.cls.resumable or self.cls.trains)
                or not (self.folder.path / self.cls.file_name).exists()):
            return None
        if state["built_from"] != self.built_from:
            earlier = state["built_from"].keys() != self.built_from.keys()
            self.note(f"{self.folder.path} holds a stopped build " + ("that an earlier vsearch began, which this one "
                      "cannot go on from" if earlier else "of other vectors") + ": starting over")
            return None
        try:
            backend = self.cls.load(self.folder.path, self.dim, self.params, writable=True)
        except RuntimeError as exc:  # both libraries check a file's length against what it lists
            self.note(f"cannot read the index of the stopped build in {self.folder.path} ({exc}): starting over")
            return None
        backend.release_file()  # the next checkpoint replaces it
        self.saved = len(backend)
        self.note(f"resuming the stopped build in {self.folder.path}: " + (
            f"{len(backend):,} vectors already in its index" if self.cls.resumable else
            "its quantisers already trained"))
        return backend

    def save_if_due(self, backend: Backend) -> None:
        if self.cls.resumable and self.folder.due():
            self.save(backend)

    def save(self, backend: Backend) -> None:
        """Save `backend` as the checkpoint, unless the disk has no room for it (said once)."""
        last = f"{self.saved:,} vectors" if self.saved is not None else None
        if not self.folder.has_room(memory_bytes(self.cls.type, len(backend), self.dim, self.params), last):
            return
        staging = self.folder.path / "saving"
        with self.folder.saving(last, staging / self.cls.file_name):
            self.folder.write_state({"built_from": self.built_from})
            staging.mkdir(exist_ok=True)
            backend.save(staging)
            fsync_file(staging / self.cls.file_name)
            os.replace(staging / self.cls.file_name, self.folder.path / self.cls.file_name)
            self.saved = len(backend)


def build_index(config: BuildConfig, source: VectorSource, destination: Path,
                on_rows: Callable[[int], None] = lambda n: None, note: Notes = lambda line: None) -> dict[str, Any]:
    """Build an index of `config.type` from `source` into `destination`. Ids deleted from the index
    there (`delete_ids`) are left out and stay deleted."""
    cls = backend_class(config.type, config.engine)
    _check_replaceable(destination, source)
    carried = still_deleted(destination)
    if len(carried):
        source = replace(source, excluded=frozenset(carried.column("id").to_pylist()))
        note(f"leaving out the {len(carried):,} ids deleted from {destination} "
             f"({source.excluded_rows:,} of them in these vectors)")
    count = source.count
    if count == 0:
        hint = " (vsearch embed --kind clip makes them)" if config.kind == "clip" else ""
        raise VsearchError(f"no {config.kind} vectors in {source.directory}: nothing to index{hint}")
    defaults = {**cls.build_params, **cls.search_params}
    choice = choose_build_params(config.type, defaults, count, source.dim, config.params,
                                 config.memory_budget, config.target_recall)
    for reason in choice.reasons:
        note(reason)
    params = choice.params
    started = time.perf_counter()
    checkpoints = _BuildCheckpoints(cls, destination, source, params, note)

    def fill(work: Path) -> dict[str, Any]:
        # Now rather than after an hour's work; the room for checkpoints is looked for as they fall due.
        needed = memory_bytes(config.type, count, source.dim, params) + refinement_bytes(config.type, count, source.dim)
        checkpoints.folder.room_for_output(needed, destination.parent, f"the index {destination}", make=False)
        backend = checkpoints.resumed()
        resuming = backend is not None
        if backend is None:
            backend = cls.create(work, source.dim, count, params)
        resumed = len(backend)
        backend.set_threads(config.threads)
        if cls.trains and not resuming:
            note(f"training on {min(params['train_size'], count):,} sampled vectors")
            backend.train(gather(source, sample_positions(count, params["train_size"])))
            checkpoints.save(backend)
        backend.prepare(work, count - resumed)
        held = HeldOut(sample_positions(count, min(config.recall_queries, count // 10), seed=1))
        tuned = not set(cls.search_params) & set(config.params)
        target = config.target_recall if tuned and cls.search_params else None
        measured = None
        skeleton = _skeleton(cls, count, held.positions)
        with RowsWriter(work / ROWS, source.row_schema) as rows:
            window = InsertionWindow(backend, on_rows, after=lambda: checkpoints.save_if_due(backend))
            if len(skeleton) and not len(backend):  # its rows are counted as the files reach them
                note(f"beginning the graph with {len(skeleton):,} vectors sampled across the files")
                first = InsertionWindow(backend, after=window.after)
                positions = np.delete(np.arange(count), held.positions)[skeleton]  # held rows have no label
                first.add(gather(source, positions), skeleton)
                first.flush()
            inside = InIndex(len(backend) - len(skeleton), skeleton)
            label = _add_files(window, source, source.files, 0, rows, inside, held)
            if len(held.positions):
                measured = _measured(config.type, backend, params, np.concatenate(held.vectors),
                                     np.full(len(held.positions), -1), _held_out_truth(source, held), target,
                                     "held-out")
                _add_held(backend, held, label, rows, on_rows)
        mark_superseded(work, carried, _insertion_order(count, held.positions), note)
        checkpoints.folder.room_for_output(memory_bytes(config.type, count, source.dim, params), destination.parent,
                                           f"the index {destination}", make=True)
        _save(backend, work)
        if measured is None:  # too few rows to hold any out
            measured = _leave_one_out(config.type, backend, held_labels(read_deleted(work)), params,
                                      config.recall_queries, target)
        info = {
            "format": FORMAT, "type": config.type, "engine": cls.engine, "params": params, "choices": choice.reasons,
            "dim": source.dim, "metric": "cosine", "count": count, "kind": config.kind, **source.info(),
            "shards": [{**file_entry(f), "labels": labels}
                       for f, labels in zip(source.files, _file_labels(source.live_rows, held.positions))],
            "files": {"index": cls.file_name, "rows": ROWS},
            "memory_bytes": memory_bytes(config.type, count, source.dim, params), "recall": measured,
            "build_seconds": round(time.perf_counter() - started, 3), "resumed_vectors": resumed,
            "checkpoints": {"saved": checkpoints.folder.checkpoints,
                            "seconds": round(checkpoints.folder.checkpoint_seconds, 3)},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_id": uuid.uuid4().hex, "appends": [],
        }
        note(f"recall@10 {info['recall']['recall@10']} with "
             + (", ".join(f"{k}={params[k]}" for k in cls.search_params) or "exact search"))
        if cls.search_params and info["recall"]["recall@10"] < config.target_recall:
            note(f"that is below the target recall@10 {config.target_recall}: "
                 + shortfall_hint(config.type, params, source.dim))
        return info

    try:
        info = _in_work_dir(destination, fill)
    except BaseException:
        checkpoints.folder.close()
        raise
    checkpoints.folder.remove()
    return info


def _check_appendable(path: Path, info: dict[str, Any], source: VectorSource) -> None:
    if _holds(path, source):
        raise VsearchError(f"cannot append {source.directory} to index {path}: the embeddings are inside the "
                           f"index folder, which an append replaces; move them to a folder of their own")
    if source.kind is not None and source.kind != info.get("kind", "cover"):
        raise VsearchError(f"index {path} holds {info.get('kind', 'cover')} vectors, not {source.kind} ones: "
                           f"pass --kind {info.get('kind', 'cover')}")
    if source.dim != info["dim"]:
        raise VsearchError(f"cannot append {source.dim}-d vectors to the {info['dim']}-d index {path}")
    if source.encoder and info.get("encoder") and source.encoder["fingerprint"] != info["encoder"]["fingerprint"]:
        raise VsearchError(f"cannot append vectors from {source.encoder['spec']} to index {path}, "
                           f"built from {info['encoder']['spec']}: different model weights")


def _stale_entries(path: Path, info: dict[str, Any], source: VectorSource,
                   note: Notes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest entries of the index's files whose vectors an append retires: (those `source`
    holds in another version, to be added again; those gone from a vsearch shard folder, shards
    past the end of a dataset that shrank). Files gone from a bring-your-own folder keep their
    vectors: the index needs no file it was built from, and such files are often cleared once
    indexed."""
    current = {str(f.path.resolve()): f.sha256 for f in source.files}
    changed = [s for s in info["shards"] if current.get(s["path"], s["sha256"]) != s["sha256"]]
    folder = source.directory.resolve()
    gone = [s for s in info["shards"] if Path(s["path"]).parent == folder and s["path"] not in current]
    removed = gone if source.kind is not None else []
    unlabelled = [s["name"] for s in changed + removed if "labels" not in s]
    if unlabelled:
        raise VsearchError(f"{unlabelled[0]} changed or went since index {path} was built from it, and the index "
                           f"predates vsearch's record of which vectors came from which file; rebuild the index")
    if gone and not removed:
        note(f"{folder} no longer holds {counted(len(gone), 'file')} the index was built from; their vectors "
             f"stay in it (vsearch delete or a rebuild drops them)")
    return changed, removed


def _same_vectors(backend: Backend, existing: Rows, source: VectorSource, changed: list[dict[str, Any]],
                  hidden: np.ndarray) -> dict[str, tuple[dict[str, Any], VectorFile, np.ndarray, pa.Table]]:
    """The `changed` files that hold the same ids, once each, with the same vectors as the version
    the index took up and shows (no label of it `hidden`: deleted, replaced by a later file's row
    or retired), by path: (manifest entry, file, the label of each of its rows, its rows). Only
    their other columns changed (a title edited, the paths of covers that moved): their vectors
    stay, and their rows are taken up in place, where adding them again would have shown the same
    vectors and left as many retired ones in the index."""
    files = {str(f.path.resolve()): f for f in source.files}
    same = {}
    for entry in changed:
        labels = _labels_of([entry])
        then = dict(zip(existing.take(labels).column("id").to_pylist(), labels.tolist()))
        file = files[entry["path"]]
        if not len(labels) or len(then) != len(labels) or file.rows != len(labels) or np.isin(labels, hidden).any():
            continue
        parts, at, seen = [], [], set()
        for rows, vectors in source.batches([file], metadata=True):
            ids = rows.column("id").to_pylist()
            if any(id_ not in then or id_ in seen for id_ in ids):
                break
            seen.update(ids)
            labels_now = np.array([then[id_] for id_ in ids], np.int64)
            # float16 rounding apart (the vectors ivfpq refines with): a vector made again from the
            # same cover differs far more
            if np.abs(backend.vectors(labels_now) - vectors).max(initial=0) > 2e-3:
                break
            parts.append(rows)
            at.append(labels_now)
        else:
            if len(seen) == len(then):
                same[entry["path"]] = (entry, file, np.concatenate(at), pa.concat_tables(parts))
    return same


def _note_changes(same: dict[str, tuple], stale: list[dict[str, Any]], removed: list[dict[str, Any]],
                adding: list[VectorFile], source: VectorSource, note: Notes) -> None:
    rows_now = {str(f.path.resolve()): f.rows for f in adding}
    for entry, _, labels, _ in same.values():
        note(f"{entry['name']} changed in its other columns alone: its {counted(len(labels), 'vector')} kept, "
             "its rows taken up")
    for entry in stale:
        note(f"{entry['name']} changed since it was indexed: retiring its "
             f"{counted(len(_labels_of([entry])), 'old vector')}, adding its {counted(rows_now[entry['path']], 'row')}")
    for entry in removed:
        note(f"{entry['name']} is gone from {source.directory}: retiring its "
             f"{counted(len(_labels_of([entry])), 'vector')}")


def _rows_now(same: dict[str, tuple], schema: pa.Schema) -> tuple[np.ndarray, pa.Table]:
    """(labels, in order, and their rows) of the files `_same_vectors` found, conformed to `schema`."""
    if not same:
        return np.empty(0, np.int64), schema.empty_table()
    labels = np.concatenate([at for _, _, at, _ in same.values()])
    rows = pa.concat_tables([conform(rows, schema, str(file.path)) for _, file, _, rows in same.values()])
    order = np.argsort(labels, kind="stable")
    return labels[order], rows.take(pa.array(order))


def _with_rows_now(table: pa.Table, start: int, labels: np.ndarray, rows: pa.Table) -> pa.Table:
    """`table`, the row file's rows from label `start` on, with those of `labels` (sorted) replaced
    by `rows`."""
    first, end = np.searchsorted(labels, [start, start + len(table)]).tolist()
    if first == end:
        return table
    order = np.arange(len(table))
    order[labels[first:end] - start] = len(table) + np.arange(end - first)
    return pa.concat_tables([table, rows.slice(first, end - first)]).take(pa.array(order))


def append_index(path: Path, source: VectorSource, on_rows: Callable[[int], None] = lambda n: None,
                 note: Notes = lambda line: None, recall_queries: int = 500,
                 on_total: Callable[[int], None] = lambda n: None, threads: int = -1) -> dict[str, Any]:
    """Bring the index at `path` up to date with the files of `source`, without rebuilding it: add
    the files it has not seen; for each file that changed since (such as the last shard of a
    dataset that grew) retire the vectors of its old version and add its rows again, unless it
    holds the same ids with the same vectors (`_same_vectors`: a title edited, covers moved), whose
    rows the index then takes up in place; retire the vectors of shards gone from a vsearch shard
    folder. Ids deleted from the index stay deleted where a changed file holds them again, and in
    any shard of a vsearch shard folder (each a piece of the same dataset, wherever an edit moved
    its rows); a new bring-your-own file brings them back. `on_total(n)` once with the number of
    vectors to add, `on_rows(n)` as they are; `threads` as a build's (-1: every core)."""
    info = read_index_manifest(path)
    _check_appendable(path, info, source)
    changed, removed = _stale_entries(path, info, source, note)
    indexed = {s["path"] for s in info["shards"]} - {s["path"] for s in changed + removed}
    new = [f for f in source.files if str(f.path.resolve()) not in indexed]
    if not new and not removed:
        note(f"nothing to append: index {path} already holds every file in {source.directory}")
        return info
    cls = backend_class(info["type"], info["engine"])
    started = time.perf_counter()

    def fill(work: Path) -> dict[str, Any]:
        for line in check_machine_memory(info["type"], info["count"] + sum(f.rows for f in new), info["dim"],
                                         info["params"], "append on a machine with more memory"):
            note(line)
        for name in [p.name for p in path.glob("vectors-*.npy")] + [DELETED]:
            if (path / name).exists():
                os.link(path / name, work / name)  # unchanged files: share them, don't copy
        backend = cls.load(path, info["dim"], info["params"], writable=True)
        backend.set_threads(threads)
        existing = Rows(path / ROWS)
        deleted = read_deleted(path)
        same = _same_vectors(backend, existing, source, changed, held_labels(deleted))
        stale = [entry for entry in changed if entry["path"] not in same]
        adding = [f for f in new if str(f.path.resolve()) not in same]
        retired = _labels_of(stale + removed)
        _note_changes(same, stale, removed, adding, source, note)
        new_rows = sum(f.rows for f in adding)
        # The index's file is written anew; of the vectors beside it, only the new rows' (the rest are linked).
        check_room(path.parent, memory_bytes(info["type"], info["count"] + new_rows, info["dim"], info["params"])
                   + refinement_bytes(info["type"], new_rows, info["dim"]), f"the index {path}")
        on_total(new_rows)
        if new_rows:
            backend.prepare(work, new_rows)
        dead = np.union1d(held_labels(deleted), retired)
        backend.hide(dead)  # now, so that recall is measured on the search the saved index makes
        held = HeldOut(sample_positions(new_rows, min(recall_queries, (info["count"] + new_rows) // 10), seed=1))
        params = dict(info["params"])
        rows_now = _rows_now(same, existing.schema)
        with RowsWriter(work / ROWS, existing.schema) as rows:
            for table, start in zip(existing.tables(), existing.starts.tolist()):
                rows.write(_with_rows_now(table, start, *rows_now), str(path / ROWS))
            label = _add_files(InsertionWindow(backend, on_rows), source, adding, info["count"], rows,
                               InIndex(info["count"]), held)
            measured = _append_recall(info, backend, dead, held, params, recall_queries)
            if len(held.positions):
                _add_held(backend, held, label, rows, on_rows)
        refreshed = [{**entry, **file_entry(file)} for entry, file, _, _ in same.values()]  # labels kept
        entries = [{**file_entry(f), "labels": labels} for f, labels
                   in zip(adding, _file_labels([f.rows for f in adding], held.positions, info["count"]))]
        again = [e for e in entries if source.kind is not None or e["path"] in {s["path"] for s in stale}]
        order = np.concatenate([_shown_last(info["count"], dead),
                                info["count"] + _insertion_order(new_rows, held.positions)])
        rows_deleted = pa.concat_tables([retire(deleted, retired), deleted_again(path, work, _labels_of(again))])
        mark_superseded(work, rows_deleted, order, note, hidden=np.setdiff1d(retired, held_labels(deleted)))
        _save(backend, work, hidden_before=dead)
        appended = {**info, "count": info["count"] + new_rows, "params": params, "recall": measured,
                    "shards": [s for s in info["shards"] if s["path"] in indexed] + refreshed + entries,
                    "appends": info.get("appends", []) + [{
                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": [f.name for f in adding],
                        "rows": new_rows, "changed": [s["name"] for s in stale],
                        "refreshed": [s["name"] for s in refreshed],
                        "removed": [s["name"] for s in removed], "retired": len(retired),
                        "seconds": round(time.perf_counter() - started, 3)}]}
        note(f"appended {counted(new_rows, 'vector')} from {counted(len(adding), 'file')}"
             + (f", retired {counted(len(retired), 'vector')}" if len(retired) else "")
             + f"; recall@10 now {measured['recall@10']}"
             + (" (leave-one-out, too few new rows to hold any out: its queries are in the index, so it runs high)"
                if measured["method"] == "leave-one-out" and cls.search_params else ""))
        _note_retuning(info, appended, note)
        return appended

    return _in_work_dir(path, fill)


def _append_recall(info: dict[str, Any], backend: Backend, dead: np.ndarray, held: HeldOut,
                   params: dict[str, int], queries: int) -> dict[str, Any]:
    """Recall@10 of an index being appended to, measured as a build measures it: the `held` new rows,
    not yet added, as queries against exact search over the live rows the backend holds. Search
    parameters tuned to a target at build are tuned to it again, in `params`, where enough rows could
    be held out: the index grew or changed, and the setting that reached the target may no longer."""
    if not len(held.positions):
        return _leave_one_out(info["type"], backend, dead, params, queries, info["recall"].get("target"))
    vectors = np.concatenate(held.vectors)
    live = np.setdiff1d(np.arange(len(backend)), dead)
    truth = backend.search_among(vectors, live, min(RECALL_K, len(live)))
    searched = _Live(backend, deletes_of(dead, len(backend), type(backend)))
    return _measured(info["type"], searched, params, vectors, np.full(len(vectors), -1), truth,
                     info["recall"].get("target"), "held-out", tune=len(vectors) >= min(TUNING_QUERIES, queries))


def _note_retuning(info: dict[str, Any], appended: dict[str, Any], note: Notes) -> None:
    """Say which search parameters an append changed, and what to rebuild with where the recall it
    measured falls short of the target they are tuned to."""
    target, measured = appended["recall"]["target"], appended["recall"]["recall@10"]
    reached = target is not None and measured >= target
    before, after = info["params"], appended["params"]
    for key in sorted(k for k in after if after[k] != before[k]):
        note(f"{key} {before[key]} -> {after[key]}: " + (f"the cheapest setting that keeps recall@10 at {target} "
                                                         "or more" if reached else "the best tried"))
    if target is not None and not reached:
        note(f"recall@10 {measured} is below the target {target}: "
             + shortfall_hint(info["type"], after, info["dim"]) + ", in a rebuild (build-index without --append)")


def delete_ids(path: Path, ids: list[str]) -> tuple[int, list[str]]:
    """Mark `ids` deleted in the index at `path` (filtered at query time); returns (newly deleted, unknown ids)."""
    read_index_manifest(path)
    table = Rows(path / ROWS).ids().combine_chunks()
    wanted = pa.array(sorted(set(ids)), pa.string())
    labels = pc.indices_nonzero(pc.is_in(table, value_set=wanted)).to_numpy().astype(np.int64)
    known = set(table.take(pa.array(labels)).to_pylist())
    previous = read_deleted(path)
    write_deleted(path, delete_by_id(previous, labels, table.take(pa.array(labels))))
    return len(np.setdiff1d(labels, previous.column("label").to_numpy())), sorted(set(ids) - known)


def _save(backend: Backend, work: Path, hidden_before: np.ndarray | None = None) -> None:
    """Save the index built in `work`, the rows deleted there hidden from the library's own search
    (deletes made later are filtered at query time only). `hidden_before`: those the backend hides
    already, shown again unless still deleted, and not hidden a second time (hnswlib answers each
    with an exception: 100k retired vectors cost as many)."""
    hidden = held_labels(read_deleted(work))
    if hidden_before is not None:
        backend.show(np.setdiff1d(hidden_before, hidden))
        hidden = np.setdiff1d(hidden, hidden_before)
    backend.hide(hidden)
    backend.save(work)
