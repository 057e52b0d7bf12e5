"""OCR-aware reranking: stage two of a query.

Each candidate's final score is a weighted sum of its parts:

    final = w_ann * ann + w_lexical * lexical + w_semantic * presence * semantic

* ann: the cosine between the query and the cover vector from the index.
* lexical: how much of the query's wording the cover's OCR text and title contain: the weighted
  share of the query's character 1-3-grams (the lexical encoder's n-grams and weights) found there.
* semantic: UniCLIP's semantic head, the probability that the query matches the text on the cover
  (the query stands in for the OCR text the head was trained on), from the cover's visual tokens,
  recomputed from its image (for a clip, the cover image of its video).
* presence: UniCLIP's presence head, the probability that the cover carries text at all. It gates
  semantic: a cover without text has no text for the query to match.

semantic and presence need a UniCLIP encoder and the cover image; the image work is capped at
`image_budget` candidates so a query stays interactive. The cheap parts (ann and lexical) rank
every candidate first and the cap takes the best of that order, so a cover whose text holds the
query's words gets its image read even when its vector ranked it lower; the candidates past the cap
follow the reranked ones in that order. Covers are fetched together (remote ones concurrently,
within `COVER_FETCH_SECONDS`), then decoded and resized: on a GPU there, as the embed job does;
otherwise on a pool of threads (PIL releases the GIL). About 3 ms of CPU a cover, so 50 covers one
after another would spend five times the 30 ms GPU budget before the GPU starts. A part that cannot
be computed drops out, and the result says why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, lru_cache, partial

from vsearch.embeddings.lexical import NGRAM_WEIGHT, ngrams
from vsearch.embeddings.media import MediaError, decode_image, read_all
from vsearch.errors import VsearchError


# A remote cover taking longer than this drops out of a query's reranking (the embed job waits on a
# server as long as it keeps sending): a query waits on a slow cover server for this long at most.
COVER_FETCH_SECONDS = 3.0


@dataclass(frozen=True)
class Weights:
    ann: float = 1.0
    lexical: float = 0.3
    semantic: float = 0.5

    def __post_init__(self) -> None:
        # Every part is evidence for a match: a negative weight would rank by its absence.
        values = {"ann": self.ann, "lexical": self.lexical, "semantic": self.semantic}
        if not all(math.isfinite(v) and v >= 0 for v in values.values()) or not any(values.values()):
            shown = ",".join(f"{name}={value:g}" for name, value in values.items())
            raise VsearchError(f"bad weights {shown}: each must be a number at least 0, and one above 0")


@dataclass
class Candidate:
    id: str
    ann: float
    title: str | None
    ocr: str | None
    uri: str | None
    cover: str | None = None  # a clip's cover image; a cover's image is its uri
    parts: dict[str, float] = field(default_factory=dict)
    score: float = 0.0

    @property
    def image(self) -> str | None:
        """Where the cover image the OCR heads read is."""
        return self.cover or self.uri


@lru_cache(maxsize=256)
def _query_ngrams(query: str) -> tuple[dict[str, float], float]:
    """Each n-gram of the query with its weight, and their total: the same for every candidate."""
    weights = {gram: NGRAM_WEIGHT[len(gram)] for gram in ngrams(query)}
    return weights, sum(weights.values())


def lexical_overlap(query: str, text: str) -> float:
    """The weighted share of the query's character n-grams that also occur in `text`."""
    wanted, total = _query_ngrams(query)
    if not wanted:
        return 0.0
    present = ngrams(text)
    return sum(weight for gram, weight in wanted.items() if gram in present) / total


def _fuse(candidate: Candidate, weights: Weights) -> float:
    parts = candidate.parts
    score = weights.ann * parts["ann"] + weights.lexical * parts["lexical"]
    if "semantic" in parts:
        score += weights.semantic * parts["presence"] * parts["semantic"]
    return score


