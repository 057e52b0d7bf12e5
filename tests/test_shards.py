import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vsearch.embeddings.datasets import Row, open_dataset, url_id
from vsearch.embeddings.job import EmbedConfig, run_embed, text_processes
from vsearch.embeddings import datasets, shards
from vsearch.embeddings.shards import MANIFEST, Manifest
from vsearch.errors import VsearchError, human_size
from vsearch.files import sha256_of, write_json_atomic
from vsearch.workspace import Workspace
from tests.conftest import disk_with_free, edit_lines, random_cover_line, write_cbvs_covers


def rows_of(directory):
    tables = [pq.read_table(directory / s["name"]) for s in Manifest.read(directory).shards]
    return pa.concat_tables(tables).to_pylist()


def test_a_dataset_named_by_a_relative_path_is_read_by_its_absolute_one_and_old_shards_keep_their_vectors(
        tmp_path, workspace, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("".join(f"标题{i}\tcovers/{i}.jpg\t字幕{i}\n" for i in range(25)),
                                             encoding="utf-8")
    config = EmbedConfig(dataset="data/c.txt", model="lexical", shard_size=10, workers=0)
    with monkeypatch.context() as before_fix:  # as vsearch kept such a path: relative, as given
        before_fix.setattr(datasets, "_absolute", lambda url: url)
        first = run_embed(config, workspace)
    assert first.manifest.source == "data/c.txt" and rows_of(first.directory)[0]["uri"] == "data/covers/0.jpg"
    vectors = {row["id"]: row["vector"] for row in rows_of(first.directory)}
    # Two processes, as a lexical job on two cores runs: the shards are written again, nothing encoded.
    again = run_embed(replace(config, workers=2), workspace)
    assert (again.shards_refreshed, again.shards_written, again.rows_written, again.shards_redone) == (3, 3, 0, 0)
    assert again.manifest.source == str(tmp_path / "data" / "c.txt")
    rows = rows_of(again.directory)
    assert [row["uri"] for row in rows] == [str(tmp_path / "data" / "covers" / f"{i}.jpg") for i in range(25)]
    assert {row["id"]: row["vector"] for row in rows} == vectors
    monkeypatch.chdir(tmp_path / "data")  # the same file named from another folder: nothing to do
    done = run_embed(replace(config, dataset="c.txt"), workspace)
    assert (done.shards_skipped, done.shards_written) == (3, 0)


def test_vectors_hold_for_rows_changed_in_nothing_they_were_made_from(tmp_path):
    def shard(number, uri, ocr=None):
        columns = {"id": ["a"], "vector": np.eye(4, dtype=np.float32)[:1], "title": ["标题"], "ocr": [ocr], "uri": [uri]}
        return shards.write_shard_file(tmp_path, shards.shard_schema(4), "cover", number, columns, [],
                                       {"content_digest": "before", "media_digest": "same"})

    def hold(entry, row, digests, text_encoded, reads_text=False):
        return shards.vectors_hold(tmp_path, entry, [row], {}, digests, text_encoded, reads_text)

    local, remote, read = shard(0, "/covers/a.jpg"), shard(1, "http://a.example/1.jpg"), shard(2, "/covers/a.jpg", "封面字")
    image = {"content_digest": "after", "media_digest": "same"}  # an image model's job looks at the files
    assert hold(local, Row("a", "标题", None, "/elsewhere/a.jpg"), image, False)  # moved: its version vouches
    assert not hold(remote, Row("a", "标题", None, "http://b.example/1.jpg"), image, False)  # maybe another cover
    assert hold(local, Row("a", "新标题", "新字幕", "/covers/a.jpg"), image, False)  # text is not what it encodes
    assert not hold(local, Row("a", "标题", None, "/covers/a.jpg"), {**image, "media_digest": "changed"}, False)
    text = {"content_digest": "after"}  # a text encoder's job reads the rows alone
    assert hold(remote, Row("a", "标题", None, "http://b.example/1.jpg"), text, True)
    assert not hold(local, Row("a", "新标题", None, "/covers/a.jpg"), text, True)
    # OCR text in the shard that the row lacks: read off its cover (--ocr), or else gone from the dataset since
    assert hold(read, Row("a", "标题", None, "/covers/a.jpg"), text, True, reads_text=True)
    assert not hold(read, Row("a", "标题", None, "/covers/a.jpg"), text, True)


def test_shard_round_trip_schema_dtype_normalisation_and_manifest(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 250)
    result = run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=100), workspace)
    directory = result.directory
    assert directory == workspace.embeddings_dir("c")
    assert sorted(p.name for p in directory.iterdir()) == [
        ".lock", "_manifest.json", "cover-00000.parquet", "cover-00001.parquet", "cover-00002.parquet"]

    schema = pq.read_schema(directory / "cover-00000.parquet")
    assert schema.field("id").type == pa.string() and not schema.field("id").nullable
    assert schema.field("kind").type == pa.string()
    assert schema.field("vector").type == pa.list_(pa.float16(), 512)
    for name in ("title", "ocr", "uri"):
        assert schema.field(name).type == pa.string() and schema.field(name).nullable
    chunks = pq.ParquetFile(directory / "cover-00000.parquet").metadata.row_group(0)
    encodings = {chunks.column(i).path_in_schema: chunks.column(i) for i in range(chunks.num_columns)}
    vector = encodings["vector.list.element"]  # float16 values read back 3.4 times as fast without a dictionary
    assert vector.compression == "ZSTD" and "RLE_DICTIONARY" not in vector.encodings
    assert "RLE_DICTIONARY" in encodings["title"].encodings

    rows = rows_of(directory)
    assert len(rows) == 250 and len({r["id"] for r in rows}) == 250
    assert {r["kind"] for r in rows} == {"cover"}
    assert rows[0]["title"] and rows[0]["uri"] == "http://covers.example/0.jpg"
    assert rows[0]["ocr"] is None  # "\N" in the source
    stored = pa.concat_tables(pq.read_table(directory / s["name"]) for s in Manifest.read(directory).shards)
    vectors = stored.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, 512)
    assert vectors.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)

    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["dataset"] == "c" and manifest["source"] == str(source)
    assert manifest["encoder"]["spec"] == "lexical" and len(manifest["encoder"]["fingerprint"]) == 16
    assert (manifest["dim"], manifest["metric"], manifest["dtype"]) == (512, "cosine", "float16")
    assert [(s["name"], s["rows"]) for s in manifest["shards"]] == [
        ("cover-00000.parquet", 100), ("cover-00001.parquet", 100), ("cover-00002.parquet", 50)]
    for shard in manifest["shards"]:
        assert shard["sha256"] == sha256_of(directory / shard["name"])
    assert manifest["failed"] == []


