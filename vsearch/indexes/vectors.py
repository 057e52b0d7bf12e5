"""Where an index's vectors come from: vsearch shards, or a folder of your own embeddings.

A vsearch shard folder has a `_manifest.json` (the encoder, dim and checksums come from it).
Any other folder is "bring your own embeddings", in one of two layouts:

* every `*.parquet` file in it, read in name order, with an id column (`id`, or `--id-column`) and
  a vector column (a list of floats, fixed-size or of one length throughout, as pandas and Hugging
  Face datasets write them: `vector`, `embedding` or the only such column, or `--vector-column`);
* clip-retrieval's output (embedding-reader's "parquet_npy"; LAION's released embeddings too, their
  metadata folder linked in as `metadata/`): `img_emb/*.npy` (or `text_emb/`, as `--vector-column
  text_emb`), each a matrix whose rows line up with those of the `metadata/*.parquet` file of the
  same number, which holds the ids (`id`, `key` or `image_path`, or `--id-column`) and the rest of
  the columns.

Their vectors are indexed L2-normalised, as vsearch's own are: scores are cosine similarities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vsearch.embeddings.encoders import Encoder, l2_normalise
from vsearch.embeddings.shards import MANIFEST, Manifest
from vsearch.errors import VsearchError, counted
from vsearch.files import sha256_of
from vsearch.overlap import read_ahead

VECTOR_NAMES = ("vector", "embedding", "embeddings", "emb")
NPY_FOLDERS = ("img_emb", "text_emb")  # clip-retrieval's, image embeddings first
NPY_ID_NAMES = ("id", "key", "image_path")  # webdataset input gives a key, a folder of images a path


@dataclass
class VectorFile:
    name: str
    path: Path  # the Parquet file: ids, other columns, and the vectors unless `vectors` holds them
    rows: int
    sha256: str
    vectors: Path | None = None  # a .npy matrix of the vectors, row for row with `path` (clip-retrieval's)

    @property
    def vector_path(self) -> Path:
        return self.vectors or self.path


@dataclass
class VectorSource:
    directory: Path
    dataset: str
    dim: int
    files: list[VectorFile]
    encoder: dict[str, str] | None  # spec and fingerprint; None for bring-your-own embeddings
    id_column: str = "id"
    vector_column: str = "vector"
    excluded: frozenset[str] = frozenset()  # ids left out (deleted from the index a build replaces)
    kind: str | None = None  # the kind of vsearch shards it reads; None for bring-your-own embeddings

    @property
    def count(self) -> int:
        return sum(self.live_rows)

    @property
    def excluded_rows(self) -> int:
        return sum(f.rows for f in self.files) - self.count

    @cached_property
    def _excluded_ids(self) -> pa.Array | None:
        """`excluded` as the value set of Arrow's `is_in`, made once for every pass over the files."""
        return pa.array(sorted(self.excluded), pa.string()) if self.excluded else None

    @cached_property
    def live_rows(self) -> list[int]:
        """Rows of each file whose id is not `excluded` (with exclusions, the id columns are read
        once to count them), so that a row's position says which file holds it."""
        wanted = self._excluded_ids
        if wanted is None:
            return [f.rows for f in self.files]
        live = {f.name: f.rows for f in self.files}
        for file, rows, _ in self._read():
            live[file.name] -= pc.sum(pc.is_in(rows.column("id"), value_set=wanted)).as_py() or 0
        return [live[f.name] for f in self.files]

    @property
    def file_starts(self) -> list[int]:
        """Position of each file's first row among all rows not excluded."""
        return np.cumsum([0] + self.live_rows[:-1]).tolist()

    @cached_property
    def row_schema(self) -> pa.Schema:
        """Schema of the rows an index keeps per vector: `id` (string), then every column of the first
        file that is not a vector (vsearch shards: kind, title, ocr, uri and per-row model outputs)."""
        schema = _parquet(self.files[0].path).schema_arrow
        rest = [f for f in schema if f.name != self.id_column and not _float_list(f)]
        return pa.schema([pa.field("id", pa.string())] + rest)

    def batches(self, files: list[VectorFile] | None = None, batch_rows: int = 65536, metadata: bool = False
                ) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(rows, float32 vectors) one record batch at a time: see `file_batches`."""
        return ((rows, vectors) for _, rows, vectors in self.file_batches(files, batch_rows, metadata))

    def file_batches(self, files: list[VectorFile] | None = None, batch_rows: int = 65536, metadata: bool = False
                     ) -> Iterator[tuple[VectorFile, pa.Table, np.ndarray]]:
        """(file, rows, float32 vectors) one record batch at a time; rows hold `id` as a string, and
        with `metadata` every other column of `row_schema`. Vectors are L2-normalised here, whatever
        their source, because every index scores by cosine: vsearch's shards already are (to
        float16 rounding), and bring-your-own vectors need not be. The next batch is decoded and
        converted on a thread while the caller works on this one: a fixed-size list column takes
        a core about 0.6 s per 100k×512 as vsearch writes it (1.3 s with pyarrow's default
        dictionary), which a build's inserting threads would otherwise wait for."""
        return read_ahead(self._converted(files, batch_rows, metadata))

    def _converted(self, files: list[VectorFile] | None, batch_rows: int, metadata: bool
                   ) -> Iterator[tuple[VectorFile, pa.Table, np.ndarray]]:
        for file, rows, vectors in self._float32(files, batch_rows, self.row_schema.names[1:] if metadata else []):
            # A NaN vector is not just unfindable: one among an hnswlib graph's first vectors cost it a
            # tenth of its recall@10 on every other query (0.996 -> 0.876 at 20k), and FAISS cannot
            # train IVF-PQ on one. So none is indexed.
            if not np.isfinite(vectors).all():
                raise self._not_finite(file)
            yield file, rows, l2_normalise(vectors)

    def _float32(self, files: list[VectorFile] | None, batch_rows: int = 65536, names: Sequence[str] = ()
                 ) -> Iterator[tuple[VectorFile, pa.Table, np.ndarray]]:
        """(file, rows, float32 vectors as stored) of every record batch, the `excluded` ids left out."""
        wanted = self._excluded_ids
        for file, rows, vectors in self._read(files, batch_rows, names, vectors=True):
            if wanted is not None:
                keep = pc.invert(pc.is_in(rows.column("id"), value_set=wanted))
                rows, vectors = rows.filter(keep), vectors[keep.to_numpy(zero_copy_only=False)]
            yield file, rows, vectors.astype(np.float32)

    def _not_finite(self, file: VectorFile) -> VsearchError:
        """The error for `file` holding vectors with NaN or infinite values, counted over the whole file."""
        count, first = 0, None
        for _, rows, vectors in self._float32([file]):
            bad = ~np.isfinite(vectors).all(axis=1)
            if first is None and bad.any():
                first = rows.column("id")[int(np.argmax(bad))].as_py()
            count += int(bad.sum())
        one = count == 1
        return VsearchError(f"{file.vector_path}: {counted(count, 'vector')} {'holds' if one else 'hold'} NaN or "
                            f"infinite values ({'' if one else 'the first: '}id {first!r}); re-embed or drop "
                            f"{'it: it' if one else 'them: they'} would spoil the index's results")

    def _read(self, files: list[VectorFile] | None = None, batch_rows: int = 65536, names: Sequence[str] = (),
              vectors: bool = False) -> Iterator[tuple[VectorFile, pa.Table, np.ndarray | None]]:
        """(file, rows: `id` as a string and the `names` columns a file has, the batch's vectors as
        stored when `vectors`, else None) of every record batch."""
        for file in files if files is not None else self.files:
            for path in dict.fromkeys([file.path, file.vector_path]):
                if not path.is_file():
                    listed = "in the manifest" if self.kind is not None else f"among the files of {self.directory}"
                    raise VsearchError(f"{path} is listed {listed} but missing")
            parquet = _parquet(file.path)
            present = [n for n in names if n in parquet.schema_arrow.names]
            in_parquet = vectors and file.vectors is None
            columns = [self.id_column, *([self.vector_column] if in_parquet else []), *present]
            matrix = _npy(file.vectors) if vectors and file.vectors is not None else None
            start = 0
            try:
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                    ids = batch.column(self.id_column).cast(pa.string())
                    if ids.null_count:  # a search hands back None for "no row": an id must never be
                        raise self._without_id(file)
                    rows = pa.table([ids, *(batch.column(n) for n in present)], names=["id", *present])
                    stored = (_dense(batch.column(self.vector_column), self.dim, file.path, ids) if in_parquet
                              else None if matrix is None else np.asarray(matrix[start:start + len(batch)]))
                    yield file, rows, stored
                    start += len(batch)
            except (pa.ArrowException, OSError) as exc:  # a shard damaged after it was written
                raise VsearchError(f"cannot read {file.path}: {exc}") from None

    def _without_id(self, file: VectorFile) -> VsearchError:
        ids = pq.read_table(file.path, columns=[self.id_column]).column(0)
        count, first = ids.null_count, pc.index(pc.is_null(ids), True).as_py()
        one = count == 1
        return VsearchError(f"{file.path}: {counted(count, 'row')} {'has' if one else 'have'} no {self.id_column!r} "
                            f"({'' if one else 'the first: '}row {first:,}, counting from 0); give every vector an id")

    def info(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "embeddings": str(self.directory.resolve()), "encoder": self.encoder}


