import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import faiss
import hnswlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vsearch.embeddings.datasets import url_id
from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.errors import VsearchError
from vsearch.indexes import BuildConfig, append_index, build_index, delete_ids, load_index
from vsearch.indexes.backends import COARSE_EF_CONSTRUCTION, HnswlibBackend
from vsearch.indexes.hugepages import huge_page_bytes
from vsearch.indexes.index import read_index_manifest
from vsearch.indexes.rows import Rows
from vsearch.indexes.tuning import exact_neighbours, gather, recall_at
from vsearch.indexes.vectors import open_source
from tests.conftest import can_collapse, disk_with_free, needs_huge_pages, write_cbvs_covers

TYPES = [("flat", None), ("hnsw", None), ("hnsw", "faiss"), ("ivfpq", None)]


def clustered(count: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors with low intrinsic dimension and clusters, as CLIP embeddings have."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((count, 12)) + 2 * rng.standard_normal((16, 12))[rng.integers(0, 16, count)]
    vectors = latent @ rng.standard_normal((12, dim)) + 0.2 * rng.standard_normal((count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_parquet(folder, vectors, start=0, name="part-0.parquet", column="embedding", dtype=np.float32):
    folder.mkdir(exist_ok=True)
    ids = [f"doc{i}" for i in range(start, start + len(vectors))]
    data = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(dtype).ravel()), vectors.shape[1])
    pq.write_table(pa.table({"id": ids, column: data, "caption": ["x"] * len(ids)}), folder / name)
    return folder


@pytest.fixture
def byo(tmp_path):
    vectors = clustered(3000)
    write_parquet(tmp_path / "byo", vectors[:1500], 0, "part-0.parquet")
    write_parquet(tmp_path / "byo", vectors[1500:], 1500, "part-1.parquet")
    return tmp_path / "byo", vectors


@pytest.fixture
def embedded(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 300)
    return run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=128), workspace).directory


def exact(vectors, queries, k):
    return np.argsort(-(queries @ vectors.T), axis=1)[:, :k]


def test_exact_search_and_sampling_read_files_in_parallel_and_count_positions_across_them(tmp_path):
    vectors = clustered(2500)
    for number, start in enumerate(range(0, 2500, 700)):  # four files, the last one shorter
        write_parquet(tmp_path / "parts", vectors[start:start + 700], start, f"part-{number}.parquet")
    source = open_source(tmp_path / "parts")
    gone = {5, 701, 1402, 2499}  # deleted ids shift the positions of every later row
    source = replace(source, excluded=frozenset(f"doc{i}" for i in gone))
    kept = np.array([i for i in range(2500) if i not in gone])
    queries = clustered(40, seed=1)
    scores, positions = exact_neighbours(source, queries, 25)
    np.testing.assert_array_equal(kept[positions], kept[exact(vectors[kept], queries, 25)])
    np.testing.assert_allclose(scores, np.sort(queries @ vectors[kept].T, axis=1)[:, ::-1][:, :25], atol=1e-3)
    assert (source.count, source.excluded_rows) == (2496, 4)
    sample = np.array([0, 4, 5, 699, 700, 1399, 2300, 2495])  # none in the third file
    np.testing.assert_allclose(gather(source, sample), vectors[kept[sample]], atol=1e-3)
    assert gather(source, np.array([], np.int64)).shape == (0, 64)


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_every_type_builds_from_bring_your_own_parquet_and_finds_neighbours(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    info = build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), tmp_path / "index")
    assert info["count"] == 3000 and info["dim"] == 64 and info["encoder"] is None
    assert info["recall"]["recall@10"] >= 0.95 and info["recall"]["method"] == "held-out"
    assert info["recall"]["queries"] == 300  # a tenth of the rows at most, up to 500
    index = load_index(tmp_path / "index")
    scores, ids = index.search(vectors[:50], 10)
    truth = exact(vectors, vectors[:50], 10)
    found = np.mean([len({int(i[3:]) for i in row} & set(t)) / 10 for row, t in zip(ids, truth)])
    assert found >= 0.95
    assert ids[0, 0] == "doc0" and abs(scores[0, 0] - 1.0) < 1e-3


def write_clip_retrieval(folder, vectors, partitions=2, text=None):
    """`folder` as clip-retrieval's inference writes it from a folder of images: float16 unit
    vectors in img_emb/img_emb_N.npy (and `text`'s in text_emb/), row for row with
    metadata/metadata_N.parquet (image_path, caption)."""
    for sub in ("img_emb", "metadata") + (("text_emb",) if text is not None else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for number, rows in enumerate(np.array_split(np.arange(len(vectors)), partitions)):
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", vectors[rows].astype(np.float16))
        if text is not None:
            np.save(folder / "text_emb" / f"text_emb_{number}.npy", text[rows].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"/images/{i:05d}.jpg" for i in rows],
                                 "caption": [f"caption {i}" for i in rows]}),
                       folder / "metadata" / f"metadata_{number}.parquet")
    return folder


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_clip_retrieval_output_is_indexed_as_it_lies(index_type, tmp_path):
    vectors, text = clustered(3000), clustered(3000, seed=5)
    folder = write_clip_retrieval(tmp_path / "clip-retrieval", vectors, partitions=3, text=text)
    source = open_source(folder)
    assert (source.id_column, source.vector_column, source.dim, len(source.files)) == ("image_path", "img_emb", 64, 3)
    info = build_index(BuildConfig(type=index_type), source, tmp_path / "index")
    assert info["count"] == 3000 and info["recall"]["recall@10"] >= 0.95
    assert [s["name"] for s in info["shards"]] == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    index = load_index(tmp_path / "index")
    _, ids = index.search(vectors[[0, 2999]], 1)
    assert ids.tolist() == [["/images/00000.jpg"], ["/images/02999.jpg"]]
    label = list(index.ids).index("/images/01234.jpg")
    assert index.rows.take(np.array([label])).to_pylist()[0]["caption"] == "caption 1234"
    texts = open_source(folder, id_column="caption", vector_column="text_emb")
    build_index(BuildConfig(type="flat"), texts, tmp_path / "texts")
    assert load_index(tmp_path / "texts").search(text[[7]], 1)[1].tolist() == [["caption 7"]]


def test_clip_retrieval_output_that_does_not_line_up_is_a_clear_error(tmp_path):
    folder = write_clip_retrieval(tmp_path / "out", clustered(100))

    def error(**columns):
        with pytest.raises(VsearchError) as raised:
            open_source(folder, **columns)
        return str(raised.value)

    assert error(vector_column="text_emb") == f"{folder} has no text_emb/ folder of .npy vectors (it has img_emb/)"
    assert error(id_column="key") == (f"{folder / 'metadata' / 'metadata_0.parquet'} has no id column 'key': its "
                                      "columns are image_path, caption; pass --id-column")
    pq.write_table(pa.table({"caption": ["x"] * 50}), folder / "metadata" / "metadata_0.parquet")
    assert error() == (f"{folder / 'metadata' / 'metadata_0.parquet'} has no id column id, key or image_path: its "
                       "columns are caption; pass --id-column")
    write_clip_retrieval(folder, clustered(100))
    np.save(folder / "img_emb" / "img_emb_1.npy", clustered(49))
    assert error() == (f"{folder / 'img_emb' / 'img_emb_1.npy'} holds 49 vectors but "
                       f"{folder / 'metadata' / 'metadata_1.parquet'} 50 rows: they must match row for row")
    np.save(folder / "img_emb" / "img_emb_1.npy", clustered(50, dim=32))
    assert error() == f"{folder / 'img_emb' / 'img_emb_1.npy'} holds 32-d vectors, not 64-d like img_emb_0.npy"
    np.save(folder / "img_emb" / "img_emb_1.npy", np.arange(50))
    assert error() == (f"{folder / 'img_emb' / 'img_emb_1.npy'} holds a int64 array of shape (50,), not a matrix "
                       "of float vectors, one a row")
    (folder / "img_emb" / "img_emb_1.npy").unlink()
    assert error() == (f"{folder / 'metadata' / 'metadata_1.parquet'} has no vectors file of the same number in "
                       f"{folder / 'img_emb'}: each .npy needs its .parquet, row for row")


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_every_type_builds_from_demo_style_shards(index_type, engine, embedded, tmp_path):
    build_index(BuildConfig(type=index_type, engine=engine), open_source(embedded), tmp_path / "index")
    scores, ids = load_index(tmp_path / "index").search(np.eye(1, 512, dtype=np.float32), 5)
    assert all(isinstance(i, str) for i in ids[0])


