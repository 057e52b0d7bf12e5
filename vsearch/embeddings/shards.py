"""The shard format: the contract every later stage reads.

`embeddings/<dataset>/` holds one Parquet file per shard, `<kind>-<NNNNN>.parquet`, and a
`_manifest.json`. Columns:

    id      string, unique within a kind (covers and clips of one video share it)
    kind    string, "cover" or "clip"
    vector  fixed_size_list<float16>[dim], L2-normalised before the cast to float16
    title, ocr, uri   string, nullable; a clip's uri is its video
    cover   string, nullable: a clip's cover image (null for covers, whose uri is the image)
    ...     per-row model outputs an encoder declares (e.g. `ocr_presence`, float32)

Shard N of a kind holds the dataset's rows N*shard_size .. (N+1)*shard_size - 1 that encoded
successfully; the rest are listed under `failed` in the manifest with their reasons. A shard
is written to `<name>.tmp`, flushed and renamed, and only then recorded in the manifest
(itself replaced atomically), so a crash leaves no partial shard. The manifest records the rows
each shard was made from (`input_rows` of them; their ids digested in `input_digest`, the rows
whole, as the dataset gave them, in `content_digest`, and where the job reads images or videos, the
size and modification time of each local one its vectors came from in `media_digest`, and of each
one a failed row could not use in that failure's `version`); a re-run skips a shard whose place in
the dataset still holds those rows and makes it again otherwise (rows added, removed, reordered or
edited since, a cover image replaced, a longer `--limit`), so every row is in exactly one shard,
as the dataset file and its media now have it, however they changed. A `.lock` file, locked while
a job writes, keeps a second job out.

The manifest is rewritten after each shard, unless its last rewrite took more than a
`MANIFEST_SHARE` of the time since: a job listing a million failed rows (a 250 MB manifest, 5 s to
write) would otherwise spend as long rewriting it as encoding. A crash then redoes at most the
shards finished since the last rewrite (a listed shard whose file is not the size listed was
replaced in that time, and is redone too); closing the writer, on success or error, records them all.

The failed rows of a shard found done are encoded again when one of their files changed (a
missing cover put in place), or with `--retry-failed` (a cover a server did not send); the shard
is written again whole: its rows kept from the file, and the retried ones, in the dataset's order.
A shard whose rows changed in nothing its vectors came from (`vectors_hold`: a folder of covers
moved, with their sizes and modification times; a title or OCR text edited, for an image model)
keeps its vectors the same way, written again with the rows' metadata as they are now, and its
failed rows are encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vsearch.embeddings.datasets import Row, file_version, is_registered, is_remote
from vsearch.errors import VsearchError, human_size
from vsearch.files import errors_naming, fsync_file, lock_folder, sha256_of, write_json_atomic

FORMAT = "vsearch-shards/1"
MANIFEST = "_manifest.json"
KINDS = ("cover", "clip")
MANIFEST_SHARE = 0.05
ALL_FAILED_NOTE_ROWS = 1000  # failed rows, none written yet, after which a run says so
METADATA_COLUMNS = ("title", "ocr", "uri", "cover")


def shard_schema(dim: int, extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float16(), dim), nullable=False),
        *(pa.field(name, pa.string()) for name in METADATA_COLUMNS),
        *(pa.field(name, dtype) for name, dtype in (extra or {}).items()),
    ]
    return pa.schema(fields, metadata={"vsearch.format": FORMAT, "vsearch.dim": str(dim)})


def commonest_failure(failed: list[dict[str, Any]]) -> tuple[str, int]:
    """The reason most of the `failed` rows share, each row's own file left out of it, and how many share it."""
    reasons = Counter(f["reason"].replace(f["uri"], "…") if f.get("uri") else f["reason"] for f in failed)
    return reasons.most_common(1)[0]


def shard_name(kind: str, number: int) -> str:
    return f"{kind}-{number:05d}.parquet"