def made_by(source: VectorSource, encoder: Encoder) -> VectorSource:
    """Bring-your-own vectors declared to come from `encoder`, which an index built from them then
    records, so that text queries are encoded with it."""
    if source.encoder is not None:
        raise VsearchError(f"{source.directory} was embedded by {source.encoder['spec']}, as its manifest "
                           "records; --model is for bring-your-own embeddings")
    if encoder.dim != source.dim:
        raise VsearchError(f"{encoder.spec} makes {encoder.dim}-d vectors, but {source.directory} holds "
                           f"{source.dim}-d ones: they cannot come from it")
    return replace(source, encoder={"spec": encoder.spec, "fingerprint": encoder.fingerprint})


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise VsearchError(f"cannot read {path}: {exc}") from None


def file_entry(file: VectorFile) -> dict[str, Any]:
    """How an index manifest records a file it was built from; `path` lets appends come from elsewhere."""
    return {"name": file.name, "path": str(file.path.resolve()), "rows": file.rows, "sha256": file.sha256}


def _float_list(field: pa.Field) -> bool:
    kind = field.type
    lists = pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    return lists and pa.types.is_floating(kind.value_type)


def _dense(column: pa.Array, dim: int, path: Path, ids: pa.Array) -> np.ndarray:
    """A batch's vector column as an (n, dim) array, zeros where a vector is null. A column of
    variable-length lists must hold `dim` values in every vector."""
    if not pa.types.is_fixed_size_list(column.type):
        wrong = pc.fill_null(pc.not_equal(pc.list_value_length(column), dim), False)
        if count := pc.sum(wrong).as_py():
            first = pc.index(wrong, True).as_py()
            raise VsearchError(
                f"{path}: {counted(count, 'vector')} {'does' if count == 1 else 'do'} not have {dim} values like "
                f"the first one (id {ids[first].as_py()!r} has {len(column[first].values)})")
    values = np.asarray(column.flatten()).reshape(-1, dim)
    if column.null_count == 0:
        return values
    vectors = np.zeros((len(column), dim), values.dtype)
    vectors[column.is_valid().to_numpy(zero_copy_only=False)] = values
    return vectors


