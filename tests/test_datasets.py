import hashlib
from pathlib import Path

import pytest
from PIL import Image

from vsearch.embeddings.datasets import open_dataset, url_id
from vsearch.errors import VsearchError
from tests.conftest import SHARED


def test_cbvs_covers_parse_nulls_skip_short_lines_and_duplicates(tmp_path, workspace):
    source = tmp_path / "cbvs5m.txt"
    source.write_bytes(
        "标题一\thttp://a/1.jpg\t文字一\r\n"  # saved with a byte-order mark and Windows line ends
        "\\N\thttp://a/2.jpg\t\\N\n"
        "too\tshort\n"
        "标题三\thttp://a/1.jpg\t重复的url\n".encode("utf-8-sig")
        + "坏\thttp://a/3.jpg\t行\n".encode("gbk")
        + "标题四\tcovers/4.jpg\t文字四\n".encode()
    )
    dataset = open_dataset(str(source), workspace)
    rows = list(dataset.rows())
    assert [r.id for r in rows] == [url_id("http://a/1.jpg"), url_id("http://a/2.jpg"), url_id("covers/4.jpg")]
    assert (rows[0].title, rows[0].ocr, rows[0].uri) == ("标题一", "文字一", "http://a/1.jpg")
    assert (rows[1].title, rows[1].ocr) == (None, None)
    assert rows[2].uri == f"{tmp_path}/covers/4.jpg"
    assert dataset.duplicates == 1 and dataset.malformed == 2  # the short line and the one not in UTF-8
    assert dataset.name == "cbvs5m" and dataset.has_text


def test_a_file_in_another_encoding_is_refused(tmp_path, workspace):
    source = tmp_path / "gbk.txt"
    source.write_bytes("大宅门演员表\thttp://a/1.jpg\t大宅门\n".encode("gbk"))
    with pytest.raises(VsearchError, match="is not UTF-8 text; convert it"):
        list(open_dataset(str(source), workspace).rows())


def test_url_id_is_stable_across_versions():
    # Ids key every shard and index; changing how they are derived would orphan users' data.
    url = "http://puui.qpic.cn/vpic_cover/d3349orxhl9/d3349orxhl9_hz.jpg/640"
    assert url_id(url) == hashlib.sha1(url.encode()).hexdigest()[:16] == "ed2efa6a113c178d"


def test_images_folder_convention_overrides_urls(tmp_path, workspace):
    source = tmp_path / "covers.txt"
    source.write_text("t\thttp://a/1.jpg\to\n", encoding="utf-8")
    (tmp_path / "covers-images").mkdir()
    (row,) = open_dataset(str(source), workspace).rows()
    assert row.uri == f"{tmp_path}/covers-images/{url_id('http://a/1.jpg')}.jpg"
    (tmp_path / "elsewhere").mkdir()
    (row,) = open_dataset(str(source), workspace, images=str(tmp_path / "elsewhere")).rows()
    assert row.uri == f"{tmp_path}/elsewhere/{url_id('http://a/1.jpg')}.jpg"


def test_cbvs20k_format_one_row_per_docid(tmp_path, workspace):
    source = tmp_path / "pairs.txt"
    source.write_text("查询一\td1\thttp://x/1.jpg\t2\n查询二\td1\thttp://x/1.jpg\t0\n查询二\td2\thttp://x/2.jpg\t1\n")
    dataset = open_dataset(str(source), workspace)
    assert dataset.format == "cbvs20k" and not dataset.has_text
    assert [(r.id, r.uri) for r in dataset.rows()] == [("d1", "http://x/1.jpg"), ("d2", "http://x/2.jpg")]


@pytest.mark.skipif(not (SHARED / "data" / "cbvs20k.txt").exists(), reason="needs ../shared")
def test_registered_cbvs20k_reads_the_real_file(workspace):
    workspace.datasets.mkdir(parents=True)
    (workspace.datasets / "cbvs20k.txt").symlink_to(SHARED / "data" / "cbvs20k.txt")
    rows = list(open_dataset("cbvs20k", workspace).rows())
    assert len(rows) == 19662
    assert rows[0].id == "70001002_d3349orxhl9"