def test_index_files_load_with_the_plain_libraries(byo, tmp_path):
    source = open_source(byo[0])
    for index_type, engine in TYPES:
        build_index(BuildConfig(type=index_type, engine=engine), source, tmp_path / f"{index_type}-{engine}")
    assert faiss.read_index(str(tmp_path / "flat-None" / "index.faiss")).ntotal == 3000
    assert faiss.read_index(str(tmp_path / "ivfpq-None" / "index.faiss")).ntotal == 3000
    assert faiss.read_index(str(tmp_path / "hnsw-faiss" / "index.faiss")).ntotal == 3000
    plain = hnswlib.Index(space="ip", dim=64)
    plain.load_index(str(tmp_path / "hnsw-None" / "index.hnsw"))
    assert plain.get_current_count() == 3000


@pytest.mark.skipif(not hasattr(faiss, "IO_FLAG_MMAP_IFC"), reason="faiss < 1.10 cannot map flat codes")
@pytest.mark.parametrize("engine", ["flat", "hnsw"])
def test_faiss_vectors_are_memory_mapped_not_read(engine, byo, tmp_path):
    build_index(BuildConfig(type=engine, engine="faiss"), open_source(byo[0]), tmp_path / "index")
    index = load_index(tmp_path / "index")
    flat = index.backend.index if engine == "flat" else faiss.downcast_index(index.backend.index.storage)
    assert not flat.codes.is_owned  # a view of the mapped file
    scores, ids = index.search(byo[1][:2], 1)
    assert ids[:, 0].tolist() == ["doc0", "doc1"] and np.allclose(scores[:, 0], 1, atol=1e-5)


