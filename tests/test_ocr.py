"""`vsearch embed --ocr`: the text on covers whose row has none, read with RapidOCR."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vsearch.embeddings.datasets import Row, open_dataset
from vsearch.embeddings import ocr
from vsearch.embeddings.ocr import with_cover_text
from vsearch.embeddings.shards import MANIFEST

DAZHAIMEN = ["000.jpg", "001.jpg", "005.jpg"]  # covers reading 大宅门 演员表, 大宅门 主要演员, 大宅门 演员表
OTHERS = ["033.jpg", "144.jpg"]  # 艾尔登法环马怎么获得, 小猫简笔画


@pytest.fixture
def demo_covers(workspace):
    """Where the demo covers are, and the OCR text the demo manifest gives each."""
    rows = list(open_dataset("demo", workspace).rows())
    return {row.uri.rsplit("/", 1)[-1]: row for row in rows}


@pytest.fixture
def cover_folder(tmp_path, demo_covers):
    """A folder of demo covers: images only, no text beside them."""
    folder = tmp_path / "covers"
    folder.mkdir()
    for name in DAZHAIMEN + OTHERS:
        shutil.copy(demo_covers[name].uri, folder / name)
    return folder


def shard_rows(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    return [row for shard in manifest["shards"] for row in pq.read_table(folder / shard["name"]).to_pylist()]


def test_a_folder_of_covers_is_searchable_by_the_text_read_off_them(cli, workspace, cover_folder, demo_covers):
    assert cli("embed", "--dataset", str(cover_folder), "--model", "lexical").code == 1  # nothing to encode
    # Two reader processes: the pool the job uses by default.
    assert cli("embed", "--dataset", str(cover_folder), "--model", "lexical", "--ocr", "--workers", "2").code == 0
    rows = shard_rows(workspace.embeddings / "covers")
    assert len(rows) == 5
    for row in rows:
        assert row["ocr"].replace(" ", "") == demo_covers[f"{row['id']}.jpg"].ocr.replace(" ", "")
    manifest = json.loads((workspace.embeddings / "covers" / MANIFEST).read_text())
    assert manifest["ocr"] == "rapidocr"

    assert cli("build-index", "--type", "flat").code == 0
    result = cli("query", "大宅门演员表", "-k", "3", "--json")
    assert {hit["id"] for hit in json.loads(result.stdout)["results"]} == {"000", "001", "005"}


def test_text_the_dataset_gives_is_kept_and_clips_read_their_videos_cover(demo_covers, tmp_path, monkeypatch):
    shown = []  # the sizes of the images RapidOCR is given
    start = ocr._start_engine

    def counted(threads):
        start(threads)
        engine = ocr._engine
        monkeypatch.setattr(ocr, "_engine", lambda image: shown.append(image.size) or engine(image))

    monkeypatch.setattr(ocr, "_start_engine", counted)
    monkeypatch.setattr(ocr, "_engine", None)
    given = Row("a", "标题", "原有文字", demo_covers["000.jpg"].uri)
    blank = Row("b", "标题", None, demo_covers["033.jpg"].uri)
    clip = Row("c", None, None, "video.mp4", cover=demo_covers["144.jpg"].uri)
    unreadable = Row("d", None, None, "/nowhere/cover.jpg")
    sliver = tmp_path / "sliver.png"  # too thin for RapidOCR to resize
    Image.new("RGB", (1, 1)).save(sliver)
    strip = tmp_path / "strip.png"  # RapidOCR would take 19 s and 5 GB over it: not read
    Image.open(demo_covers["000.jpg"].uri).resize((2000, 30)).save(strip)
    rows = [given, blank, unreadable, Row("e", None, None, str(sliver)), Row("f", None, None, str(strip))]
    read = []
    (number, covers), = with_cover_text(iter([(7, rows)]), "cover", workers=0, on_rows=read.append)
    assert (2000, 30) not in shown and (1, 1) in shown
    assert number == 7 and read == [1, 1, 1, 1, 1]  # each cover read, then the row that had text
    assert covers[0].ocr == "原有文字" and covers[2].ocr is None and covers[3].ocr is None and covers[4].ocr is None
    assert covers[1].ocr.replace(" ", "") == "艾尔登法环马怎么获得"  # wrapped over two lines: one space between
    (_, clips), = with_cover_text(iter([(0, [clip])]), "clip", workers=0)
    assert clips[0].ocr == "小猫简笔画" and clips[0].uri == "video.mp4"


def test_resuming_with_a_different_ocr_setting_is_refused(cli, workspace):
    assert cli("embed", "--dataset", "demo", "--model", "lexical", "--limit", "5").code == 0
    manifest = workspace.embeddings / "demo" / MANIFEST
    before = manifest.read_text()
    refused = cli("embed", "--dataset", "demo", "--model", "lexical", "--ocr", "--workers", "0")
    assert refused.code == 1 and "made without --ocr, not with --ocr (rapidocr)" in refused.stderr
    assert manifest.read_text() == before


def test_ocr_without_rapidocr_installed_is_a_clear_error(cli, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    result = cli("embed", "--dataset", "demo", "--model", "lexical", "--ocr")
    assert result.code == 1
    assert result.stderr.strip() == ("vsearch: error: --ocr needs RapidOCR: pip install 'vsearch[ocr]' "
                                     "(missing: rapidocr, onnxruntime)")


def test_an_ocr_engine_that_cannot_start_is_a_clear_error_before_any_work(cli, workspace, monkeypatch):
    def offline(threads):
        raise OSError("Failed to download https://www.modelscope.cn/…/det.onnx")

    monkeypatch.setattr(ocr, "_new_engine", offline)
    result = cli("embed", "--dataset", "demo", "--model", "lexical", "--ocr")
    assert result.code == 1 and "RapidOCR cannot start (OSError: Failed to download" in result.stderr
    assert not (workspace.embeddings / "demo").exists()
