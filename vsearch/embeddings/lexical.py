"""The `lexical` encoder: hashed character n-grams, so the pipeline runs with no weights.

A text is NFKC-normalised and lower-cased, split into runs of letters and digits, and each
run contributes its character 1-, 2- and 3-grams (every CJK character counts as a letter,
so Chinese needs no word segmentation). Each distinct n-gram adds a signed weight
`(1 + log tf) * NGRAM_WEIGHT[n]` at bucket `crc32(ngram) % dim`; the random sign keeps
inner products unbiased under hash collisions. Single characters weigh least because they
are shared by unrelated texts; longer n-grams carry the phrase. The vector is L2-normalised.

A cover is encoded from its title and OCR text together; a query from its own text, so
query-cover cosine measures how much of the query's wording appears on the cover.
A text with no letters or digits encodes to the zero vector, which callers reject.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from vsearch.embeddings.encoders import l2_normalise

NGRAM_WEIGHT = {1: 0.35, 2: 1.0, 3: 1.2}
VERSION = 1
_RUN = re.compile(r"[^\W_]+")


def ngrams(text: str) -> Counter[str]:
    """Character n-grams (n = 1..3) of the text's runs of letters and digits."""
    return Counter(run[i : i + n] for run in _RUN.findall(unicodedata.normalize("NFKC", text).lower())
                   for n in NGRAM_WEIGHT for i in range(len(run) - n + 1))


class LexicalEncoder:
    def __init__(self, dim: int = 512):
        self.dim = dim
        self.spec = "lexical" if dim == 512 else f"lexical:{dim}"
        config = f"lexical-v{VERSION}:dim={dim}:weights={sorted(NGRAM_WEIGHT.items())}"
        self.fingerprint = hashlib.sha256(config.encode()).hexdigest()[:16]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[int] = []
        buckets: list[int] = []
        weights: list[float] = []
        slots: dict[str, tuple[int, float]] = {}  # n-gram -> (bucket, signed weight): texts share many
        for row, text in enumerate(texts):
            counts = ngrams(text)
            rows += [row] * len(counts)
            for gram, tf in counts.items():
                slot = slots.get(gram)
                if slot is None:
                    code = zlib.crc32(gram.encode("utf-8"))
                    sign = 1.0 if code & 0x80000000 else -1.0
                    slot = slots[gram] = (code % self.dim, sign * NGRAM_WEIGHT[len(gram)])
                buckets.append(slot[0])
                weights.append(slot[1] if tf == 1 else slot[1] * (1.0 + math.log(tf)))  # log 1 = 0: the same
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        # One call for the batch (indexing numpy per n-gram cost a sixth of the encoding), adding in
        # n-gram order as that did, so colliding n-grams sum to the same float32 vector.
        np.add.at(vectors, (rows, buckets), np.asarray(weights, np.float32))
        return l2_normalise(vectors)