@needs_huge_pages
def test_an_hnswlib_graph_asks_for_huge_pages_before_its_rows_are_written(tmp_path):
    # In a process of its own, as a build runs: in this one, after other tests have freed more than
    # the graph takes, malloc may place the graph in memory the process holds already (no new mapping).
    script = f"""
import numpy as np
from pathlib import Path
from vsearch.indexes.backends import HnswlibBackend
from tests.conftest import huge_page_advised_bytes

before = huge_page_advised_bytes()
backend = HnswlibBackend.create(Path({str(tmp_path)!r}), 512, 20_000, {{"M": 32, "ef_construction": 40}})
created = huge_page_advised_bytes() - before
backend.add(np.ones((10, 512), np.float32), np.arange(10))
backend.prepare(Path({str(tmp_path)!r}), 30_000)  # an append's resize replaces the allocation
print(created, huge_page_advised_bytes() - before, len(backend))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    created, resized, count = map(int, done.stdout.split())
    assert created >= 20_000 * 512 * 4  # its vectors alone; links add more
    assert resized >= 30_010 * 512 * 4 and count == 10  # the new allocation asks too


@needs_huge_pages
@can_collapse
def test_a_loaded_hnswlib_graph_moves_onto_huge_pages_and_finds_the_same(tmp_path):
    # Past glibc's largest mmap threshold (32 MiB), so that the graph is a mapping of its own
    vectors = np.random.default_rng(0).standard_normal((20_000, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = HnswlibBackend.create(tmp_path, 512, len(vectors), {"M": 8, "ef_construction": 16})
    built.add(vectors, np.arange(len(vectors)))
    built.save(tmp_path)
    del built
    before = huge_page_bytes()
    loaded = HnswlibBackend.load(tmp_path, 512, {"ef_search": 32})
    found = loaded.search(vectors[:50], 5)  # while the pages move: searches need not wait
    loaded.settle()
    assert huge_page_bytes() - before >= 32 << 20  # most of the 42 MB graph
    assert np.array_equal(loaded.search(vectors[:50], 5)[1], found[1])


def test_ivfpq_keeps_float16_vectors_on_disk_and_its_index_small(byo, tmp_path):
    folder, _ = byo
    build_index(BuildConfig(type="ivfpq"), open_source(folder), tmp_path / "ivfpq")
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "flat")
    on_disk = np.load(tmp_path / "ivfpq" / "vectors-00000.npy", mmap_mode="r")
    assert on_disk.dtype == np.float16 and on_disk.shape == (3000, 64)
    ivf_size = (tmp_path / "ivfpq" / "index.faiss").stat().st_size
    assert ivf_size * 8 <= (tmp_path / "flat" / "index.faiss").stat().st_size
    index = load_index(tmp_path / "ivfpq")
    assert all(isinstance(s, np.memmap) for s in index.backend.segments)


def test_ivfpq_takes_the_disk_space_of_its_vectors_before_writing_them(tmp_path):
    # With the blocks taken first, a full disk stops the build as it starts, not hours into it.
    from vsearch.indexes.backends import IvfPqBackend

    backend = IvfPqBackend.create(tmp_path, 64, 50_000, {**IvfPqBackend.build_params, "m": 8, "nlist": 16})
    backend.prepare(tmp_path, 50_000)
    kept = (tmp_path / "vectors-00000.npy").stat()
    assert kept.st_size >= 50_000 * 64 * 2 and kept.st_blocks * 512 >= kept.st_size


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file every write to fails as a full disk's")
@pytest.mark.parametrize("count", [10, 5000], ids=["within-stdio-buffer", "past-it"])
def test_a_faiss_index_the_disk_cannot_take_is_an_error_naming_its_file(count, tmp_path):
    from vsearch.indexes.backends import FlatBackend

    backend = FlatBackend.create(tmp_path, 64, count, {})
    backend.add(clustered(count), np.arange(count))
    path = tmp_path / FlatBackend.file_name
    path.symlink_to("/dev/full")  # every write fails, as on a full disk
    with pytest.raises(OSError) as raised:
        backend.save(tmp_path)
    assert (raised.value.strerror, raised.value.filename) == ("No space left on device", str(path))


@pytest.mark.slow
def test_ivfpq_with_an_opq_rotation_reaches_the_target_recall(tmp_path):
    write_parquet(tmp_path / "byo", clustered(12000, dim=128))
    info = build_index(BuildConfig(type="ivfpq"), open_source(tmp_path / "byo"), tmp_path / "ivfpq")
    assert info["params"]["opq"] == 1 and info["params"]["nbits"] == 8
    assert info["recall"]["recall@10"] >= 0.95


@pytest.mark.parametrize("index_type, engine", [("flat", None), ("hnsw", None)])
def test_recall_counts_any_of_the_vectors_tied_at_the_kth_score(index_type, engine, tmp_path):
    # Every cover repeated 15 times, as reposted covers are: any 10 of a tied group are right answers.
    write_parquet(tmp_path / "byo", np.repeat(clustered(200), 15, axis=0))
    info = build_index(BuildConfig(type=index_type, engine=engine), open_source(tmp_path / "byo"), tmp_path / "index")
    assert info["recall"]["recall@10"] >= (1.0 if index_type == "flat" else 0.95)
    if index_type == "hnsw":  # the target is reached, so the tuning stops well short of the largest ef
        assert info["params"]["ef_search"] < 1024


def test_recall_at_counts_ties_but_not_lower_scores_or_padding():
    exact = (np.array([[0.9, 0.8, 0.8]]), np.array([[1, 2, 3]]))
    assert recall_at(3, (np.array([[0.9, 0.8, 0.8]]), np.array([[1, 3, 7]])), exact) == 1.0  # 7 ties 2 and 3
    assert recall_at(3, (np.array([[0.9, 0.8, 0.7]]), np.array([[1, 2, 7]])), exact) == pytest.approx(2 / 3)
    assert recall_at(3, (np.array([[0.9, -np.inf, -np.inf]]), np.array([[1, -1, -1]])), exact) == pytest.approx(1 / 3)
    nothing = (np.zeros((1, 0)), np.zeros((1, 0), np.int64))  # an index of one vector, its own row left out
    assert recall_at(3, nothing, nothing) == 1.0
    found = ([[0.9, 0.8, 0.7], []], [[1, 2, 7], []])  # the second row had nothing to find: it does not count
    assert recall_at(3, found, ([[0.9, 0.8, 0.8], []], [[1, 2, 3], []])) == pytest.approx(2 / 3)
    assert recall_at(1, (np.array([[0.8]]), np.array([[2]])), exact) == 0.0


def test_parameters_are_chosen_with_reasons_and_user_settings_win(byo, tmp_path):
    notes = []
    info = build_index(BuildConfig(type="hnsw", params={"M": 12}, target_recall=0.99), open_source(byo[0]),
                       tmp_path / "index", note=notes.append)
    assert info["params"]["M"] == 12 and info["params"]["ef_construction"] == 400
    assert "M=12: set by you" in notes and any(n.startswith("recall@10 ") for n in notes)
    sweep = info["recall"]["sweep"]
    assert sweep == sorted(sweep, key=lambda s: s["ef_search"])  # cheapest first
    reached = [s for s in sweep if s["recall@10"] >= 0.99] or [max(sweep, key=lambda s: s["recall@10"])]
    assert reached[0]["ef_search"] == info["params"]["ef_search"]


def test_search_tuning_bisects_between_the_doublings_to_the_cheapest_setting():
    from vsearch.indexes.tuning import tune_search

    class Graph:  # finds every neighbour of the first ef/7 of 100 queries, none of the rest's
        def set_search(self, setting):
            self.ef = setting["ef_search"]

        def search(self, queries, k):
            right = np.arange(len(queries))[:, None] < self.ef * len(queries) // 700
            labels = np.where(right, np.arange(k)[None, :], np.arange(k)[None, :] + 100)
            return np.where(right, 1.0 - np.arange(k)[None, :] / 100, 0.0), labels

    truth = (np.tile(1.0 - np.arange(11) / 100, (100, 1)), np.tile(np.arange(11), (100, 1)))
    graph = Graph()
    chosen, sweep = tune_search("hnsw", graph, {}, np.zeros((100, 4)), np.full(100, -1), truth, 0.95)
    assert [s["ef_search"] for s in sweep] == [16, 32, 64, 128, 256, 512, 640, 704, 768, 1024]
    assert chosen == {"ef_search": 704} and graph.ef == 704  # 665 reaches 0.95: 704 is within an eighth of 640


def test_a_recall_below_the_target_is_said_with_what_to_raise(byo, tmp_path):
    notes = []
    params = {"m": 2, "nprobe": 1, "k_factor": 1}  # 2 bytes a vector, no refinement to speak of
    info = build_index(BuildConfig(type="ivfpq", params=params), open_source(byo[0]), tmp_path / "index",
                       note=notes.append)
    assert info["recall"]["recall@10"] < 0.95
    assert "that is below the target recall@10 0.95: --param m=8 (more bytes per vector) or --param k_factor=2" \
        in "\n".join(notes)


def test_ivfpq_codes_about_8_dims_a_byte_whatever_the_dimension():
    from vsearch.indexes.backends import IvfPqBackend
    from vsearch.indexes.tuning import choose_build_params

    def m(dim):
        return choose_build_params("ivfpq", IvfPqBackend.build_params, 100_000, dim, {}, None, 0.95).params["m"]

    assert [m(dim) for dim in (512, 768, 3072, 4096, 64)] == [64, 96, 256, 256, 8]  # the usual code sizes
    assert [m(dim) for dim in (1000, 600, 200, 100, 97, 8)] == [125, 75, 25, 10, 97, 1]  # any divisor


def test_ivfpq_builds_on_a_dimension_no_usual_code_size_divides(tmp_path):
    vectors = clustered(2000, dim=100)
    info = build_index(BuildConfig(type="ivfpq"), open_source(write_parquet(tmp_path / "byo", vectors)),
                       tmp_path / "index")
    assert 100 % info["params"]["m"] == 0
    _, ids = load_index(tmp_path / "index").search(vectors[:20], 1)
    assert (ids[:, 0] == [f"doc{i}" for i in range(20)]).mean() >= 0.9


@pytest.mark.parametrize("coarse_hnsw", [0, 1])
def test_ivfpq_asked_for_every_vector_ranks_every_one(coarse_hnsw, tmp_path):
    vectors = clustered(300)
    build_index(BuildConfig(type="ivfpq", params={"nprobe": 1, "coarse_hnsw": coarse_hnsw}),
                open_source(write_parquet(tmp_path / "byo", vectors)), tmp_path / "index")
    delete_ids(tmp_path / "index", [f"doc{i}" for i in range(0, 300, 3)])
    scores, ids = load_index(tmp_path / "index").search(vectors[:2], 200)  # the 200 left, wherever they are
    assert all(sorted(row) == sorted(f"doc{i}" for i in range(300) if i % 3) for row in ids)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_ivfpq_finds_its_lists_through_an_hnsw_graph_from_about_ten_million_vectors():
    from vsearch.indexes.backends import IvfPqBackend
    from vsearch.indexes.tuning import choose_build_params

    def chosen(count):
        return choose_build_params("ivfpq", IvfPqBackend.build_params, count, 512, {}, None, 0.95)

    ten, fewer = chosen(10_000_000), chosen(1_000_000)
    assert (ten.params["nlist"], ten.params["coarse_hnsw"]) == (16384, 1)
    assert "coarse_hnsw=1: the 16,384 lists found through an HNSW graph of their centroids, not a scan of them all" \
        in ten.reasons
    assert (fewer.params["nlist"], fewer.params["coarse_hnsw"]) == (4096, 0)
    assert "coarse_hnsw=0: the 4,096 lists' centroids scanned, few enough" in fewer.reasons
    assert IvfPqBackend.factory_string(512, ten.params) == "OPQ64_512,IVF16384_HNSW32,PQ64x8np"


def test_ivfpq_trains_on_the_39_vectors_per_list_faiss_asks_for_however_many_lists_there_are():
    from vsearch.indexes.backends import IvfPqBackend
    from vsearch.indexes.tuning import choose_build_params

    def chosen(count, **overrides):
        return choose_build_params("ivfpq", IvfPqBackend.build_params, count, 512, overrides, None, 0.95)

    assert chosen(10_000_000).params["train_size"] == 655_360  # 16,384 lists
    assert chosen(1_000_000).params["train_size"] == 163_840  # 4,096 lists
    yours = chosen(1_000_000, nlist=16384)  # what follows from nlist follows the user's nlist
    assert (yours.params["train_size"], yours.params["coarse_hnsw"]) == (655_360, 1)
    assert [r for r in yours.reasons if r.startswith("nlist=")] == ["nlist=16384: set by you"]
    assert chosen(1_000_000, nlist=16384, train_size=200_000).params["train_size"] == 200_000


def test_ivfpq_lists_found_through_an_hnsw_graph_serve_search_append_and_deletes(byo, tmp_path):
    folder, vectors = byo
    info = build_index(BuildConfig(type="ivfpq", params={"coarse_hnsw": 1}), open_source(folder), tmp_path / "index")
    assert info["recall"]["recall@10"] >= 0.95
    raw = faiss.read_index(str(tmp_path / "index" / "index.faiss"))  # plain FAISS reads the graph too
    graph = faiss.downcast_index(faiss.extract_index_ivf(raw).quantizer)
    assert isinstance(graph, faiss.IndexHNSWFlat) and graph.ntotal == info["params"]["nlist"]
    assert graph.hnsw.efConstruction == COARSE_EF_CONSTRUCTION  # not FAISS's 40, which sends vectors to far lists
    index = load_index(tmp_path / "index")
    index.set_search(nprobe=info["params"]["nlist"])  # every list: what a scan of the centroids would find
    _, ids = index.search(vectors[:50], 10)
    assert np.mean([len(set(row) & {f"doc{i}" for i in truth}) / 10
                    for row, truth in zip(ids, exact(vectors, vectors[:50], 10))]) >= 0.95
    write_parquet(tmp_path / "more", clustered(500, seed=3), 3000)
    append_index(tmp_path / "index", open_source(tmp_path / "more"))
    assert delete_ids(tmp_path / "index", ["doc3000", "doc0"]) == (2, [])
    index = load_index(tmp_path / "index")
    _, ids = index.search(clustered(500, seed=3)[:5], 3)  # the appended doc3000 to doc3004
    assert len(index) == 3498 and "doc3000" not in ids.ravel()
    assert list(ids[1:, 0]) == ["doc3001", "doc3002", "doc3003", "doc3004"]


def test_too_few_vectors_to_train_ivfpq_is_a_clear_error(tmp_path):
    folder = write_parquet(tmp_path / "byo", clustered(100))
    with pytest.raises(VsearchError, match=r"ivfpq cannot train on 100 vectors: Number of training points \(100\) "
                                           r"should be at least as large as number of clusters \(256\); lower"):
        build_index(BuildConfig(type="ivfpq", params={"nbits": 8}), open_source(folder), tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_a_memory_budget_too_small_is_a_clear_error(byo, tmp_path):
    with pytest.raises(VsearchError, match="over the memory budget.*ivfpq fits far more"):
        build_index(BuildConfig(type="hnsw", memory_budget=100_000), open_source(byo[0]), tmp_path / "index")


def test_an_index_past_the_machines_memory_is_refused_unless_a_budget_says_it_is_for_a_larger_one(byo, tmp_path,
                                                                                                  monkeypatch):
    import vsearch.indexes.tuning as tuning

    monkeypatch.setattr(tuning, "machine_memory", lambda: (1 << 20, 1 << 19))  # 3,000 graph nodes take 1.6 MiB
    with pytest.raises(VsearchError, match=r"hnsw with 3,000 x 64-d vectors needs about 1.6 MiB, more than this "
                                           r"machine's 1.0 MiB of memory; ivfpq fits far more vectors in the same "
                                           r"memory; to build it for a larger machine, give its --memory-budget$"):
        build_index(BuildConfig(type="hnsw"), open_source(byo[0]), tmp_path / "index")
    assert not (tmp_path / "index").exists()
    build_index(BuildConfig(type="hnsw", memory_budget=4 << 20), open_source(byo[0]), tmp_path / "index")
    write_parquet(byo[0], clustered(3000, seed=3), 3000, "part-2.parquet")
    monkeypatch.setattr(tuning, "machine_memory", lambda: (3 << 20, 1 << 21))  # 6,000 nodes take 3.3 MiB
    with pytest.raises(VsearchError, match=r"hnsw with 6,000 x 64-d vectors needs about 3.3 MiB, more than this "
                                           r"machine's 3.0 MiB .*; append on a machine with more memory$"):
        append_index(tmp_path / "index", open_source(byo[0]))
    assert len(load_index(tmp_path / "index")) == 3000
    notes = []
    monkeypatch.setattr(tuning, "machine_memory", lambda: (16 << 20, 1 << 19))
    build_index(BuildConfig(type="flat"), open_source(byo[0]), tmp_path / "flat", note=notes.append)
    assert "that is more than the 512.0 KiB of memory free now (of 16.0 MiB): it may slow down, or be stopped " \
           "for memory" in notes


def test_an_hnswlib_graph_larger_than_the_machines_memory_is_refused_before_it_is_read(byo, tmp_path, monkeypatch):
    import vsearch.indexes.backends as backends

    build_index(BuildConfig(type="hnsw"), open_source(byo[0]), tmp_path / "index")
    monkeypatch.setattr(backends, "machine_memory", lambda: (1 << 20, 1 << 20))
    with pytest.raises(VsearchError, match=r"index .*index takes about 1.5 MiB of memory once loaded \(hnswlib reads "
                                           r"its graph whole\), more than this machine's 1.0 MiB: search it on a "
                                           r"larger machine, or build an ivfpq index of its vectors"):
        load_index(tmp_path / "index")


def test_append_adds_new_files_without_a_rebuild(byo, tmp_path):
    folder, vectors = byo
    first = tmp_path / "first"
    write_parquet(first, vectors[:1500], 0, "part-0.parquet")
    for index_type, engine in TYPES:
        path = tmp_path / f"{index_type}-{engine}"
        build_index(BuildConfig(type=index_type, engine=engine), open_source(first), path)
        write_parquet(first, vectors[1500:], 1500, "part-1.parquet")
        info = append_index(path, open_source(first))
        (first / "part-1.parquet").unlink()
        assert info["count"] == 3000 and [a["files"] for a in info["appends"]] == [["part-1.parquet"]]
        _, ids = load_index(path).search(vectors[2500:2501], 1)
        assert ids[0, 0] == "doc2500", (index_type, engine)


def test_an_append_without_room_for_the_index_leaves_it_as_it_was(byo, tmp_path, monkeypatch):
    folder, vectors = byo
    first = tmp_path / "first"
    write_parquet(first, vectors[:1500], 0, "part-0.parquet")
    path = tmp_path / "index"
    build_index(BuildConfig(), open_source(first), path)
    write_parquet(first, vectors[1500:], 1500, "part-1.parquet")
    disk_with_free(monkeypatch, 2**20)
    # The graph of 3,000 vectors is written anew beside the old one.
    with pytest.raises(VsearchError, match=rf"^no room for the index {path}: it needs about 1.6 MiB, and {tmp_path} has "
                                           r"1.0 MiB free; free some space or write elsewhere$"):
        append_index(path, open_source(first))
    assert read_index_manifest(path)["count"] == 1500 and sorted(p.name for p in tmp_path.iterdir()) == [
        "byo", "first", "index"]


def test_an_index_moved_with_its_embeddings_appends_from_where_they_are_now(byo, tmp_path):
    folder, vectors = byo
    first = tmp_path / "first"
    first.mkdir()
    write_parquet(first / "vectors", vectors[:1500])
    build_index(BuildConfig(type="flat"), open_source(first / "vectors"), first / "index")
    shutil.copytree(first / "index", tmp_path / "serving")  # an index copied alone: its files stay where they were
    second = first.rename(tmp_path / "second")  # the index moved together with its embeddings
    info = read_index_manifest(second / "index")
    assert info["embeddings"] == str(second / "vectors")
    assert [entry["path"] for entry in info["shards"]] == [str(second / "vectors" / "part-0.parquet")]
    assert read_index_manifest(tmp_path / "serving")["embeddings"] == str(first / "vectors")
    write_parquet(second / "vectors", vectors[1500:], 1500, "part-1.parquet")
    appended = append_index(second / "index", open_source(second / "vectors"))
    assert appended["count"] == 3000 and appended["appends"][0]["files"] == ["part-1.parquet"]
    assert json.loads((second / "index" / "index.json").read_text())["folder"] == str(second / "index")


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_an_append_takes_up_a_file_whose_other_columns_alone_changed_in_place(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), tmp_path / "index")
    count = len(load_index(tmp_path / "index"))
    table = pq.read_table(folder / "part-1.parquet")
    retitled = table.set_column(2, "caption", pa.array(["retitled"] * len(table)))
    pq.write_table(retitled.take(np.random.default_rng(0).permutation(len(table))), folder / "part-1.parquet")
    info = append_index(tmp_path / "index", open_source(folder))
    assert (info["appends"][-1]["refreshed"], info["appends"][-1]["changed"], info["count"]) == (["part-1.parquet"], [], count)
    index = load_index(tmp_path / "index")
    assert len(index.deleted) == 0
    captions = dict(zip(index.rows.table().column("id").to_pylist(), index.rows.table().column("caption").to_pylist()))
    assert all(captions[f"doc{i}"] == ("retitled" if i >= 1500 else "x") for i in range(3000))
    assert index.search(vectors[2000:2001], 1)[1][0, 0] == "doc2000"
    # A file whose rows do not all show (doc1500 upserted by a later file) is added again, as appends
    # upsert a changed file's rows: taken up in place, it would show another vector than that.
    write_parquet(folder, clustered(1, seed=9), 1500, "part-2.parquet")
    append_index(tmp_path / "index", open_source(folder))
    pq.write_table(retitled.set_column(2, "caption", pa.array(["again"] * len(table))), folder / "part-1.parquet")
    upserted = append_index(tmp_path / "index", open_source(folder))["appends"][-1]
    assert (upserted["refreshed"], upserted["changed"]) == ([], ["part-1.parquet"])
    index = load_index(tmp_path / "index")
    live = np.setdiff1d(np.arange(index.rows.count), index.deleted)
    shown = dict(zip(index.ids[live], index.backend.vectors(live)))
    assert shown["doc1500"] @ vectors[1500] > 0.999 and len(shown) == 3000
    other = pq.read_table(folder / "part-0.parquet")  # the same ids, other vectors: added again
    pq.write_table(other.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(np.roll(vectors[:1500], 1, axis=0).ravel()), 64)), folder / "part-0.parquet")
    again = append_index(tmp_path / "index", open_source(folder))
    assert (again["appends"][-1]["refreshed"], again["appends"][-1]["changed"]) == ([], ["part-0.parquet"])


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_an_append_measures_recall_with_new_rows_it_holds_out_until_then(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    first = write_parquet(tmp_path / "first", vectors[:1500])
    path = tmp_path / "index"
    build_index(BuildConfig(type=index_type, engine=engine), open_source(first), path)
    delete_ids(path, ["doc7"])
    write_parquet(first, vectors[1500:2700], 1500, "part-1.parquet")
    info = append_index(path, open_source(first))
    assert info["recall"]["method"] == "held-out" and info["recall"]["queries"] == 270  # up to a tenth of 2700
    assert info["shards"][-1]["labels"] == [[1500, 2430], [2430, 2700]]  # the held-out rows went in last
    index = load_index(path)
    assert sorted(index.ids[1500:]) == sorted(f"doc{i}" for i in range(1500, 2700)) and len(index) == 2699
    # What it reports is what queries the index has not seen get: the rows kept out of it come out alike.
    fresh = vectors[2700:]
    live = np.flatnonzero(np.arange(2700) != 7)
    similarity = fresh @ vectors[live].T
    best = np.argsort(-similarity, axis=1)[:, :10]
    truth = np.take_along_axis(similarity, best, axis=1), live[best]
    scores, ids = index.search(fresh, 10)
    found = scores, np.array([[int(i[3:]) for i in row] for row in ids])
    assert abs(recall_at(10, found, truth) - info["recall"]["recall@10"]) < 0.03


def test_an_append_tunes_search_again_to_the_target_the_build_tuned_to(byo, tmp_path):
    folder, vectors = byo
    first = write_parquet(tmp_path / "first", vectors[:1500])
    built = build_index(BuildConfig(type="hnsw"), open_source(first), tmp_path / "tuned")
    fixed = build_index(BuildConfig(type="hnsw", params={"ef_search": 20}), open_source(first), tmp_path / "fixed")
    assert built["recall"]["target"] == 0.95 and fixed["recall"]["target"] is None
    write_parquet(first, vectors[1500:], 1500, "part-1.parquet")
    tuned = append_index(tmp_path / "tuned", open_source(first))
    chosen = next((s for s in tuned["recall"]["sweep"] if s["recall@10"] >= 0.95), None)
    assert chosen and tuned["params"]["ef_search"] == chosen["ef_search"] and tuned["recall"]["target"] == 0.95
    assert load_index(tmp_path / "tuned").backend.ef_search == chosen["ef_search"]
    kept = append_index(tmp_path / "fixed", open_source(first))
    assert kept["params"]["ef_search"] == 20 and not kept["recall"]["sweep"]
    write_parquet(first, clustered(50, seed=3), 5000, "part-2.parquet")  # too few new rows to tune on
    small = append_index(tmp_path / "tuned", open_source(first))
    assert small["recall"]["queries"] == 50 and not small["recall"]["sweep"]
    assert small["params"] == tuned["params"] and small["recall"]["target"] == 0.95


def test_an_append_short_of_the_target_says_what_to_rebuild_with(byo, tmp_path):
    folder, vectors = byo
    first = write_parquet(tmp_path / "first", vectors[:1500])
    # One thread each: hnswlib inserting on several builds another graph each time, and such a sparse
    # one now and then joins up well enough to reach the target after all.
    sparse = BuildConfig(type="hnsw", params={"M": 2, "ef_construction": 8}, target_recall=0.999, threads=1)
    build_index(sparse, open_source(first), tmp_path / "index")
    write_parquet(first, vectors[1500:], 1500, "part-1.parquet")
    notes = []
    info = append_index(tmp_path / "index", open_source(first), note=notes.append, threads=1)
    assert info["recall"]["recall@10"] < 0.999 and notes[-1] == (
        f"recall@10 {info['recall']['recall@10']} is below the target 0.999: a denser graph may reach it: "
        "--param M=4 --param ef_construction=16, in a rebuild (build-index without --append)")


def test_a_loaded_index_drops_ids_deleted_since_but_not_what_an_append_replaced(byo, tmp_path, monkeypatch):
    monkeypatch.setattr("vsearch.indexes.index.DELETES_CHECK_SECONDS", 0.0)
    folder, vectors = byo
    build_index(BuildConfig(type="hnsw"), open_source(folder), tmp_path / "index")
    serving = load_index(tmp_path / "index")
    assert serving.search(vectors[:1], 1)[1][0, 0] == "doc0"
    delete_ids(tmp_path / "index", ["doc0"])  # as `vsearch delete` from another process
    assert "doc0" not in serving.search(vectors[:1], 5)[1][0] and len(serving) == 2999
    write_parquet(folder, clustered(1, seed=5), 1, "part-2.parquet")  # doc1 again, elsewhere
    append_index(tmp_path / "index", open_source(folder))
    assert serving.search(vectors[1:2], 1)[1][0, 0] == "doc1"  # its old vector, until reloaded
    assert serving.search(vectors[:1], 5)[1][0, 0] != "doc0"


def test_an_append_replaces_the_vectors_of_ids_it_brings_again(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="hnsw"), open_source(folder), tmp_path / "index")
    moved = clustered(10, seed=5)  # doc0..doc9 again, with new vectors
    write_parquet(folder, moved, 0, "part-2.parquet")
    expected, added = [], []
    append_index(tmp_path / "index", open_source(folder), on_rows=added.append, on_total=expected.append)
    assert expected == [10] and sum(added) == 10
    index = load_index(tmp_path / "index")
    assert len(index) == 3000 and index.rows.count == 3010
    scores, ids = index.search(moved[:1], 3)
    assert ids[0, 0] == "doc0" and scores[0, 0] == pytest.approx(1, abs=1e-3) and "doc0" not in ids[0, 1:]
    scores, _ = index.search(vectors[:1], 1)  # the old doc0 vector is gone
    assert scores[0, 0] < 0.999


def test_repeated_ids_in_bring_your_own_files_keep_the_last_vector(tmp_path):
    vectors = clustered(200)
    write_parquet(tmp_path / "byo", vectors[:100], 0, "part-0.parquet")
    write_parquet(tmp_path / "byo", vectors[100:], 50, "part-1.parquet")  # doc50..doc149: doc50..doc99 again
    notes = []
    build_index(BuildConfig(type="flat"), open_source(tmp_path / "byo"), tmp_path / "index", note=notes.append)
    assert "50 vectors replaced by later ones with the same id" in notes
    index = load_index(tmp_path / "index")
    assert len(index) == 150
    scores, ids = index.search(vectors, 1)
    assert list(ids[:50, 0]) + list(ids[100:, 0]) == [f"doc{i}" for i in range(150)]
    assert (scores[:50, 0] > 0.999).all() and (scores[100:, 0] > 0.999).all()
    assert (scores[50:100, 0] < 0.999).all()  # the first vectors of doc50..doc99 are gone


def test_an_id_deleted_then_appended_again_survives_a_rebuild(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    delete_ids(tmp_path / "index", ["doc0", "doc1"])
    write_parquet(folder, vectors[:1], 0, "part-2.parquet")  # doc0 comes back
    append_index(tmp_path / "index", open_source(folder))
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    _, ids = load_index(tmp_path / "index").search(vectors[:2], 1)
    assert ids[0, 0] == "doc0" and ids[1, 0] != "doc1"


def test_an_id_deleted_after_its_file_changed_stays_deleted_through_a_rebuild(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    write_parquet(folder, vectors[1500:2000], 1500, "part-1.parquet")  # changed: its old vectors are retired
    append_index(tmp_path / "index", open_source(folder))
    delete_ids(tmp_path / "index", ["doc1600"])  # the retired old vector of doc1600 is no copy of it to keep
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    index = load_index(tmp_path / "index")
    assert "doc1600" not in set(index.ids) and len(index) == 1999


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_an_id_whose_replacing_vector_is_retired_shows_the_vector_it_replaced(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    path = tmp_path / "index"
    other = clustered(3, seed=5)
    write_parquet(folder, other[:1], 1500, "part-2.parquet")  # doc1500 again, in a later file: it wins
    build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), path)
    assert load_index(path).search(other[:1], 1)[1][0, 0] == "doc1500"
    write_parquet(folder, other[1:], 5000, "part-2.parquet")  # changed: doc1500 gone from it
    notes = []
    append_index(path, open_source(folder), note=notes.append)
    assert "1 replaced vectors shown again: the vectors that replaced them were retired" in notes
    index = load_index(path)
    assert index.search(vectors[1500:1501], 1)[1][0, 0] == "doc1500"  # part-1's vector, shown again
    assert len(index) == 3002 and sorted(set(index.ids) - {f"doc{i}" for i in range(3000)}) == ["doc5000", "doc5001"]
    if index_type == "hnsw" and engine is None:  # shown again in hnswlib's own file too
        plain = hnswlib.Index(space="ip", dim=64)
        plain.load_index(str(path / "index.hnsw"))
        assert plain.knn_query(vectors[1500:1501], k=1)[0][0, 0] == list(index.ids).index("doc1500")


def test_a_deleted_id_stays_deleted_when_a_vector_that_brought_it_back_is_retired(byo, tmp_path):
    folder, vectors = byo
    path = tmp_path / "index"
    other = clustered(3, seed=5)
    write_parquet(folder, other[:1], 1500, "part-2.parquet")  # doc1500 in part-1 and, replacing it, part-2
    build_index(BuildConfig(type="flat"), open_source(folder), path)
    delete_ids(path, ["doc1500"])
    write_parquet(folder, other[1:2], 1500, "part-3.parquet")  # a new file brings doc1500 back
    append_index(path, open_source(folder))
    assert load_index(path).search(other[1:2], 1)[1][0, 0] == "doc1500"
    write_parquet(folder, other[2:], 7000, "part-3.parquet")  # and drops it again
    append_index(path, open_source(folder))
    assert "doc1500" not in set(load_index(path).search(vectors[1500:1501], 3000)[1][0])


def test_hnswlib_searching_past_hidden_vectors_falls_back_to_the_ones_shown(tmp_path):
    vectors = clustered(12)
    backend = HnswlibBackend.create(tmp_path, 64, 12, {"M": 16, "ef_construction": 32, "ef_search": 16})
    backend.add(vectors, np.arange(12))
    backend.hide(np.arange(2, 12))  # hnswlib cannot fill k=5 from the graph, nor read the hidden vectors
    scores, labels = backend.search(vectors[:1], 5)
    assert labels.tolist() == [[0, 1]] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    backend.show(np.array([5]))
    assert sorted(backend.search(vectors[:1], 5)[1][0].tolist()) == [0, 1, 5]


def test_each_file_records_the_labels_of_its_rows(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    delete_ids(tmp_path / "index", ["doc3", "doc1600"])
    info = build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")  # leaves them out
    rows = Rows(tmp_path / "index" / "rows.arrow")
    held = info["count"] - info["recall"]["queries"]
    for entry, first in zip(info["shards"], (0, 1500)):
        labels = np.concatenate([np.arange(a, b) for a, b in entry["labels"]])
        assert entry["labels"][-1][0] >= held  # the rows held out to measure recall went in last
        ids = set(rows.take(labels).column("id").to_pylist())
        assert ids == {f"doc{i}" for i in range(first, first + 1500)} - {"doc3", "doc1600"}


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_an_append_replaces_the_vectors_of_a_file_that_changed(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    path = tmp_path / "index"
    build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), path)
    more = clustered(100, seed=7)  # part-1 now: doc1500..doc2799 as before, doc2800..doc2999 gone, 100 new rows
    write_parquet(folder, np.concatenate([vectors[1500:2800], more]), 1500, "part-1.parquet")
    notes = []
    info = append_index(path, open_source(folder), note=notes.append)
    assert "part-1.parquet changed since it was indexed: retiring its 1,500 old vectors, adding its 1,400 rows" in notes
    assert info["appends"][-1]["changed"] == ["part-1.parquet"] and info["appends"][-1]["retired"] == 1500
    index = load_index(path)
    assert len(index) == 2900
    _, ids = index.search(np.concatenate([vectors[[10, 2000, 2900]], more[50:51]]), 5)
    assert ids[0, 0] == "doc10" and ids[1, 0] == "doc2000" and ids[3, 0] == "doc2850"
    assert "doc2900" not in ids[2] and all(len(set(row)) == 5 for row in ids)  # each id once
    write_parquet(folder, vectors[2900:2901], 2900, "part-1.parquet")  # changed again
    append_index(path, open_source(folder))
    assert load_index(path).search(vectors[2900:2901], 1)[1][0, 0] == "doc2900" and len(load_index(path)) == 1501


def test_plain_hnswlib_leaves_out_what_an_append_retired_or_replaced(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="hnsw"), open_source(folder), tmp_path / "index")
    write_parquet(folder, vectors[1500:2000], 1500, "part-1.parquet")  # doc2000..doc2999 retired
    write_parquet(folder, clustered(10, seed=5), 0, "part-2.parquet")  # doc0..doc9 replaced
    append_index(tmp_path / "index", open_source(folder))
    dead = load_index(tmp_path / "index").deleted
    assert len(dead) == 1500 + 10
    plain = hnswlib.Index(space="ip", dim=64)
    plain.load_index(str(tmp_path / "index" / "index.hnsw"))
    plain.set_ef(400)
    labels, _ = plain.knn_query(vectors[[0, 2500, 2999]], k=300)
    assert not np.isin(labels, dead).any()


def test_an_id_deleted_stays_deleted_when_its_file_changes_and_a_rebuild_keeps_retired_ids(byo, tmp_path):
    folder, vectors = byo
    path = tmp_path / "index"
    build_index(BuildConfig(type="flat"), open_source(folder), path)
    delete_ids(path, ["doc1501"])
    write_parquet(folder, vectors[1500:2000], 1500, "part-1.parquet")  # doc2000..doc2999 gone
    append_index(path, open_source(folder))
    _, ids = load_index(path).search(vectors[[1501, 2500]], 3)
    assert "doc1501" not in ids[0] and "doc2500" not in ids[1]
    write_parquet(folder, vectors[2500:2501], 2500, "part-2.parquet")  # doc2500 again, in a file of its own
    build_index(BuildConfig(type="flat"), open_source(folder), path)  # a retired vector is not a deleted id
    _, ids = load_index(path).search(vectors[[1501, 2500]], 3)
    assert "doc1501" not in ids[0] and ids[1, 0] == "doc2500"


def test_append_refuses_a_changed_file_of_an_index_that_does_not_record_its_labels(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    manifest = tmp_path / "index" / "index.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "shards": [{k: v for k, v in s.items() if k != "labels"}
                                                       for s in info["shards"]]}))
    write_parquet(folder, vectors[:1500][::-1], 0, "part-0.parquet")
    with pytest.raises(VsearchError, match="part-0.parquet changed or went since.*predates.*rebuild the index"):
        append_index(tmp_path / "index", open_source(folder))


def test_append_keeps_the_vectors_of_files_gone_from_the_folder_and_says_so(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    (folder / "part-0.parquet").unlink()
    write_parquet(folder, clustered(10, seed=3), 3000, "part-2.parquet")
    notes = []
    append_index(tmp_path / "index", open_source(folder), note=notes.append)
    assert any("no longer holds 1 file the index was built from" in n for n in notes)
    assert len(load_index(tmp_path / "index")) == 3010


def test_append_retires_the_shards_of_a_dataset_that_shrank(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 300)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=128)
    folder = run_embed(config, workspace).directory
    build_index(BuildConfig(type="hnsw"), open_source(folder), tmp_path / "index")
    source.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:200]), encoding="utf-8")
    run_embed(config, workspace)  # shard 1 made again with 72 rows, shard 2 removed
    notes = []
    info = append_index(tmp_path / "index", open_source(folder), note=notes.append)
    assert any(n.startswith("cover-00002.parquet is gone from") and n.endswith("retiring its 44 vectors") for n in notes)
    assert any(n.startswith("appended 72 vectors from 1 file, retired 172 vectors;") for n in notes)
    assert info["appends"][-1]["removed"] == ["cover-00002.parquet"]
    index = load_index(tmp_path / "index")
    shown = np.setdiff1d(np.arange(index.rows.count), index.deleted)
    assert sorted(index.ids[shown]) == sorted(pq.read_table(folder, columns=["id"]).column("id").to_pylist())
    source.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:128]), encoding="utf-8")
    run_embed(config, workspace)  # shard 1 removed, nothing new: recall can only be measured leave-one-out
    notes.clear()
    info = append_index(tmp_path / "index", open_source(folder), note=notes.append)
    assert notes[-1].startswith("appended 0 vectors from 0 files, retired 72 vectors; recall@10 now ")
    assert info["recall"]["method"] == "leave-one-out" and info["recall"]["queries"] == 128
    assert sorted(load_index(tmp_path / "index").search(np.eye(1, info["dim"]), 200)[1][0][:128]) == \
        sorted(pq.read_table(folder, columns=["id"]).column("id").to_pylist())


def test_an_id_deleted_stays_deleted_when_an_edit_moves_it_into_a_new_shard(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 300)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=100)
    folder = run_embed(config, workspace).directory
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    last = url_id("http://covers.example/299.jpg")
    delete_ids(tmp_path / "index", [last])
    added = [f"新的封面 {i}\thttp://covers.example/new-{i}.jpg\t\\N\n" for i in range(10)]
    source.write_text("".join(added) + source.read_text(encoding="utf-8"), encoding="utf-8")
    run_embed(config, workspace)  # every row moves down 10: the last ones into a new shard, cover-00003
    info = append_index(tmp_path / "index", open_source(folder))
    assert "cover-00003.parquet" in info["appends"][-1]["files"]
    index = load_index(tmp_path / "index")
    shown = set(index.ids[np.setdiff1d(np.arange(index.rows.count), index.deleted)])
    assert last not in shown and len(shown) == 309 and url_id("http://covers.example/new-0.jpg") in shown


def test_append_refuses_shards_of_the_other_kind(embedded, tmp_path):
    build_index(BuildConfig(type="flat"), open_source(embedded), tmp_path / "index")
    with pytest.raises(VsearchError, match="holds cover vectors, not clip ones: pass --kind cover"):
        append_index(tmp_path / "index", open_source(embedded, "clip"))


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_deleted_ids_never_come_back(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), tmp_path / "index")
    before = load_index(tmp_path / "index").search(vectors[:1], 20)[1][0]
    deleted, unknown = delete_ids(tmp_path / "index", list(before[:15]) + ["nope"])
    assert deleted == 15 and unknown == ["nope"]
    index = load_index(tmp_path / "index")
    scores, ids = index.search(vectors[:1], 10)
    assert not set(ids[0]) & set(before[:15]) and len(set(ids[0])) == 10 and None not in ids[0]
    assert len(index) == 3000 - 15
    # Rebuilding into the same folder leaves them out (reclaiming their space), and so does the next one.
    for _ in range(2):
        build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), tmp_path / "index")
        rebuilt = load_index(tmp_path / "index")
        assert rebuilt.rows.count == len(rebuilt) == 3000 - 15
        assert not set(rebuilt.search(vectors[:1], 20)[1][0]) & set(before[:15])
    assert delete_ids(tmp_path / "index", [before[0], before[15]]) == (1, [before[0]])  # gone already


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_search_among_given_rows_is_exact_and_leaves_out_deleted_ones(index_type, engine, byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), tmp_path / "index")
    index = load_index(tmp_path / "index")
    among = np.arange(0, index.rows.count, 7)  # labels: every 7th row
    delete_ids(tmp_path / "index", [str(i) for i in index.ids[among[:5]]])
    index = load_index(tmp_path / "index")
    queries = clustered(4, seed=9)
    scores, labels = index.search_among(queries, among, 10)
    live = among[5:]
    by_label = vectors[[int(i[3:]) for i in index.ids[live]]]  # "docN" holds row N of `vectors`
    exact = np.sort(queries @ by_label.T, axis=1)[:, ::-1][:, :10]
    assert np.allclose(scores, exact, atol=1e-3)  # ivfpq keeps float16 vectors
    assert set(labels.ravel()) <= set(live.tolist())


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_threads_can_search_one_index_at_once(index_type, engine, byo, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    folder, vectors = byo
    build_index(BuildConfig(type=index_type, engine=engine, params={"ef_search": 16} if index_type == "hnsw" else {}),
                open_source(folder), tmp_path / "index")
    delete_ids(tmp_path / "index", [f"doc{i}" for i in range(0, 3000, 7)])
    index = load_index(tmp_path / "index")
    jobs = [(vectors[i:i + 3], k) for i in range(0, 600, 3) for k in (5, 40)]  # k above ef_search and below

    def ids(job):
        return index.search(*job)[1].tolist()

    alone = [ids(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ids, jobs)) == alone


def test_search_parameters_can_change_after_loading(byo, tmp_path):
    build_index(BuildConfig(type="ivfpq"), open_source(byo[0]), tmp_path / "index")
    index = load_index(tmp_path / "index")
    index.set_search(nprobe=1, k_factor=1)
    with pytest.raises(VsearchError, match="unknown search parameter ef_search for ivfpq"):
        index.set_search(ef_search=10)
    with pytest.raises(VsearchError, match="nprobe must be at least 1"):
        index.set_search(nprobe=0)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_k_larger_than_the_index_pads_with_none(index_type, tmp_path):
    write_parquet(tmp_path / "tiny", clustered(3))
    build_index(BuildConfig(type=index_type), open_source(tmp_path / "tiny"), tmp_path / "index")
    scores, ids = load_index(tmp_path / "index").search(clustered(3)[:1], 5)
    assert list(ids[0][3:]) == [None, None] and all(ids[0][:3])
    assert np.isneginf(scores[0][3:]).all()


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_vectors_with_nan_or_infinite_values_are_refused_and_the_index_in_place_is_kept(index_type, engine, byo,
                                                                                         tmp_path):
    folder, _ = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    spoiled = clustered(300, seed=2)
    spoiled[40], spoiled[41, 3], spoiled[250, 0] = np.nan, np.inf, -np.inf
    write_parquet(folder, spoiled, start=3000, name="part-2.parquet", dtype=np.float16)
    refused = r"part-2.parquet: 3 vectors hold NaN or infinite values \(the first: id 'doc3040'\); re-embed or drop"
    with pytest.raises(VsearchError, match=refused):
        build_index(BuildConfig(type=index_type, engine=engine), open_source(folder), tmp_path / "index")
    with pytest.raises(VsearchError, match=refused):
        append_index(tmp_path / "index", open_source(folder))
    assert len(load_index(tmp_path / "index")) == 3000


def test_rows_without_an_id_are_refused(tmp_path):
    vectors = clustered(300)
    write_parquet(tmp_path / "byo", vectors[:100])
    ids = pa.array([None if row in (7, 150) else f"doc{100 + row}" for row in range(200)])
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors[100:].ravel()), 64)
    pq.write_table(pa.table({"id": ids, "embedding": column}), tmp_path / "byo" / "part-1.parquet")
    with pytest.raises(VsearchError, match=r"part-1.parquet: 2 rows have no 'id' \(the first: row 7, counting from "
                                           r"0\); give every vector an id"):
        build_index(BuildConfig(type="flat"), open_source(tmp_path / "byo"), tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_query_dimension_mismatch_is_a_clear_error(byo, tmp_path):
    build_index(BuildConfig(type="flat"), open_source(byo[0]), tmp_path / "index")
    with pytest.raises(VsearchError, match="dim 256.*dim 64"):
        load_index(tmp_path / "index").search(np.ones((1, 256), np.float32), 3)


def test_a_failed_build_leaves_the_previous_index_untouched(embedded, tmp_path):
    build_index(BuildConfig(type="hnsw"), open_source(embedded), tmp_path / "index")
    before = (tmp_path / "index" / "index.json").read_text()
    (embedded / "cover-00001.parquet").unlink()
    with pytest.raises(VsearchError, match="cover-00001.parquet is listed in the manifest but missing"):
        build_index(BuildConfig(type="hnsw"), open_source(embedded), tmp_path / "index")
    assert (tmp_path / "index" / "index.json").read_text() == before
    assert load_index(tmp_path / "index").search(np.eye(1, 512, dtype=np.float32), 1)[1][0][0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_build_removes_what_killed_builds_left_and_nothing_else(byo, tmp_path):
    import os
    import socket

    host = socket.gethostname()
    killed = tmp_path / f".index.tmp-{host}-{_pid_of_exited()}"
    running = tmp_path / f".index.tmp-{host}-{os.getppid()}"
    elsewhere = tmp_path / f".index.tmp-another-host-{_pid_of_exited()}"
    for folder in (killed, running, elsewhere):
        folder.mkdir()
        (folder / "index.hnsw").write_bytes(b"half written")
    build_index(BuildConfig(type="flat"), open_source(byo[0]), tmp_path / "index")
    assert not killed.exists() and running.exists() and elsewhere.exists()


def _pid_of_exited() -> int:
    """The pid of a process that has gone, as a killed build's has."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_build_refuses_to_replace_a_folder_that_is_not_an_index(byo, tmp_path):
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(VsearchError, match="refusing to replace .*documents"):
        build_index(BuildConfig(type="flat"), open_source(byo[0]), precious)
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_bring_your_own_parquet_needs_a_recognisable_vector_column(tmp_path):
    folder = tmp_path / "odd"
    write_parquet(folder, clustered(10), column="a")
    write_parquet(folder, clustered(10), name="part-1.parquet", column="a")
    pq.write_table(pq.read_table(folder / "part-0.parquet").append_column(
        "b", pq.read_table(folder / "part-0.parquet").column("a")), folder / "part-0.parquet")
    with pytest.raises(VsearchError, match="cannot tell the vector column"):
        open_source(folder)
    assert open_source(folder, vector_column="a").dim == 64