def test_rows_that_cannot_be_encoded_are_recorded_and_the_job_goes_on(tmp_path, workspace):
    source = tmp_path / "c.txt"
    source.write_text("好标题\thttp://a/1\t文字\n\\N\thttp://a/2\t\\N\n！！！\thttp://a/3\t\\N\n又一个\thttp://a/4\t\\N\n",
                      encoding="utf-8")
    result = run_embed(EmbedConfig(model="lexical", dataset=str(source)), workspace)
    assert [r["title"] for r in rows_of(result.directory)] == ["好标题", "又一个"]
    failed = {(f["uri"], f["reason"]) for f in result.manifest.failed}
    assert failed == {("http://a/2", "no title or OCR text to encode"),
                      ("http://a/3", "no letters or digits in title or OCR text")}


def test_rerun_skips_complete_shards_and_writes_nothing_twice(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    first = run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50), workspace)
    before = {p.name: p.stat().st_mtime_ns for p in first.directory.glob("*.parquet")}
    again = run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50), workspace)
    assert (again.shards_written, again.shards_skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in again.directory.glob("*.parquet")} == before


def test_a_text_job_shared_among_processes_writes_what_one_process_writes(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=50)
    one = run_embed(replace(config, workers=0, out=tmp_path / "one"), workspace)
    shared = run_embed(replace(config, workers=2, out=tmp_path / "shared"), workspace)
    assert text_processes(open_dataset(str(source), workspace), replace(config, workers=2)) == 2
    assert text_processes(open_dataset(str(source), workspace), replace(config, workers=2, shard_size=120)) == 1
    assert text_processes(open_dataset(str(source), workspace), replace(config, workers=8)) == 3  # 3 shards
    assert [s["name"] for s in shared.manifest.shards] == [s["name"] for s in one.manifest.shards]
    assert rows_of(shared.directory) == rows_of(one.directory)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file every write to fails as a full disk's")