def input_digest(ids: list[str]) -> str:
    """What a shard was made from: a digest of its dataset rows' ids, in any order."""
    return hashlib.sha1("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:16]


def content_digest(rows: list[Row]) -> str:
    """What a shard was made from, in full: a digest of its dataset rows (id, title, OCR text, uri,
    cover), in any order. A row edited in place (its OCR text corrected, say) changes it, where
    the ids alone do not."""
    lines = sorted("\x1f".join(v or "" for v in (r.id, r.title, r.ocr, r.uri, r.cover)) for r in rows)
    return hashlib.sha1("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def media_version(row: Row, files: Callable[[Row], list[str | None]]) -> str:
    """Which version of its files (`files(row)`, those the job reads) a row has: see
    `datasets.file_version`."""
    return "|".join(map(file_version, files(row)))


def media_digest(versions: dict[str, str]) -> str:
    """What a shard's vectors were made from on disk: a digest of the `media_version` of each row
    that has one, by id. A cover image replaced under the same name changes it."""
    lines = sorted(f"{id_}\x1f{version}" for id_, version in versions.items())
    return hashlib.sha1("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def vectors_hold(directory: Path, entry: dict[str, Any] | None, rows: list[Row], failed: dict[str, Any],
                 digests: dict[str, str], text_encoded: bool, reads_text: bool = False) -> bool:
    """Whether the vectors of the shard `entry` lists, made from other rows than these `rows` (by
    `content_digest`), still hold for them: the same ids, with those that `failed` in it (a mapping
    by id); where the job reads media, the same versions of the files (`media_digest`, by id,
    whatever their paths; so a path that changed must be a local file's, whose version is looked
    at); and where the vectors encode text (`text_encoded`, not an image model), the same titles and
    OCR text (or, with `reads_text` (--ocr), any text for a row that has none, read off its cover).
    Only the rows' metadata in it then needs writing again (`with_metadata`)."""
    if entry is None or entry["input_rows"] != len(rows) or "content_digest" not in entry:
        return False
    reads_media = "media_digest" in digests
    if any(entry.get(key, digest) != digest for key, digest in digests.items() if key != "content_digest"):
        return False
    try:
        path = directory / entry["name"]
        columns = [name for name in ("id", "title", "ocr", "uri", "cover") if name in pq.read_schema(path).names]
        written = pq.read_table(path, columns=columns).to_pylist()
    except (OSError, pa.ArrowException):
        return False  # made again, as any shard that cannot be read
    by_id = {row.id: row for row in rows}
    if len(written) + len(failed) != len(rows) or any(id_ not in by_id for id_ in failed):
        return False
    for kept in written:
        row = by_id.get(kept["id"])
        if row is None:
            return False
        if text_encoded and (row.title != kept["title"] or row.ocr != kept["ocr"] and not (reads_text and row.ocr is None)):
            return False
        moved = [new for new, old in ((row.uri, kept["uri"]), (row.cover, kept.get("cover"))) if new != old]
        if reads_media and any(new is not None and is_remote(new) for new in moved):
            return False
    return True


def with_metadata(columns: dict[str, Any], rows: list[Row], reads_text: bool = False) -> dict[str, Any]:
    """`columns` with each row's title, OCR text, `uri` and `cover` as `rows` (by id) give them now;
    with `reads_text` (--ocr), the text read off a cover stays where its row has none."""
    by_id = {row.id: row for row in rows}
    now = [by_id[id_] for id_ in columns["id"]]
    read = columns.get("ocr", [None] * len(now))
    return {**columns, "title": [row.title for row in now], "uri": [row.uri for row in now],
            "cover": [row.cover for row in now],
            "ocr": [text if reads_text and row.ocr is None else row.ocr for row, text in zip(now, read)]}


def made_from(entry: dict[str, Any] | None, rows: list[Row], digests: dict[str, str]) -> bool:
    """Whether the shard a manifest `entry` lists was made from these dataset `rows`, whose
    `content_digest` and, where the job reads media, `media_digest` are in `digests`. Manifests
    written before vsearch recorded the content are trusted on the ids, and before it recorded
    `input_digest`, on the row count; those written before it recorded the media, on the media."""
    if entry is None or entry["input_rows"] != len(rows):
        return False
    if "content_digest" not in entry:
        return entry.get("input_digest") in (None, input_digest([r.id for r in rows]))
    return all(entry.get(key, digest) == digest for key, digest in digests.items())


@dataclass
class Manifest:
    dataset: str
    source: str
    encoder: dict[str, str]
    dim: int
    shard_size: int
    ocr: str | None = None  # the engine that read the text on covers whose row had none (`--ocr`)
    metric: str = "cosine"
    dtype: str = "float16"
    format: str = FORMAT
    shards: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0  # dataset lines skipped because their id came before
    malformed_lines: int = 0  # dataset lines skipped: too few fields, or not UTF-8
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    updated_at: str = ""

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST
        if not path.is_file():
            raise VsearchError(f"no embeddings in {directory} (missing {MANIFEST}); run vsearch embed first")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("format") != FORMAT:
                raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT!r}")
            return cls(**payload)
        except (ValueError, TypeError) as exc:
            raise VsearchError(f"unreadable shard manifest {path}: {exc}") from exc

    def write(self, directory: Path) -> None:
        self.updated_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(directory / MANIFEST, asdict(self))

    def rows(self, kind: str | None = None) -> int:
        return sum(s["rows"] for s in self.shards if kind is None or s["kind"] == kind)


class ShardWriter:
    """Writes numbered shards of one dataset into a directory, resuming where a run stopped.

    Given the rows to come (`expect_rows`) and a `note`, it says once, as soon as the shards written
    tell, when the folder's disk will not hold the rest at the bytes a row they have taken: at 10M
    rows the disk would otherwise fill hours into the job (which then stops, keeping its shards)."""

    def __init__(self, directory: Path, manifest: Manifest, extra: dict[str, pa.DataType] | None = None,
                 note: Callable[[str], None] = lambda line: None):
        self.directory = directory
        self.manifest = manifest
        self.schema = shard_schema(manifest.dim, extra)
        self.note = note
        self._done = {(s["kind"], s["number"]): s for s in manifest.shards}
        self._written_at = time.monotonic()
        self._write_seconds = 0.0
        self._unwritten = False
        self._lock: IO[str] | None = None
        # The count comes from another thread than the shards: whichever comes last forecasts.
        self._forecasting = threading.Lock()
        self._rows_to_come: int | None = None
        self._room_said = False
        self._failed_first: list[dict[str, Any]] | None = []  # this run's failures while none has a vector

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._room_said = True  # a count that comes after the job has nothing left to forecast
        try:
            self.flush()
            # A job cut short (Ctrl-C stops its processes mid-write) leaves no partial file behind.
            _remove_partial_files(self.directory)
        finally:
            if self._lock is not None:
                self._lock.close()

    def flush(self) -> None:
        """Write the manifest if it lacks shards recorded since its last rewrite."""
        if self._unwritten:
            self.write_manifest()

    def write_manifest(self) -> None:
        started = time.monotonic()
        self.manifest.write(self.directory)
        self._written_at = time.monotonic()
        self._write_seconds = self._written_at - started
        self._unwritten = False

    @classmethod
    def open(cls, directory: Path, fresh: Manifest, extra: dict[str, pa.DataType] | None = None,
             overwrite: bool = False, note: Callable[[str], None] = lambda line: None) -> "ShardWriter":
        """Start or resume writing, holding the folder's lock until the writer is closed; refuse to mix
        in shards made by another encoder or dataset."""
        directory.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(directory, "vsearch embed")
        try:
            writer = cls(directory, _resumed_manifest(directory, fresh, overwrite), extra, note)
        except BaseException:
            lock.close()
            raise
        writer._lock = lock
        return writer

    @property
    def done(self) -> dict[tuple[str, int], dict[str, Any]]:
        """(kind, number) -> manifest entry of every shard the manifest lists."""
        return dict(self._done)

    def write(self, kind: str, number: int, columns: dict[str, Any], failed: list[dict[str, Any]],
              digests: dict[str, str] | None = None) -> None:
        """Write one shard, made from dataset rows whose digests (see `made_from`) are `digests`, and record it."""
        self.record(write_shard_file(self.directory, self.schema, kind, number, columns, failed, digests), failed)

    def record(self, entry: dict[str, Any], failed: list[dict[str, Any]]) -> None:
        """Add a shard file already in place (see `write_shard_file`) to the manifest, in place of
        any earlier shard of its number (see the module docstring for when it is rewritten).

        Only one process records, so shards written by several processes never race on the manifest.
        """
        self._forget(entry["kind"], entry["number"])
        self.manifest.shards.append(entry)
        self.manifest.shards.sort(key=lambda s: (s["kind"], s["number"]))
        self.manifest.failed.extend(dict(f, shard=entry["name"]) for f in failed)
        self._done[(entry["kind"], entry["number"])] = entry
        self._changed()
        self._forecast_room()
        self._say_if_all_failed(entry["rows"], failed)

    def _say_if_all_failed(self, rows: int, failed: list[dict[str, Any]]) -> None:
        """Say, once, that the first rows of a run all failed: a model giving NaN on every cover, or
        covers that are error pages, would otherwise fail the whole dataset before the job says why."""
        if self._failed_first is None:
            return
        if rows:
            self._failed_first = None
            return
        self._failed_first += failed
        if len(self._failed_first) >= ALL_FAILED_NOTE_ROWS:
            reason, count = commonest_failure(self._failed_first)
            self.note(f"the first {len(self._failed_first):,} rows all failed, {count:,} of them for one reason: "
                      f"{reason}. The job goes on; Ctrl-C stops it, keeping what it wrote")
            self._failed_first = None

    def expect_rows(self, rows: int) -> None:
        """The dataset rows the job reads in all, at most (its lines, repeats included)."""
        self._rows_to_come = rows
        self._forecast_room()

    def _forecast_room(self) -> None:
        with self._forecasting:
            shards = list(self.manifest.shards)
            done = sum(s["input_rows"] for s in shards)
            if self._room_said or self._rows_to_come is None or not done or done >= self._rows_to_come:
                return
            left, per_row = self._rows_to_come - done, sum(s["bytes"] for s in shards) / done
            free = shutil.disk_usage(self.directory).free
            if free >= left * per_row:
                return
            self._room_said = True
        self.note(f"{self.directory} looks short of room: at the {human_size(per_row)} a row its shards take, the "
                  f"{left:,} rows left need about {human_size(left * per_row)}, and its disk has {human_size(free)} "
                  "free. The job goes on until the disk is full and keeps what it wrote: free some space and run "
                  "the same command again to finish, or start over with --out on a larger disk")

    def remove_beyond(self, kind: str, count: int) -> int:
        """Delete the shards of `kind` numbered `count` and up, left from a dataset that had more
        rows; return how many there were."""
        beyond = [number for k, number in self._done if k == kind and number >= count]
        if beyond:
            for number in beyond:
                self._forget(kind, number)
            self.write_manifest()  # first, so that a manifest never lists a file already deleted
            for number in beyond:
                (self.directory / shard_name(kind, number)).unlink(missing_ok=True)
        return len(beyond)

    def _forget(self, kind: str, number: int) -> None:
        if self._done.pop((kind, number), None) is not None:
            name = shard_name(kind, number)
            self.manifest.shards = [s for s in self.manifest.shards if s["name"] != name]
            self.manifest.failed = [f for f in self.manifest.failed if f["shard"] != name]

    def _changed(self) -> None:
        self._unwritten = True
        if self._write_seconds <= MANIFEST_SHARE * (time.monotonic() - self._written_at):
            self.write_manifest()


def _remove_partial_files(directory: Path) -> None:
    """Remove the temporary files of shards whose writing stopped (the folder's lock is held, so
    no one is writing them)."""
    for partial in directory.glob("*.tmp"):
        partial.unlink()


def _resumed_manifest(directory: Path, fresh: Manifest, overwrite: bool) -> Manifest:
    """The manifest to go on with: `fresh` for a new (or overwritten) folder, else the one there, if it
    was made by the same encoder from the same dataset."""
    _remove_partial_files(directory)
    if overwrite:
        for old in (path for kind in KINDS for path in directory.glob(f"{kind}-*.parquet")):
            old.unlink()
        (directory / MANIFEST).unlink(missing_ok=True)
    if not (directory / MANIFEST).exists():
        return fresh
    existing = Manifest.read(directory)
    if _same_dataset_moved(existing, fresh):
        existing.source = fresh.source
    for key in ("source", "encoder", "dim", "shard_size", "ocr"):
        if getattr(existing, key) != getattr(fresh, key):
            raise VsearchError(
                f"{directory} holds embeddings made {_setting(key, getattr(existing, key))}, not "
                f"{_setting(key, getattr(fresh, key))}: run the command that made them to resume, "
                "or pass --overwrite to replace them or --out for another folder"
            )
    # A shard replaced (made again, or its failed rows retried) by a job that died before its
    # manifest said so is not the file the manifest lists: it is made again.
    existing.shards = [s for s in existing.shards if _size(directory / s["name"]) == s["bytes"]]
    listed = {s["name"] for s in existing.shards}
    existing.failed = [f for f in existing.failed if f["shard"] in listed]
    return existing


def _same_dataset_moved(existing: Manifest, fresh: Manifest) -> bool:
    """Whether `fresh` names the dataset `existing` was made from, found elsewhere now: a dataset
    known by its name in a workspace (or a package, the demo's) that moved, or a path recorded
    relative, as vsearch once kept it. Its shards' vectors are then kept where they still hold (see
    `vectors_hold`)."""
    if "://" not in existing.source and os.path.abspath(existing.source) == fresh.source:
        return True
    return (is_registered(fresh.dataset) and existing.dataset == fresh.dataset
            and PurePosixPath(existing.source).name == PurePosixPath(fresh.source).name)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _setting(key: str, value: Any) -> str:
    """A manifest setting as the words that follow "made" in a sentence."""
    if key == "source":
        return f"from {value}"
    if key == "encoder":
        return f"by {value['spec']} (weights {value['fingerprint'][:12]})"
    if key == "dim":
        return f"of {value}-d vectors"
    if key == "shard_size":
        return f"with --shard-size {value}"
    return f"with --ocr ({value})" if value else "without --ocr"


def _column(field_: pa.Field, kind: str, vectors: np.ndarray, columns: dict[str, Any]) -> pa.Array:
    rows = len(vectors)
    if field_.name == "vector":
        return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), field_.type.list_size)
    if field_.name == "kind":
        return pa.array([kind] * rows, pa.string())
    if field_.name in columns:
        return pa.array(columns[field_.name], field_.type)
    return pa.nulls(rows, field_.type)


