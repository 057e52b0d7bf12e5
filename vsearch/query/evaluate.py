"""CBVS-20K evaluation: the ranking metrics of the CBVS paper, from per-pair scores.

Definitions (the published evaluation):

* PNR: over every query with at least two pairs, each ordered pair (i, j) with label_i > label_j is
  concordant if score_i > score_j, discordant if lower, a tie if equal; pooled over all queries,
  PNR = (concordant + ties/2) / (discordant + ties/2).
* NDCG@k (k = 1, 3, 5, 10): queries whose pairs carry more than one distinct label; pairs ranked by
  score (file order among equal scores); DCG@k = sum of (2^label - 1) / log2(rank + 1);
  NDCG = (DCG + 1e-6) / (ideal DCG + 1e-6); the mean over those queries.
* MAP: label 2 is relevant; queries with no relevant pair are skipped; AP is the mean of the
  precision at each relevant pair's rank; MAP is the mean AP.
* R@1/5/10 and MR (the paper does not publish its procedure; this is vsearch's): text-to-cover
  retrieval over the whole pool of CBVS-20K covers with the images at hand; a query is a hit at k
  when one of its label-2 covers is among its k nearest covers; R@k is the share of queries with a
  label-2 cover that hit; MR is the mean of R@1, R@5 and R@10.

Scoring the pairs with a model, a pair whose cover image is missing or unreadable is left out and
counted. The released evaluation scores it against a blank image instead, an arbitrary score that
would move every metric; with all 19,662 covers present the two agree.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsearch.errors import VsearchError, counted
from vsearch.files import text_lines, write_text_atomic

# The CBVS paper's UniCLIP ViT-B/16 row (fine-tuned on CBVS-5M).
PAPER_UNICLIP = {"R@1": 0.503, "R@5": 0.754, "R@10": 0.820, "MR": 0.692, "PNR": 3.069,
                 "NDCG@1": 0.784, "NDCG@5": 0.846, "NDCG@10": 0.893, "MAP": 0.779}
NDCG_AT = (1, 3, 5, 10)
RECALL_AT = (1, 5, 10)
LABELS = (0, 1, 2)  # CBVS-20K's grades; MAP counts 2 as relevant


@dataclass(frozen=True)
class Pair:
    query: str
    docid: str
    label: int
    score: float


def read_scores(path: Path) -> list[Pair]:
    """Pairs from a scores file: `label \\t query \\t docid \\t score`, one per line."""
    if not path.is_file():
        raise VsearchError(f"scores file not found: {path}")
    pairs = []
    with open(path, "rb") as handle:
        for number, line in text_lines(handle, str(path)):
            if not line.strip():
                continue
            try:
                label, query, docid, score = line.split("\t")
                pair = Pair(query, docid, int(label), float(score))
            except ValueError:
                raise VsearchError(f"{path}:{number}: expected label\\tquery\\tdocid\\tscore, "
                                   f"got {line[:80]!r}") from None
            if pair.label not in LABELS or not math.isfinite(pair.score):
                raise VsearchError(f"{path}:{number}: the label must be 0, 1 or 2 and the score a finite number, "
                                   f"got {line[:80]!r}")
            pairs.append(pair)
    if not pairs:
        raise VsearchError(f"scores file {path} has no pairs")
    return pairs


def by_query(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    grouped: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        grouped[pair.query].append(pair)
    return grouped


def pnr(groups: dict[str, list[Pair]]) -> float:
    concordant = discordant = ties = 0
    for pairs in groups.values():
        if len(pairs) < 2:
            continue
        labels = np.array([p.label for p in pairs])
        scores = np.array([p.score for p in pairs])
        ordered = labels[:, None] > labels[None, :]
        concordant += int((ordered & (scores[:, None] > scores[None, :])).sum())
        discordant += int((ordered & (scores[:, None] < scores[None, :])).sum())
        ties += int((ordered & (scores[:, None] == scores[None, :])).sum())
    return (concordant + ties / 2) / (discordant + ties / 2) if discordant + ties else math.inf


def ranked_labels(pairs: list[Pair]) -> list[int]:
    """Labels in descending score order; equal scores keep file order."""
    return [p.label for p in sorted(pairs, key=lambda p: -p.score)]


def _dcg(labels: list[int], k: int) -> float:
    return sum((2 ** label - 1) / math.log2(rank + 1) for rank, label in enumerate(labels[:k], start=1))


def ndcg(groups: dict[str, list[Pair]], k: int) -> float:
    values = [(_dcg(ranked_labels(pairs), k) + 1e-6) / (_dcg(sorted((p.label for p in pairs), reverse=True), k) + 1e-6)
              for pairs in groups.values() if len({p.label for p in pairs}) > 1]
    return float(np.mean(values)) if values else math.nan


def mean_average_precision(groups: dict[str, list[Pair]]) -> float:
    averages = []
    for pairs in groups.values():
        labels = ranked_labels(pairs)
        hits = [rank for rank, label in enumerate(labels, start=1) if label == 2]
        if hits:
            averages.append(np.mean([found / rank for found, rank in enumerate(hits, start=1)]))
    return float(np.mean(averages)) if averages else math.nan


def ranking_metrics(pairs: list[Pair]) -> dict[str, float]:
    """PNR, NDCG@1/3/5/10 and MAP of scored pairs."""
    groups = by_query(pairs)
    metrics = {"PNR": pnr(groups)}
    metrics.update({f"NDCG@{k}": ndcg(groups, k) for k in NDCG_AT})
    metrics["MAP"] = mean_average_precision(groups)
    return metrics


def retrieval_metrics(query_vectors: np.ndarray, queries: list[str], cover_vectors: np.ndarray,
                      covers: list[str], relevant: dict[str, set[str]]) -> dict[str, float]:
    """R@1/5/10 and MR of text-to-cover retrieval over the whole cover pool (see the module docstring)."""
    asked = [i for i, q in enumerate(queries) if relevant.get(q)]
    if not asked:
        raise VsearchError("no query has a label-2 cover among the covers at hand: cannot compute R@k")
    top = np.argsort(-(query_vectors[asked] @ cover_vectors.T), axis=1)[:, :max(RECALL_AT)]
    hits = {k: np.mean([bool(relevant[queries[i]] & {covers[j] for j in row[:k]}) for i, row in zip(asked, top)])
            for k in RECALL_AT}
    metrics = {f"R@{k}": float(hits[k]) for k in RECALL_AT}
    metrics["MR"] = float(np.mean(list(metrics.values())))
    return metrics


def read_pairs(path: Path) -> list[Pair]:
    """Unscored pairs from a CBVS-20K file (`query \\t docid \\t url \\t label`); score is NaN."""
    if not path.is_file():
        raise VsearchError(f"CBVS-20K file not found: {path}")
    pairs = []
    with open(path, "rb") as handle:
        for number, line in text_lines(handle, str(path)):
            fields = line.split("\t")
            if len(fields) < 4 or fields[3].strip() not in {str(label) for label in LABELS}:
                if line.strip():
                    raise VsearchError(f"{path}:{number}: expected query\\tdocid\\turl\\tlabel (0, 1 or 2), "
                                       f"got {line[:80]!r}")
                continue
            pairs.append(Pair(fields[0].strip(), fields[1].strip(), int(fields[3]), math.nan))
    return pairs


def coverage_notes(scored: list[Pair], pairs: list[Pair], source: Path) -> list[str]:
    """What keeps metrics of `scored` from being comparable with the paper's, which are over every
    pair of CBVS-20K (`pairs`, read from `source`) with its labels: pairs left out or added, labels
    changed. Queries and docids are compared stripped, as `read_pairs` reads them (one of the
    released scores' queries ends in a no-break space that the CBVS-20K file lacks)."""
    labels = {(p.query, p.docid): p.label for p in pairs}
    given = {(p.query.strip(), p.docid.strip()): p.label for p in scored}
    left_out = len(labels.keys() - given.keys())
    added = len(given.keys() - labels.keys())
    relabelled = sum(labels[key] != label for key, label in given.items() if key in labels)
    notes = [f"the scores leave out {left_out:,} of the {len(labels):,} distinct pairs of {source}" if left_out else "",
             f"{counted(added, 'scored pair')} {'is' if added == 1 else 'are'} not in {source}" if added else "",
             f"{counted(relabelled, 'scored pair')} {'carries' if relabelled == 1 else 'carry'} another label than "
             f"{source} gives it (the metrics use the scores file's)" if relabelled else ""]
    notes = [note for note in notes if note]
    if notes:
        notes.append("the metrics are therefore not comparable with the paper's, which are over every pair of CBVS-20K")
    return notes


@dataclass
class ModelScores:
    pairs: list[Pair]  # the pairs whose cover image was read, scored
    retrieval: dict[str, float]
    missing_covers: int  # covers not found or not readable as an image


def score_with_model(encoder, pairs: list[Pair], images: Path,
                     on_covers: Callable[[int], None] = lambda n: None) -> ModelScores:
    """Score each pair by the cosine of its query and its cover (`<images>/<docid>.jpg`), and rank the
    whole pool of covers found for R@k. Covers are read and encoded as `vsearch embed` does (reader
    processes, GPU JPEG decoding, fp16 on CUDA); `on_covers(n)` as they are."""
    from vsearch.embeddings.datasets import Row
    from vsearch.embeddings.job import EmbedConfig, encode_media_shards, total_workers

    if not hasattr(encoder, "encode_pixels"):
        raise VsearchError(f"{encoder.spec} encodes text only, and CBVS-20K pairs are scored against the cover "
                           "image: use --model uniclip:PATH or open_clip:ARCH:PATH")
    docids = list(dict.fromkeys(p.docid for p in pairs))
    rows = [Row(docid, None, None, str(images / f"{docid}.jpg")) for docid in docids]
    config = EmbedConfig(workers=total_workers(None, 1))
    encoded = list(encode_media_shards(encoder, "cover", iter([(0, rows)]), config, on_covers))
    covers: list[str] = encoded[0].columns["id"] if encoded else []
    if not covers:
        raise VsearchError(f"none of the {len(docids):,} covers is in {images} (expected <docid>.jpg files)")
    missing = len(encoded[0].failed)
    cover_vectors = encoded[0].columns["vector"]
    queries = list(dict.fromkeys(p.query for p in pairs))
    query_vectors = np.concatenate([encoder.encode_texts(queries[s:s + 256]) for s in range(0, len(queries), 256)])
    cover_at = {docid: i for i, docid in enumerate(covers)}
    query_at = {query: i for i, query in enumerate(queries)}
    scored = [Pair(p.query, p.docid, p.label, float(query_vectors[query_at[p.query]] @ cover_vectors[cover_at[p.docid]]))
              for p in pairs if p.docid in cover_at]
    relevant: dict[str, set[str]] = defaultdict(set)
    for p in scored:
        if p.label == 2:
            relevant[p.query].add(p.docid)
    return ModelScores(scored, retrieval_metrics(query_vectors, queries, cover_vectors, covers, relevant), missing)


def write_scores(pairs: list[Pair], path: Path) -> None:
    write_text_atomic(path, "".join(f"{p.label}\t{p.query}\t{p.docid}\t{p.score}\n" for p in pairs))
