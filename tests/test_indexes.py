import json

import faiss
import hnswlib
import numpy as np
import pytest

from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.embeddings.shards import Manifest, read_vectors
from vsearch.errors import VsearchError
from vsearch.indexes import BuildConfig, build_index, load_index
from tests.conftest import write_cbvs_covers


@pytest.fixture
def embedded(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 300)
    return run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=128), workspace).directory


def all_vectors(directory):
    pairs = [pair for f in Manifest.read(directory).shard_files(directory) for pair in read_vectors(f)]
    ids = [i for batch, _ in pairs for i in batch]
    return ids, np.concatenate([v for _, v in pairs]).astype(np.float32)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_search_returns_the_exact_neighbours_with_string_ids(index_type, embedded, tmp_path):
    info = build_index(BuildConfig(type=index_type), embedded, tmp_path / "index")
    assert info["count"] == 300 and info["dim"] == 512 and info["encoder"]["spec"] == "lexical"
    index = load_index(tmp_path / "index")
    ids, vectors = all_vectors(embedded)
    queries = vectors[:20]
    scores, found = index.search(queries, 5)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    assert found.shape == (20, 5) and isinstance(found[0, 0], str)
    assert [list(row) for row in found] == [[ids[j] for j in row] for row in exact]
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, exact, axis=1), atol=1e-4)


def test_index_files_load_with_the_plain_libraries(embedded, tmp_path):
    build_index(BuildConfig(type="flat"), embedded, tmp_path / "flat")
    build_index(BuildConfig(type="hnsw"), embedded, tmp_path / "hnsw")
    assert faiss.read_index(str(tmp_path / "flat" / "index.faiss")).ntotal == 300
    plain = hnswlib.Index(space="ip", dim=512)
    plain.load_index(str(tmp_path / "hnsw" / "index.hnsw"))
    assert plain.get_current_count() == 300
    manifest = json.loads((tmp_path / "hnsw" / "index.json").read_text())
    assert manifest["params"] == {"M": 32, "ef_construction": 200, "ef_search": 128}
    assert [s["name"] for s in manifest["shards"]] == ["cover-00000.parquet", "cover-00001.parquet", "cover-00002.parquet"]


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_k_larger_than_the_index_pads_with_none(index_type, tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "small.txt", 3)
    directory = run_embed(EmbedConfig(model="lexical", dataset=str(source)), workspace).directory
    build_index(BuildConfig(type=index_type), directory, tmp_path / "index")
    scores, ids = load_index(tmp_path / "index").search(all_vectors(directory)[1][:1], 5)
    assert list(ids[0][3:]) == [None, None] and all(ids[0][:3])
    assert np.isneginf(scores[0][3:]).all()


def test_query_dimension_mismatch_is_a_clear_error(embedded, tmp_path):
    build_index(BuildConfig(type="flat"), embedded, tmp_path / "index")
    with pytest.raises(VsearchError, match="dim 256.*dim 512"):
        load_index(tmp_path / "index").search(np.ones((1, 256), np.float32), 3)


def test_a_failed_build_leaves_the_previous_index_untouched(embedded, tmp_path):
    build_index(BuildConfig(type="hnsw"), embedded, tmp_path / "index")
    before = (tmp_path / "index" / "index.json").read_text()
    (embedded / "cover-00001.parquet").unlink()
    with pytest.raises(VsearchError, match="cover-00001.parquet is listed in the manifest but missing"):
        build_index(BuildConfig(type="hnsw"), embedded, tmp_path / "index")
    assert (tmp_path / "index" / "index.json").read_text() == before
    assert load_index(tmp_path / "index").search(np.eye(1, 512, dtype=np.float32), 1)[1][0][0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unknown_index_type_and_parameter_are_clear_errors(embedded, tmp_path):
    with pytest.raises(VsearchError, match="unknown index type 'ivf'"):
        build_index(BuildConfig(type="ivf"), embedded, tmp_path / "index")
    with pytest.raises(VsearchError, match="unknown parameter efs for hnsw"):
        build_index(BuildConfig(type="hnsw", params={"efs": 5}), embedded, tmp_path / "index")


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(VsearchError, match="no index at"):
        load_index(tmp_path / "nothing")


def test_build_refuses_to_replace_a_folder_that_is_not_an_index(embedded, tmp_path):
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(VsearchError, match="refusing to replace .*documents"):
        build_index(BuildConfig(type="flat"), embedded, precious)
    assert (precious / "thesis.txt").read_text() == "years of work"
