"""Text queries against a built index: encode, search, filter and join metadata, rerank.

A `Searcher` loads the index and the encoder its manifest records once; each query then pulls
k' ANN candidates (default 10 k), takes their metadata rows from the index's memory-mapped row file
(O(k'), whatever the index size; see vsearch/indexes/rows.py), keeps the rows for which a `--where`
predicate holds, evaluated by DuckDB over them, and reranks.

When too few candidates pass, the ANN search is widened, 4 times more each round. A predicate
that still leaves too few after `Searcher.widenings` rounds (64 k' candidates) is selective:
rather than widen a graph search over the whole index (at 200k covers that took 8-17 s in
hnswlib), DuckDB finds every row that passes, and the index scores exactly those.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from vsearch.embeddings import Encoder, load_encoder
from vsearch.errors import VsearchError, first_line
from vsearch.indexes import Index, load_index
from vsearch.query.rerank import Candidate, Weights, rerank

MAX_QUERY_CHARS = 128


class QueryTextError(VsearchError):
    """A query text that cannot be searched (empty, or nothing the model can match): in a batch, that
    query's answer, not the end of the batch."""


@dataclass
class QueryConfig:
    text: str
    index: Path
    k: int = 10
    where: str | None = None
    rerank: bool = True
    candidates: int | None = None  # ANN candidates to rerank; default 10 * k
    image_budget: int | None = None  # covers whose images the heads read; default `default_image_budget`
    weights: Weights = field(default_factory=Weights)
    device: str = "auto"


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    title: str | None
    ocr: str | None
    uri: str | None
    parts: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    query: str
    hits: list[Hit]
    notes: list[str]
    seconds: dict[str, float]  # time per stage: encode, search, metadata, rerank


def query_encoder(index: Index, device: str = "auto", model: str | None = None) -> Encoder:
    """Load the encoder the index's vectors came from, or `model` instead (its checkpoint moved, or
    the index is served on another machine), refusing a model with other weights."""
    recorded = index.manifest["encoder"]
    if recorded is None:
        raise VsearchError(f"index {index.path} was built from bring-your-own embeddings with no recorded model, "
                           "so text queries cannot be encoded; build it with --model SPEC (the model that made "
                           "the vectors), or search it with vectors (vsearch.indexes.load_index)")
    try:
        encoder = load_encoder(model or recorded["spec"], device)
    except VsearchError as exc:
        if model:
            raise
        raise VsearchError(f"{exc}; if the index's model is elsewhere now, name it with --model") from None
    if encoder.fingerprint != recorded["fingerprint"]:
        raise VsearchError(
            f"model {encoder.spec} has fingerprint {encoder.fingerprint}, but index {index.path} "
            f"was built from vectors with fingerprint {recorded['fingerprint']} ({recorded['spec']}); "
            + ("--model must name the model that made them" if model else "re-embed and rebuild")
        )
    return encoder


def default_image_budget(on_gpu: bool) -> int:
    """How many covers the OCR heads read per query: 50 on a GPU (its 30 ms budget); on a CPU one
    per thread torch computes with, at most 50. A ViT-B/16 cover costs about 0.7 core-seconds
    there, so reranking takes under a second on any machine (8 covers took 3.3 s on 2 cores)."""
    if on_gpu:
        return 50
    import torch

    return min(50, torch.get_num_threads())


def clean_query(text: str, notes: list[str]) -> str:
    text = " ".join(text.split())
    if not text:
        raise QueryTextError("empty query: give some text to search for")
    if len(text) > MAX_QUERY_CHARS:
        notes.append(f"query truncated to its first {MAX_QUERY_CHARS} characters")
        text = text[:MAX_QUERY_CHARS]
    return text


