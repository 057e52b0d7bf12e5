"""A stopped HNSW build goes on from its last checkpoint when run again, an IVF-PQ build from its training (see
vsearch/indexes/resume.py)."""

import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from vsearch.errors import VsearchError
from vsearch.files import lock_folder
from vsearch.indexes import BuildConfig, build_index, load_index, resume
from vsearch.indexes.backends import FaissHnswBackend, FlatBackend, HnswlibBackend, IvfPqBackend
from vsearch.indexes.rows import Rows
from vsearch.indexes.tuning import memory_bytes, sample_positions
from vsearch.indexes.vectors import open_source
from tests.test_indexes import clustered, exact, write_parquet

FILES, ROWS = 4, 1000  # a record batch per file: a checkpoint after each, with `every_batch`
HNSW = [("hnswlib", HnswlibBackend), ("faiss", FaissHnswBackend)]


@pytest.fixture
def parts(tmp_path):
    vectors = clustered(FILES * ROWS)
    for number in range(FILES):
        write_parquet(tmp_path / "parts", vectors[number * ROWS:(number + 1) * ROWS], number * ROWS,
                      f"part-{number}.parquet")
    return tmp_path / "parts", vectors


def counting_adds(monkeypatch, backend, stop_at=None, labels_added=None):
    """The rows each call of `backend.add` gets (and their labels, into `labels_added`); Ctrl-C on call `stop_at`."""
    added, add = [], backend.add

    def counted(self, vectors, labels):
        if len(added) + 1 == stop_at:
            raise KeyboardInterrupt
        added.append(len(labels))
        if labels_added is not None:
            labels_added.append(labels.copy())
        add(self, vectors, labels)

    monkeypatch.setattr(backend, "add", counted)
    return added


def stopped_build(monkeypatch, backend, config, source, out, stop_at=3):
    with monkeypatch.context() as patch:
        counting_adds(patch, backend, stop_at)
        with pytest.raises(KeyboardInterrupt):
            build_index(config, source, out)


