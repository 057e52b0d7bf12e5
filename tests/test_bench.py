import json

import numpy as np
import pytest

from vsearch.indexes.bench import BenchConfig, clip_like, run_bench


def test_synthetic_vectors_are_unit_norm_clustered_and_reproducible():
    first = next(clip_like(2000, 64, seed=3))
    again = next(clip_like(2000, 64, seed=3))
    assert first.dtype == np.float32 and (first == again).all() and abs(float((first ** 2).sum(axis=1).mean()) - 1) < 1e-5
    # clustered: the nearest neighbour is much closer than a random vector
    similarity = first[:100] @ first.T
    similarity[range(100), range(100)] = -1
    assert similarity.max(axis=1).mean() > similarity.mean() + 0.3


def test_bench_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    config = BenchConfig(sizes=[3000], dim=32, queries=60, latency_queries=10, out=tmp_path / "ann")
    written = run_bench(config, tmp_path / "scratch", say=lambda line: None)
    results = json.loads(written["json"].read_text())["results"]
    assert [(r["type"], r["engine"]) for r in results] == [
        ("flat", "faiss"), ("hnsw", "hnswlib"), ("hnsw", "faiss"), ("ivfpq", "faiss")]
    flat = results[0]["at_chosen"]
    assert flat["recall@1"] == flat["recall@10"] == flat["recall@100"] == 1.0
    for result in results:
        assert result["at_chosen"]["recall@10"] >= 0.9 and result["build_peak_bytes"] > 0
        assert result["overhead"]["batch"] > 0 and result["sweep"]
    assert "| 3,000 | hnsw (hnswlib) |" in written["markdown"].read_text()
    assert written["plot"].read_bytes()[:4] == b"\x89PNG"
