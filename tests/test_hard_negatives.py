"""The cbvs10m-HNSW file UniCLIP's trainer reads: one line per distinct OCR text and its 10 nearest others."""

import pytest

from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings import load_encoder
from vsearch.indexes.hard_negatives import read_as_trained, write_hard_negatives
from tests.conftest import disk_with_free, huge_page_advised_bytes, needs_huge_pages

LINES = [
    "大宅门演员表\thttp://c/1.jpg\t大宅门 演员表",
    "大宅门第二部\thttp://c/2.jpg\t大宅门 第二部",
    "重复的文字\thttp://c/3.jpg\t大宅门 演员表",  # same OCR text as line 1: listed once
    "无文字\thttp://c/4.jpg\t\\N",  # no OCR text: skipped
    "坏行\thttp://c/5.jpg",  # malformed: skipped
    *[f"标题{i}\thttp://c/x{i}.jpg\t原神 攻略 第{i}期" for i in range(12)],
    "周杰伦\thttp://c/6.jpg\t周杰伦 个人资料",
]


def test_one_line_per_distinct_ocr_text_with_its_ten_nearest_others(tmp_path, workspace):
    source = tmp_path / "cbvs10m.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "cbvs10m-HNSW"
    during = []  # the folder as each batch is encoded: the run's work is kept beside the file until it is written
    read, line_count, counted, listed = [], [], [], []

    def on_lines(n):
        read.append(n)
        during.append(sorted(p.name for p in tmp_path.iterdir()))

    written = write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), out, batch=4,
                                   on_lines=on_lines, on_line_count=line_count.append, on_texts=counted.append,
                                   on_written=listed.append)
    assert during and all(names == ["cbvs10m-HNSW.partial", source.name] for names in during)
    assert line_count == [18] and sum(read) == 18  # every line read counts, repeats, \N and malformed ones too
    assert counted == [15] and listed == [4, 4, 4, 3]
    lines = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    texts = [fields[0] for fields in lines]
    assert written.texts == len(lines) == 15
    assert written.recall == 1.0 and written.ef_search == 16  # 15 texts: the cheapest setting finds them all
    assert texts[:2] == ["大宅门 演员表", "大宅门 第二部"] and len(set(texts)) == 15
    assert "\\N" not in texts
    for fields in lines:
        assert len(fields) == 11 and fields[0] not in fields[1:] and set(fields[1:]) <= set(texts)
    assert lines[0][1] == "大宅门 第二部"  # the nearest other text shares 大宅门
    assert all(n.startswith("原神 攻略") for n in lines[5][1:10])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cbvs10m-HNSW", source.name]


@needs_huge_pages
def test_its_graph_asks_for_huge_pages_before_its_rows_are_written(tmp_path, workspace):
    source = tmp_path / "cbvs10m.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    before, grown = huge_page_advised_bytes(), []
    encoder = load_encoder("lexical")
    write_hard_negatives(open_dataset(str(source), workspace), encoder, tmp_path / "cbvs10m-HNSW",
                         on_texts=lambda n: grown.append(huge_page_advised_bytes() - before))
    assert grown[0] >= (1 << 16) * encoder.dim * 4  # the graph's first allocation, its vectors alone


def test_the_cli_writes_it_under_the_workspace_datasets(cli, workspace):
    workspace.datasets.mkdir(parents=True)
    (workspace.datasets / "cbvs10m.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    result = cli("build-index", "--type", "hnsw", "--layout", "cbvs10m-hnsw", "--dataset", "cbvs10m",
                 "--model", "lexical")
    assert result.code == 0, result.stderr
    assert len((workspace.datasets / "cbvs10m-HNSW").read_text(encoding="utf-8").splitlines()) == 15
    wrong = cli("build-index", "--type", "flat", "--layout", "cbvs10m-hnsw")
    assert wrong.code == 1 and "the one layout is cbvs10m-hnsw (hnsw)" in wrong.stderr