HELD = sample_positions(FILES * ROWS, FILES * ROWS // 10, seed=1)  # rows a build measures recall with, added last


def skeleton_labels(size):
    """The labels of the skeleton a new hnswlib graph of the `parts` takes first: `size` sampled across the files."""
    return sample_positions(FILES * ROWS - len(HELD), size, seed=2)


def labels_of_files(files):
    """How many labels a build gives the rows of the first `files` files (less those held out, labelled last)."""
    return files * ROWS - int(np.sum(HELD < files * ROWS))


def labels_in_graph(backend, files):
    """How many vectors a build's index holds once its skeleton (hnswlib's) and its first `files` files are in."""
    prefix = labels_of_files(files)
    return len(np.union1d(skeleton_labels(backend.skeleton), np.arange(prefix))) if backend.skeleton else prefix


def test_hnswlib_takes_a_skeleton_sampled_across_the_files_then_windows_of_near_vectors_and_resumes_after_one(
        parts, tmp_path, monkeypatch):
    folder, vectors = parts
    monkeypatch.setattr(resume, "CHECKPOINT_SHARE", 1e9)
    monkeypatch.setattr(HnswlibBackend, "insertion_window", 1500)  # a window once two files are read
    monkeypatch.setattr(HnswlibBackend, "rows_per_cluster", 64)
    monkeypatch.setattr(HnswlibBackend, "skeleton", 300)
    out = tmp_path / "index"
    with monkeypatch.context() as patch:
        added = []
        counting_adds(patch, HnswlibBackend, stop_at=3, labels_added=added)  # Ctrl-C in the second window
        with pytest.raises(KeyboardInterrupt):
            build_index(BuildConfig(type="hnsw"), open_source(folder), out)
    skeleton, window = added
    # First the skeleton, in the files' order, drawn from all four files (a quarter of the collection each).
    assert list(skeleton) == list(skeleton_labels(300)) and len(skeleton) == 300
    quarters = np.bincount(skeleton * FILES // (FILES * ROWS - len(HELD)), minlength=FILES)
    assert quarters.min() > 40
    # Then the first two files' other rows, less those held out, in another order than theirs.
    assert sorted(window) == sorted(set(range(labels_of_files(2))) - set(skeleton)) and list(window) != sorted(window)
    # Inserted in that order, they lie in runs of the same cluster: each vector's neighbour in the
    # order is nearer, on average, than its neighbour in the files.
    kept = np.delete(vectors, HELD, axis=0)
    next_in_order = np.mean(np.sum(kept[window[1:]] * kept[window[:-1]], axis=1))
    in_files = np.sort(window)
    assert next_in_order > np.mean(np.sum(kept[in_files[1:]] * kept[in_files[:-1]], axis=1)) + 0.4

    notes, added = [], counting_adds(monkeypatch, HnswlibBackend)
    info = build_index(BuildConfig(type="hnsw"), open_source(folder), out, note=notes.append)
    in_graph = labels_in_graph(HnswlibBackend, files=2)
    assert f"resuming the stopped build in {tmp_path / 'index.partial'}: {in_graph:,} vectors already in its index" in notes
    assert info["resumed_vectors"] == in_graph and sum(added) == FILES * ROWS - in_graph
    assert info["recall"]["recall@10"] >= 0.95
    monkeypatch.undo()
    reference = build_index(BuildConfig(type="hnsw"), open_source(folder), tmp_path / "reference")
    assert [s["labels"] for s in info["shards"]] == [s["labels"] for s in reference["shards"]]
    index = load_index(out)
    assert np.array_equal(index.backend.vectors(np.arange(len(index.backend))),
                          load_index(tmp_path / "reference").backend.vectors(np.arange(len(index.backend))))


@pytest.mark.parametrize("engine, backend", HNSW, ids=[engine for engine, _ in HNSW])
def test_a_stopped_build_goes_on_from_its_last_checkpoint(engine, backend, parts, tmp_path, monkeypatch, every_batch):
    folder, vectors = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    config = BuildConfig(type="hnsw", engine=engine)
    stopped_build(monkeypatch, backend, config, open_source(folder), out)
    assert not out.exists() and (partial / backend.file_name).exists()

    added, notes = counting_adds(monkeypatch, backend), []
    info = build_index(config, open_source(folder), out, note=notes.append)
    in_graph = labels_in_graph(backend, files=1 if backend.skeleton else 2)  # two adds before the third stopped it
    assert f"resuming the stopped build in {partial}: {in_graph:,} vectors already in its index" in notes
    assert sum(added) == FILES * ROWS - in_graph and info["resumed_vectors"] == in_graph
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["index", "parts"]

    reference = build_index(config, open_source(folder), tmp_path / "reference")
    assert [s["labels"] for s in info["shards"]] == [s["labels"] for s in reference["shards"]]
    assert Rows(out / "rows.arrow").ids().to_pylist() == Rows(tmp_path / "reference" / "rows.arrow").ids().to_pylist()
    assert info["recall"]["recall@10"] >= 0.95
    _, ids = load_index(out).search(vectors[:50], 10)
    found = np.mean([len({int(i[3:]) for i in row} & set(t)) / 10 for row, t in zip(ids, exact(vectors, vectors[:50], 10))])
    assert found >= 0.95


def lists_centroids(index):
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def test_a_stopped_ivfpq_build_goes_on_from_its_trained_index_without_training_again(parts, tmp_path, monkeypatch):
    folder, vectors = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    config = BuildConfig(type="ivfpq")
    stopped_build(monkeypatch, IvfPqBackend, config, open_source(folder), out)
    trained = faiss.read_index(str(partial / "index.faiss"))
    assert not out.exists() and trained.is_trained and trained.ntotal == 0
    with pytest.raises(VsearchError, match=r"made with nlist=64, not 32"):
        build_index(BuildConfig(type="ivfpq", params={"nlist": 32}), open_source(folder), out)

    trainings, notes = [], []
    monkeypatch.setattr(IvfPqBackend, "train", lambda self, sample: trainings.append(len(sample)))
    added = counting_adds(monkeypatch, IvfPqBackend)
    info = build_index(config, open_source(folder), out, note=notes.append)
    assert f"resuming the stopped build in {partial}: its quantisers already trained" in notes
    assert trainings == [] and not any(n.startswith("training on") for n in notes)
    assert sum(added) == FILES * ROWS and info["resumed_vectors"] == 0 and not partial.exists()

    monkeypatch.undo()
    reference = build_index(config, open_source(folder), tmp_path / "reference")
    centroids = [lists_centroids(faiss.read_index(str(path / "index.faiss"))) for path in (out, tmp_path / "reference")]
    assert np.array_equal(centroids[0], lists_centroids(trained))
    assert np.array_equal(*centroids)  # the sample it trained on, and so the lists, are a fresh build's
    assert info["recall"]["recall@10"] == reference["recall"]["recall@10"] >= 0.95
    assert np.array_equal(load_index(out).search(vectors[:50], 10)[1], load_index(tmp_path / "reference").search(vectors[:50], 10)[1])


def test_ctrl_c_in_an_ivfpq_build_says_its_training_is_kept_and_the_same_command_goes_on_from_it(
        parts, tmp_path, monkeypatch, cli):
    folder, _ = parts
    command = ("build-index", "--type", "ivfpq", "--embeddings", str(folder), "--out", str(tmp_path / "index"))
    with monkeypatch.context() as patch:
        counting_adds(patch, IvfPqBackend, stop_at=2)
        stopped = cli(*command)
    assert stopped.code == 130 and "".join(stopped.stderr.split()).endswith(
        f"thetrainedquantisersarekeptin{tmp_path / 'index.partial'}:runthesamecommandagaintoresumevsearch:interrupted")
    resumed = cli(*command)
    assert resumed.code == 0 and "trainingon" not in "".join(resumed.stderr.split())
    assert f"resumingthestoppedbuildin{tmp_path / 'index.partial'}:itsquantisersalreadytrained" in "".join(resumed.stderr.split())
    assert len(load_index(tmp_path / "index")) == FILES * ROWS and not (tmp_path / "index.partial").exists()


def test_a_stopped_build_is_not_mixed_with_other_settings(parts, tmp_path, monkeypatch, every_batch):
    folder, _ = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    stopped_build(monkeypatch, HnswlibBackend, BuildConfig(params={"M": 16}), open_source(folder), out)
    with pytest.raises(VsearchError, match=r"index.partial holds a stopped run made with M=16, not 8: run the command "
                                           r"that started it to resume it, or delete the folder to start over"):
        build_index(BuildConfig(params={"M": 8}), open_source(folder), out)
    with pytest.raises(VsearchError, match=r"made with type=hnsw, not flat"):
        build_index(BuildConfig(type="flat"), open_source(folder), out)
    with pytest.raises(VsearchError, match=r"made with engine=hnswlib, not faiss"):
        build_index(BuildConfig(engine="faiss", params={"M": 16}), open_source(folder), out)
    with lock_folder(partial, "test"), pytest.raises(VsearchError, match=r"another vsearch build-index \(process \d+\)"):
        build_index(BuildConfig(params={"M": 16}), open_source(folder), out)
    assert (partial / "index.hnsw").exists() and not out.exists()


def test_a_stopped_build_of_other_vectors_or_an_unreadable_index_starts_over(parts, tmp_path, monkeypatch, every_batch):
    folder, vectors = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    stopped_build(monkeypatch, HnswlibBackend, BuildConfig(), open_source(folder), out)
    write_parquet(folder, clustered(ROWS, seed=5), 0, "part-0.parquet")  # the first file re-embedded since

    notes = []
    with monkeypatch.context() as patch:
        counting_adds(patch, HnswlibBackend, stop_at=3)
        with pytest.raises(KeyboardInterrupt):
            build_index(BuildConfig(), open_source(folder), out, note=notes.append)
    assert f"{partial} holds a stopped build of other vectors: starting over" in notes

    graph = partial / "index.hnsw"
    graph.write_bytes(graph.read_bytes()[:-100])  # as a disk that filled up while hnswlib wrote it
    added, notes = counting_adds(monkeypatch, HnswlibBackend), []
    info = build_index(BuildConfig(), open_source(folder), out, note=notes.append)
    said = [n for n in notes if n.startswith(f"cannot read the index of the stopped build in {partial} (")]
    assert len(said) == 1 and said[0].endswith("): starting over")
    assert sum(added) == FILES * ROWS and info["resumed_vectors"] == 0 and not partial.exists()


def test_a_stopped_build_whose_graph_began_with_the_files_first_vectors_starts_over(parts, tmp_path, monkeypatch,
                                                                                     every_batch):
    folder, _ = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    stopped_build(monkeypatch, HnswlibBackend, BuildConfig(), open_source(folder), out)
    state = json.loads((partial / "checkpoint.json").read_text())
    del state["built_from"]["skeleton"]  # as vsearch wrote it before its skeleton was sampled
    (partial / "checkpoint.json").write_text(json.dumps(state))
    added, notes = counting_adds(monkeypatch, HnswlibBackend), []
    info = build_index(BuildConfig(), open_source(folder), out, note=notes.append)
    assert f"{partial} holds a stopped build that an earlier vsearch began, which this one cannot go on from: " \
           "starting over" in notes
    assert sum(added) == FILES * ROWS and info["resumed_vectors"] == 0 and not partial.exists()


class Disk:
    """A disk of `size` bytes holding the files under `root` but the source's (`parts`), as
    `shutil.disk_usage` sees it; `others` bytes written by someone else."""

    usage = namedtuple("usage", "total used free")

    def __init__(self, monkeypatch, root, size):
        self.root, self.size, self.others = root, size, 0
        monkeypatch.setattr(shutil, "disk_usage", self.usage_of)

    def usage_of(self, path):
        used = self.others + sum(f.stat().st_size for f in self.root.rglob("*")
                                 if f.is_file() and "parts" not in f.relative_to(self.root).parts)
        return self.usage(self.size, used, max(self.size - used, 0))


def index_bytes(count=FILES * ROWS):
    return memory_bytes("hnsw", count, 64, HnswlibBackend.build_params)


def test_a_build_without_room_for_its_index_stops_before_it_starts(parts, tmp_path, monkeypatch):
    folder, _ = parts
    out = tmp_path / "index"
    build_index(BuildConfig(type="flat"), open_source(folder), out)
    Disk(monkeypatch, tmp_path, size=int(index_bytes() * 0.9))
    added = counting_adds(monkeypatch, HnswlibBackend)
    with pytest.raises(VsearchError, match=rf"^no room for the index {out}: it needs about 2.2 MiB, and {tmp_path} "
                                           r"has [\d.]+ KiB free; free some space or write elsewhere$"):
        build_index(BuildConfig(), open_source(folder), out)
    assert added == [] and sorted(p.name for p in tmp_path.iterdir()) == ["index", "parts"]
    assert load_index(out).manifest["type"] == "flat"  # the index there is as it was


def test_a_disk_without_room_for_a_checkpoint_costs_the_checkpoint_not_the_build(parts, tmp_path, monkeypatch,
                                                                                 every_batch):
    folder, vectors = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    Disk(monkeypatch, tmp_path, size=int(index_bytes() * 1.5))  # the index and half of it again
    notes = []
    info = build_index(BuildConfig(), open_source(folder), out, note=notes.append)
    assert info["count"] == FILES * ROWS and 1 <= info["checkpoints"]["saved"] < 1 + FILES  # the skeleton's, a file's each
    without = [n for n in notes if "going on without" in n]
    assert len(without) == 1 and without[0].startswith(f"{partial}") is False
    assert re.fullmatch(rf"\d.\d MiB free in {partial}, a checkpoint needs about \d.\d MiB: going on without; a run "
                        r"stopped from here resumes from the last one \([\d,]+ vectors\)", without[0])
    # At the end, the checkpoint's space is the index's: its save would fail without it.
    assert re.fullmatch(rf"removing the checkpoint in {partial} \(\d.\d MiB\) to make room for the index {out}; a "
                        r"run stopped from here starts over", notes[notes.index(without[0]) + 1])
    assert not partial.exists() and load_index(out).search(vectors[:3], 1)[1][:, 0].tolist() == ["doc0", "doc1", "doc2"]


def test_a_build_whose_index_finds_no_room_at_the_end_keeps_its_checkpoint(parts, tmp_path, monkeypatch,
                                                                           every_batch):
    folder, _ = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    disk = Disk(monkeypatch, tmp_path, size=index_bytes() * 3)
    added, add = [], HnswlibBackend.add

    def filling(self, vectors, labels):
        add(self, vectors, labels)
        added.append(len(labels))
        if sum(added) >= FILES * ROWS:  # someone else fills the disk as the last rows go in
            disk.others = disk.size - index_bytes() // 2

    monkeypatch.setattr(HnswlibBackend, "add", filling)
    with pytest.raises(VsearchError, match=rf"^no room for the index {out}: .* free and .* in the checkpoint in "
                                           rf"{partial}, which it would replace; the checkpoint is kept: free some "
                                           r"space and run the same command again to resume from it$"):
        build_index(BuildConfig(), open_source(folder), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.partial", "parts"]

    disk.others, added[:], notes = 0, [], []
    info = build_index(BuildConfig(), open_source(folder), out, note=notes.append)
    assert any(n.startswith(f"resuming the stopped build in {partial}") for n in notes)
    assert info["resumed_vectors"] > 0 and sum(added) == FILES * ROWS - info["resumed_vectors"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file every write to fails as a full disk's")
@pytest.mark.parametrize("engine, backend", HNSW, ids=[engine for engine, _ in HNSW])
def test_a_checkpoint_the_disk_cannot_take_leaves_the_last_one_and_the_build_goes_on(engine, backend, parts, tmp_path,
                                                                                   monkeypatch, every_batch):
    folder, _ = parts
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    staged = partial / "saving" / backend.file_name
    calls, add = [], backend.add

    def failing_saves(self, vectors, labels):
        calls.append(len(labels))
        if len(calls) == 2:  # the first checkpoint saved: the next is written where writes fail, as on a full disk
            staged.symlink_to("/dev/full")
        if len(calls) == 4:
            raise KeyboardInterrupt
        add(self, vectors, labels)

    notes = []
    monkeypatch.setattr(backend, "add", failing_saves)
    with pytest.raises(KeyboardInterrupt):
        build_index(BuildConfig(engine=engine), open_source(folder), out, note=notes.append)
    saved = backend.load(partial, 64, backend.build_params)
    assert len(saved) == calls[0]  # the first checkpoint's, the failed one's file gone
    assert not staged.exists() and not staged.is_symlink()
    said = [n for n in notes if "checkpoint" in n]
    assert len(said) == 1 and said[0].startswith("cannot save a checkpoint (")
    assert said[0].endswith(f"): going on without; a run stopped from here resumes from the last one ({calls[0]:,} vectors)")

    monkeypatch.undo()
    info = build_index(BuildConfig(engine=engine), open_source(folder), out)
    assert info["resumed_vectors"] == calls[0] and info["count"] == FILES * ROWS


def test_a_build_that_saved_no_checkpoint_leaves_no_folder_for_one(parts, tmp_path, monkeypatch):
    folder, _ = parts
    stopped_build(monkeypatch, FlatBackend, BuildConfig(type="flat"), open_source(folder), tmp_path / "index", stop_at=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]

    def interrupted(self, sample):
        raise KeyboardInterrupt

    monkeypatch.setattr(IvfPqBackend, "train", interrupted)  # Ctrl-C before its training was saved
    with pytest.raises(KeyboardInterrupt):
        build_index(BuildConfig(type="ivfpq"), open_source(folder), tmp_path / "index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_the_manifest_and_files_of_a_resumed_build_are_those_of_any_build(parts, tmp_path, monkeypatch, every_batch):
    folder, _ = parts
    out = tmp_path / "index"
    stopped_build(monkeypatch, HnswlibBackend, BuildConfig(), open_source(folder), out, stop_at=4)
    build_index(BuildConfig(), open_source(folder), out)
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["count"] == FILES * ROWS and manifest["resumed_vectors"] > 0
    assert len(pq.read_table(folder / "part-0.parquet")) == ROWS  # the source is only read
    assert sorted(p.name for p in out.iterdir()) == ["index.hnsw", "index.json", "rows.arrow"]


def test_a_resumed_build_holds_no_disk_space_of_the_checkpoint_it_replaced(parts, tmp_path, monkeypatch, every_batch):
    folder, _ = parts
    stopped_build(monkeypatch, HnswlibBackend, BuildConfig(), open_source(folder), tmp_path / "index")
    replaced, add = [], HnswlibBackend.add

    def checking(self, vectors, labels):
        replaced.append(f"{tmp_path / 'index.partial' / 'index.hnsw'} (deleted)" in Path("/proc/self/maps").read_text())
        add(self, vectors, labels)

    monkeypatch.setattr(HnswlibBackend, "add", checking)
    build_index(BuildConfig(), open_source(folder), tmp_path / "index")
    assert len(replaced) >= 2 and not any(replaced)  # a checkpoint followed each of them


def test_a_checkpoint_waits_for_fifty_times_the_last_saves_time_of_work(tmp_path, monkeypatch):
    from types import SimpleNamespace

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(resume, "time", SimpleNamespace(monotonic=lambda: clock.now))
    folder = resume.CheckpointFolder(tmp_path / "out", "test", {}, lambda line: None)
    assert folder.due()  # the first at once: nothing saved yet
    with folder.saving(None, tmp_path / "staged"):
        clock.now += 1.0
    clock.now += 49.0
    assert not folder.due()
    clock.now += 1.0
    assert folder.due() and folder.checkpoints == 1 and folder.checkpoint_seconds == 1.0
    folder.close()
    assert not (tmp_path / "out.partial").exists()  # it never held a checkpoint
