"""A built index loaded for search: the library's file (memory-mapped where the library allows),
its rows, and the deleted rows it leaves out, taken up while it serves. The folder it is loaded
from is described in `store`, which writes it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vsearch.errors import VsearchError, first_line
from vsearch.indexes.backends import Backend, backend_class
from vsearch.indexes.deleted import DELETED, held_labels, read_deleted
from vsearch.indexes.rows import ROWS, Rows
from vsearch.indexes.tuning import check_params

FORMAT = "vsearch-index/2"
MANIFEST = "index.json"
DELETES_CHECK_SECONDS = 1.0


def read_index_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise VsearchError(f"no index at {path} (missing {MANIFEST}); run vsearch build-index first")
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise VsearchError(f"unreadable index manifest {manifest}: {exc}") from exc
    if info.get("format") != FORMAT:
        raise VsearchError(f"{manifest} has format {info.get('format')!r}, not {FORMAT!r}; "
                           "rebuild the index with this version's vsearch build-index")
    return _followed(info, path)


def _followed(info: dict[str, Any], path: Path) -> dict[str, Any]:
    """`info` with the embeddings folder it was built from, and its files, where they are now if
    they moved with the index folder (a workspace moved or copied whole: appends then come from the
    folder beside it, and `vsearch list` compares with it); as recorded where they did not (an index
    copied to serve elsewhere)."""
    was, now = info.get("folder"), str(path.resolve())
    if was in (None, now) or not info.get("embeddings"):
        return info

    def moved(recorded: str) -> str:
        return os.path.normpath(os.path.join(now, os.path.relpath(recorded, was)))

    if not Path(moved(info["embeddings"])).is_dir():
        return info
    return {**info, "folder": now, "embeddings": moved(info["embeddings"]),
            "shards": [{**entry, "path": moved(entry["path"])} for entry in info["shards"]]}


@dataclass(frozen=True)
class Deletes:
    """The deleted labels an index leaves out, taken up whole: threads searching while a delete is
    taken up see the old set or the new one, never a mix."""
    labels: np.ndarray
    # Dead labels as a mask, its last slot standing for the padding label -1: a lookup costs 0.3 µs
    # a query where np.isin took 84 µs with 1,000 deleted labels and 770 ms with a million.
    dead: np.ndarray
    # Without deletes, a backend that never pads its results needs no per-query check for -1 labels.
    unpadded: bool


def deletes_of(labels: np.ndarray, count: int, cls: type[Backend]) -> Deletes:
    """The `labels` deleted from an index of `count` rows searched by a `cls` backend."""
    dead = np.zeros(count + 1, bool)
    dead[labels] = True
    dead[-1] = True
    return Deletes(labels, dead, cls.full_results and not len(labels))


def search_live(backend: Backend, queries: np.ndarray, k: int, deletes: Deletes) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of each query's k best rows of `backend` but the deleted ones, best first: -1
    past the live rows, and at most as many columns as the backend has rows."""
    total = len(deletes.dead) - 1
    if not len(deletes.labels):
        return backend.search(queries, min(k, total))
    # Fetch past the deleted rows (all of a few; with many, twice their share of k, for fetching more
    # costs every query: 4k made 1,000 deletes in 100k cost 2.5 times the search), and search again,
    # 4 times wider, for the queries still short of k live results (a whole batch again took 1.6
    # times as long with 10% deleted), until the index is exhausted.
    few = len(deletes.labels) <= 4 * k
    fetch = min(total, k + len(deletes.labels) if few else k + 2 + 2 * k * len(deletes.labels) // total)
    width = min(k, total)
    scores = np.full((len(queries), width), -np.inf, np.float32)
    labels = np.full((len(queries), width), -1, np.int64)
    pending = np.arange(len(queries))
    while len(pending):
        found_scores, found = backend.search(queries[pending], fetch)
        live = ~deletes.dead[found]
        done = (live.sum(axis=1) >= width) | (fetch >= total)
        # Live results first, in their order; plain fancy indexing, as take_along_axis costs 6 µs a call.
        order = np.argsort(~live[done], axis=1, kind="stable")[:, :width]
        rows, columns = np.arange(len(order))[:, None], order.shape[1]
        scores[pending[done], :columns] = np.where(live, found_scores, -np.inf)[done][rows, order]
        labels[pending[done], :columns] = np.where(live, found, -1)[done][rows, order]
        pending, fetch = pending[~done], min(total, fetch * 4)
    return scores, labels


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file at `path` is replaced or rewritten; None when there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _version_of(manifest: dict[str, Any]) -> tuple[Any, Any, int]:
    """What tells one build of an index, and each append to it, from another (a delete changes none)."""
    return manifest.get("build_id"), manifest.get("built_at"), len(manifest.get("appends", []))


class Index:
    """A loaded index: `search(queries, k)` returns cosine scores and string ids, deleted ids left out.
    Threads may search one index at once."""

    def __init__(self, path: Path, manifest: dict[str, Any] | None = None):
        self.path = path
        self.manifest = manifest or read_index_manifest(path)
        cls = backend_class(self.manifest["type"], self.manifest.get("engine"))
        self.dim = int(self.manifest["dim"])
        try:
            self.backend = cls.load(path, self.dim, self.manifest["params"])
            self.rows = Rows(path / ROWS)
        except (RuntimeError, OSError, pa.ArrowException) as exc:  # what faiss, hnswlib and Arrow raise
            raise VsearchError(f"index {path} is damaged ({first_line(exc)}); rebuild it") from None
        if len(self.backend) != self.rows.count:
            raise VsearchError(f"index {path} is damaged: {cls.file_name} holds {len(self.backend):,} vectors "
                               f"but {ROWS} {self.rows.count:,} rows; rebuild it")
        self._deletes_checked = time.monotonic()
        self._take_deletes()

    def _take_deletes(self) -> None:
        """Leave out the labels deleted.parquet lists now."""
        self._deletes_seen = _file_stamp(self.path / DELETED)
        self.deletes = deletes_of(held_labels(read_deleted(self.path)), self.rows.count, type(self.backend))

    @property
    def deleted(self) -> np.ndarray:
        return self.deletes.labels

    def _follow_deletes(self) -> Deletes:
        """The deletes a search leaves out, taking up those made since loading (`vsearch delete` from
        another process), looking at most once a `DELETES_CHECK_SECONDS`: a long-running searcher
        drops deleted ids without a restart.
        After an append or a rebuild the folder holds another index, whose deleted rows may be rows
        this one lacks (an upsert deletes the vector it replaces): this one then keeps its deletes
        until it is loaded again."""
        now = time.monotonic()
        if now - self._deletes_checked < DELETES_CHECK_SECONDS:
            return self.deletes
        self._deletes_checked = now
        stamp = _file_stamp(self.path / DELETED)
        if stamp == self._deletes_seen:
            return self.deletes
        self._deletes_seen = stamp
        try:
            current = read_index_manifest(self.path)
        except VsearchError:  # the folder is being replaced
            return self.deletes
        if _version_of(current) == _version_of(self.manifest):
            self._take_deletes()
        return self.deletes

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """Every label's id, as an object array of str, loaded on first use (`search` needs it; `vsearch
        query` reads rows by position and does not). Picking k of them costs 0.1 µs, where numpy's
        StringDType takes 1.3 µs and an Arrow take 8-15 µs, against a budget of a few µs per query; it
        costs about 73 bytes an id (16 characters) and 0.6 s per million ids to load on 2 cores."""
        return self.rows.ids().to_numpy(zero_copy_only=False)

    def __len__(self) -> int:
        return self.rows.count - len(self.deleted)

    def set_threads(self, threads: int) -> None:
        self.backend.set_threads(threads)

    def settle(self) -> None:
        """Wait until searches run at full speed. Right after loading, an hnswlib graph moves onto
        huge pages on a thread (about a second a GB; 1.3x the queries/s at 1M); searches meanwhile
        are right, only slower. A service may call this before it takes traffic; benchmarks do."""
        self.backend.settle()

    def set_search(self, **params: int) -> None:
        """Change search parameters (hnsw: ef_search; ivfpq: nprobe, k_factor) for later searches."""
        cls = type(self.backend)
        unknown = set(params) - set(cls.search_params)
        if unknown:
            raise VsearchError(f"unknown search parameter {', '.join(sorted(unknown))} for {cls.type} "
                               f"(known: {', '.join(cls.search_params) or 'none'})")
        check_params(params)
        self.backend.set_search(params)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32, order="C")  # np.atleast_2d alone costs 0.4 µs
        if queries.ndim == 1:
            queries = queries[None]
        if queries.shape[1] != self.dim:
            raise VsearchError(f"query vectors have dim {queries.shape[1]}, index {self.path} has dim {self.dim}")
        return queries

    def search_among(self, queries: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact (scores, labels) of the k best of the rows `labels` only, deleted ones left out: for a
        filter so selective that an ANN search would have to be widened over most of the index."""
        labels = np.asarray(labels, np.int64)
        deletes = self._follow_deletes()
        if len(deletes.labels):
            labels = labels[~deletes.dead[labels]]
        return self.backend.search_among(self._queries(queries), labels, min(k, len(labels)))

    def search_labels(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like `search`, but library labels (-1 past the live rows; `rows.take` gives their metadata),
        and at most as many columns as the index has rows."""
        return search_live(self.backend, self._queries(queries), k, self._follow_deletes())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores (n, k), ids (n, k)); slots past the live rows hold None and -inf."""
        deletes = self._follow_deletes()
        scores, labels = search_live(self.backend, self._queries(queries), k, deletes)
        if labels.shape[1] == k and (deletes.unpadded or (labels >= 0).all()):  # the common case, kept lean
            return scores, self.ids[labels]
        valid = labels >= 0
        ids = np.full((len(labels), k), None, dtype=object)
        padded = np.full((len(labels), k), -np.inf, dtype=np.float32)
        columns = labels.shape[1]
        ids[:, :columns][valid] = self.ids[labels[valid]]
        padded[:, :columns] = np.where(valid, scores, -np.inf)
        return padded, ids


def load_index(path: str | os.PathLike) -> Index:
    """Load an index folder written by `build_index` (`~` is the home folder, as in a shell)."""
    return Index(Path(path).expanduser())