def test_the_dataset_file_is_never_written_over(cli, workspace):
    workspace.datasets.mkdir(parents=True)
    dataset = workspace.datasets / "cbvs10m.txt"
    dataset.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    result = cli("build-index", "--type", "hnsw", "--layout", "cbvs10m-hnsw", "--dataset", "cbvs10m",
                 "--model", "lexical", "--out", str(dataset))
    assert result.code == 1 and "would erase it" in result.stderr
    assert dataset.read_text(encoding="utf-8") == "\n".join(LINES) + "\n"


def test_uniclip_reads_ocr_texts_at_the_semantic_heads_training_length(tiny_uniclip):
    import numpy as np

    encoder = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    long_text = "大宅门演员表现在都怎么样了完整版第一部第二部"  # 22 characters: 12 and 20 tokens both cut it, at different places
    at_query_length = encoder.encode_texts([long_text])
    assert read_as_trained(encoder) is encoder and encoder.context_length == 20
    assert np.allclose(encoder.encode_texts([long_text]), encoder.encode_texts([long_text], context_length=20))
    assert not np.allclose(encoder.encode_texts([long_text]), at_query_length)
    lexical = load_encoder("lexical")
    assert read_as_trained(lexical) is lexical and not hasattr(lexical, "context_length")


def test_its_graph_and_search_take_the_users_parameters_and_threads(tmp_path, workspace, monkeypatch):
    import hnswlib

    made = []

    class Recorded(hnswlib.Index):
        def init_index(self, **kwargs):
            made.append(kwargs)
            super().init_index(**kwargs)

        def knn_query(self, *args, **kwargs):
            made.append({"threads": self.num_threads, "ef": self.ef})
            return super().knn_query(*args, **kwargs)

    monkeypatch.setattr(hnswlib, "Index", Recorded)
    source = tmp_path / "cbvs10m.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    written = write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"),
                                   tmp_path / "cbvs10m-HNSW", params={"M": 8, "ef_construction": 40, "ef_search": 24},
                                   threads=1)
    assert made[0]["M"] == 8 and made[0]["ef_construction"] == 40
    assert made[1:] and all(search == {"threads": 1, "ef": 24} for search in made[1:])  # measured at 24, not tuned
    assert written.params == {"M": 8, "ef_construction": 40, "ef_search": 24} and written.recall == 1.0


def test_by_default_its_graph_is_built_and_searched_on_every_core(tmp_path, workspace, monkeypatch):
    import os
    import threading

    import hnswlib

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: nothing to spread over")
    workers = []  # native threads hnswlib ran each call of 2048 texts or more on (a smaller one runs on one)

    def watched(call, *args, **kwargs):
        before, seen, done = set(os.listdir("/proc/self/task")), set(), threading.Event()

        def watch():
            while not done.is_set():
                seen.update(os.listdir("/proc/self/task"))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            return call(*args, **kwargs)
        finally:
            done.set()
            watcher.join()
            if len(args[0]) >= 2048:
                workers.append(len(seen - before) - 1)  # less the watcher

    class Watched(hnswlib.Index):
        def add_items(self, *args, **kwargs):
            return watched(super().add_items, *args, **kwargs)

        def knn_query(self, *args, **kwargs):
            return watched(super().knn_query, *args, **kwargs)

    monkeypatch.setattr(hnswlib, "Index", Watched)
    source = tmp_path / "cbvs10m.txt"
    source.write_text("".join(f"标题{i}\thttp://c/{i}.jpg\t大宅门 演员表 第{i}集\n" for i in range(4096)), encoding="utf-8")
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), tmp_path / "cbvs10m-HNSW")
    assert len(workers) == 3 and all(count >= 2 for count in workers)  # one window inserted, two batches searched


