"""The on-disk index format, and building one from shards.

`indexes/<name>/` holds:

    index.json     manifest: type, engine, params, dim, metric, count, kind, the shards it was
                   built from (with checksums), the encoder spec and fingerprint, build time
    index.faiss | index.hnsw   the library's own file, loadable by plain faiss or hnswlib
    ids.parquet    `id` column: row i is the id of library label i

An index is built in a temporary folder beside its destination and renamed into place, so a
failed build never replaces a good index.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vsearch.embeddings.shards import Manifest, read_vectors
from vsearch.errors import VsearchError
from vsearch.files import write_json_atomic
from vsearch.indexes.backends import Backend, backend_class, resolve_params

FORMAT = "vsearch-index/1"
MANIFEST = "index.json"
IDS = "ids.parquet"


@dataclass
class BuildConfig:
    type: str = "hnsw"
    embeddings: Path | None = None
    out: Path | None = None
    name: str | None = None
    kind: str = "cover"
    params: dict[str, int] = field(default_factory=dict)
    threads: int = -1


def _add_shards(backend: Backend, embeddings: Path, manifest: Manifest, kind: str, ids_path: Path,
                on_rows: Callable[[int], None]) -> list[dict[str, Any]]:
    """Stream every shard of `kind` into the backend and the id table, one record batch at a time."""
    used = []
    label = 0
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)])
    with pq.ParquetWriter(ids_path, schema) as ids:
        for shard in manifest.shards:
            if shard["kind"] != kind:
                continue
            path = embeddings / shard["name"]
            if not path.is_file():
                raise VsearchError(f"shard {path} is listed in the manifest but missing")
            for batch_ids, vectors in read_vectors(path):
                labels = np.arange(label, label + len(batch_ids), dtype=np.int64)
                backend.add(np.ascontiguousarray(vectors, dtype=np.float32), labels)
                ids.write_table(pa.table({"id": pa.array(batch_ids, pa.string())}, schema=schema))
                label += len(batch_ids)
                on_rows(len(batch_ids))
            used.append({k: shard[k] for k in ("name", "rows", "sha256")})
    return used


def _check_replaceable(destination: Path) -> None:
    """Refuse to build over a folder that holds anything but a vsearch index."""
    if destination.exists() and not (destination / MANIFEST).is_file() and any(destination.iterdir()):
        raise VsearchError(f"refusing to replace {destination}: it is not empty and not a vsearch index")


def _replace_dir(built: Path, destination: Path) -> None:
    """Swap `built` into `destination`; the old index is removed only after the new one is in place."""
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    if destination.exists():
        os.replace(destination, old)
    os.replace(built, destination)
    shutil.rmtree(old, ignore_errors=True)


def build_index(config: BuildConfig, embeddings: Path, destination: Path,
                on_rows: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Build an index of `config.type` from the shards in `embeddings` into `destination`."""
    cls = backend_class(config.type)
    params = resolve_params(config.type, config.params)
    manifest = Manifest.read(embeddings)
    count = manifest.rows(config.kind)
    if count == 0:
        raise VsearchError(f"no {config.kind} vectors in {embeddings}: nothing to index")
    _check_replaceable(destination)
    started = time.perf_counter()
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        backend = cls.create(manifest.dim, count, params)
        backend.set_threads(config.threads)
        shards = _add_shards(backend, embeddings, manifest, config.kind, work / IDS, on_rows)
        backend.save(str(work / cls.file_name))
        info = {
            "format": FORMAT, "type": config.type, "engine": cls.engine, "params": params,
            "dim": manifest.dim, "metric": manifest.metric, "count": count, "kind": config.kind,
            "dataset": manifest.dataset, "embeddings": str(embeddings.resolve()), "shards": shards,
            "encoder": manifest.encoder, "files": {"index": cls.file_name, "ids": IDS},
            "build_seconds": round(time.perf_counter() - started, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(work / MANIFEST, info)
        _replace_dir(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return info


class Index:
    """A loaded index: `search(queries, k)` returns cosine scores and string ids."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest = read_index_manifest(path)
        cls = backend_class(self.manifest["type"])
        self.dim = int(self.manifest["dim"])
        self.backend = cls.load(str(path / self.manifest["files"]["index"]), self.dim, self.manifest["params"])
        self.ids = pq.read_table(path / self.manifest["files"]["ids"]).column("id").combine_chunks()

    def __len__(self) -> int:
        return len(self.ids)

    def set_threads(self, threads: int) -> None:
        self.backend.set_threads(threads)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores (n, k), ids (n, k)); slots past the index's size hold None and -inf."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise VsearchError(f"query vectors have dim {queries.shape[1]}, index {self.path} has dim {self.dim}")
        found = min(k, len(self))
        scores, labels = self.backend.search(queries, found)
        valid = labels >= 0
        ids = np.full(labels.shape, None, dtype=object)
        ids[valid] = np.asarray(self.ids.take(pa.array(labels[valid])).to_pylist(), dtype=object)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        if found < k:
            ids = np.pad(ids, ((0, 0), (0, k - found)), constant_values=None)
            scores = np.pad(scores, ((0, 0), (0, k - found)), constant_values=-np.inf)
        return scores, ids


def read_index_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise VsearchError(f"no index at {path} (missing {MANIFEST}); run vsearch build-index first")
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise VsearchError(f"unreadable index manifest {manifest}: {exc}") from exc
    if info.get("format") != FORMAT:
        raise VsearchError(f"{manifest} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def load_index(path: str | os.PathLike) -> Index:
    """Load an index folder written by `build_index`."""
    return Index(Path(path))
