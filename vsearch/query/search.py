"""Text queries against a built index: encode, search, join metadata from the shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from vsearch.embeddings import Encoder, load_encoder
from vsearch.errors import VsearchError
from vsearch.indexes import Index, load_index


@dataclass
class QueryConfig:
    text: str
    index: Path
    k: int = 10
    device: str = "auto"


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    title: str | None
    ocr: str | None
    uri: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def query_encoder(index: Index, device: str = "auto") -> Encoder:
    """Load the encoder the index's vectors came from, refusing a model with other weights."""
    recorded = index.manifest["encoder"]
    if recorded is None:
        raise VsearchError(f"index {index.path} was built from bring-your-own embeddings with no recorded model, "
                           "so text queries cannot be encoded; search it with vectors (vsearch.indexes.load_index)")
    encoder = load_encoder(recorded["spec"], device)
    if encoder.fingerprint != recorded["fingerprint"]:
        raise VsearchError(
            f"model {recorded['spec']} has fingerprint {encoder.fingerprint}, but index {index.path} "
            f"was built from vectors with fingerprint {recorded['fingerprint']}; re-embed and rebuild"
        )
    return encoder


def encode_query(encoder: Encoder, text: str) -> np.ndarray:
    if not text.strip():
        raise VsearchError("empty query: give some text to search for")
    vector = encoder.encode_texts([text.strip()])
    if not np.any(vector):
        raise VsearchError(f"query {text!r} has no letters or digits to match")
    return vector


def fetch_metadata(index: Index, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Title, OCR text and uri for `ids`, read with DuckDB from only the shards the index used."""
    if not ids:
        return {}
    embeddings = Path(index.manifest["embeddings"])
    files = [str(embeddings / shard["name"]) for shard in index.manifest["shards"]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise VsearchError(f"index {index.path} needs shard {missing[0]}, which is missing")
    rows = duckdb.execute(
        "SELECT id, title, ocr, uri FROM read_parquet(?) WHERE kind = ? AND id IN (SELECT unnest(?))",
        [files, index.manifest["kind"], ids],
    ).fetchall()
    return {id_: {"title": title, "ocr": ocr, "uri": uri} for id_, title, ocr, uri in rows}


def search(config: QueryConfig) -> list[Hit]:
    if config.k < 1:
        raise VsearchError("-k must be at least 1")
    index = load_index(config.index)
    vector = encode_query(query_encoder(index, config.device), config.text)
    scores, ids = index.search(vector, config.k)
    found = [(float(s), i) for s, i in zip(scores[0], ids[0]) if i is not None]
    metadata = fetch_metadata(index, [i for _, i in found])
    return [Hit(rank, id_, score, **metadata.get(id_, {"title": None, "ocr": None, "uri": None}))
            for rank, (score, id_) in enumerate(found, start=1)]
