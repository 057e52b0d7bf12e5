"""The one registry of index types. Each wraps one library index behind the same small API:

    create(directory, dim, capacity, params)    load(directory, dim, params, writable)
    train(sample)   prepare(directory, new_rows)   add(vectors, labels)   hide(labels)   show(labels)
    save(directory)                             insertion_order(vectors): how a build orders a window
    search(queries, k) -> (scores, labels)       set_search(params)     set_threads(n)
    vectors(labels) -> the stored vectors        search_among(queries, labels, k): exact, over those

Vectors are L2-normalised, so inner product is cosine and every backend returns it as the score.
Labels are the int64 row numbers of the index's id table. Build parameters are fixed when an
index is built; search parameters (ef_search, nprobe, k_factor) can change at any time.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vsearch.errors import VsearchError, counted, first_line, human_size
from vsearch.files import errors_naming, fsync_file
from vsearch.indexes.hugepages import collapse_in_background, huge_pages_for_new_regions
from vsearch.memory import machine_memory

FAISS_FILE = "index.faiss"


def _faiss():
    import faiss

    return faiss


def exact_top_k(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of each query's k best by exact inner product over `chunks` of (labels,
    vectors), best first. Each chunk's own top k is taken first, so the merge holds 2k columns
    whatever the chunk's width."""
    def chunk_best() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for labels, vectors in chunks:
            if not len(labels) or k < 1:
                continue
            scores = queries @ np.asarray(vectors, np.float32).T
            local = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
            yield np.take_along_axis(scores, local, axis=1), np.asarray(labels, np.int64)[local]

    return merged_top_k(len(queries), chunk_best(), k)


def merged_top_k(rows: int, parts: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of `rows` rows' k best of the (scores, labels) `parts` (each rows x any width), best first."""
    best_scores = np.full((rows, 0), -np.inf, np.float32)
    best_labels = np.full((rows, 0), -1, np.int64)
    for scores, labels in parts:
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_labels = np.concatenate([best_labels, labels], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
            best_labels = np.take_along_axis(best_labels, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_labels, order, axis=1)


class Backend:
    type: ClassVar[str]
    engine: ClassVar[str]
    file_name: ClassVar[str] = FAISS_FILE
    build_params: ClassVar[dict[str, int]] = {}
    search_params: ClassVar[dict[str, int]] = {}
    trains: ClassVar[bool] = False
    resumable: ClassVar[bool] = False  # `load(writable=True)` gives an index that takes more vectors
    full_results: ClassVar[bool] = False  # search always fills k columns with real labels when k <= count
    insertion_window: ClassVar[int] = 0  # vectors a build gathers before `add`, in `insertion_order`
    skeleton: ClassVar[int] = 0  # vectors sampled across the files that a new index takes first (store._skeleton)

    @classmethod
    def create(cls, directory: Path, dim: int, capacity: int, params: dict[str, int]) -> "Backend":
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict[str, int], writable: bool = False) -> "Backend":
        raise NotImplementedError

    def train(self, sample: np.ndarray) -> None:
        """Learn quantisers from a sample; only for types with `trains`."""

    def prepare(self, directory: Path, new_rows: int) -> None:
        """Make room for `new_rows` more vectors before they are added (building into `directory`)."""

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        raise NotImplementedError

    def insertion_order(self, vectors: np.ndarray) -> np.ndarray:
        """The order to add a window of `vectors` in (positions); as given, unless the index is faster
        to build in another."""
        return np.arange(len(vectors))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels), best first; fewer than k columns, or labels of -1, where the index runs out."""
        raise NotImplementedError

    def __len__(self) -> int:
        """How many vectors it holds, every one searchable."""
        raise NotImplementedError

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """The stored vectors of `labels` (each >= 0), as float32."""
        raise NotImplementedError

    def search_among(self, queries: np.ndarray, labels: np.ndarray, k: int,
                     chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k over the stored vectors of `labels` only, read back a chunk at a time."""
        return exact_top_k(queries, ((labels[start:start + chunk], self.vectors(labels[start:start + chunk]))
                                     for start in range(0, len(labels), chunk)), k)

    def set_search(self, params: dict[str, int]) -> None:
        """Apply search parameters (a subset of `search_params`)."""

    def hide(self, labels: np.ndarray) -> None:
        """Keep `labels` (deleted, replaced and retired vectors) out of this index's own searches
        while they stay in it, where the library can; vsearch filters them out of results anyway."""

    def show(self, labels: np.ndarray) -> None:
        """Undo `hide` for `labels` (replaced vectors shown again)."""

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def set_threads(self, threads: int) -> None:
        if threads > 0:
            _faiss().omp_set_num_threads(threads)

    def settle(self) -> None:
        """Wait for what the backend goes on doing by itself after loading (none do but hnswlib)."""

    def release_file(self) -> None:
        """Stop reading from the file the index was loaded from, which is about to be replaced: a
        mapping would keep its disk space taken (none map it after a writable load but hnswlib)."""