def _list_dim(parquet: pq.ParquetFile, column: str) -> int | None:
    """How many values each vector of `column` in `parquet` has: a fixed-size list's size, or the
    length of the first vector that is not null (None when there is none)."""
    kind = parquet.schema_arrow.field(column).type
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    for batch in parquet.iter_batches(batch_size=4096, columns=[column]):
        lengths = pc.drop_null(pc.list_value_length(batch.column(0)))
        if len(lengths):
            return lengths[0].as_py()
    return None


def _vector_column(schema: pa.Schema, requested: str | None, path: Path) -> str:
    if requested:
        if requested not in schema.names or not _float_list(schema.field(requested)):
            raise VsearchError(f"{path} has no float list column {requested!r}")
        return requested
    candidates = [f.name for f in schema if _float_list(f)]
    for name in VECTOR_NAMES:
        if name in candidates:
            return name
    if len(candidates) == 1:
        return candidates[0]
    raise VsearchError(
        f"cannot tell the vector column of {path}: float list columns are {candidates or 'none'}; "
        "pass --vector-column"
    )


def shard_source(directory: Path, kind: str) -> VectorSource:
    manifest = Manifest.read(directory)
    files = [VectorFile(s["name"], directory / s["name"], s["rows"], s["sha256"])
             for s in manifest.shards if s["kind"] == kind]
    return VectorSource(directory, manifest.dataset, manifest.dim, files, manifest.encoder, kind=kind)


def parquet_source(directory: Path, id_column: str | None = None, vector_column: str | None = None) -> VectorSource:
    paths = sorted(directory.glob("*.parquet"))
    if not paths:
        raise VsearchError(f"no embeddings in {directory}: no {MANIFEST}, no *.parquet files, and no img_emb/ and "
                           "metadata/ folders as clip-retrieval writes")
    schema = _parquet(paths[0]).schema_arrow
    column = _vector_column(schema, vector_column, paths[0])
    id_name = id_column or "id"
    if id_name not in schema.names:
        raise VsearchError(f"{paths[0]} has no id column {id_name!r}; pass --id-column")
    dim, files = None, []
    for path in paths:
        parquet = _parquet(path)
        other = parquet.schema_arrow
        listed = column in other.names and _float_list(other.field(column))
        length = _list_dim(parquet, column) if listed else None
        if not listed or None not in (dim, length) and length != dim:
            raise VsearchError(f"{path} does not have the same {dim or ''}-d vector column {column!r} as "
                               f"{paths[0].name}")
        dim = dim or length
        files.append(VectorFile(path.name, path, parquet.metadata.num_rows, sha256_of(path)))
    if dim is None:
        raise VsearchError(f"no vectors in {directory}: its {column!r} columns hold none")
    return VectorSource(directory, directory.name, dim, files, None, id_name, column)


