"""The embed job: dataset rows -> encoder -> Parquet shards, resumable at shard granularity.

Shard N always covers the dataset's rows N*shard_size .. (N+1)*shard_size - 1, so a re-run
reads the cheap text rows again, skips every shard the manifest lists as complete, and
encodes only the rest: no row is written twice and none is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from vsearch.embeddings.datasets import Dataset, Row, open_dataset
from vsearch.embeddings.encoders import Encoder, ImageEncoder, load_encoder
from vsearch.embeddings.images import ImageError, load_image
from vsearch.embeddings.shards import Manifest, ShardWriter
from vsearch.errors import VsearchError
from vsearch.workspace import Workspace


@dataclass
class EmbedConfig:
    dataset: str = "demo"
    model: str = "lexical"
    out: Path | None = None
    images: str | None = None
    shard_size: int = 10_000
    batch_size: int = 256
    limit: int | None = None
    overwrite: bool = False
    device: str = "auto"


@dataclass
class EmbedResult:
    directory: Path
    manifest: Manifest
    shards_written: int
    shards_skipped: int
    rows_written: int
    rows_failed: int


def cover_text(row: Row) -> str:
    """The text a text-only encoder sees for a cover: its title and OCR text."""
    return "\n".join(part for part in (row.title, row.ocr) if part)


def _failure(row: Row, reason: str) -> dict[str, Any]:
    return {"id": row.id, "kind": "cover", "uri": row.uri, "reason": reason}


def _encode_by_text(encoder: Encoder, rows: list[Row]) -> tuple[list[Row], np.ndarray, list[dict]]:
    failed = [_failure(row, "no title or OCR text to encode") for row in rows if not cover_text(row)]
    rows = [row for row in rows if cover_text(row)]
    vectors = encoder.encode_texts([cover_text(row) for row in rows]) if rows else np.zeros((0, encoder.dim))
    empty = np.linalg.norm(vectors, axis=1) == 0
    failed += [_failure(row, "no letters or digits in title or OCR text") for row, e in zip(rows, empty) if e]
    return [row for row, e in zip(rows, empty) if not e], vectors[~empty], failed


def _encode_by_image(encoder: ImageEncoder, rows: list[Row]) -> tuple[list[Row], np.ndarray, list[dict]]:
    kept, images, failed = [], [], []
    for row in rows:
        try:
            images.append(load_image(row.uri))
            kept.append(row)
        except ImageError as exc:
            failed.append(_failure(row, str(exc)))
    vectors = encoder.encode_images(images) if images else np.zeros((0, encoder.dim))
    return kept, vectors, failed


def encode_rows(encoder: Encoder, rows: list[Row]) -> tuple[list[Row], np.ndarray, list[dict]]:
    """Encode covers by image when the encoder has an image tower, else by title + OCR text."""
    if isinstance(encoder, ImageEncoder):
        return _encode_by_image(encoder, rows)
    return _encode_by_text(encoder, rows)


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _shard_columns(encoder: Encoder, rows: list[Row], batch_size: int) -> tuple[dict[str, Any], list[dict]]:
    kept: list[Row] = []
    parts: list[np.ndarray] = []
    failed: list[dict] = []
    for batch in _chunks(iter(rows), batch_size):
        batch_kept, vectors, batch_failed = encode_rows(encoder, batch)
        kept += batch_kept
        parts.append(vectors)
        failed += batch_failed
    columns = {
        "id": [row.id for row in kept],
        "vector": np.concatenate(parts) if parts else np.zeros((0, encoder.dim)),
        "title": [row.title for row in kept],
        "ocr": [row.ocr for row in kept],
        "uri": [row.uri for row in kept],
    }
    return columns, failed


def check_encodable(encoder: Encoder, dataset: Dataset) -> None:
    if not isinstance(encoder, ImageEncoder) and not dataset.has_text:
        raise VsearchError(
            f"dataset {dataset.name} has no title or OCR text, so {encoder.spec} cannot embed it; "
            "use an image model (--model open_clip:ARCH:PATH)"
        )


def run_embed(config: EmbedConfig, workspace: Workspace,
              on_rows: Callable[[int], None] = lambda n: None) -> EmbedResult:
    if config.shard_size < 1 or config.batch_size < 1:
        raise VsearchError("--shard-size and --batch-size must be at least 1")
    dataset = open_dataset(config.dataset, workspace, config.images)
    encoder = load_encoder(config.model, config.device)
    check_encodable(encoder, dataset)
    directory = Path(config.out) if config.out else workspace.embeddings_dir(dataset.name)
    fresh = Manifest(dataset=dataset.name, source=dataset.source,
                     encoder={"spec": encoder.spec, "fingerprint": encoder.fingerprint},
                     dim=encoder.dim, shard_size=config.shard_size)
    writer = ShardWriter.open(directory, fresh, overwrite=config.overwrite)
    written = skipped = rows_written = rows_failed = rows_read = 0
    rows = islice(dataset.rows(), config.limit) if config.limit else dataset.rows()
    for number, chunk in enumerate(_chunks(rows, config.shard_size)):
        if writer.is_done("cover", number, len(chunk)):
            skipped += 1
        else:
            columns, failed = _shard_columns(encoder, chunk, config.batch_size)
            writer.write("cover", number, len(chunk), columns, failed)
            written += 1
            rows_written += len(columns["id"])
            rows_failed += len(failed)
        rows_read += len(chunk)
        on_rows(len(chunk))
    if rows_read == 0:
        raise VsearchError(f"dataset {dataset.name} has no rows: {dataset.source}")
    writer.manifest.duplicates = dataset.duplicates
    writer.manifest.write(directory)
    return EmbedResult(directory, writer.manifest, written, skipped, rows_written, rows_failed)