class InsertionWindow:
    """Vectors on their way into `backend`, gathered until it has `insertion_window` of them, then
    added in its `insertion_order` (hnswlib's, after the graph's first vectors: near vectors one
    after another, so that each insert finds the part of the graph it reads still in the cache), a
    chunk at a time for the progress bar. `after()` runs between windows only (an HNSW build, and the
    cbvs10m-HNSW job, save their checkpoints there): the index then holds every label below some
    point and no other, as a resumed run expects."""

    CHUNK = 16_384

    def __init__(self, backend: Backend, on_rows: Callable[[int], None] = lambda n: None,
                 after: Callable[[], None] = lambda: None):
        self.backend, self.on_rows, self.after = backend, on_rows, after
        self.vectors: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        self.vectors.append(vectors)
        self.labels.append(labels)
        if sum(map(len, self.labels)) >= self.backend.insertion_window:
            self.flush()

    def flush(self) -> None:
        if not self.labels:
            return
        vectors, labels = (parts[0] if len(parts) == 1 else np.concatenate(parts)  # one batch: no copy
                           for parts in (self.vectors, self.labels))
        self.vectors, self.labels = [], []
        # A backend that gathers no window takes its batches as they come: sliced, not gathered.
        order = self.backend.insertion_order(vectors) if self.backend.insertion_window else None
        for start in range(0, len(labels), self.CHUNK):
            part = slice(start, start + self.CHUNK) if order is None else order[start:start + self.CHUNK]
            self.backend.add(np.ascontiguousarray(vectors[part], dtype=np.float32), labels[part])
            self.on_rows(len(labels[part]))
        self.after()


def _faiss_reason(exc: RuntimeError) -> str:
    """What a FAISS error says went wrong, without the source location and the check that failed."""
    return str(exc).split("failed: ")[-1].strip()


class FaissBackend(Backend):
    """Shared by the FAISS types: the index is one file in FAISS's own format."""

    def __init__(self, index: Any):
        self.index = index

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict[str, int], writable: bool = False) -> "FaissBackend":
        faiss = _faiss()
        path = str(directory / cls.file_name)
        # Memory-map what FAISS can map, so opening a big index costs page faults, not a full read, and
        # processes share one copy in the page cache. IO_FLAG_MMAP_IFC (faiss >= 1.10) maps the stored
        # vectors and codes too, where IO_FLAG_MMAP copies them: a 1M x 512 flat index opens in 0 ms
        # instead of 1.3 s.
        flags = 0 if writable else getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
        try:
            index = faiss.read_index(path, flags)
        except RuntimeError:
            index = faiss.read_index(path)
        backend = cls(index)
        backend.set_search(params)
        return backend

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if labels[0] != self.index.ntotal:
            raise VsearchError(f"internal: labels must continue at {self.index.ntotal}, got {labels[0]}")
        self.index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(np.asarray(labels, np.int64))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def save(self, directory: Path) -> None:
        path = directory / self.file_name
        faiss = _faiss()
        # Through a Python file: FAISS's own writer reports a full disk only when a write overflows
        # stdio's buffer, and the last buffer's failure, the whole of a small index, it only prints.
        with errors_naming(path), open(path, "wb") as handle:
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(handle.write))


class FlatBackend(FaissBackend):
    """Exact inner-product search (FAISS IndexFlatIP)."""

    type, engine = "flat", "faiss"

    @classmethod
    def create(cls, directory: Path, dim: int, capacity: int, params: dict[str, int]) -> "FlatBackend":
        return cls(_faiss().IndexFlatIP(dim))


