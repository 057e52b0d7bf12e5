"""The cbvs10m-HNSW file UniCLIP's trainer reads: one line per distinct OCR text and its 10 nearest others."""

from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings import load_encoder
from vsearch.indexes.hard_negatives import read_as_trained, write_hard_negatives
from tests.conftest import huge_page_advised_bytes, needs_huge_pages

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
    during = []  # the folder as each batch is encoded: the vectors spilled to disk have no name to leave behind
    read, line_count, counted, listed = [], [], [], []

    def on_lines(n):
        read.append(n)
        during.append(sorted(p.name for p in tmp_path.iterdir()))

    written = write_hard_negatives(open_dataset(str(source), workspace), load_encoder("lexical"), out, batch=4,
                                   on_lines=on_lines, on_line_count=line_count.append, on_texts=counted.append,
                                   on_written=listed.append)
    assert during and all(names == [source.name] for names in during)
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
    assert not list(tmp_path.glob("*.tmp"))


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