def with_kept_rows(directory: Path, entry: dict[str, Any], columns: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """`columns` (rows encoded again, as `write_shard_file` takes them) together with the rows of the
    shard `entry` lists, in the order of the ids in `order`: a shard whose failed rows were retried,
    or whose vectors still hold for rows that changed (`vectors_hold`), to be written whole again."""
    try:
        kept = pq.read_table(directory / entry["name"])
    except (OSError, pa.ArrowException) as exc:
        raise VsearchError(f"cannot read shard {directory / entry['name']} to keep its rows: {exc}; "
                           "run embed with --overwrite to make every shard again") from None
    dim = kept.schema.field("vector").type.list_size
    merged = {"vector": np.concatenate([kept.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim),
                                        np.asarray(columns["vector"]).reshape(-1, dim)])}
    for name in set(kept.column_names) - {"kind", "vector"}:
        # A column the new rows lack (a model output clips do not have) is null for them, as it is
        # for the kept rows.
        new = columns.get(name, [None] * len(columns["id"]))
        merged[name] = kept.column(name).to_pylist() + (new.tolist() if isinstance(new, np.ndarray) else list(new))
    position = {id_: place for place, id_ in enumerate(order)}
    ordered = np.argsort([position[id_] for id_ in merged["id"]], kind="stable")
    return {name: values[ordered] if isinstance(values, np.ndarray) else [values[i] for i in ordered]
            for name, values in merged.items()}