@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
def test_bring_your_own_vectors_may_be_plain_lists_of_one_length(list_type, tmp_path):
    vectors = clustered(300)
    column = pa.array([None, *map(list, vectors[1:])], list_type(pa.float32()))  # as pandas writes them
    pq.write_table(pa.table({"id": [f"doc{i}" for i in range(300)], "embedding": column}), tmp_path / "part-0.parquet")
    source = open_source(tmp_path)
    assert (source.dim, source.vector_column) == (64, "embedding")
    build_index(BuildConfig(type="flat"), source, tmp_path / "index")
    assert load_index(tmp_path / "index").search(vectors[7:8], 1)[1][0, 0] == "doc7"
    ragged = pa.array([list(v) for v in vectors[:3]] + [list(vectors[3][:63])], list_type(pa.float32()))
    pq.write_table(pa.table({"id": ["a", "b", "c", "short"], "embedding": ragged}), tmp_path / "part-1.parquet")
    with pytest.raises(VsearchError, match=r"part-1.parquet: 1 vector does not have 64 values .*'short' has 63"):
        build_index(BuildConfig(type="flat"), open_source(tmp_path), tmp_path / "index")
    assert len(load_index(tmp_path / "index")) == 300


def test_float16_bring_your_own_vectors(tmp_path):
    write_parquet(tmp_path / "half", clustered(200), dtype=np.float16)
    build_index(BuildConfig(type="flat"), open_source(tmp_path / "half"), tmp_path / "index")
    assert load_index(tmp_path / "index").search(clustered(200)[:1], 1)[1][0][0] == "doc0"