class FaissHnswBackend(FaissBackend):
    """HNSW graph in FAISS (IndexHNSWFlat, inner product)."""

    type, engine = "hnsw", "faiss"
    build_params = {"M": 32, "ef_construction": 200}
    search_params = {"ef_search": 128}
    resumable = True

    @classmethod
    def create(cls, directory: Path, dim: int, capacity: int, params: dict[str, int]) -> "FaissHnswBackend":
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        backend = cls(index)
        backend.set_search(params)
        return backend

    def set_search(self, params: dict[str, int]) -> None:
        # Kept on the Python side too: reading a SWIG attribute on every query costs microseconds.
        self.ef_search = params.get("ef_search", getattr(self, "ef_search", self.search_params["ef_search"]))
        self.index.hnsw.efSearch = self.ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k <= self.ef_search:
            return self.index.search(queries, k)
        # HNSW returns at most ef results: a wider ef for this call alone, as threads search at once.
        return self.index.search(queries, k, params=_faiss().SearchParametersHNSW(efSearch=k))


# hnswlib's file (`HierarchicalNSW::saveIndex`, unchanged since hnswlib 0.5): this header, then
# each element's level-0 record (links, vector, label) in hnswlib's internal order, then the
# upper levels' links.
HNSWLIB_HEADER = np.dtype([
    ("offset_level0", "<u8"), ("max_elements", "<u8"), ("count", "<u8"), ("size_per_element", "<u8"),
    ("label_offset", "<u8"), ("data_offset", "<u8"), ("max_level", "<i4"), ("entry_point", "<u4"),
    ("max_m", "<u8"), ("max_m0", "<u8"), ("m", "<u8"), ("mult", "<f8"), ("ef_construction", "<u8")])