def write_vectors_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` as vsearch writes vectors: zstd, and no dictionary for the vector column. Its
    float16 values would fill a dictionary of 65,536 entries whose indices take as many bits as the
    values: 3% more bytes, twice the time to write and 3.4 times to read back (100k × 512)."""
    pq.write_table(table, path, compression="zstd", use_dictionary=[n for n in table.column_names if n != "vector"])


def write_shard_file(directory: Path, schema: pa.Schema, kind: str, number: int, columns: dict[str, Any],
                     failed: list[dict[str, Any]], digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Write shard `number` of `kind` from column data (`vector` as an (n, dim) array) via a
    temporary file and a rename; return its manifest entry (name, kind, number, rows, bytes, sha256,
    and the rows it was made from: those written and the `failed` ones, and the `digests` of those
    rows as the dataset gave them and of their media, where known)."""
    vectors = np.ascontiguousarray(columns["vector"], dtype=np.float16)
    table = pa.Table.from_arrays([_column(f, kind, vectors, columns) for f in schema], schema=schema)
    name = shard_name(kind, number)
    final = directory / name
    temporary = final.with_name(name + ".tmp")
    try:
        with errors_naming(temporary):
            write_vectors_parquet(table, temporary)
            fsync_file(temporary)
    except OSError:
        temporary.unlink(missing_ok=True)  # its space, on a full disk
        raise
    os.replace(temporary, final)
    inputs = list(columns["id"]) + [f["id"] for f in failed]
    entry = {"name": name, "kind": kind, "number": number, "rows": len(table),
             "bytes": final.stat().st_size, "sha256": sha256_of(final),
             "input_rows": len(inputs), "input_digest": input_digest(inputs)}
    return {**entry, **(digests or {})}