@pytest.mark.parametrize("index_type, message", [("ivf", "unknown index type 'ivf'"), ("hnsw", "unknown parameter efs")])
def test_unknown_index_type_and_parameter_are_clear_errors(index_type, message, byo, tmp_path):
    params = {"efs": 5} if index_type == "hnsw" else {}
    with pytest.raises(VsearchError, match=message):
        build_index(BuildConfig(type=index_type, params=params), open_source(byo[0]), tmp_path / "index")


def test_an_index_path_may_start_at_the_home_folder(byo, tmp_path, monkeypatch):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "home" / "index")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_index("~/index").search(vectors[:1], 1)[1][0, 0] == "doc0"


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(VsearchError, match="no index at"):
        load_index(tmp_path / "nothing")


def test_append_from_another_folder_keeps_every_file_reachable(tmp_path, workspace, cli):
    first = write_cbvs_covers(tmp_path / "first.txt", 50)
    second = tmp_path / "second.txt"
    second.write_text(first.read_text(encoding="utf-8").replace("covers.example", "more.example"), encoding="utf-8")
    a = run_embed(EmbedConfig(model="lexical", dataset=str(first), out=tmp_path / "a"), workspace).directory
    b = run_embed(EmbedConfig(model="lexical", dataset=str(second), out=tmp_path / "b", shard_size=20), workspace).directory
    index = tmp_path / "index"
    build_index(BuildConfig(type="flat"), open_source(a), index)
    info = append_index(index, open_source(b))  # b's shards have the same names as a's: files count, not names
    assert info["count"] == 100 and len({s["path"].rsplit("/", 2)[-2] for s in info["shards"]}) == 2
    result = cli("query", "大宅门 第4集", "--index", str(index), "-k", "100", "--json")
    assert result.code == 0, result.stderr
    titles = [h["uri"] for h in json.loads(result.stdout)["results"]]
    assert any("more.example" in t for t in titles) and any("covers.example" in t for t in titles)