@pytest.mark.parametrize("workers", [0, 2], ids=["one process", "two processes"])
def test_a_shard_the_disk_cannot_take_is_one_line_naming_it_and_a_rerun_resumes(workers, tmp_path, workspace,
                                                                                monkeypatch):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=50, workers=workers, out=tmp_path / "shards")
    config.out.mkdir()
    full = config.out / "cover-00001.parquet.tmp"
    full.symlink_to("/dev/full")  # where shard 1 is written first: every write there fails, as on a full disk
    with monkeypatch.context() as patch, pytest.raises(VsearchError if workers else OSError) as raised:
        patch.setattr(shards, "_remove_partial_files", lambda directory: None)  # a stopped run's, at the start
        run_embed(config, workspace)
    assert str(raised.value) == f"No space left on device: {full}" if workers else (
        raised.value.strerror, raised.value.filename) == ("No space left on device", str(full))
    assert not full.is_symlink() and not (config.out / "cover-00001.parquet").exists()

    again = run_embed(config, workspace)
    assert again.shards_written + again.shards_skipped == 3 and again.shards_written >= 1
    assert rows_of(config.out) == rows_of(run_embed(replace(config, workers=0, out=tmp_path / "whole"), workspace).directory)


def test_a_writer_forecasts_the_room_its_rows_to_come_need_from_the_bytes_a_row_its_shards_took(tmp_path, monkeypatch):
    notes = []
    fresh = Manifest(dataset="d", source="d.txt", encoder={"spec": "lexical"}, dim=4, shard_size=100)
    columns = {"id": [f"r{i}" for i in range(90)], "vector": np.eye(4, dtype=np.float32)[np.arange(90) % 4],
               "title": ["标题"] * 90, "ocr": [None] * 90, "uri": [f"{i}.jpg" for i in range(90)]}
    failed = [{"id": f"f{i}", "uri": f"f{i}.jpg", "reason": "unreadable"} for i in range(10)]
    with shards.ShardWriter.open(tmp_path, fresh, note=notes.append) as writer:
        writer.write("cover", 0, columns, failed)
        written = writer.manifest.shards[0]["bytes"]
        disk_with_free(monkeypatch, 9 * written)  # room for the 900 rows left, at a hundredth of the shard a row
        writer.expect_rows(1000)
        assert notes == []
        disk_with_free(monkeypatch, 7 * written - 1)
        writer.write("cover", 1, columns, failed)  # the count in: each shard forecasts, and says it once
        writer.write("cover", 2, columns, failed)
        assert [entry["bytes"] for entry in writer.manifest.shards] == [written] * 3
    assert notes == [
        f"{tmp_path} looks short of room: at the {human_size(written / 100)} a row its shards take, the 800 rows left "
        f"need about {human_size(8 * written)}, and its disk has {human_size(7 * written - 1)} free. The job "
        "goes on until the disk is full and keeps what it wrote: free some space and run the same command again to "
        "finish, or start over with --out on a larger disk"]


@pytest.mark.parametrize("workers", [0, 2], ids=["one process", "two processes"])
def test_a_disk_too_small_for_the_rest_of_an_embed_is_said_once_and_the_job_goes_on(workers, tmp_path, workspace,
                                                                                     monkeypatch):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=20, workers=workers, out=tmp_path / "shards")
    notes = []
    roomy = run_embed(replace(config, out=tmp_path / "roomy"), workspace, note=notes.append)
    assert notes == [] and roomy.rows_written == 120
    disk_with_free(monkeypatch, 0)
    result = run_embed(config, workspace, note=notes.append)
    assert result.rows_written == 120 and rows_of(config.out) == rows_of(roomy.directory)
    assert len(notes) == 1 and notes[0].startswith(f"{config.out} looks short of room: at the ")
    notes.clear()
    assert run_embed(config, workspace, note=notes.append).shards_skipped == 6 and notes == []  # nothing left to come


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file every write to fails as a full disk's")
def test_a_manifest_the_disk_cannot_take_names_itself_and_leaves_the_old_one(tmp_path):
    manifest = tmp_path / MANIFEST
    write_json_atomic(manifest, {"shards": []})
    (tmp_path / f"{MANIFEST}.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as raised:
        write_json_atomic(manifest, {"shards": [{"name": "cover-00000.parquet"}]})
    assert (raised.value.strerror, raised.value.filename) == ("No space left on device", str(tmp_path / f"{MANIFEST}.tmp"))
    assert json.loads(manifest.read_text()) == {"shards": []}


def test_a_remote_text_dataset_is_read_once_by_one_process(tmp_path, workspace):
    import fsspec

    with fsspec.open("memory://covers/c.txt", "wb") as remote:
        remote.write(write_cbvs_covers(tmp_path / "c.txt", 120).read_bytes())
    dataset = open_dataset("memory://covers/c.txt", workspace)
    assert not dataset.is_local and len(list(dataset.rows())) == 120
    assert text_processes(dataset, EmbedConfig(model="lexical", shard_size=50, workers=2)) == 1


@pytest.mark.parametrize("limit, expected", [(None, 120), (70, 70), (500, 120)])
def test_the_job_says_how_many_rows_to_expect_for_its_progress_bar(limit, expected, tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    totals, advanced = [], []
    run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50, limit=limit), workspace,
              on_rows=advanced.append, on_total=totals.append)
    assert totals == [expected] and sum(advanced) == expected