def test_image_folder_ids_are_relative_paths_without_extension(tmp_path, workspace):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "b.jpg")
    Image.new("RGB", (8, 8)).save(folder / "sub" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    dataset = open_dataset(str(folder), workspace)
    assert dataset.format == "image-folder"
    assert [(r.id, r.uri) for r in dataset.rows()] == [("b", str(folder / "b.jpg")), ("sub/a", str(folder / "sub/a.png"))]


def test_an_image_folder_finds_its_videos_in_a_folder_beside_it(tmp_path, workspace):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.jpg")
    (tmp_path / "imgs-videos" / "sub").mkdir(parents=True)
    for name in ("a", "sub/c"):  # in subfolders as their images are
        (tmp_path / "imgs-videos" / f"{name}.mp4").write_bytes(b"")
    clips = list(open_dataset(f"{folder}/", workspace).clip_rows())
    assert [(r.id, r.uri, r.cover) for r in clips] == [
        (name, str(tmp_path / "imgs-videos" / f"{name}.mp4"), str(folder / f"{name}.jpg")) for name in ("a", "sub/c")]
    with pytest.raises(VsearchError, match=f"dataset imgs has no videos folder {tmp_path / 'elsewhere'}: put videos"):
        list(open_dataset(str(folder), workspace, videos=str(tmp_path / "elsewhere")).clip_rows())


def test_demo_dataset_is_shipped_with_the_package(workspace):
    rows = list(open_dataset("demo", workspace).rows())
    assert 150 <= len(rows) <= 250
    assert all(Path(r.uri).is_file() for r in rows)
    assert sum("大宅门" in (r.title or "") + (r.ocr or "") for r in rows) >= 5


def test_file_url_is_accepted(tmp_path, workspace):
    source = tmp_path / "c.txt"
    source.write_text("t\tu.jpg\to\n", encoding="utf-8")
    assert len(list(open_dataset(f"file://{source}", workspace).rows())) == 1


@pytest.mark.parametrize("spec, message", [
    ("cbvs10m", "dataset cbvs10m not found"),
    ("/no/such/file.txt", "dataset not found: /no/such/file.txt"),
])
def test_missing_dataset_is_a_clear_error(spec, message, workspace):
    with pytest.raises(VsearchError, match=message):
        open_dataset(spec, workspace)


def test_expected_rows_is_an_upper_bound_counted_without_reading_the_rows(tmp_path, workspace):
    source = tmp_path / "c.txt"
    source.write_text("a\thttp://a/1.jpg\to\nb\thttp://a/1.jpg\to\nshort\nc\thttp://a/2.jpg\to", encoding="utf-8")
    dataset = open_dataset(str(source), workspace)
    assert dataset.expected_rows() == 4  # the last line has no line end; the repeat and the short line count
    assert len(list(dataset.rows())) == 2
    videos = tmp_path / "c-videos"
    videos.mkdir()
    (videos / f"{url_id('http://a/1.jpg')}.mp4").write_bytes(b"")
    (videos / "notes.txt").write_text("not a video")
    assert dataset.expected_rows("clip") == 1

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert open_dataset(str(folder), workspace).expected_rows() == 2


def test_a_remote_dataset_file_is_not_read_twice_to_count_its_rows(cover_server, workspace):
    folder, base = cover_server
    (folder / "remote.txt").write_text("t\thttp://a/1.jpg\to\n", encoding="utf-8")
    dataset = open_dataset(f"{base}/remote.txt", workspace)
    assert dataset.expected_rows() is None and len(list(dataset.rows())) == 1


def test_unrecognised_file_format_is_a_clear_error(tmp_path, workspace):
    source = tmp_path / "weird.txt"
    source.write_text("just one column\n" * 3)
    with pytest.raises(VsearchError, match="cannot tell the format"):
        open_dataset(str(source), workspace)
    source.write_text("\n\n")
    with pytest.raises(VsearchError, match=r"dataset .*weird.txt is empty: no line of it holds any text$"):
        open_dataset(str(source), workspace)