def test_index_rows_carry_each_vectors_id_and_metadata_in_label_order(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="hnsw"), open_source(folder), tmp_path / "index")
    index = load_index(tmp_path / "index")
    assert index.rows.schema.names == ["id", "caption"]  # every column but the vectors
    assert len(index.rows.batches) > 1
    for count in (5, 2000):  # a few rows are sliced out, many taken per record batch
        labels = np.random.default_rng(count).integers(0, 3000, count)  # any order, repeats, across batches
        rows = index.rows.take(labels)
        assert rows.column("id").to_pylist() == index.ids[labels].tolist()
        assert set(rows.column("caption").to_pylist()) == {"x"}
    _, found = index.search(vectors[7:8], 1)
    assert found[0, 0] == "doc7"


def test_appended_files_missing_a_column_get_nulls_there(byo, tmp_path):
    folder, vectors = byo
    build_index(BuildConfig(type="flat"), open_source(folder), tmp_path / "index")
    more = tmp_path / "more"
    more.mkdir()
    data = pa.FixedSizeListArray.from_arrays(pa.array(vectors[:10].ravel()), 64)
    pq.write_table(pa.table({"id": [f"new{i}" for i in range(10)], "embedding": data}), more / "part-9.parquet")
    append_index(tmp_path / "index", open_source(more))
    rows = load_index(tmp_path / "index").rows
    assert rows.take(np.array([0, 3000, 3009])).to_pylist() == [
        {"id": "doc0", "caption": "x"}, {"id": "new0", "caption": None}, {"id": "new9", "caption": None}]


