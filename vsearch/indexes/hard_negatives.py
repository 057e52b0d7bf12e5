"""The `cbvs10m-HNSW` file that UniCLIP's trainer reads to mine hard negatives for its
OCR-semantic head: one line per distinct OCR text of the dataset,
`ocr_text \\t neighbour_1 \\t ... \\t neighbour_10`, the 10 nearest other OCR texts found with an
HNSW index over their text vectors.

Everything streams: texts are read, deduplicated, encoded and added to the graph in batches, and
the neighbours are written batch by batch, so 10 million lines need memory for the graph and the
distinct texts only (and, until the file is written, 1 KB of disk per text for their vectors).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from vsearch.embeddings.datasets import Dataset
from vsearch.embeddings.encoders import Encoder
from vsearch.errors import VsearchError
from vsearch.files import fsync_file

NEIGHBOURS = 10


def distinct_ocr_texts(dataset: Dataset) -> Iterator[str]:
    """Each distinct OCR text once, in file order; `\\N`, empty and malformed lines are skipped."""
    seen: set[str] = set()
    for row in dataset.rows():
        if row.ocr and row.ocr not in seen:
            seen.add(row.ocr)
            yield row.ocr


def read_as_trained(encoder: Encoder) -> Encoder:
    """`encoder`, set to read OCR texts as UniCLIP's semantic head did in training (20 tokens, not a
    query's 12); encoders without a context length are returned as they are."""
    if hasattr(encoder, "context_length"):
        from vsearch.embeddings.uniclip import SEMANTIC_CONTEXT

        encoder.context_length = SEMANTIC_CONTEXT
    return encoder


def write_hard_negatives(dataset: Dataset, encoder: Encoder, out: Path, batch: int = 2048,
                         on_rows: Callable[[int], None] = lambda n: None) -> int:
    """Write the file for `dataset` to `out` (via a temporary file); returns the number of lines."""
    import hnswlib

    if not dataset.has_text:
        raise VsearchError(f"dataset {dataset.name} has no OCR texts (format {dataset.format})")
    index = hnswlib.Index(space="ip", dim=encoder.dim)
    index.init_index(max_elements=1 << 16, M=32, ef_construction=200)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    # The vectors again, for the queries: hnswlib hands them back only as Python lists (get_items,
    # about 23 µs a vector: 4 minutes at 10M), a float16 file beside the output in a few seconds.
    spilled = out.with_name(out.name + ".vectors.tmp")
    texts: list[str] = []
    try:
        with open(spilled, "wb") as vectors_out:
            stream = distinct_ocr_texts(dataset)
            while chunk := list(islice(stream, batch)):
                if len(texts) + len(chunk) > index.get_max_elements():
                    index.resize_index(2 * index.get_max_elements())
                vectors = encoder.encode_texts(chunk)
                index.add_items(vectors, np.arange(len(texts), len(texts) + len(chunk)))
                vectors_out.write(vectors.astype(np.float16).tobytes())
                texts += chunk
                on_rows(len(chunk))
        if len(texts) < 2:
            raise VsearchError(f"dataset {dataset.name} has {len(texts)} distinct OCR text(s): need at least 2")
        index.set_ef(200)
        queries = np.memmap(spilled, np.float16, mode="r", shape=(len(texts), encoder.dim))
        with open(temporary, "w", encoding="utf-8") as handle:
            for start in range(0, len(texts), batch):
                found, _ = index.knn_query(np.asarray(queries[start:start + batch], np.float32),
                                           k=min(NEIGHBOURS + 1, len(texts)))
                for label, row in enumerate(found, start):
                    others = [texts[j] for j in row if j != label][:NEIGHBOURS]
                    handle.write("\t".join([texts[label], *others]) + "\n")
        fsync_file(temporary)
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        spilled.unlink(missing_ok=True)
    return len(texts)