def test_the_cli_passes_params_and_refuses_options_that_are_not_for_the_file(cli, workspace):
    workspace.datasets.mkdir(parents=True)
    (workspace.datasets / "cbvs10m.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    written = workspace.datasets / "cbvs10m-HNSW"
    layout = ("build-index", "--layout", "cbvs10m-hnsw", "--dataset", "cbvs10m", "--model", "lexical")
    refused = cli(*layout, "--kind", "clip", "--append")
    assert refused.code == 1 and "--kind, --append: not for --layout cbvs10m-hnsw" in refused.stderr
    unknown = cli(*layout, "--param", "nprobe=8")
    assert unknown.code == 1 and "unknown parameter nprobe for the cbvs10m-hnsw layout" in unknown.stderr
    assert not written.exists()
    result = cli(*layout, "--param", "ef_search=24", "--threads", "1")
    assert result.code == 0 and "at ef_search=24)" in result.stderr
    assert len(written.read_text(encoding="utf-8").splitlines()) == 15


class Stopping:
    """The lexical encoder, stopped (as by Ctrl-C) when asked for batch number `stop_at`; records what it encodes."""

    def __init__(self, stop_at=None):
        self.inner = load_encoder("lexical")
        self.spec, self.dim, self.fingerprint = self.inner.spec, self.inner.dim, self.inner.fingerprint
        self.stop_at, self.encoded = stop_at, []

    def encode_texts(self, texts):
        if len(self.encoded) == self.stop_at:
            raise KeyboardInterrupt
        self.encoded.append(list(texts))
        return self.inner.encode_texts(texts)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_stopped_run_goes_on_from_its_last_checkpoint(tmp_path, workspace, every_batch):
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out = tmp_path / "cbvs10m-HNSW"
    out.write_text("the file of an earlier run\n", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=2), out, batch=4)
    assert out.read_text(encoding="utf-8") == "the file of an earlier run\n"  # kept until the new one is written
    assert (tmp_path / "cbvs10m-HNSW.partial" / "graph.hnsw").exists()

    encoder, notes, read = Stopping(), [], []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append,
                                   on_lines=read.append)
    assert notes == [f"resuming the stopped run in {tmp_path / 'cbvs10m-HNSW.partial'}: 8 texts already in its graph"]
    assert sum(len(chunk) for chunk in encoder.encoded) == 7  # the 8 texts of the two batches saved are not encoded again
    assert sum(read) == 18
    reference = tmp_path / "reference"
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), reference, batch=4)
    assert written.texts == 15 and written.recall == 1.0 and written.checkpoints == 2  # after each batch encoded
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cbvs10m-HNSW", source.name, "reference"]