def test_an_index_in_an_older_format_is_a_clear_error(byo, tmp_path):
    build_index(BuildConfig(type="flat"), open_source(byo[0]), tmp_path / "index")
    manifest = tmp_path / "index" / "index.json"
    manifest.write_text(manifest.read_text().replace("vsearch-index/2", "vsearch-index/1"))
    with pytest.raises(VsearchError, match="rebuild the index"):
        load_index(tmp_path / "index")


def test_hnswlib_vectors_are_read_from_its_file_as_get_items_returns_them(byo, tmp_path):
    from vsearch.indexes.backends import hnswlib_file_vectors

    build_index(BuildConfig(type="hnsw"), open_source(byo[0]), tmp_path / "index")
    backend = load_index(tmp_path / "index").backend
    labels = np.random.default_rng(0).permutation(len(backend))[:100]
    assert np.array_equal(backend.vectors(labels), backend.index.get_items(labels, return_type="numpy"))
    assert backend._mapped is not None  # from the file, not through get_items
    mapped = np.memmap(tmp_path / "index" / "index.hnsw", np.uint8, "r")
    assert hnswlib_file_vectors(mapped, 64, len(backend) + 1) is None  # another count: not this file
    assert hnswlib_file_vectors(mapped, 32, len(backend)) is None
    assert hnswlib_file_vectors(np.memmap(tmp_path / "index" / "rows.arrow", np.uint8, "r"), 64, len(backend)) is None


