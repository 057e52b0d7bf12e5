"""The embed job: dataset rows -> encoder -> Parquet shards, resumable at shard granularity.

Shard N of a kind always covers the dataset's rows N*shard_size .. (N+1)*shard_size - 1 (for
clips: of the rows that have a video), so a re-run reads the cheap text rows again, skips every
shard the manifest lists as made from the rows now at its place (and the cover images or videos
now in their files), and encodes only the rest (`ResumePlan`): no row is written twice, even when
the dataset file changed in between.

Reading (DataLoader workers), encoding (this process, on the device) and writing (a background
thread) overlap. With several devices, one process per device encodes the shards whose number
modulo the device count is its rank, writes them, and reports them here; this process alone
updates the manifest. A text-only encoder (lexical) shares the shards among processes the same
way, one a core (`text_processes`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vsearch.embeddings.datasets import Dataset, Row, open_dataset
from vsearch.embeddings.encoders import Encoder, check_device_name, l2_normalise, load_encoder, runs_on_device
from vsearch.embeddings.ocr import ENGINE as OCR_ENGINE, require_engine as require_ocr_engine, with_cover_text
from vsearch.embeddings.shards import (Manifest, ShardWriter, content_digest, made_from, media_digest,
                                      media_version, shard_schema, vectors_hold, with_kept_rows, with_metadata,
                                      write_shard_file)
from vsearch.errors import VsearchError, os_error_line
from vsearch.overlap import exit_with_parent, in_background, read_ahead
from vsearch.workspace import Workspace

KINDS = {"cover": ("cover",), "clip": ("clip",), "both": ("cover", "clip")}
T = TypeVar("T")


@dataclass
class EmbedConfig:
    dataset: str = "demo"
    model: str = "uniclip"
    kind: str = "cover"
    out: Path | None = None
    images: str | None = None
    videos: str | None = None
    shard_size: int = 10_000
    batch_size: int = 256
    frames: int = 12
    decode: str = "auto"  # where covers' JPEGs are decoded: auto (both with a GPU, else workers), device, workers, both
    limit: int | None = None
    overwrite: bool = False
    device: str = "auto"
    workers: int | None = None  # DataLoader processes in all, shared by the devices; None: see `total_workers`
    ocr: bool = False  # read the text on covers whose row has none (see `ocr.with_cover_text`)
    retry_failed: bool = False  # encode every row that failed before again (see `ResumePlan`)


@dataclass
class StageTimes:
    """Seconds the encoding loop spent waiting for input (readers, OCR, JPEG decoding on the device),
    in the model, and waiting for the shard writer (the disk): the largest is the stage that bounds
    the job. `decoding` is the time spent preparing batches on the device (JPEG decoding, resizing)
    beside the model, on a thread of its own, and `decoded_on_device` the covers it decoded."""

    input: float = 0.0
    model: float = 0.0
    output: float = 0.0
    decoding: float = 0.0
    decoded_on_device: int = 0

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - started)

    def waited(self, items: Iterator[T]) -> Iterator[T]:
        """`items`, the time spent waiting for each added to `input`."""
        end = object()
        while True:
            with self.timing("input"):
                item = next(items, end)
            if item is end:
                return
            yield item

    def add(self, other: dict[str, float]) -> None:
        for stage, seconds in other.items():
            setattr(self, stage, getattr(self, stage) + seconds)


@dataclass
class EmbedResult:
    directory: Path
    manifest: Manifest
    shards_written: int = 0
    shards_skipped: int = 0
    shards_redone: int = 0  # written again: their place in the dataset holds other rows than before
    shards_removed: int = 0  # beyond the end of a dataset that has fewer rows than before
    shards_refreshed: int = 0  # written again with their rows' metadata as it is now, their vectors kept
    rows_written: int = 0
    rows_failed: int = 0
    rows_retried: int = 0  # rows that failed before, encoded again (see `ResumePlan`)
    times: StageTimes = field(default_factory=StageTimes)


@dataclass
class EncodedShard:
    kind: str
    number: int
    columns: dict[str, Any]
    failed: list[dict[str, Any]]


def resolve_model(spec: str, workspace: Workspace) -> str:
    """`uniclip` with no path means the configured checkpoint (see `uniclip.default_checkpoint`)."""
    if spec != "uniclip":
        return spec
    from vsearch.embeddings.uniclip import default_checkpoint

    return f"uniclip:{default_checkpoint(workspace.models)}"


def total_workers(workers: int | None, devices: int) -> int:
    """The DataLoader processes for `devices` device processes: as given, or every core, at most 16
    a device. With a GPU the readers decode as many of the JPEGs as they keep up with
    (`reader.JpegSplit`), so cores count; past 16 (a GPU machine's core decodes about 150 covers a
    second, an H200 encodes 5,000) each holds its prefetched batches in shared memory for little."""
    return workers if workers is not None else min(16 * devices, os.cpu_count() or 1)


def resolve_devices(device: str) -> list[str]:
    """`auto` is every GPU when there are several; `cuda:0,cuda:1` lists them; else one device."""
    if "," in device:
        return [d.strip() for d in device.split(",") if d.strip()]
    if device == "auto":
        import torch

        if torch.cuda.device_count() > 1:
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def cover_text(row: Row) -> str:
    """The text a text-only encoder sees for a cover: its title and OCR text."""
    return "\n".join(part for part in (row.title, row.ocr) if part)


def _failure(row: Row, kind: str, reason: str) -> dict[str, Any]:
    return {"id": row.id, "kind": kind, "uri": row.uri, "reason": reason}


def _columns(rows: list[Row], vectors: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    return {"id": [r.id for r in rows], "vector": vectors, "title": [r.title for r in rows],
            "ocr": [r.ocr for r in rows], "uri": [r.uri for r in rows], "cover": [r.cover for r in rows],
            **(extra or {})}


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def pending_shards(rows: Iterator[Row], shard_size: int,
                   to_encode: Callable[[int, list[Row]], list[Row]]) -> Iterator[tuple[int, list[Row]]]:
    """(number, rows to encode) of every shard still to write, asking `to_encode(number, rows)` of
    each shard of the dataset."""
    for number, chunk in enumerate(_chunks(rows, shard_size)):
        if encode := to_encode(number, chunk):
            yield number, encode


def encode_text_shard(encoder: Encoder, number: int, rows: list[Row], batch_size: int) -> EncodedShard:
    """A cover shard from a text-only encoder: each cover is read as its title and OCR text."""
    failed = [_failure(r, "cover", "no title or OCR text to encode") for r in rows if not cover_text(r)]
    rows_with_text = [r for r in rows if cover_text(r)]
    parts = [encoder.encode_texts([cover_text(r) for r in batch]) for batch in _chunks(iter(rows_with_text), batch_size)]
    vectors = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    empty = np.linalg.norm(vectors, axis=1) == 0
    failed += [_failure(r, "cover", "no letters or digits in title or OCR text")
               for r, e in zip(rows_with_text, empty) if e]
    kept, outputs, unusable = _finite_only("cover", [r for r, e in zip(rows_with_text, empty) if not e],
                                           {"vector": vectors[~empty]})
    return EncodedShard("cover", number, _columns(kept, outputs.pop("vector"), outputs), failed + unusable)


def _finite_only(kind: str, rows: list[Row], outputs: dict[str, np.ndarray]
                 ) -> tuple[list[Row], dict[str, np.ndarray], list[dict[str, Any]]]:
    """The rows whose vector the model gave with finite values, their outputs, and the others as
    failures: fp16 can overflow on an input, and a NaN vector would spoil an index built on it."""
    finite = np.isfinite(outputs["vector"]).all(axis=1)
    if finite.all():
        return rows, outputs, []
    failed = [_failure(row, kind, "the model gave a vector with NaN or infinite values")
              for row, ok in zip(rows, finite) if not ok]
    kept = [row for row, ok in zip(rows, finite) if ok]
    return kept, {name: value[finite] for name, value in outputs.items()}, failed


class OomBackoff:
    """Encodes a batch in slices no larger than `limit`, halving `limit` on CUDA out-of-memory."""

    def __init__(self, encoder: Any, limit: int):
        self.encoder, self.limit = encoder, limit

    def __call__(self, pixels: Any) -> Callable[[], dict[str, np.ndarray]]:
        """Start encoding `pixels`; returns the function that waits for their outputs. Memory runs out
        while the work is queued, so the halving happens here."""
        import torch

        parts = []
        start = 0
        while start < len(pixels):
            size = min(self.limit, len(pixels) - start)
            try:
                parts.append(self.encoder.submit_pixels(pixels[start:start + size]))
                start += size
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise VsearchError("CUDA out of memory with a batch of one image") from None
                torch.cuda.empty_cache()
                self.limit = size // 2

        def outputs() -> dict[str, np.ndarray]:
            results = [part.result() for part in parts]
            return {name: np.concatenate([result[name] for result in results]) for name in results[0]}

        return outputs


def one_in_flight(items: Iterator[T], submit: Callable[[T], Any]) -> Iterator[tuple[T, Any]]:
    """Each item with what `submit(item)` returned, the next item submitted before this one is
    given back: the device has the next batch queued while the host waits for this one's outputs
    and then takes up the host for other work (writing shards, the next batch's decoding)."""
    pending = None
    for item in items:
        submitted = (item, submit(item))
        if pending is not None:
            yield pending
        pending = submitted
    if pending is not None:
        yield pending


def mean_pool(frame_vectors: np.ndarray, frames: int) -> np.ndarray:
    """CLIP4Clip's meanP: average each video's L2-normalised frame vectors and re-normalise."""
    return l2_normalise(frame_vectors.reshape(-1, frames, frame_vectors.shape[-1]).mean(axis=1))


@dataclass
class _ShardInProgress:
    kind: str
    number: int
    rows: list[Row] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def finished(self, dim: int) -> EncodedShard:
        names = self.outputs[0].keys() if self.outputs else ["vector"]
        merged = {name: np.concatenate([o[name] for o in self.outputs]) if self.outputs else np.zeros((0, dim))
                  for name in names}
        vectors = merged.pop("vector")
        return EncodedShard(self.kind, self.number, _columns(self.rows, vectors, merged), self.failed)


def encode_media_shards(encoder: Any, kind: str, shards: Iterator[tuple[int, list[Row]]],
                        config: EmbedConfig, on_rows: Callable[[int], None], times: StageTimes | None = None
                        ) -> Iterator[EncodedShard]:
    """Encode covers (images) or clips (pooled frames) shard by shard with an image encoder."""
    times = times or StageTimes()
    from vsearch.embeddings.reader import JpegSplit, decodes_jpegs_on_device, device_pixels, media_batches

    batch_rows = config.batch_size if kind == "cover" else max(1, config.batch_size // config.frames)
    decode = config.decode if config.decode != "auto" else "both" if encoder.device.type == "cuda" else "workers"
    on_device = kind == "cover" and decodes_jpegs_on_device(encoder) and decode != "workers"
    split = JpegSplit(config.workers if decode == "both" else 0) if on_device else None
    batches = media_batches(shards, kind, encoder.image_transform, config.frames, batch_rows, config.workers,
                            pin_memory=encoder.device.type == "cuda", split=split)
    transform = getattr(encoder, "tensor_transform", None)
    encode = OomBackoff(encoder, config.batch_size)

    def with_pixels(batch: Any) -> tuple:
        times.decoded_on_device += len(batch.jpeg_sizes)
        with times.timing("decoding") if on_device else nullcontext():
            return batch, *device_pixels(batch, encoder.device, transform, encoder.image_transform)

    def submitted(prepared: tuple) -> Callable[[], dict[str, np.ndarray]] | None:
        pixels = prepared[1]
        if pixels is None:
            return None
        with times.timing("model"):
            return encode(pixels if kind == "cover" else pixels.flatten(0, 1))

    shard: _ShardInProgress | None = None
    # The next batch is read and prepared on the device (JPEGs decoded and resized) while the model
    # runs on this one, and queued on the device before this one's outputs are waited for.
    prepared = times.waited(read_ahead(map(with_pixels, batches)))
    for (batch, pixels, rows, failed), outputs in one_in_flight(prepared, submitted):
        if shard is not None and batch.number != shard.number:
            yield shard.finished(encoder.dim)
            shard = None
        shard = shard or _ShardInProgress(kind, batch.number)
        shard.failed += [_failure(row, kind, reason) for row, reason in failed]
        if outputs is not None:
            with times.timing("model"):
                arrays = _overflowed_in_fp32(encoder, kind, pixels, _pooled(kind, outputs(), config.frames),
                                             config.frames)
            rows, arrays, unusable = _finite_only(kind, rows, arrays)
            shard.outputs.append(arrays)
            shard.rows += rows
            shard.failed += unusable
        on_rows(len(batch.rows) + len(batch.failed))
    if shard is not None:
        yield shard.finished(encoder.dim)


def _pooled(kind: str, outputs: dict[str, np.ndarray], frames: int) -> dict[str, np.ndarray]:
    """A batch's outputs by row: for clips, each video's frame vectors pooled into one."""
    return outputs if kind == "cover" else {"vector": mean_pool(outputs["vector"], frames)}


def _overflowed_in_fp32(encoder: Any, kind: str, pixels: Any, outputs: dict[str, np.ndarray], frames: int
                        ) -> dict[str, np.ndarray]:
    """`outputs` (by row) with the rows whose vector is not finite encoded again in float32 from
    their `pixels`: fp16 can overflow on an input where float32 does not."""
    overflowed = np.flatnonzero(~np.isfinite(outputs["vector"]).all(axis=1))
    if len(overflowed):
        again = pixels[overflowed.tolist()]
        redone = encoder.encode_pixels(again if kind == "cover" else again.flatten(0, 1), fp32=True)
        for name, values in _pooled(kind, redone, frames).items():
            outputs[name][overflowed] = values
    return outputs


def _kind_rows(dataset: Dataset, kind: str, limit: int | None) -> Iterator[Row]:
    rows = dataset.rows() if kind == "cover" else dataset.clip_rows()
    return rows if limit is None else islice(rows, limit)


def encoded_shards(encoder: Encoder, dataset: Dataset, kind: str, config: EmbedConfig,
                   to_encode: Callable[[int, list[Row]], list[Row]], on_rows: Callable[[int], None],
                   on_text: Callable[[int], None], times: StageTimes) -> Iterator[EncodedShard]:
    shards = pending_shards(_kind_rows(dataset, kind, config.limit), config.shard_size, to_encode)
    if config.ocr:
        shards = with_cover_text(shards, kind, config.workers or 0, on_text)
    if hasattr(encoder, "encode_pixels"):
        yield from encode_media_shards(encoder, kind, shards, config, on_rows, times)
        return
    for number, rows in times.waited(shards):
        with times.timing("model"):
            shard = encode_text_shard(encoder, number, rows, config.batch_size)
        yield shard
        on_rows(len(rows))


def expected_rows(dataset: Dataset, kinds: tuple[str, ...], limit: int | None) -> int | None:
    """About how many rows the job will read, at most: see `Dataset.expected_rows`."""
    counts = [dataset.expected_rows(kind) for kind in kinds]
    if None in counts:
        return None
    return sum(count if limit is None else min(count, limit) for count in counts)


def check_encodable(encoder: Encoder, dataset: Dataset, kinds: tuple[str, ...], ocr: bool) -> None:
    if hasattr(encoder, "encode_pixels"):
        return
    if "clip" in kinds:
        raise VsearchError(f"clip vectors need an image model; {encoder.spec} encodes text only "
                           "(use --model uniclip:PATH or open_clip:ARCH:PATH)")
    if not dataset.has_text and not ocr:
        raise VsearchError(
            f"dataset {dataset.name} has no title or OCR text, so {encoder.spec} cannot embed it; "
            "use an image model (--model uniclip:PATH or open_clip:ARCH:PATH) or --ocr to read the covers' text"
        )


def files_read(encoder: Encoder, kind: str, ocr: bool) -> Callable[[Row], list[str | None]] | None:
    """The files a job reads for a row of `kind`, if any: the cover image or the video for an image
    model, and the cover image `--ocr` reads the text of."""
    if kind == "clip":
        return (lambda row: [row.uri, row.cover]) if ocr else (lambda row: [row.uri])
    return (lambda row: [row.uri]) if ocr or hasattr(encoder, "encode_pixels") else None


@dataclass
class ResumePlan:
    """Which rows of which shards of one kind a pass over the dataset encodes, given the manifest's
    `done` shards and `failed` rows (shard name -> {id: the `shards.media_version` its files had
    when it failed}): every row of a shard not made from the rows now at its place and, where the
    job reads any (`files`, see `files_read`), the files its vectors came from as they are now (see
    `shards.made_from`); and the failed rows of a shard that is done, when one of their files
    changed or with `retry_all` (--retry-failed), which `finished` writes back into their shard (in
    `directory`); and of a shard made from other rows whose vectors still hold for these
    (`shards.vectors_hold`: files moved, a title edited for an image model), its failed rows,
    `finished` writing it again with the rows' metadata as it is now, or, with none,
    `refreshed_shards` handing it over with nothing to encode. With `share` (rank, processes), only
    the shards whose number is rank modulo processes. Counts as it goes, reports the rows found done
    to `on_done`, and keeps the digests of each pending shard's rows, read before `--ocr` fills in their text, and the versions of
    their files, looked at before they are read, for the shard's manifest entry."""

    kind: str
    done: dict[tuple[str, int], dict[str, Any]]
    failed: dict[str, dict[str, str | None]] = field(default_factory=dict)
    files: Callable[[Row], list[str | None]] | None = None
    retry_all: bool = False
    reads_text: bool = False  # --ocr: covers whose row has no OCR text have it read off them
    text_encoded: bool = True  # the vectors encode the rows' text (lexical), not their images
    directory: Path | None = None
    share: tuple[int, int] = (0, 1)
    on_done: Callable[[int], None] = lambda rows: None
    skipped: int = 0
    redone: int = 0
    retried: int = 0  # failed rows encoded again
    refreshed: int = 0  # shards whose vectors still hold for rows that changed
    count: int = 0  # shards the dataset has, pending or not
    pending: dict[int, tuple[str, dict[str, str]]] = field(default_factory=dict)  # -> (content digest, versions)
    patched: dict[int, tuple[dict[str, Any], list[Row]]] = field(default_factory=dict)  # -> (entry, rows now)
    unencoded: list[int] = field(default_factory=list)  # refreshed shards with no row to encode

    @classmethod
    def of_job(cls, kind: str, encoder: Encoder, config: EmbedConfig, done: dict[tuple[str, int], dict[str, Any]],
               failed: dict[str, dict[str, str | None]], directory: Path, share: tuple[int, int] = (0, 1),
               on_done: Callable[[int], None] = lambda rows: None) -> "ResumePlan":
        """The plan for `kind` of a job embedding with `encoder` as `config` says."""
        return cls(kind, done, failed, files_read(encoder, kind, config.ocr), config.retry_failed, config.ocr,
                   not hasattr(encoder, "encode_pixels"), directory, share, on_done)

    def to_encode(self, number: int, rows: list[Row]) -> list[Row]:
        self.count = max(self.count, number + 1)
        rank, processes = self.share
        if number % processes != rank:
            return []
        entry = self.done.get((self.kind, number))
        failed = self.failed.get(entry["name"], {}) if entry else {}
        content = content_digest(rows)
        versions = {row.id: media_version(row, self.files) for row in rows} if self.files else {}
        digests = {"content_digest": content}
        if self.files:
            digests["media_digest"] = media_digest({i: v for i, v in versions.items() if i not in failed})
        if made_from(entry, rows, digests):
            changed = any(was is not None and versions.get(i, was) != was for i, was in failed.items())
            again = [row for row in rows if row.id in failed] if self.retry_all or changed else []
            if not again:
                self.on_done(len(rows))
                self.skipped += 1
                return []
        elif vectors_hold(self.directory, entry, rows, failed, digests, self.text_encoded, self.reads_text):
            again = [row for row in rows if row.id in failed]  # their failure may have been where a file was
            self.refreshed += 1
            if not again:
                self.unencoded.append(number)
        else:
            self.redone += entry is not None
            self.pending[number] = (content, versions)
            return rows
        # The shard is written again whole: its rows kept from the file, and those encoded again.
        self.on_done(len(rows) - len(again))
        self.retried += len(again)
        self.patched[number] = (entry, rows)
        self.pending[number] = (content, versions)
        return again

    def finished(self, shard: EncodedShard) -> tuple[EncodedShard, dict[str, str]]:
        """The shard to write for `shard` as encoded (with the rows kept from before, where only
        its failed rows were encoded again, and the version of each failed row's files), and the
        digests of what it was made from."""
        content, versions = self.pending.pop(shard.number)
        if shard.number in self.patched:
            entry, rows = self.patched.pop(shard.number)
            columns = with_kept_rows(self.directory, entry, shard.columns, [row.id for row in rows])
            shard = replace(shard, columns=with_metadata(columns, rows, self.reads_text))
        digests = {"content_digest": content}
        if self.files:
            digests["media_digest"] = media_digest({i: versions[i] for i in shard.columns["id"]})
            shard = replace(shard, failed=[{**f, "version": versions[f["id"]]} for f in shard.failed])
        return shard, digests

    def refreshed_shards(self) -> Iterator[EncodedShard]:
        """The shards whose vectors still hold and that have no row to encode, as `finished` takes
        them: with no rows of their own, all kept. Read after the encoded ones, when the plan has
        seen every shard."""
        while self.unencoded:
            yield EncodedShard(self.kind, self.unencoded.pop(0), {"id": [], "vector": np.zeros(0)}, [])


def text_processes(dataset: Dataset, config: EmbedConfig) -> int:
    """How many processes embed covers with a text-only encoder: one a worker (`--workers`), each
    reading the dataset and encoding its share of the shards (lexical runs in Python, a core a
    process), but no more than the dataset has shards. One where `--ocr` reads the covers, whose
    pool of processes has the cores already, and for a remote dataset, which each process would
    download again."""
    if config.ocr or (config.workers or 0) < 2 or not dataset.is_local:
        return 1
    # Counting the first shards' rows is enough to know whether every process would have one.
    enough = config.workers * config.shard_size
    rows = sum(1 for _ in islice(_kind_rows(dataset, "cover", config.limit), enough))
    return max(1, min(config.workers, math.ceil(rows / config.shard_size)))


def failed_versions(failed: list[dict[str, Any]]) -> dict[str, dict[str, str | None]]:
    """Shard name -> {id: the version of its files when it failed (None where not recorded)} of
    the rows that failed in it, from a manifest's `failed` list."""
    by_shard: dict[str, dict[str, str | None]] = {}
    for failure in failed:
        by_shard.setdefault(failure["shard"], {})[failure["id"]] = failure.get("version")
    return by_shard


def _device_process(rank: int, devices: list[str], spec: str, config: EmbedConfig, root: str,
                    kinds: tuple[str, ...], done: dict[tuple[str, int], dict[str, Any]],
                    failed: dict[str, dict[str, str | None]], directory: str, results: Any, parent: int) -> None:
    """One device's share of the shards of each kind: encode, write the files, report each to the parent."""
    exit_with_parent(parent)
    try:
        workspace = Workspace.resolve(root)
        dataset = open_dataset(config.dataset, workspace, config.images, config.videos)
        encoder = load_encoder(spec, devices[rank])
        schema = shard_schema(encoder.dim, getattr(encoder, "extra_columns", None))
        for kind in kinds:
            plan = ResumePlan.of_job(kind, encoder, config, done, failed, Path(directory), share=(rank, len(devices)),
                                     on_done=lambda rows: results.put(("skipped", rows, None, None)))
            times = StageTimes()
            for shard in chain(encoded_shards(encoder, dataset, kind, config, plan.to_encode, lambda n: None,
                                              lambda n: results.put(("text", n, None, None)), times),
                               plan.refreshed_shards()):
                encoded = len(shard.columns["id"])
                with times.timing("output"):
                    whole, digests = plan.finished(shard)
                    entry = write_shard_file(Path(directory), schema, kind, shard.number, whole.columns, whole.failed,
                                             digests)
                results.put(("shard", entry, encoded, whole.failed))
            results.put(("done", rank, (kind, plan.skipped, plan.redone, plan.retried, plan.refreshed, plan.count,
                                        asdict(times)),
                         (dataset.duplicates, dataset.malformed)))
    except VsearchError as exc:
        results.put(("error", rank, str(exc), None))
    except OSError as exc:  # a file that cannot be written (a full disk) is said in one line, as in one process
        results.put(("error", rank, os_error_line(exc), None))
    except BaseException:
        results.put(("crash", rank, traceback.format_exc(), None))


def _died_without_reporting(processes: list[Any]) -> str:
    """Why embedding processes ended with no word, as far as their exit codes tell."""
    codes = sorted({p.exitcode for p in processes if p.exitcode})
    if codes and all(code < 0 for code in codes):
        return (f"an embedding process was killed by signal {-codes[0]} without reporting "
                "(out of memory? try fewer --workers or a smaller --batch-size)")
    return ("an embedding process died without reporting (see its error above); from a Python script, call "
            "run_embed under `if __name__ == \"__main__\":`, as processes started by spawn import the script")


def _run_on_devices(devices: list[str], spec: str, config: EmbedConfig, workspace: Workspace,
                    kinds: tuple[str, ...], writer: ShardWriter, failed: dict[str, dict[str, str | None]],
                    result: EmbedResult, on_rows: Callable[[int], None], on_done: Callable[[int], None],
                    on_text: Callable[[int], None]) -> tuple[tuple[int, int], dict[str, int]]:
    """Run one process per device (for a text encoder, per core), each loading the model once for
    every kind; return the lines they skipped, as repeats and as malformed, and the number of shards
    the dataset has of each kind."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    config = replace(config, workers=max(0, config.workers // len(devices)))
    processes = [context.Process(target=_device_process, daemon=False,
                                 args=(rank, devices, spec, config, str(workspace.root), kinds,
                                       writer.done, failed, str(writer.directory), results, os.getpid()))
                 for rank in range(len(devices))]
    for process in processes:
        process.start()
    running, skipped_lines, shards = len(processes) * len(kinds), (0, 0), {}  # running: "done" messages to come
    try:
        while running:
            try:
                message, payload, detail, extra = results.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    raise VsearchError(_died_without_reporting(processes)) from None
                continue
            if message == "text":
                on_text(payload)
            elif message == "skipped":
                on_done(payload)
            elif message == "shard":  # detail: the rows encoded into it this time
                writer.record(payload, extra)
                _count(result, detail, extra)
                on_rows(detail + len(extra))
            elif message == "done":
                kind, skipped, redone, retried, refreshed, shards[kind], times = detail  # every process sees every shard
                result.shards_skipped += skipped
                result.shards_redone += redone
                result.rows_retried += retried
                result.shards_refreshed += refreshed
                result.times.add(times)
                if kind == kinds[-1]:  # every line, as `_run_here` counts them: in the last pass
                    skipped_lines = extra
                running -= 1
            elif message == "error":
                raise VsearchError(detail)
            else:
                raise RuntimeError(f"embedding process {payload} ({devices[payload]}) failed:\n{detail}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return skipped_lines, shards


def _count(result: EmbedResult, rows: int, failed: list) -> None:
    result.shards_written += 1
    result.rows_written += rows
    result.rows_failed += len(failed)


def _write_in_background(shards: Iterator[EncodedShard], writer: ShardWriter, result: EmbedResult,
                         plan: ResumePlan) -> None:
    """Write each shard, as the `plan` finishes it, on a background thread while the next one
    encodes; at most two wait."""
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        for shard in shards:
            if len(pending) >= 2:
                with result.times.timing("output"):
                    pending.pop(0).result()
            _count(result, len(shard.columns["id"]), shard.failed)
            whole, digests = plan.finished(shard)
            pending.append(pool.submit(writer.write, whole.kind, whole.number, whole.columns, whole.failed, digests))
        with result.times.timing("output"):
            for future in pending:
                future.result()


def _run_here(encoder: Encoder, dataset: Dataset, kinds: tuple[str, ...], config: EmbedConfig, writer: ShardWriter,
              failed: dict[str, dict[str, str | None]], result: EmbedResult, on_rows: Callable[[int], None],
              on_done: Callable[[int], None], on_text: Callable[[int], None]) -> tuple[tuple[int, int], dict[str, int]]:
    """Encode each kind in this process, as `_run_on_devices` does in several, returning what it returns."""
    shards = {}
    for kind in kinds:
        plan = ResumePlan.of_job(kind, encoder, config, writer.done, failed, writer.directory, on_done=on_done)
        _write_in_background(chain(encoded_shards(encoder, dataset, kind, config, plan.to_encode, on_rows, on_text,
                                                  result.times), plan.refreshed_shards()), writer, result, plan)
        result.shards_skipped += plan.skipped
        result.shards_redone += plan.redone
        result.rows_retried += plan.retried
        result.shards_refreshed += plan.refreshed
        shards[kind] = plan.count
    return (dataset.duplicates, dataset.malformed), shards


def run_embed(config: EmbedConfig, workspace: Workspace, on_rows: Callable[[int], None] = lambda n: None,
              encoder: Encoder | None = None, on_text: Callable[[int], None] = lambda n: None,
              on_total: Callable[[int], None] = lambda n: None,
              on_done: Callable[[int], None] = lambda n: None,
              note: Callable[[str], None] = lambda line: None) -> EmbedResult:
    """Embed `config.dataset`; `on_rows(n)` as rows are written, `on_done(n)` with the rows of each
    shard found already written (a resumed job), `on_text(n)` as `--ocr` reads covers, `on_total(n)`
    once with the rows to expect at most, done ones included (from another thread, where they can
    be counted cheaply), `note(line)` where the disk looks too small for the rest (see `ShardWriter`);
    pass `encoder` to reuse a loaded model (it must be `config.model`'s)."""
    if config.kind not in KINDS:
        raise VsearchError(f"unknown --kind {config.kind!r}: use cover, clip or both")
    if config.decode not in ("auto", "device", "workers", "both"):
        raise VsearchError(f"unknown --decode {config.decode!r}: use auto, device, workers or both")
    if min(config.shard_size, config.batch_size, config.frames) < 1:
        raise VsearchError("--shard-size, --batch-size and --frames must be at least 1")
    if config.limit is not None and config.limit < 1:
        raise VsearchError("--limit must be at least 1")
    if config.workers is not None and config.workers < 0:
        raise VsearchError("--workers must be at least 0")
    kinds = KINDS[config.kind]
    if config.ocr:
        require_ocr_engine()
    dataset = open_dataset(config.dataset, workspace, config.images, config.videos)
    spec = resolve_model(config.model, workspace)
    for name in config.device.split(","):
        check_device_name(name.strip())
    devices = resolve_devices(config.device) if runs_on_device(spec) else ["cpu"]
    config = replace(config, workers=total_workers(config.workers, len(devices)))
    # With several devices the model here only describes the job (spec, fingerprint, dim) while each
    # device process loads its own, so it stays on the CPU rather than take GPU 0's memory twice.
    encoder = encoder or load_encoder(spec, devices[0] if len(devices) == 1 else "cpu")
    check_encodable(encoder, dataset, kinds, config.ocr)
    directory = Path(config.out) if config.out else workspace.embeddings_dir(dataset.name)
    fresh = Manifest(dataset=dataset.name, source=dataset.source,
                     encoder={"spec": encoder.spec, "fingerprint": encoder.fingerprint},
                     dim=encoder.dim, shard_size=config.shard_size, ocr=OCR_ENGINE if config.ocr else None)
    with ShardWriter.open(directory, fresh, getattr(encoder, "extra_columns", None), config.overwrite, note) as writer:
        result = EmbedResult(directory, writer.manifest)

        def expect(rows: int) -> None:
            on_total(rows)
            writer.expect_rows(rows)

        # 10 million lines take a few seconds to count: counted while the job starts.
        counting = in_background(lambda: expected_rows(dataset, kinds, config.limit), expect)
        rows_seen = 0

        def progress(rows: int) -> None:
            nonlocal rows_seen
            rows_seen += rows
            on_rows(rows)

        def done_before(rows: int) -> None:
            nonlocal rows_seen
            rows_seen += rows
            on_done(rows)

        failed = failed_versions(writer.manifest.failed)
        # skipped_lines: (repeated ids, malformed lines) as the last pass over the dataset counted them;
        # shards: kind -> how many shards the dataset has
        processes = devices if hasattr(encoder, "encode_pixels") else ["cpu"] * text_processes(dataset, config)
        if len(processes) > 1:
            skipped_lines, shards = _run_on_devices(processes, encoder.spec, config, workspace, kinds, writer, failed,
                                                    result, progress, done_before, on_text)
        else:
            skipped_lines, shards = _run_here(encoder, dataset, kinds, config, writer, failed, result, progress,
                                              done_before, on_text)
        if rows_seen == 0:  # checked before removing anything: an emptied dataset file is more likely a mistake
            malformed = f" ({skipped_lines[1]:,} malformed lines skipped)" if skipped_lines[1] else ""
            raise VsearchError(f"dataset {dataset.name} has no rows to embed: {dataset.source}{malformed}")
        if config.limit is None:
            result.shards_removed = sum(writer.remove_beyond(kind, count) for kind, count in shards.items())
        writer.manifest.duplicates, writer.manifest.malformed_lines = skipped_lines
        writer.write_manifest()
    counting.join()
    return result