def test_its_texts_go_in_and_are_searched_for_a_window_at_a_time_near_ones_first_and_a_stop_resumes_from_the_end_of_one(
        tmp_path, workspace, monkeypatch):
    import hnswlib
    import numpy as np
    from vsearch.indexes import resume
    from vsearch.indexes.backends import HnswlibBackend

    monkeypatch.setattr(resume, "CHECKPOINT_SHARE", 1e9)
    monkeypatch.setattr(HnswlibBackend, "insertion_window", 200)  # a window every four batches of 50
    monkeypatch.setattr(HnswlibBackend, "rows_per_cluster", 8)
    monkeypatch.setattr(HnswlibBackend, "skeleton", 50)
    inserted, searched = [], []

    class Recorded(hnswlib.Index):
        def add_items(self, data, ids=None, *args, **kwargs):
            inserted.append(np.asarray(ids).copy())
            return super().add_items(data, ids, *args, **kwargs)

        def knn_query(self, data, *args, **kwargs):
            labels, distances = super().knn_query(data, *args, **kwargs)
            searched.append(labels[:, 0].copy())  # each text is its own nearest
            return labels, distances

    monkeypatch.setattr(hnswlib, "Index", Recorded)
    topics = ["大宅门 演员表", "原神 攻略", "周杰伦 个人资料", "红烧肉 做法"]
    source = write_lines(tmp_path / "cbvs10m.txt", [f"标题{i}\thttp://c/{i}.jpg\t{topics[i % 4]} 第{i}期"
                                                    for i in range(400)])  # the topics take turns
    out = tmp_path / "cbvs10m-HNSW"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the second window
        # One thread: a graph built on several differs from run to run, and 400 near-duplicate
        # texts are few enough for one of them to miss a text's own nearest.
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=5), out, batch=50, threads=1)
    (labels,) = inserted
    assert list(labels[:50]) == list(range(50))  # the graph's skeleton, in the file's order: every topic
    rest = labels[50:]
    assert sorted(rest) == list(range(50, 200)) and list(rest) != sorted(rest)  # the rest in another order
    # Inserted in that order, texts of a topic follow each other, as they never do in the file.
    topic = np.arange(200) % 4
    assert np.mean(topic[rest[1:]] == topic[rest[:-1]]) > 0.9

    encoder, notes = Stopping(), []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=50, threads=1,
                                   note=notes.append)
    assert notes == [f"resuming the stopped run in {tmp_path / 'cbvs10m-HNSW.partial'}: 200 texts already in its graph"]
    assert sum(len(chunk) for chunk in encoder.encoded) == 200 and written.texts == 400 and written.recall >= 0.95
    (second,) = inserted[1:]  # into a graph past its skeleton: all of the window near texts first
    assert sorted(second) == list(range(200, 400)) and np.mean(topic[second[1:] % 200] == topic[second[:-1] % 200]) > 0.9
    # Searched for in the same way, a window at a time, near texts one after another ...
    order = np.concatenate(searched[-8:])  # the last 8 batches of 50, after the tuning: the lists' two windows
    assert [sorted(order[:200]), sorted(order[200:])] == [list(range(200)), list(range(200, 400))]
    assert np.mean(topic[order[1:] % 200] == topic[order[:-1] % 200]) > 0.9
    # ... and written in the file's order, each text with its own nearest others.
    texts = [f"{topics[i % 4]} 第{i}期" for i in range(400)]
    lines = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert [fields[0] for fields in lines] == texts
    vectors = encoder.inner.encode_texts(texts)
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.max(axis=1)
    position = {text: i for i, text in enumerate(texts)}
    assert all(scores[i, position[fields[1]]] >= nearest[i] - 1e-5 for i, fields in enumerate(lines))


def test_a_run_stopped_while_saving_its_graph_goes_on_from_the_graph_saved_before(tmp_path, workspace, monkeypatch,
                                                                                   every_batch):
    import hnswlib

    saves = []

    class StoppedSaving(hnswlib.Index):
        def save_index(self, path):
            saves.append(path)
            if len(saves) == 2:  # the checkpoint lists the new graph, which never replaces the old
                open(path, "wb").write(b"half a graph")
                raise KeyboardInterrupt
            super().save_index(path)

    monkeypatch.setattr(hnswlib, "Index", StoppedSaving)
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out = tmp_path / "cbvs10m-HNSW"
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(), out, batch=4)
    encoder, notes = Stopping(), []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append)
    assert notes[0].endswith(": 4 texts already in its graph")
    assert sum(len(chunk) for chunk in encoder.encoded) == 11 and written.texts == 15 and written.recall == 1.0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 15


def test_a_stopped_run_is_not_mixed_with_other_settings_or_other_texts(tmp_path, workspace, every_batch):
    from vsearch.errors import VsearchError
    from vsearch.files import lock_folder

    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out, partial = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial"
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=2), out, batch=4, params={"M": 8})
    with pytest.raises(VsearchError, match=r"holds a stopped run made with M=8, not 16: run the command"):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(), out, batch=4, params={"M": 16})
    other_model = load_encoder("lexical:256")
    with pytest.raises(VsearchError, match=r"made with model lexical, not lexical:256"):
        write_hard_negatives(open_dataset(str(source), workspace), other_model, out, batch=4, params={"M": 8})
    with lock_folder(partial, "test"), pytest.raises(VsearchError, match=r"another vsearch build-index --layout "
                                                                         r"cbvs10m-hnsw \(process \d+\) is writing to"):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(), out, batch=4, params={"M": 8})
    assert (partial / "graph.hnsw").exists() and not out.exists()

    # The dataset's first OCR text corrected since: the graph's texts are not the dataset's first any more.
    write_lines(source, [LINES[0].replace("大宅门 演员表", "大宅门 演员名单"), *LINES[1:]])
    encoder, notes = Stopping(), []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, params={"M": 8},
                                   note=notes.append)
    assert notes == [f"{partial} holds a stopped run over texts this dataset no longer begins with: starting over"]
    assert sum(len(chunk) for chunk in encoder.encoded) == 16 and written.texts == 16
    assert out.read_text(encoding="utf-8").startswith("大宅门 演员名单\t") and not partial.exists()


