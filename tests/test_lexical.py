import math
import subprocess
import sys
import zlib

import numpy as np

from vsearch.embeddings import load_encoder
from vsearch.embeddings.encoders import l2_normalise
from vsearch.embeddings.lexical import NGRAM_WEIGHT, ngrams


def test_vectors_are_unit_norm_float32_of_the_requested_dim():
    encoder = load_encoder("lexical:256")
    vectors = encoder.encode_texts(["大宅门演员表", "Elden Ring 攻略"])
    assert vectors.shape == (2, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_normalisation_ignores_width_case_and_punctuation():
    encoder = load_encoder("lexical")
    a, b = encoder.encode_texts(["ＡＢＣ，大宅门！", "abc 大宅门"])
    np.testing.assert_allclose(a, b)


def test_ngrams_stay_inside_runs_of_letters_and_digits():
    assert set(ngrams("大宅 门")) == {"大", "宅", "门", "大宅"}


def test_exact_text_outranks_partial_overlap_and_unrelated():
    encoder = load_encoder("lexical")
    query = encoder.encode_texts(["大宅门演员表"])[0]
    covers = encoder.encode_texts(["大宅门 演员表", "大宅院 装修", "原神 攻略"])
    scores = covers @ query
    assert scores[0] > scores[1] > scores[2]


def test_text_without_letters_encodes_to_zero():
    assert not np.any(load_encoder("lexical").encode_texts(["!!! ？？"]))


def test_vectors_and_fingerprint_are_identical_in_a_fresh_process():
    # Python's str hash is salted per process; the encoder must not depend on it.
    code = "from vsearch.embeddings import load_encoder as l; e=l('lexical'); print(e.fingerprint, e.encode_texts(['大宅门'])[0].tobytes().hex())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    encoder = load_encoder("lexical")
    assert runs == {f"{encoder.fingerprint} {encoder.encode_texts(['大宅门'])[0].tobytes().hex()}\n"}


def test_vectors_follow_the_documented_formula_to_the_bit():
    # Shards and indexes made by one version are searched with queries encoded by the next (the
    # fingerprint stays): any change to the vectors must bump lexical.VERSION. The reference adds
    # each n-gram's signed weight one at a time, in n-gram order.
    texts = ["大宅门演员表", "大宅门 演员表 大宅门", "Elden Ring 艾尔登法环 攻略 2024", "ＡＢＣ，大宅门！", "!!!", "周杰伦" * 40]
    for dim in (512, 64):
        expected = np.zeros((len(texts), dim), np.float32)
        for row, text in enumerate(texts):
            for gram, tf in ngrams(text).items():
                code = zlib.crc32(gram.encode("utf-8"))
                sign = 1.0 if code & 0x80000000 else -1.0
                expected[row, code % dim] += sign * (1.0 + math.log(tf)) * NGRAM_WEIGHT[len(gram)]
        assert np.array_equal(load_encoder(f"lexical:{dim}").encode_texts(texts), l2_normalise(expected))