def rerank(encoder, query: str, candidates: Sequence[Candidate], weights: Weights,
           image_budget: int) -> tuple[list[Candidate], list[str]]:
    """Candidates reordered by their fused score, and notes on any part that dropped out."""
    notes: list[str] = []
    for candidate in candidates:
        candidate.parts = {"ann": candidate.ann,
                           "lexical": lexical_overlap(query, " ".join(filter(None, (candidate.title, candidate.ocr))))}
        candidate.score = _fuse(candidate, weights)
    ranked = sorted(candidates, key=lambda c: -c.score)
    if not hasattr(encoder, "match_and_presence"):
        notes.append(f"semantic and presence parts dropped: {encoder.spec} has no OCR heads (UniCLIP has)")
        return ranked, notes
    if image_budget <= 0:
        notes.append("semantic and presence parts dropped: --rerank-images is 0")
        return ranked, notes
    pool = ranked[:image_budget]
    _add_head_parts(encoder, query, pool, notes)
    for candidate in pool:
        candidate.score = _fuse(candidate, weights)
    return sorted(pool, key=lambda c: -c.score) + ranked[len(pool):], notes


@cache
def _cover_readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="vsearch-covers")


def _cover_pixels(transform: Callable, data: bytes | MediaError, uri: str | None):
    """The cover in `data` (read from `uri`) preprocessed for the image tower, or why it cannot be."""
    if isinstance(data, MediaError):
        return data
    try:
        return transform(decode_image(data, uri))
    except MediaError as exc:
        return exc


def _cover_inputs(encoder, fetched: list[bytes | MediaError], uris: list[str | None], on_device: bool) -> list:
    """Each fetched cover preprocessed for the image tower, or why it cannot be. `on_device`: JPEGs
    are decoded and resized on the encoder's device (a GPU), as the embed job does."""
    from vsearch.embeddings.reader import decode_jpegs, jpeg_tensor

    inputs: list = [None] * len(fetched)
    if on_device:
        tensors = {i: jpeg_tensor(data) for i, data in enumerate(fetched) if not isinstance(data, MediaError)}
        jpegs = [i for i, tensor in tensors.items() if tensor is not None]
        if jpegs:
            decoded, failed = decode_jpegs([tensors[i] for i in jpegs], [uris[i] for i in jpegs], encoder.device,
                                           encoder.tensor_transform, encoder.image_transform)
            rest = iter([] if decoded is None else decoded)
            for position, i in enumerate(jpegs):
                inputs[i] = MediaError(failed[position]) if position in failed else next(rest)
    left = [i for i, done in enumerate(inputs) if done is None]
    prepared = _cover_readers().map(partial(_cover_pixels, encoder.image_transform),
                                    [fetched[i] for i in left], [uris[i] for i in left])
    for i, pixels in zip(left, prepared):
        inputs[i] = pixels
    return inputs


def _add_head_parts(encoder, query: str, pool: list[Candidate], notes: list[str]) -> None:
    import torch

    from vsearch.embeddings.reader import decodes_jpegs_on_device

    uris = [c.image for c in pool]
    pixels = _cover_inputs(encoder, read_all(uris, deadline=COVER_FETCH_SECONDS), uris,
                           on_device=encoder.device.type == "cuda" and decodes_jpegs_on_device(encoder))
    failures = [p for p in pixels if isinstance(p, MediaError)]
    if failures:
        notes.append(f"semantic and presence parts dropped for {len(failures)} of {len(pool)} covers "
                     f"whose image cannot be read ({failures[0]})")
    readable = [(c, p) for c, p in zip(pool, pixels) if not isinstance(p, MediaError)]
    if not readable:
        return
    pixels = torch.stack([p.to(encoder.device) for _, p in readable])  # some may have been decoded there
    semantic, presence = encoder.match_and_presence([query] * len(readable), pixels)
    for (candidate, _), s, p in zip(readable, semantic, presence):
        candidate.parts.update(semantic=float(s), presence=float(p))
