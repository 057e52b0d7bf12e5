"""The one registry of index types. Each wraps one library index behind the same small API:

    create(dim, capacity, params) -> backend     add(vectors, labels)     search(queries, k)
    save(path)                                    load(path, dim, params)

Vectors are L2-normalised, so inner product is cosine and every backend returns it as the score.
Labels are the int64 row numbers of the index's id table.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np

from vsearch.errors import VsearchError


class Backend(Protocol):
    engine: ClassVar[str]
    file_name: ClassVar[str]
    defaults: ClassVar[dict[str, int]]

    @classmethod
    def create(cls, dim: int, capacity: int, params: dict[str, int]) -> "Backend": ...

    @classmethod
    def load(cls, path: str, dim: int, params: dict[str, int]) -> "Backend": ...

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str) -> None: ...

    def set_threads(self, threads: int) -> None: ...


class FlatBackend:
    """Exact inner-product search (FAISS IndexFlatIP)."""

    engine = "faiss"
    file_name = "index.faiss"
    defaults: dict[str, int] = {}

    def __init__(self, index: Any):
        self.index = index

    @classmethod
    def create(cls, dim: int, capacity: int, params: dict[str, int]) -> "FlatBackend":
        import faiss

        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def load(cls, path: str, dim: int, params: dict[str, int]) -> "FlatBackend":
        import faiss

        return cls(faiss.read_index(path))

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        self.index.add_with_ids(vectors, labels)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def save(self, path: str) -> None:
        import faiss

        faiss.write_index(self.index, path)

    def set_threads(self, threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)


class HnswBackend:
    """Approximate search on an hnswlib HNSW graph (inner-product space)."""

    engine = "hnswlib"
    file_name = "index.hnsw"
    defaults = {"M": 32, "ef_construction": 200, "ef_search": 128}

    def __init__(self, index: Any, ef_search: int):
        self.index = index
        self.ef_search = ef_search
        self.threads = -1

    @classmethod
    def create(cls, dim: int, capacity: int, params: dict[str, int]) -> "HnswBackend":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=capacity, M=params["M"], ef_construction=params["ef_construction"])
        return cls(index, params["ef_search"])

    @classmethod
    def load(cls, path: str, dim: int, params: dict[str, int]) -> "HnswBackend":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.load_index(path)
        return cls(index, params["ef_search"])

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        self.index.add_items(vectors, labels, num_threads=self.threads)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # hnswlib needs ef >= k to return k neighbours.
        self.index.set_ef(max(self.ef_search, k))
        labels, distances = self.index.knn_query(queries, k=k, num_threads=self.threads)
        return 1.0 - distances, labels.astype(np.int64)

    def save(self, path: str) -> None:
        self.index.save_index(path)

    def set_threads(self, threads: int) -> None:
        self.threads = threads


INDEX_TYPES: dict[str, type[Backend]] = {"flat": FlatBackend, "hnsw": HnswBackend}


def backend_class(index_type: str) -> type[Backend]:
    if index_type not in INDEX_TYPES:
        raise VsearchError(f"unknown index type {index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    return INDEX_TYPES[index_type]


def resolve_params(index_type: str, overrides: dict[str, int]) -> dict[str, int]:
    """The backend's defaults with the user's `--param KEY=VALUE` settings applied."""
    defaults = backend_class(index_type).defaults
    unknown = set(overrides) - set(defaults)
    if unknown:
        known = ", ".join(defaults) or "none"
        raise VsearchError(f"unknown parameter {', '.join(sorted(unknown))} for {index_type} (known: {known})")
    return {**defaults, **overrides}