def test_lines_added_to_the_dataset_after_a_stop_are_taken_on_resuming(tmp_path, workspace, every_batch):
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out = tmp_path / "cbvs10m-HNSW"
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=3), out, batch=4)
    write_lines(source, [*LINES, "新的\thttp://c/7.jpg\t新的 文字"])
    encoder = Stopping()
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4)
    assert sum(len(chunk) for chunk in encoder.encoded) == 4 and written.texts == 16
    assert out.read_text(encoding="utf-8").splitlines()[-1].startswith("新的 文字\t")


def test_too_few_texts_leave_no_stopped_run_behind(tmp_path, workspace):
    from vsearch.errors import VsearchError

    source = write_lines(tmp_path / "cbvs10m.txt", LINES[:1])
    with pytest.raises(VsearchError, match="has 1 distinct OCR text"):
        write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), tmp_path / "cbvs10m-HNSW")
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_texts_the_model_gives_nan_vectors_for_stop_the_run_before_they_reach_the_graph(tmp_path, workspace):
    from vsearch.errors import VsearchError

    class Damaged(Stopping):  # NaN for texts of 原神, as damaged weights give even in float32
        def encode_texts(self, texts):
            vectors = super().encode_texts(texts)
            vectors[[text.startswith("原神") for text in texts]] = float("nan")
            return vectors

    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out = write_lines(tmp_path / "cbvs10m-HNSW", ["the file of an earlier run"])
    with pytest.raises(VsearchError) as error:
        write_hard_negatives(open_dataset(str(source), workspace), Damaged(), out, batch=4)
    assert str(error.value) == ("lexical gave a vector with NaN or infinite values for the OCR text '原神 攻略 第0期' "
                                "(and 1 other in its batch of 4): its weights may be damaged")
    assert out.read_text(encoding="utf-8") == "the file of an earlier run\n"


def test_a_graph_that_cannot_be_read_or_saved_costs_the_checkpoint_not_the_run(tmp_path, workspace, monkeypatch,
                                                                              every_batch):
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out, partial = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial"
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=2), out, batch=4)
    graph = partial / "graph.hnsw"
    graph.write_bytes(graph.read_bytes()[:-100])  # as a disk that filled up while hnswlib wrote it
    encoder, notes = Stopping(stop_at=3), []
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append)
    assert notes[0].startswith(f"cannot read the graph of the stopped run in {partial} (")
    assert notes[0].endswith("): starting over")
    assert sum(len(chunk) for chunk in encoder.encoded) == 12

    disk_with_free(monkeypatch, 8000)  # room for the file (3.6 KiB), none for a checkpoint (34 KiB)
    encoder, notes = Stopping(), []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append)
    assert notes[0].endswith(": 12 texts already in its graph")
    assert len(notes) == 2 and notes[1].startswith(f"7.8 KiB free in {partial}, a checkpoint needs about")
    assert notes[1].endswith("going on without; a run stopped from here resumes from the last one (12 texts)")
    assert written.texts == 15 and len(out.read_text(encoding="utf-8").splitlines()) == 15


def test_a_checkpoint_the_disk_cannot_take_leaves_the_last_one(tmp_path, workspace, every_batch):
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full, a file every write to fails as a full disk's")
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out, partial = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial"
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=1), out, batch=4)
    (partial / "graph.hnsw.tmp").symlink_to("/dev/full")  # where the next graph is written: every write fails
    notes = []
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=2), out, batch=4,
                             note=notes.append)
    assert notes[1].startswith("cannot save a checkpoint (hnswlib wrote 0 of ")
    assert notes[1].endswith("going on without; a run stopped from here resumes from the last one (4 texts)")
    assert not (partial / "graph.hnsw.tmp").is_symlink()

    notes = []
    written = write_hard_negatives(open_dataset(str(source), workspace), Stopping(), out, batch=4, note=notes.append)
    assert notes[0].endswith(": 4 texts already in its graph") and written.texts == 15