def test_a_limited_run_followed_by_a_full_run_gives_every_row_once(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50, limit=70), workspace)
    full = run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50), workspace)
    assert (full.shards_written, full.shards_skipped) == (2, 1)  # shard 1 had only 20 of its 50 rows
    ids = [r["id"] for r in rows_of(full.directory)]
    assert len(ids) == len(set(ids)) == 120


def shard_times(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.parquet")}


def embed_lines(source, lines, workspace, **options):
    source.write_text("".join(lines), encoding="utf-8")
    return run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50, **options), workspace)


def assert_shards_hold_exactly(directory, lines):
    """The folder's shards and manifest hold each row of `lines` once, and nothing else."""
    rows = rows_of(directory)
    assert sorted(r["uri"] for r in rows) == sorted(line.split("\t")[1] for line in lines)
    manifest = Manifest.read(directory)
    assert sorted(p.name for p in directory.glob("*.parquet")) == [s["name"] for s in manifest.shards]
    assert sum(s["input_rows"] for s in manifest.shards) == len(lines)


def test_rows_added_at_the_end_embed_only_the_new_rows(tmp_path, workspace):
    lines = write_cbvs_covers(tmp_path / "c.txt", 170).read_text(encoding="utf-8").splitlines(keepends=True)
    first = embed_lines(tmp_path / "c.txt", lines[:120], workspace)
    before = shard_times(first.directory)
    again = embed_lines(tmp_path / "c.txt", lines, workspace)
    assert (again.shards_skipped, again.shards_redone, again.shards_written) == (2, 1, 2)
    assert {name: t for name, t in shard_times(again.directory).items() if name in before} == {
        **before, "cover-00002.parquet": shard_times(again.directory)["cover-00002.parquet"]}
    assert_shards_hold_exactly(again.directory, lines)


def test_rows_inserted_or_removed_mid_dataset_redo_the_shards_after_them(tmp_path, workspace):
    lines = write_cbvs_covers(tmp_path / "c.txt", 170).read_text(encoding="utf-8").splitlines(keepends=True)
    embed_lines(tmp_path / "c.txt", lines[10:], workspace)
    grown = embed_lines(tmp_path / "c.txt", lines, workspace)  # ten rows inserted at the top
    assert (grown.shards_skipped, grown.shards_redone, grown.shards_written) == (0, 4, 4)
    assert_shards_hold_exactly(grown.directory, lines)

    shrunk_lines = lines[:60] + lines[130:]  # seventy rows removed from the middle
    shrunk = embed_lines(tmp_path / "c.txt", shrunk_lines, workspace)
    assert (shrunk.shards_skipped, shrunk.shards_redone, shrunk.shards_removed) == (1, 1, 2)
    assert_shards_hold_exactly(shrunk.directory, shrunk_lines)


def test_a_dataset_left_with_no_rows_is_refused_and_its_shards_kept(tmp_path, workspace):
    lines = write_cbvs_covers(tmp_path / "c.txt", 120).read_text(encoding="utf-8").splitlines(keepends=True)
    directory = embed_lines(tmp_path / "c.txt", lines, workspace).directory
    before = shard_times(directory)
    with pytest.raises(VsearchError, match="has no rows to embed"):
        embed_lines(tmp_path / "c.txt", ["标题\t\\N\t没有url的行\n"], workspace)
    assert shard_times(directory) == before
    assert_shards_hold_exactly(directory, lines)