def hnswlib_file_vectors(file: np.ndarray, dim: int, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(each element's vector in an hnswlib index file, mapped as bytes, in hnswlib's internal order;
    the internal position of each label 0..count-1), or None when the file is not laid out so."""
    if len(file) < HNSWLIB_HEADER.itemsize:
        return None
    header = file[:HNSWLIB_HEADER.itemsize].view(HNSWLIB_HEADER)[0]
    size, data, label = (int(header[name]) for name in ("size_per_element", "data_offset", "label_offset"))
    if (int(header["count"]) != count or label - data != 4 * dim or label + 8 > size
            or len(file) < HNSWLIB_HEADER.itemsize + count * size):
        return None
    records = file[HNSWLIB_HEADER.itemsize:HNSWLIB_HEADER.itemsize + count * size].reshape(count, size)
    labels = records[:, label:label + 8].view("<u8")[:, 0]
    if count and int(labels.max()) >= count:
        return None
    internal = np.empty(count, np.int64)
    internal[labels] = np.arange(count)
    return records[:, data:data + 4 * dim].view("<f4"), internal


def _each_label(mark: Any, labels: np.ndarray, done_already: str) -> None:
    """`mark(label)` for each label (hnswlib's mark_deleted, unmark_deleted), but for those whose
    error says they are so already: hnswlib offers no way to ask first."""
    for label in labels.tolist():
        try:
            mark(label)
        except RuntimeError as exc:
            if done_already not in str(exc):
                raise


def new_hnswlib_graph(dim: int, capacity: int, params: dict[str, int]) -> Any:
    """An empty hnswlib graph (inner product) with room for `capacity` vectors, on huge pages."""
    import hnswlib

    index = hnswlib.Index(space="ip", dim=dim)
    with huge_pages_for_new_regions(capacity * dim * 4):
        index.init_index(max_elements=max(capacity, 1), M=params["M"], ef_construction=params["ef_construction"])
    return index


def save_hnswlib_graph(index: Any, path: Path) -> None:
    """Save `index` to `path`, an OSError where the file came out short: hnswlib writes what fits
    and reports nothing (a full disk, a quota)."""
    index.save_index(str(path))
    written, expected = path.stat().st_size, index.index_file_size()
    if written != expected:
        raise OSError(errno.EIO, f"hnswlib wrote {written:,} of {expected:,} bytes, "
                      f"{human_size(shutil.disk_usage(path.parent).free)} free on that disk", str(path))


def loaded_hnswlib_graph(path: Path, dim: int) -> tuple[Any, threading.Thread | None]:
    """The hnswlib graph saved in `path`, and the thread moving its pages onto huge ones (see
    `collapse_in_background`). A file whose length disagrees with what it lists is hnswlib's
    RuntimeError."""
    import hnswlib

    size, (total, _) = path.stat().st_size, machine_memory()
    if size > total:  # hnswlib reads it into memory whole: past the machine's, it would be killed reading it
        raise VsearchError(f"index {path.parent} takes about {human_size(size)} of memory once loaded (hnswlib reads "
                           f"its graph whole), more than this machine's {human_size(total)}: search it on a larger "
                           "machine, or build an ivfpq index of its vectors, which takes a small part of that")
    index = hnswlib.Index(space="ip", dim=dim)
    with huge_pages_for_new_regions(size // 2) as graph:  # its vectors and links, most of the file
        index.load_index(str(path))
    return index, collapse_in_background(graph, index)


class HnswlibBackend(Backend):
    """HNSW graph in hnswlib (inner-product space)."""

    type, engine, file_name = "hnsw", "hnswlib", "index.hnsw"
    build_params = {"M": 32, "ef_construction": 200}
    search_params = {"ef_search": 128}
    resumable = True
    full_results = True  # where hnswlib cannot find k, search falls back to exact search
    # A window of 2^18 vectors in clusters of about 256 (`insertion_order`), after a skeleton of 2^15:
    # at 1M×512 on 2 cores the graph built 2.8x faster than in the files' order, with the same recall.
    insertion_window = 1 << 18
    rows_per_cluster = 256
    skeleton = 1 << 15  # vectors a new graph takes in the order given before any sorted (`insertion_order`)

    def __init__(self, index: Any, ef_search: int, saved: np.ndarray | None = None):
        self.index, self.ef_search, self.threads = index, ef_search, -1
        self.count = index.get_current_count()
        # hnswlib searches with max(ef, k) itself: ef changes only with the setting, never per search,
        # which threads searching at once would race on.
        index.set_ef(ef_search)
        self._map_lock = threading.Lock()
        # Labels this process marked deleted: hnswlib can neither list them nor read their vectors.
        self.hidden = np.empty(0, np.int64)
        # The file the index was loaded from, mapped (so a rebuild replacing it cannot change what
        # is read), which holds the vectors of the labels it had then whatever is added since;
        # parsed on the first call to `vectors`.
        self.saved, self.saved_count = saved, self.count
        self._mapped: tuple[np.ndarray, np.ndarray] | None = None
        self.collapsing: threading.Thread | None = None  # the loaded graph moving onto huge pages
        self.clusters: Any = None  # the coarse centroids `near_first` sorts by, once trained

    @classmethod
    def create(cls, directory: Path, dim: int, capacity: int, params: dict[str, int]) -> "HnswlibBackend":
        index = new_hnswlib_graph(dim, capacity, params)
        return cls(index, params.get("ef_search", cls.search_params["ef_search"]))

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict[str, int], writable: bool = False) -> "HnswlibBackend":
        path = directory / cls.file_name
        index, collapsing = loaded_hnswlib_graph(path, dim)
        saved = np.memmap(path, np.uint8, "r")
        backend = cls(index, params.get("ef_search", cls.search_params["ef_search"]), saved)
        backend.collapsing = collapsing
        return backend

    def prepare(self, directory: Path, new_rows: int) -> None:
        needed = self.index.get_current_count() + new_rows
        if needed > self.index.get_max_elements():
            # The copy of the old graph has touched its pages; only the new rows' get huge ones.
            with huge_pages_for_new_regions(needed * self.index.dim * 4):
                self.index.resize_index(needed)

    def settle(self) -> None:
        if self.collapsing is not None:
            self.collapsing.join()

    def release_file(self) -> None:
        with self._map_lock:
            self.saved, self._mapped = None, None  # `vectors` reads them with get_items instead

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        self.index.add_items(vectors, labels, num_threads=self.threads)
        self.count = self.index.get_current_count()

    def insertion_order(self, vectors: np.ndarray) -> np.ndarray:
        """The graph's first `skeleton` vectors in the order given, then `near_first`. An insert
        reads the graph around its vector, thousands of vectors scattered over memory; the next
        insert, near it, and the other threads' find most of them still in the cache. But each vector
        links to those inserted before it, and a graph begun cluster by cluster links its clusters
        poorly (1.5-2 points of recall@10 at the same ef_search on near-duplicate OCR texts); begun
        from a sample of the whole collection, most of that comes back, at a cost of 2-12% of the
        speed (benchmarks/RESULTS.md): a build gives it one sampled across all its files
        (store._skeleton), the cbvs10m-HNSW job the dataset's first texts. Labels keep the files'
        order; only the order of insertion changes."""
        head = min(len(vectors), max(0, self.skeleton - len(self)))
        return np.concatenate([np.arange(head), head + self.near_first(vectors[head:])])

    def near_first(self, vectors: np.ndarray) -> np.ndarray:
        """An order of `vectors` by their nearest of up to 1,024 k-means centroids (one for each
        `rows_per_cluster` vectors of the first call with enough of them), near ones one after
        another."""
        if self.clusters is None:
            count = min(1024, len(vectors) // self.rows_per_cluster)
            if count < 16:  # too few to gain from it
                return np.arange(len(vectors))
            sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 64 * count), replace=False)
            kmeans = _faiss().Kmeans(vectors.shape[1], count, niter=10, spherical=True, seed=1234)
            kmeans.train(np.asarray(vectors[np.sort(sample)], np.float32))
            self.clusters = kmeans.index
        nearest = [self.clusters.search(np.asarray(vectors[start:start + 65_536], np.float32), 1)[1][:, 0]
                   for start in range(0, len(vectors), 65_536)]  # float32 a part at a time
        return np.argsort(np.concatenate(nearest), kind="stable")

    def set_search(self, params: dict[str, int]) -> None:
        self.ef_search = params.get("ef_search", self.ef_search)
        self.index.set_ef(self.ef_search)

    def hide(self, labels: np.ndarray) -> None:
        # Marked deleted, they still route hnswlib's graph search, which fills k with live results
        # past them, where vsearch's filtering afterwards is left with fewer for the same ef_search.
        _each_label(self.index.mark_deleted, labels, "already deleted")
        self.hidden = np.union1d(self.hidden, labels)

    def show(self, labels: np.ndarray) -> None:
        _each_label(self.index.unmark_deleted, labels, "is not deleted")
        self.hidden = np.setdiff1d(self.hidden, labels)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.count)  # hnswlib cannot return more than it holds
        try:
            labels, distances = self.index.knn_query(queries, k=k, num_threads=self.threads)
        except RuntimeError:  # the graph reached fewer than k nodes (many identical vectors, or many hidden)
            labels = np.setdiff1d(np.asarray(self.index.get_ids_list(), np.int64), self.hidden)
            return self.search_among(queries, labels, min(k, len(labels)))
        return 1.0 - distances, labels.view(np.int64)  # hnswlib's labels are uint64; ours fit in int64

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """Read from the loaded file, memory-mapped, where it can be: 0.4 µs a vector (200k×512, in
        the page cache) where hnswlib's get_items takes 28 µs, building a Python list of floats per
        vector (at 10M vectors, 5 minutes for the exact pass that measures an append's recall). The
        first call reads every element's label, a pass over the file (in the page cache after
        hnswlib's own load). Vectors added since loading, or to an index being built, come from
        get_items."""
        with self._map_lock:
            if self._mapped is None and self.saved is not None:
                self._mapped = hnswlib_file_vectors(self.saved, self.index.dim, self.saved_count)
                self.saved = None  # mapped now, or not laid out as expected: get_items from here on
        labels = np.asarray(labels, np.int64)
        stored, internal = self._mapped or (np.empty((0, self.index.dim), np.float32), np.empty(0, np.int64))
        saved = labels < len(internal)
        if saved.all():
            return np.asarray(stored[internal[labels]], np.float32)
        out = np.empty((len(labels), self.index.dim), np.float32)
        out[saved] = stored[internal[labels[saved]]]
        out[~saved] = self.index.get_items(labels[~saved], return_type="numpy")
        return out

    def __len__(self) -> int:
        return self.count

    def save(self, directory: Path) -> None:
        save_hnswlib_graph(self.index, directory / self.file_name)

    def set_threads(self, threads: int) -> None:
        super().set_threads(threads)  # FAISS sorts the windows
        self.threads = threads


# With `coarse_hnsw`, an HNSW graph over the IVF centroids finds a query's lists instead of a scan
# of every centroid: at 16,384 lists (10M vectors) 0.11 ms a query against 0.79 ms on one thread,
# the same 16 lists found, and a vector being added finds its list in under half the scan's time
# (benchmarks/RESULTS.md).
# The graph is searched COARSE_EF wide, or twice nprobe where that is wider (narrower, it misses
# some of the lists); an add too, for its one list. It is built COARSE_EF_CONSTRUCTION wide, not
# FAISS's 40: over 16,384 k-means centroids, a graph built 40 wide sent 0.46% of the vectors added
# to some other list than their nearest, where searches missed them (recall@10 at 1M stopped at
# 0.9988 against the scan's 0.9997); built 200 wide, 0.0005%, for 3 s more of a build.
COARSE_HNSW_M, COARSE_EF_CONSTRUCTION, COARSE_EF = 32, 200, 64


class IvfPqBackend(FaissBackend):
    """FAISS IVF with product quantisation behind an OPQ rotation, plus exact refinement.

    PQ codes alone lose recall, so a search fetches k * k_factor candidates and re-scores them
    exactly against the float16 vectors, kept in `vectors-NNNNN.npy` segments beside the index and
    memory-mapped: they stay on disk, and only the candidates' rows are read.
    """

    type, engine = "ivfpq", "faiss"
    build_params = {"nlist": 1024, "m": 64, "nbits": 8, "opq": 1, "train_size": 100_000, "opq_iterations": 10,
                    "coarse_hnsw": 0}
    search_params = {"nprobe": 32, "k_factor": 10}
    trains = True

    def __init__(self, index: Any):
        super().__init__(index)
        self.dim = index.d
        self.segments: list[np.ndarray] = []
        self.nprobe, self.k_factor = self.search_params["nprobe"], self.search_params["k_factor"]
        self._writing: Path | None = None  # the segment `add` writes into, and the offset of its next row
        self._rows_at = 0

    @staticmethod
    def factory_string(dim: int, params: dict[str, int]) -> str:
        # "np": no polysemous training, which FAISS's factory does by default. It orders the PQ
        # centroids for Hamming-distance filtering, which vsearch never searches with, and took a
        # quarter of the training time on 50k x 512 and nine tenths on the tests' 3,000 x 64.
        coarse = f"_HNSW{COARSE_HNSW_M}" if params.get("coarse_hnsw") else ""
        quantiser = f"IVF{params['nlist']}{coarse},PQ{params['m']}x{params['nbits']}np"
        return f"OPQ{params['m']}_{dim},{quantiser}" if params["opq"] else quantiser

    @classmethod
    def create(cls, directory: Path, dim: int, capacity: int, params: dict[str, int]) -> "IvfPqBackend":
        faiss = _faiss()
        if dim % params["m"]:
            raise VsearchError(f"ivfpq: m={params['m']} must divide the dimension {dim}")
        index = faiss.index_factory(dim, cls.factory_string(dim, params), faiss.METRIC_INNER_PRODUCT)
        if params["opq"]:
            opq = faiss.downcast_VectorTransform(index.chain.at(0))
            opq.niter = opq.niter_pq_0 = params["opq_iterations"]
            opq.max_train_points = min(params["train_size"], 65536)  # a rotation needs far fewer points than IVF
        backend = cls(index)
        graph = backend._coarse_graph()
        if graph is not None:
            graph.hnsw.efConstruction = COARSE_EF_CONSTRUCTION
        backend.set_search(params)
        return backend

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict[str, int], writable: bool = False) -> "IvfPqBackend":
        loaded = super().load(directory, dim, params, writable)
        for path in sorted(directory.glob("vectors-*.npy")):
            try:
                loaded.segments.append(np.load(path, mmap_mode="r"))
            except ValueError as exc:  # a file shorter than its header says, or no .npy header at all
                raise VsearchError(f"index {directory} is damaged ({path.name}: {first_line(exc)}); rebuild it") from None
        kept = sum(len(segment) for segment in loaded.segments)
        if kept != loaded.index.ntotal:
            raise VsearchError(f"index {directory} is damaged: its vectors-*.npy files hold {kept:,} of the "
                               f"{loaded.index.ntotal:,} vectors that refinement re-scores; rebuild it")
        return loaded

    def train(self, sample: np.ndarray) -> None:
        try:
            self.index.train(sample)
        except RuntimeError as exc:  # FAISS's k-means refuses fewer points than centroids
            reason = _faiss_reason(exc)
            raise VsearchError(f"ivfpq cannot train on {counted(len(sample), 'vector')}: {reason}; lower --param nlist "
                               f"or nbits, or use --type flat") from None

    def prepare(self, directory: Path, new_rows: int) -> None:
        path = directory / f"vectors-{len(self.segments):05d}.npy"
        with errors_naming(path):
            header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(new_rows, self.dim)).offset
            if hasattr(os, "posix_fallocate"):  # not on macOS
                # Its blocks taken now: the disk filling up hours into a build fails it at the start instead.
                with open(path, "r+b") as handle:
                    os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        self._writing, self._rows_at = path, header
        self.segments.append(np.load(path, mmap_mode="r"))

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        graph = self._coarse_graph()
        if graph is None:
            super().add(vectors, labels)
        else:  # COARSE_EF wide, whatever nprobe searches were tuned to
            searching, graph.hnsw.efSearch = graph.hnsw.efSearch, COARSE_EF
            try:
                super().add(vectors, labels)
            finally:
                graph.hnsw.efSearch = searching
        # Written, not stored through a writable map: a map's written pages stay in the build's resident
        # memory (at 1M x 512 its peak fell from 2.5 to 2.0 GB without them). Searches read it through a map.
        rows = np.ascontiguousarray(vectors, dtype=np.float16)
        with errors_naming(self._writing), open(self._writing, "r+b") as handle:
            handle.seek(self._rows_at)
            handle.write(rows)
        self._rows_at += rows.nbytes

    def save(self, directory: Path) -> None:
        if self._writing is not None:
            fsync_file(self._writing)
        super().save(directory)

    def set_search(self, params: dict[str, int]) -> None:
        self.nprobe = params.get("nprobe", self.nprobe)
        self.k_factor = params.get("k_factor", self.k_factor)
        _faiss().extract_index_ivf(self.index).nprobe = self.nprobe
        graph = self._coarse_graph()
        if graph is not None:
            graph.hnsw.efSearch = max(COARSE_EF, 2 * self.nprobe)

    def _coarse_graph(self) -> Any:
        """The HNSW graph the inverted lists are found through (`coarse_hnsw`), or None where the
        centroids are scanned."""
        faiss = _faiss()
        quantiser = faiss.downcast_index(faiss.extract_index_ivf(self.index).quantizer)
        return quantiser if isinstance(quantiser, faiss.IndexHNSW) else None

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """The float16 vectors kept for refinement, not the PQ codes' approximations."""
        return self.rows(labels).astype(np.float32)

    def rows(self, labels: np.ndarray) -> np.ndarray:
        """The stored float16 vectors of `labels` (each >= 0)."""
        out = np.empty((len(labels), self.dim), np.float16)
        start = 0
        for segment in self.segments:
            inside = (labels >= start) & (labels < start + len(segment))
            out[inside] = segment[labels[inside] - start]
            start += len(segment)
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(self.index.ntotal, k * self.k_factor)
        if fetch >= self.index.ntotal:
            # Asked for every vector (a small index, or a filtered search widened to all of it): nprobe
            # lists hold a share of them, and an HNSW graph of the lists may not reach every one.
            return self.search_among(queries, np.arange(self.index.ntotal), k)
        _, candidates = self.index.search(queries, fetch)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        labels = np.full((len(queries), k), -1, np.int64)
        for start in range(0, len(queries), 64):  # bounds the gathered vectors to 64 * fetch rows
            block = candidates[start:start + 64]
            vectors = self.rows(np.maximum(block, 0).ravel()).reshape(*block.shape, self.dim).astype(np.float32)
            exact = np.einsum("nkd,nd->nk", vectors, queries[start:start + 64])
            exact[block < 0] = -np.inf
            order = np.argsort(-exact, axis=1)[:, :k]
            scores[start:start + 64, :order.shape[1]] = np.take_along_axis(exact, order, axis=1)
            labels[start:start + 64, :order.shape[1]] = np.where(
                np.isfinite(np.take_along_axis(exact, order, axis=1)), np.take_along_axis(block, order, axis=1), -1)
        return scores, labels


ENGINES: dict[str, dict[str, type[Backend]]] = {
    "flat": {"faiss": FlatBackend},
    "hnsw": {"hnswlib": HnswlibBackend, "faiss": FaissHnswBackend},
    "ivfpq": {"faiss": IvfPqBackend},
}
INDEX_TYPES = tuple(ENGINES)


def backend_class(index_type: str, engine: str | None = None) -> type[Backend]:
    if index_type not in ENGINES:
        raise VsearchError(f"unknown index type {index_type!r}: use one of {', '.join(ENGINES)}")
    engines = ENGINES[index_type]
    if engine is None:
        return next(iter(engines.values()))
    if engine not in engines:
        raise VsearchError(f"index type {index_type} has no engine {engine!r}: use one of {', '.join(engines)}")
    return engines[engine]