def test_hnswlib_returns_every_neighbour_asked_for_even_where_its_graph_cannot_reach_them(tmp_path):
    # 90% identical vectors: hnswlib's graph reaches too few nodes to return them all, and hnswlib raises.
    # A search widened to the whole index meets that. One build thread, so that the graph (and whether
    # the library alone raises) is the same on every run.
    count = 6000
    vectors = np.tile(np.eye(1, 32, dtype=np.float32), (count, 1))
    vectors[: count // 10] = clustered(count // 10, 32)
    write_parquet(tmp_path / "dupes", vectors)
    build_index(BuildConfig(type="hnsw", threads=1), open_source(tmp_path / "dupes"), tmp_path / "index")
    index = load_index(tmp_path / "index")
    queries = vectors[:3]
    with pytest.raises(RuntimeError):  # the library alone
        index.backend.index.knn_query(queries, k=count)
    scores, ids = index.search(queries, count)
    assert ids.shape == (3, count) and all(set(row) == {f"doc{i}" for i in range(count)} for row in ids)
    assert np.allclose(scores, np.sort(queries @ vectors.T, axis=1)[:, ::-1], atol=1e-5)


@pytest.mark.parametrize("index_type, engine, damage, message", [
    ("flat", None, lambda d: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:1000]), "is damaged"),
    ("hnsw", None, lambda d: (d / "index.hnsw").write_bytes((d / "index.hnsw").read_bytes()[:1000]), "is damaged"),
    ("hnsw", None, lambda d: (d / "rows.arrow").write_bytes((d / "rows.arrow").read_bytes()[:500]), "is damaged"),
    ("ivfpq", None, lambda d: (d / "vectors-00000.npy").unlink(), "vectors-\\*.npy files hold 0 of the 3,000"),
    ("ivfpq", None, lambda d: (d / "vectors-00000.npy").write_bytes((d / "vectors-00000.npy").read_bytes()[:5000]),
     "is damaged \\(vectors-00000.npy: mmap length is greater than file size"),
])
def test_a_damaged_index_is_a_clear_error(index_type, engine, damage, message, byo, tmp_path):
    build_index(BuildConfig(type=index_type, engine=engine), open_source(byo[0]), tmp_path / "index")
    damage(tmp_path / "index")
    with pytest.raises(VsearchError, match=message):
        load_index(tmp_path / "index")


def test_a_damaged_shard_is_a_clear_error_and_the_old_index_stays(byo, tmp_path):
    build_index(BuildConfig(type="flat"), open_source(byo[0]), tmp_path / "index")
    (byo[0] / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(VsearchError, match="cannot read .*part-1.parquet"):
        build_index(BuildConfig(type="flat"), open_source(byo[0]), tmp_path / "index")
    assert load_index(tmp_path / "index").search(byo[1][:1], 1)[1][0, 0] == "doc0"


@pytest.mark.parametrize("index_type, engine", TYPES)
def test_bring_your_own_vectors_of_any_length_are_scored_by_cosine(index_type, engine, tmp_path):
    vectors = clustered(3000)
    lengths = np.random.default_rng(3).uniform(0.2, 20, (3000, 1)).astype(np.float32)
    write_parquet(tmp_path / "byo", vectors * lengths)
    build_index(BuildConfig(type=index_type, engine=engine), open_source(tmp_path / "byo"), tmp_path / "index")
    queries = clustered(5, seed=4)
    scores, ids = load_index(tmp_path / "index").search(queries, 5)
    cosine = queries @ vectors.T
    found = np.array([[int(i[3:]) for i in row] for row in ids])
    assert np.allclose(scores, np.take_along_axis(cosine, found, axis=1), atol=2e-3)
    if index_type == "flat":
        assert np.array_equal(found, np.argsort(-cosine, axis=1)[:, :5])