@pytest.mark.parametrize("recorded", [[], ["input_digest"]])
def test_shards_listed_before_their_rows_were_digested_are_trusted_on_what_was(recorded, tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    directory = run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50), workspace).directory
    manifest = json.loads((directory / MANIFEST).read_text())
    for entry in manifest["shards"]:
        for key in {"input_digest", "content_digest"} - set(recorded):
            del entry[key]
    (directory / MANIFEST).write_text(json.dumps(manifest))
    again = run_embed(EmbedConfig(model="lexical", dataset=str(source), shard_size=50), workspace)
    assert (again.shards_skipped, again.shards_written) == (3, 0)


def test_a_row_edited_in_place_is_embedded_again(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=50)
    directory = run_embed(config, workspace).directory
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    title, url, _ = lines[60].rstrip("\n").split("\t")
    lines[60] = f"{title}\t{url}\t修正后的字幕\n"  # the same cover (url, so id), its OCR text corrected
    source.write_text("".join(lines), encoding="utf-8")
    again = run_embed(config, workspace)
    assert (again.shards_skipped, again.shards_written) == (2, 1)
    table = pq.read_table(directory / "cover-00001.parquet")
    row = table.filter(pc.equal(table.column("id"), url_id(url)))
    assert row.column("ocr").to_pylist() == ["修正后的字幕"]
    assert_shards_hold_exactly(directory, lines)


def test_a_moved_workspace_or_package_resumes_its_datasets_and_another_file_is_refused(tmp_path, monkeypatch):
    first = Workspace.resolve(tmp_path / "first")
    first.datasets.mkdir(parents=True)
    (first.datasets / "cbvs10m.txt").write_text("".join(f"标题{i}\tcovers/{i}.jpg\t字幕{i}\n" for i in range(25)),
                                                encoding="utf-8")
    config = EmbedConfig(dataset="cbvs10m", model="lexical", shard_size=10, workers=0)
    vectors = {row["id"]: row["vector"] for row in rows_of(run_embed(config, first).directory)}
    assert run_embed(replace(config, dataset="demo"), first).rows_written == 199
    second = Workspace.resolve(first.root.rename(tmp_path / "second"))
    package = shutil.copytree(Path(datasets.demo_source()).parent, tmp_path / "package" / "demo_data")
    monkeypatch.setattr(datasets, "demo_source", lambda: str(package / datasets.DEMO_FILE))  # vsearch installed anew
    for name, refreshed in (("cbvs10m", 3), ("demo", 20)):
        moved = run_embed(replace(config, dataset=name), second)
        assert (moved.shards_refreshed, moved.rows_written, moved.shards_redone) == (refreshed, 0, 0)
        assert all(row["uri"].startswith(str(second.datasets if name == "cbvs10m" else package))
                   for row in rows_of(moved.directory))
    assert {row["id"]: row["vector"] for row in rows_of(second.embeddings_dir("cbvs10m"))} == vectors
    elsewhere = str(shutil.copy(second.datasets / "cbvs10m.txt", tmp_path / "other.txt"))
    with pytest.raises(VsearchError, match="made from .*cbvs10m.txt, not from .*other.txt"):
        run_embed(replace(config, dataset=elsewhere, out=second.embeddings_dir("cbvs10m")), second)


def test_shards_from_another_encoder_are_never_mixed_in(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 30)
    run_embed(EmbedConfig(model="lexical", dataset=str(source), out=tmp_path), workspace)
    with pytest.raises(VsearchError, match=r"made by lexical \(weights \w+\), not by lexical:256 "):
        run_embed(EmbedConfig(dataset=str(source), model="lexical:256", out=tmp_path), workspace)
    (tmp_path / "mine.parquet").write_bytes(b"a user's own file")
    replaced = run_embed(EmbedConfig(dataset=str(source), model="lexical:256", overwrite=True, out=tmp_path),
                         workspace)
    assert replaced.manifest.dim == 256 and replaced.manifest.rows() == 30
    assert (tmp_path / "mine.parquet").read_bytes() == b"a user's own file"


def test_stale_temporary_files_are_removed_on_resume(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 30)
    result = run_embed(EmbedConfig(model="lexical", dataset=str(source)), workspace)
    (result.directory / "cover-00001.parquet.tmp").write_bytes(b"half a shard")
    run_embed(EmbedConfig(model="lexical", dataset=str(source)), workspace)
    assert not list(result.directory.glob("*.tmp"))