def _npy(path: Path) -> np.ndarray:
    """The .npy matrix at `path`, mapped (a batch at a time is read)."""
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise VsearchError(f"cannot read {path}: {exc}") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
        raise VsearchError(f"{path} holds a {matrix.dtype} array of shape {matrix.shape}, not a matrix of "
                           "float vectors, one a row")
    return matrix


def _numbered(folder: Path, pattern: str) -> dict[str, Path]:
    """The files of `folder` matching `pattern` by their number, the part of the name after the last `_`
    (`img_emb_007.npy` and `metadata_007.parquet` are partition 007)."""
    return {path.stem.rsplit("_", 1)[-1]: path for path in sorted(folder.glob(pattern))}


def npy_source(directory: Path, id_column: str | None = None, vector_column: str | None = None) -> VectorSource:
    """clip-retrieval's layout: `img_emb/*.npy` (or `vector_column`, `text_emb`) beside `metadata/*.parquet`."""
    present = [name for name in NPY_FOLDERS if (directory / name).is_dir()]
    folder = vector_column or present[0]
    if folder not in present:
        raise VsearchError(f"{directory} has no {folder}/ folder of .npy vectors (it has {', '.join(present)}/)")
    vectors, metadata = _numbered(directory / folder, "*.npy"), _numbered(directory / "metadata", "*.parquet")
    if not vectors:
        raise VsearchError(f"no embeddings in {directory / folder}: no *.npy files")
    unpaired = sorted(set(vectors) ^ set(metadata))
    if unpaired:
        number = unpaired[0]
        alone = vectors.get(number) or metadata[number]
        raise VsearchError(f"{alone} has no {'metadata' if number in vectors else 'vectors'} file of the same number "
                           f"in {directory / ('metadata' if number in vectors else folder)}: each .npy needs its "
                           ".parquet, row for row")
    schema = _parquet(metadata[min(metadata)]).schema_arrow
    id_name = id_column or next((name for name in NPY_ID_NAMES if name in schema.names), None)
    if id_name not in schema.names:
        wanted = repr(id_column) if id_column else f"{', '.join(NPY_ID_NAMES[:-1])} or {NPY_ID_NAMES[-1]}"
        raise VsearchError(f"{metadata[min(metadata)]} has no id column {wanted}: its columns are "
                           f"{', '.join(schema.names)}; pass --id-column")
    dim, files = None, []
    for number in sorted(vectors):
        matrix, parquet = _npy(vectors[number]), _parquet(metadata[number])
        if matrix.shape[0] != parquet.metadata.num_rows:
            raise VsearchError(f"{vectors[number]} holds {counted(matrix.shape[0], 'vector')} but "
                               f"{metadata[number]} {counted(parquet.metadata.num_rows, 'row')}: they must match "
                               "row for row")
        if dim is not None and matrix.shape[1] != dim:
            raise VsearchError(f"{vectors[number]} holds {matrix.shape[1]}-d vectors, not {dim}-d like "
                               f"{vectors[min(vectors)].name}")
        dim = matrix.shape[1]
        digest = hashlib.sha256((sha256_of(metadata[number]) + sha256_of(vectors[number])).encode()).hexdigest()
        files.append(VectorFile(vectors[number].name, metadata[number], matrix.shape[0], digest, vectors[number]))
    return VectorSource(directory, directory.name, dim, files, None, id_name, folder)


def open_source(directory: Path, kind: str = "cover", id_column: str | None = None,
                vector_column: str | None = None) -> VectorSource:
    """Vectors from a vsearch shard folder, or else from a folder of Parquet files, or else from
    clip-retrieval's output folder."""
    if not directory.is_dir():
        raise VsearchError(f"no embeddings at {directory}")
    if (directory / MANIFEST).is_file():
        return shard_source(directory, kind)
    if not any(directory.glob("*.parquet")) and (directory / "metadata").is_dir() and any(
            (directory / name).is_dir() for name in NPY_FOLDERS):
        return npy_source(directory, id_column, vector_column)
    return parquet_source(directory, id_column, vector_column)