class Searcher:
    """An index, its encoder and its metadata files, loaded once for any number of queries, from
    any number of threads."""

    widenings = 3  # ANN rounds after the first before a --where predicate is run over every row

    def __init__(self, index: str | os.PathLike, device: str = "auto", model: str | None = None):
        self.index = load_index(index)
        self.encoder = query_encoder(self.index, device, model)
        # A --where predicate is spliced into SQL, and a service may pass its users' text: it gets no
        # files to read or write and no extensions to load, only the candidates' rows.
        self._db = duckdb.connect(config={"enable_external_access": False})
        self._local = threading.local()
        self.on_gpu = getattr(getattr(self.encoder, "device", None), "type", "cpu") == "cuda"
        self._matching: tuple[str, np.ndarray] | None = None  # the last predicate and its rows, for --file

    def encode(self, text: str, notes: list[str]) -> np.ndarray:
        context = getattr(self.encoder, "context_length", None)
        if context and len(self.encoder.tokenize([text], 512)[0].nonzero()) > context:
            notes.append(f"the model reads the first {context - 2} tokens of the query")
        vector = self.encoder.encode_texts([text])
        if not np.any(vector):
            raise QueryTextError(f"query {text!r} has no letters or digits to match")
        if not np.isfinite(vector).all():  # fp16 overflow, or damaged weights: its results would be noise
            raise QueryTextError(f"{self.encoder.spec} gave a vector with NaN or infinite values for query {text!r}")
        return vector

    @property
    def db(self) -> duckdb.DuckDBPyConnection:
        """This thread's DuckDB connection: one serves a call at a time, and a service searches from
        many threads."""
        if not hasattr(self._local, "db"):
            self._local.db = self._db.cursor()
        return self._local.db

    def passing(self, rows: pa.Table, where: str) -> np.ndarray:
        """Positions of the `rows` for which the SQL predicate `where` holds, as DuckDB evaluates it."""
        sql = f"SELECT _position FROM candidates WHERE ({where})"
        db = self.db
        db.register("candidates", rows.append_column("_position", pa.array(np.arange(len(rows)))))
        try:
            if len(db.extract_statements(sql)) != 1:
                raise VsearchError(f"bad --where predicate {where!r}: one condition, not SQL statements")
            kept = db.execute(sql).fetchnumpy()["_position"]
        except duckdb.BinderException as exc:  # most often a column that is not there: say which are
            raise VsearchError(f"bad --where predicate {where!r}: {first_line(exc)} "
                               f"(columns: {', '.join(rows.column_names)})") from None
        except duckdb.Error as exc:
            raise VsearchError(f"bad --where predicate {where!r}: {first_line(exc)}") from None
        finally:
            db.unregister("candidates")
        return np.sort(np.asarray(kept, np.int64))

    def matching(self, where: str) -> np.ndarray:
        """Labels of every row of the index for which `where` holds (the last predicate's are kept)."""
        matching = self._matching
        if matching is None or matching[0] != where:
            matching = self._matching = (where, self.passing(self.index.rows.table(), where))
        return matching[1]

    def known_selective(self, where: str | None) -> bool:
        """Whether `where` has been run over every row and so few passed that widening could not find them."""
        matching = self._matching
        return (where is not None and matching is not None and matching[0] == where
                and len(matching[1]) * 4 ** self.widenings < self.index.rows.count)

    def candidates(self, vector: np.ndarray, wanted: int, where: str | None,
                   seconds: dict[str, float]) -> list[Candidate]:
        """The best `wanted` candidates passing `where`, widening the ANN search as the filter needs."""
        fetch = min(len(self.index), wanted)
        for _ in range(0 if self.known_selective(where) else 1 + self.widenings):
            started = time.perf_counter()
            scores, labels = self.index.search_labels(vector, fetch)
            live = labels[0] >= 0
            scores, labels = scores[0][live], labels[0][live]
            searched = time.perf_counter()
            rows = self.index.rows.take(labels)
            if where:
                keep = self.passing(rows, where)
                rows, scores = rows.take(keep), scores[keep]
            seconds["search"] += searched - started
            seconds["metadata"] += time.perf_counter() - searched
            if len(rows) >= wanted or fetch >= len(self.index):
                return self._as_candidates(rows.slice(0, wanted), scores)
            fetch = min(len(self.index), fetch * 4)
        return self.exact_candidates(vector, wanted, where, seconds)

    def exact_candidates(self, vector: np.ndarray, wanted: int, where: str | None,
                         seconds: dict[str, float]) -> list[Candidate]:
        """The best `wanted` rows passing `where` (every row without one), scored exactly."""
        started = time.perf_counter()
        among = self.matching(where) if where else np.arange(self.index.rows.count)
        filtered = time.perf_counter()
        scores, labels = self.index.search_among(vector, among, wanted)
        searched = time.perf_counter()
        rows = self.index.rows.take(labels[0])
        seconds["metadata"] += filtered - started + time.perf_counter() - searched
        seconds["search"] += searched - filtered
        return self._as_candidates(rows, scores[0])

    @staticmethod
    def _as_candidates(rows: pa.Table, scores: np.ndarray) -> list[Candidate]:
        # Bring-your-own rows name them as clip-retrieval and LAION do: caption, url (image_path for a
        # folder of images).
        return [Candidate(row["id"], float(score), row.get("title", row.get("caption")), row.get("ocr"),
                          row.get("uri", row.get("url", row.get("image_path"))), row.get("cover"))
                for row, score in zip(rows.to_pylist(), scores)]

    def search(self, config: QueryConfig) -> Result:
        if config.k < 1:
            raise VsearchError("-k must be at least 1")
        if config.candidates is not None and config.candidates < 1:
            raise VsearchError("--candidates must be at least 1")
        if config.image_budget is not None and config.image_budget < 0:
            raise VsearchError("--rerank-images must be at least 0")
        notes: list[str] = []
        seconds = {"encode": 0.0, "search": 0.0, "metadata": 0.0, "rerank": 0.0}
        started = time.perf_counter()
        text = clean_query(config.text, notes)
        vector = self.encode(text, notes)
        seconds["encode"] = time.perf_counter() - started
        wanted = (config.candidates or 10 * config.k) if config.rerank else config.k
        pool = self.candidates(vector, max(wanted, config.k), config.where, seconds)
        if config.where and not pool:
            notes.append(f"nothing in the index passes --where {config.where}")
        started = time.perf_counter()
        if config.rerank:
            heads = hasattr(self.encoder, "match_and_presence")
            budget = config.image_budget
            if budget is None:  # an encoder without heads reads no covers, nor imports torch to count cores
                budget = default_image_budget(self.on_gpu) if heads else 0
            pool, rerank_notes = rerank(self.encoder, text, pool, config.weights, budget)
            notes += rerank_notes
            if heads and 0 < budget < min(config.k, len(pool)):
                notes.append(f"semantic and presence read for the {budget} covers ranked best on ann and "
                             f"lexical (--rerank-images {budget}); the rest follow them in that order")
        else:
            for candidate in pool:
                candidate.parts, candidate.score = {"ann": candidate.ann}, candidate.ann
        seconds["rerank"] = time.perf_counter() - started
        hits = [Hit(rank, c.id, c.score, c.title, c.ocr, c.uri, c.parts)
                for rank, c in enumerate(pool[:config.k], start=1)]
        if hits and max(hit.score for hit in hits) <= 0:
            notes.append("nothing in the index resembles the query (every score is 0 or below): "
                         "these results are in no particular order")
        return Result(text, hits, notes, seconds)


def search(config: QueryConfig) -> list[Hit]:
    """One query, loading the index and encoder for it (use `Searcher` for many)."""
    return Searcher(config.index, config.device).search(config).hits