def test_a_file_the_disk_cannot_take_names_itself_and_the_run_resumes_from_its_checkpoint(tmp_path, workspace,
                                                                                          every_batch):
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full, a file every write to fails as a full disk's")
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out, lists = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial" / "lists.tmp"
    lists.parent.mkdir()
    lists.symlink_to("/dev/full")  # where the file's lines are written: every write fails
    with pytest.raises(OSError) as raised:
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(), out, batch=4)
    assert (raised.value.strerror, raised.value.filename) == ("No space left on device", str(lists))
    assert not out.exists()

    lists.unlink()  # room made
    encoder, notes = Stopping(), []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append)
    assert notes[0].endswith(": 15 texts already in its graph") and encoder.encoded == []
    assert written.texts == 15 and len(out.read_text(encoding="utf-8").splitlines()) == 15


# OCR texts long enough that their file outweighs the graph's checkpoint, as at scale (about 2.3 KB a
# text for the graph at 512-d, a line of 11 texts for the file).
LONG_LINES = [f"标题{i}\thttp://c/{i}.jpg\t{'大宅门演员表现在都怎么样了' * 20} 第{i}期" for i in range(15)]


def disk_short_of_the_file_by(monkeypatch, short_by):
    """The disk's free space, once the file's size is estimated, `short_by(graph bytes)` under it;
    return the estimates."""
    from vsearch.indexes import hard_negatives

    estimate, estimates = hard_negatives.lists_bytes, []

    def estimated(graph, queries, texts):
        estimates.append(estimate(graph, queries, texts))
        disk_with_free(monkeypatch, estimates[-1] - short_by(graph.index.index_file_size()))
        return estimates[-1]

    monkeypatch.setattr(hard_negatives, "lists_bytes", estimated)
    return estimates


def test_the_file_takes_the_room_of_the_checkpoints_graph_where_the_disk_needs_it(tmp_path, workspace, monkeypatch,
                                                                                  every_batch):
    source = write_lines(tmp_path / "cbvs10m.txt", LONG_LINES)
    out, partial = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial"
    reference = tmp_path / "reference"
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), reference, batch=4)
    estimates = disk_short_of_the_file_by(monkeypatch, lambda graph: graph // 2)
    notes = []
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), out, batch=4, note=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"removing the checkpoint in {partial} (")
    assert notes[0].endswith(f") to make room for the file {out}; a run stopped from here starts over")
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")  # its vectors were kept to the end
    assert estimates == [reference.stat().st_size]  # 15 texts: the sample is all of them
    assert not partial.exists()


def test_a_file_the_disk_has_no_room_for_stops_the_run_before_its_lists_and_keeps_the_checkpoint(
        tmp_path, workspace, monkeypatch, every_batch):
    from vsearch.errors import VsearchError

    source = write_lines(tmp_path / "cbvs10m.txt", LONG_LINES)
    out, partial = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial"
    with monkeypatch.context() as small_disk:
        disk_short_of_the_file_by(small_disk, lambda graph: graph + 1000)
        with pytest.raises(VsearchError, match=rf"^no room for the file {out}: it needs about [\d.]+ KiB, and "
                                               rf"{tmp_path} has [\d.]+ KiB free and [\d.]+ KiB in the checkpoint in "
                                               rf"{partial}, which it would replace; the checkpoint is kept: free some "
                                               "space and run the same command again to resume from it$"):
            write_hard_negatives(open_dataset(str(source), workspace), Stopping(), out, batch=4)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()

    encoder, notes = Stopping(), []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append)
    assert notes == [f"resuming the stopped run in {partial}: 15 texts already in its graph"] and encoder.encoded == []
    assert written.texts == 15 and not partial.exists()