def test_a_slow_manifest_is_rewritten_less_often_and_closing_records_every_shard(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(shards.time, "monotonic", lambda: clock[0])
    real_write = Manifest.write

    def slow_write(manifest, directory):  # as a manifest listing a million failed rows: 5 s a rewrite
        real_write(manifest, directory)
        clock[0] += 5.0
    monkeypatch.setattr(Manifest, "write", slow_write)

    def shards_on_disk():
        return [s["number"] for s in Manifest.read(tmp_path).shards]

    with shards.ShardWriter.open(tmp_path, Manifest("d", "d.txt", {"spec": "lexical", "fingerprint": "f"}, 4, 2)) as writer:
        for number in range(4):
            clock[0] += 10.0  # a shard encodes in 10 s
            writer.write("cover", number, {"id": [f"{number}a", f"{number}b"], "vector": np.eye(2, 4)}, [])
        # Rewritten after shard 0, then only once 5 s is at most 5% of the time since: after 100 s.
        assert shards_on_disk() == [0]
        clock[0] += 100.0
        writer.write("cover", 4, {"id": ["4a", "4b"], "vector": np.eye(2, 4)}, [])
        assert shards_on_disk() == [0, 1, 2, 3, 4]
        clock[0] += 10.0
        writer.write("cover", 5, {"id": ["5a", "5b"], "vector": np.eye(2, 4)}, [])
        assert shards_on_disk() == [0, 1, 2, 3, 4]
    assert shards_on_disk() == [0, 1, 2, 3, 4, 5]


def test_a_second_job_on_the_same_folder_is_refused_while_the_first_writes(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 20)
    fresh = Manifest("c", str(source), {"spec": "lexical", "fingerprint": "f"}, 512, 10)
    with shards.ShardWriter.open(workspace.embeddings_dir("c"), fresh):
        with pytest.raises(VsearchError, match=r"another vsearch embed \(process \d+\) is writing to"):
            run_embed(EmbedConfig(model="lexical", dataset=str(source)), workspace)
    assert run_embed(EmbedConfig(model="lexical", dataset=str(source)), workspace).rows_written == 20


def test_a_rerun_reports_the_rows_done_before_apart_from_the_rows_it_writes(tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "c.txt", 25)
    config = EmbedConfig(model="lexical", dataset=str(source), shard_size=10)
    run_embed(replace(config, limit=20), workspace)
    written, done = [], []
    result = run_embed(config, workspace, on_rows=written.append, on_done=done.append)
    assert (done, sum(written), result.shards_skipped, result.shards_written) == ([10, 10], 5, 2, 1)


def test_random_edits_embed_incrementally_as_a_fresh_embed_would(tmp_path, workspace):
    def rows(directory):
        table = pq.read_table(directory, columns=["id", "title", "ocr", "uri", "vector"]).sort_by("id")
        return table.drop_columns("vector").to_pylist(), np.stack(table.column("vector").to_numpy(zero_copy_only=False))

    for seed in range(12):
        pick = random.Random(seed)
        lines = [random_cover_line(pick, i) for i in range(pick.randint(1, 40))]
        config = EmbedConfig(model="lexical", dataset=str(tmp_path / f"{seed}.txt"), shard_size=pick.choice([3, 8]),
                             workers=1)
        log = []
        for step in range(8):
            action, lines = edit_lines(pick, lines, step)
            log.append(action)
            (tmp_path / f"{seed}.txt").write_text("".join(lines), encoding="utf-8")
            updated = run_embed(config, workspace).directory
            fresh = run_embed(replace(config, out=tmp_path / f"fresh-{seed}-{step}"), workspace).directory
            (updated_rows, updated_vectors), (fresh_rows, fresh_vectors) = rows(updated), rows(fresh)
            assert updated_rows == fresh_rows and np.array_equal(updated_vectors, fresh_vectors), f"seed {seed}: {log}"
            assert sorted(p.name for p in updated.glob("*.parquet")) == sorted(p.name for p in fresh.glob("*.parquet"))


def test_run_embed_from_a_script_without_a_main_guard_says_what_to_add(tmp_path):
    source = write_cbvs_covers(tmp_path / "c.txt", 120)
    script = tmp_path / "embed_covers.py"
    script.write_text(
        "from vsearch.embeddings.job import EmbedConfig, run_embed\n"
        "from vsearch.workspace import Workspace\n"
        f"run_embed(EmbedConfig(model='lexical', dataset={str(source)!r}, shard_size=50, workers=2),\n"
        f"          Workspace.resolve({str(tmp_path / 'workspace')!r}))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert 'call run_embed under `if __name__ == "__main__":`' in done.stderr.strip().splitlines()[-1]