def stopped_in_its_lists(monkeypatch, workspace, source, out, windows_written):
    """Run the job on `source` with lists of 4 lines a window, stopped (Ctrl-C) once `windows_written`
    windows of lines are written."""
    from vsearch.indexes import hard_negatives

    searched, search = [], hard_negatives._neighbours_of

    def stopping(graph, queries, batch, on_searched):
        searched.append(len(queries))
        if len(searched) > windows_written:
            raise KeyboardInterrupt
        return search(graph, queries, batch, on_searched)

    with monkeypatch.context() as stop:
        stop.setattr(hard_negatives, "_neighbours_of", stopping)
        with pytest.raises(KeyboardInterrupt):
            write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), out, batch=4)


def test_a_run_stopped_in_its_lists_goes_on_from_the_last_window_of_lines_written(tmp_path, workspace, monkeypatch):
    from vsearch.indexes.backends import HnswlibBackend

    monkeypatch.setattr(HnswlibBackend, "insertion_window", 4)  # the 15 texts' lines in windows of 4, 4, 4 and 3
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out, partial, reference = tmp_path / "cbvs10m-HNSW", tmp_path / "cbvs10m-HNSW.partial", tmp_path / "reference"
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), reference, batch=4)
    lines = reference.read_text(encoding="utf-8").splitlines(keepends=True)
    stopped_in_its_lists(monkeypatch, workspace, source, out, windows_written=2)
    assert (partial / "lists.tmp").read_text(encoding="utf-8") == "".join(lines[:8])
    with open(partial / "lists.tmp", "a", encoding="utf-8") as cut_short:  # as a kill -9 mid-window leaves it
        cut_short.write(lines[8][:5])

    encoder, notes, written_lines = Stopping(), [], []
    written = write_hard_negatives(open_dataset(str(source), workspace), encoder, out, batch=4, note=notes.append,
                                   on_written=written_lines.append)
    assert notes == [f"resuming the stopped run in {partial}: 15 texts already in its graph",
                     "resuming its lists: 8 of the 15 texts' lines already written"]
    assert encoder.encoded == [] and written_lines == [8, 4, 3]  # nothing encoded, inserted or listed again
    assert out.read_text(encoding="utf-8") == "".join(lines) and written.recall == 1.0 and not partial.exists()


@pytest.mark.parametrize("change", ["a text added", "another target recall"])
def test_lines_searched_otherwise_now_are_written_again(change, tmp_path, workspace, monkeypatch):
    from vsearch.indexes.backends import HnswlibBackend

    monkeypatch.setattr(HnswlibBackend, "insertion_window", 4)
    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out, reference = tmp_path / "cbvs10m-HNSW", tmp_path / "reference"
    stopped_in_its_lists(monkeypatch, workspace, source, out, windows_written=2)
    if change == "a text added":  # every list may change
        write_lines(source, [*LINES, "新的\thttp://c/new.jpg\t大宅门 新的一集"])
    target = 0.9 if change == "another target recall" else 0.95  # the lines' ef_search is tuned again
    notes = []
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), out, batch=4,
                         target_recall=target, note=notes.append)
    assert notes == [f"resuming the stopped run in {tmp_path / 'cbvs10m-HNSW.partial'}: 15 texts already in its graph"]
    write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), reference, batch=4,
                         target_recall=target)
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")


def test_a_stopped_runs_checkpoint_is_listed_with_the_workspace(tmp_path, workspace, every_batch):
    from vsearch.listing import checkpoints_listing

    source = write_lines(tmp_path / "cbvs10m.txt", LINES)
    out = workspace.datasets / "cbvs10m-HNSW"
    with pytest.raises(KeyboardInterrupt):
        write_hard_negatives(open_dataset(str(source), workspace), Stopping(stop_at=2), out, batch=4)
    [entry] = checkpoints_listing(workspace)
    assert (entry["writes"], entry["job"], entry["running"]) == (
        str(out), "vsearch build-index --layout cbvs10m-hnsw", False)
