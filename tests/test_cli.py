import json
import os
import shutil
import subprocess
import sys

import pytest

from vsearch.embeddings.datasets import demo_source
from vsearch.workspace import ENV_VAR
from tests.conftest import write_cbvs_covers


def demo_relevant_ids():
    """Ids of the demo covers whose title or OCR text contains 大宅门."""
    from vsearch.embeddings.datasets import url_id

    lines = [line.split("\t") for line in open(demo_source(), encoding="utf-8").read().splitlines()]
    return {url_id(url) for title, url, ocr in lines if "大宅门" in title + ocr}


def test_the_demo_leaves_the_demo_covers_embedded_by_another_model_alone(cli, workspace, tiny_uniclip):
    spec = f"uniclip:{tiny_uniclip}"
    assert cli("embed", "--dataset", "demo", "--model", spec, "--limit", "8", "--device", "cpu",
               "--workers", "0").code == 0
    assert cli("build-index", "--type", "flat").code == 0
    theirs = {path.name: path.read_bytes() for path in (workspace.embeddings / "demo").iterdir()}
    result = cli("demo")
    assert result.code == 0, result.stderr
    assert {path.name: path.read_bytes() for path in (workspace.embeddings / "demo").iterdir()} == theirs
    assert (workspace.index_dir("demo-flat") / "index.json").is_file()
    payload = json.loads(cli("query", "大宅门演员表", "--json").stdout)
    assert payload["index"] == str(workspace.index_dir("demo-lexical-hnsw"))
    assert {hit["id"] for hit in payload["results"][:len(demo_relevant_ids())]} == demo_relevant_ids()


def test_the_demo_never_loads_torch(workspace):
    # torch takes a second or two and 600 MB to import; the lexical encoder runs on no device.
    script = ("import sys\nfrom vsearch.cli import main\ntry:\n    main(['demo'])\n"
              "finally:\n    print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, ENV_VAR: str(workspace.root)}, timeout=120)
    assert done.returncode == 0 and "大宅门演员表" in done.stdout, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_demo_end_to_end_then_query_uses_the_demo_index(cli, workspace):
    result = cli("demo")
    assert result.code == 0, result.stderr
    assert str(workspace.root) in result.stderr
    for example in ("大宅门演员表", "艾尔登法环马怎么获得", "周杰伦个人资料"):
        assert example in result.stdout

    result = cli("query", "大宅门演员表", "--json", "-k", "10")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["index"] == str(workspace.index_dir("demo-hnsw"))
    hits = payload["results"]
    assert {"id", "score", "title", "ocr", "uri"} <= set(hits[0])
    relevant = demo_relevant_ids()
    assert len(relevant) >= 5
    assert {hit["id"] for hit in hits[: len(relevant)]} == relevant
    assert all("大宅门" not in (h["title"] or "") + (h["ocr"] or "") for h in hits[len(relevant):])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    table = cli("query", "大宅门演员表")
    assert table.code == 0 and "大宅门 演员表" in table.stdout


def test_commands_chain_without_path_arguments(cli, workspace, tmp_path):
    from tests.conftest import write_cbvs_covers

    workspace.datasets.mkdir(parents=True)
    write_cbvs_covers(workspace.datasets / "cbvs5m.txt", 200)
    assert cli("embed", "--dataset", "cbvs5m", "--model", "lexical").code == 0
    assert cli("build-index", "--type", "flat").code == 0
    assert (workspace.index_dir("cbvs5m-flat") / "index.json").is_file()
    result = cli("query", "原神 攻略", "--json", "-k", "3")
    assert result.code == 0 and len(json.loads(result.stdout)["results"]) == 3


def test_skipped_dataset_lines_are_counted_and_files_saved_with_a_bom_read(cli, workspace, tmp_path):
    source = tmp_path / "covers.txt"
    source.write_bytes("大宅门演员表\thttp://a/1.jpg\t大宅门\n".encode("utf-8-sig") + b"\xff\xfe\tbroken\n"
                       + "陈情令\thttp://a/1.jpg\t陈情令\n".encode() + "原神\thttp://a/2.jpg\t原神\n".encode())
    embedded = cli("embed", "--dataset", str(source), "--model", "lexical")
    assert embedded.code == 0 and "1 repeated ids skipped; 1 malformed lines skipped" in embedded.stderr
    manifest = json.loads((workspace.embeddings_dir("covers") / "_manifest.json").read_text())
    assert (manifest["duplicates"], manifest["malformed_lines"]) == (1, 1)
    assert cli("build-index", "--type", "flat").code == 0
    queries = tmp_path / "queries.txt"
    queries.write_bytes("大宅门\r\n".encode("utf-8-sig"))
    answered = cli("query", "--file", str(queries))
    assert answered.code == 0
    payload = json.loads(answered.stdout)
    assert payload["query"] == "大宅门" and payload["results"][0]["title"] == "大宅门演员表"


def test_workspace_option_overrides_the_environment(cli, tmp_path):
    other = tmp_path / "other"
    assert cli("--workspace", str(other), "demo").code == 0
    assert (other / "indexes" / "demo-hnsw" / "index.json").is_file()


def test_a_workspace_that_is_a_file_is_a_clear_error(cli, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    for command in ("demo", "list"):
        result = cli("--workspace", str(tmp_path / "afile"), command)
        assert result.code == 1 and "".join(result.stderr.split()) == "".join(
            f"vsearch: error: workspace {tmp_path / 'afile'} is a file, not a folder (--workspace or VSEARCH_HOME)"
            .split())


@pytest.fixture
def garbage_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    return path


ERRORS = [
    (["embed", "--dataset", "/no/such/covers.txt"], "dataset not found: /no/such/covers.txt"),
    (["embed", "--dataset", "cbvs10m"], "dataset cbvs10m not found"),
    (["embed", "--dataset", "s3://covers/cbvs10m.txt"], "cannot open s3://covers/cbvs10m.txt: Install s3fs"),
    (["embed", "--dataset", "demo", "--images", "gs://covers/"], "cannot open gs://covers/: Please install gcsfs"),
    (["embed", "--dataset", "demo", "--images", "/no/such/covers"], "--images /no/such/covers: no such folder"),
    (["embed", "--dataset", "demo", "--model", "clip-9000"], "unknown model spec 'clip-9000'"),
    (["embed", "--dataset", "demo", "--model", "open_clip:ViT-B-32:{garbage}"], "unreadable checkpoint"),
    (["embed", "--dataset", "demo", "--model", "open_clip:ViT-B-32:/no/such.pt"], "open_clip checkpoint not found"),
    (["embed", "--dataset", "demo", "--model", "open_clip:ViT-B-32:{garbage}", "--device", "tpu"], "unknown --device 'tpu'"),
    (["embed", "--dataset", "demo", "--model", "lexical", "--limit", "0"], "--limit must be at least 1"),
    (["embed", "--dataset", "demo", "--model", "lexical", "--limit", "-1"], "--limit must be at least 1"),
    (["embed", "--dataset", "demo", "--model", "lexical", "--workers", "-1"], "--workers must be at least 0"),
    (["embed", "--dataset", "demo", "--model", "lexical", "--device", "gpu"], "unknown --device 'gpu'"),
    (["embed", "--dataset", "demo", "--model", "lexical", "--device", "cuda:0,tpu"], "unknown --device 'tpu'"),
    (["bench", "--sizes", "1000", "--dim", "0"], "--queries and --dim must be at least 1"),
    (["build-index", "--type", "annoy"], "unknown index type 'annoy'"),
    (["build-index"], "no embeddings under"),
    (["build-index", "--name", "../../elsewhere"], "--name '../../elsewhere' is not an index name"),
    (["build-index", "--name", ".hidden"], "--name '.hidden' is not an index name"),
    (["query", "大宅门"], "no index under"),
    (["query", "x", "--index", "/no/such/index"], "no index at /no/such/index"),
    (["query", "x", "--index", "nope"], "no index named 'nope' under"),
]


@pytest.mark.parametrize("args, message", ERRORS, ids=[" ".join(a[:3]) for a, _ in ERRORS])
def test_user_errors_are_one_line_without_traceback(args, message, cli, garbage_checkpoint):
    result = cli(*[a.format(garbage=garbage_checkpoint) for a in args])
    assert result.code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsearch: error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("text", ["", "   \t"])
def test_empty_query_is_an_error(text, cli):
    assert cli("demo").code == 0
    result = cli("query", text)
    assert result.code != 0 and result.stderr.strip() == "vsearch: error: empty query: give some text to search for"


@pytest.mark.parametrize("args, message", [
    (["query", "x", "--bogus"], "No such option: --bogus"),
    (["query", "x", "-k", "ten"], "Invalid value for '-k'"),
    (["serve"], "No such command 'serve'"),
])
def test_usage_errors_are_one_line_through_the_real_entry_point(args, message):
    result = subprocess.run([sys.executable, "-m", "vsearch", *args], capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("vsearch: error: ") and message in line and line.endswith(" -h')")


def test_vsearch_alone_shows_its_commands():
    result = subprocess.run([sys.executable, "-m", "vsearch"], capture_output=True, text=True)
    assert result.returncode == 2 and "embed" in result.stdout and "build-index" in result.stdout


def test_version(cli):
    from vsearch import __version__

    result = cli("--version")
    assert result.code == 0 and result.stdout.strip() == f"vsearch {__version__}"


def test_uniclip_covers_and_clips_from_the_cli(cli, workspace, tiny_uniclip, monkeypatch):
    monkeypatch.setenv("VSEARCH_UNICLIP", str(tiny_uniclip))
    result = cli("embed", "--dataset", "demo", "--kind", "both", "--device", "cpu", "--workers", "0")
    assert result.code == 0, result.stderr
    assert cli("build-index", "--type", "flat").code == 0
    assert cli("build-index", "--type", "hnsw", "--kind", "clip").code == 0
    for index, count in (("demo-flat", 5), ("demo-clip-hnsw", 5)):
        answer = cli("query", "大宅门演员表", "--index", index, "--json", "-k", "5")
        assert answer.code == 0, answer.stderr
        hits = json.loads(answer.stdout)["results"]
        assert len(hits) == count and all(h["title"] for h in hits)
    clip_ids = {h["id"] for h in json.loads(cli("query", "x", "--index", "demo-clip-hnsw", "--json", "-k", "50").stdout)["results"]}
    assert len(clip_ids) == 10


def test_embed_without_a_configured_checkpoint_says_how_to_get_one(cli, monkeypatch):
    monkeypatch.delenv("VSEARCH_UNICLIP", raising=False)
    result = cli("embed", "--dataset", "demo")
    assert result.code == 1
    assert "no UniCLIP checkpoint" in result.stderr and "--model lexical" in result.stderr


def test_embed_names_the_commonest_failure_and_retries_failed_rows_when_asked(cli, tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("".join(f"标题{i}\thttp://covers.example/{i}.jpg\t字幕{i}\n" for i in range(8))
                      + "\\N\thttp://covers.example/a.jpg\t\\N\n\\N\thttp://covers.example/b.jpg\t？\n", encoding="utf-8")
    first = cli("embed", "--dataset", str(source), "--model", "lexical")
    said = " ".join(first.stderr.split())  # as rich wraps it
    assert first.code == 0 and "8 vectors written in 1 shard, 0 shards already done, 2 failed" in said
    assert "commonest failure (1 of the folder's 2 failed rows): no title or OCR text to encode" in said
    again = cli("embed", "--dataset", str(source), "--model", "lexical", "--retry-failed")
    assert again.code == 0 and "rows that failed before, encoded again: 2" in " ".join(again.stderr.split())


def test_embed_says_how_to_bring_the_indexes_built_from_its_shards_up_to_date(cli, workspace, tmp_path):
    source = write_cbvs_covers(tmp_path / "c.txt", 30)
    embed = ("embed", "--dataset", str(source), "--model", "lexical", "--shard-size", "10")
    assert cli(*embed).code == 0
    assert cli("build-index", "--type", "hnsw").code == 0
    unchanged = cli(*embed)
    assert unchanged.code == 0 and "--append" not in unchanged.stderr
    write_cbvs_covers(source, 40)
    grown = cli(*embed)
    command = "vsearch build-index --append --name c-hnsw"
    assert f"index c-hnsw lacks what this run changed: {command}\n" in grown.stderr
    assert [i["behind"] for i in json.loads(cli("list", "--json").stdout)["indexes"]] == [1]
    assert "behind: shard files changed since" in cli("list").stdout
    assert cli(*command.split()[1:]).code == 0
    assert [i["behind"] for i in json.loads(cli("list", "--json").stdout)["indexes"]] == [0]
    assert len(json.loads(cli("query", "大宅门", "--index", "c-hnsw", "--json", "-k", "50").stdout)["results"]) == 40
    write_cbvs_covers(source, 40, seed=1)  # every row edited: an append would keep all the old vectors
    edited = cli(*embed)
    assert (f"index c-hnsw lacks what this run changed: {command} (or, as 4 of its 4 files changed, rebuild it "
            "smaller: vsearch build-index --type hnsw --engine hnswlib --name c-hnsw)\n") in edited.stderr


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_all_index_types_from_the_demo_shards(index_type, cli, workspace):
    assert cli("embed", "--dataset", "demo", "--model", "lexical").code == 0
    built = cli("build-index", "--type", index_type)
    assert built.code == 0, built.stderr
    assert "recall@10" in built.stderr
    result = cli("query", "大宅门演员表", "--json", "-k", "6", "--index", f"demo-{index_type}")
    hits = json.loads(result.stdout)["results"]
    assert {h["id"] for h in hits} == demo_relevant_ids()


def test_an_index_catches_up_with_a_dataset_that_grew_by_append(cli, workspace, tmp_path):
    from tests.conftest import write_cbvs_covers

    lines = write_cbvs_covers(tmp_path / "all.txt", 400).read_text(encoding="utf-8").splitlines(keepends=True)
    dataset = tmp_path / "covers.txt"
    dataset.write_text("".join(lines[:300]), encoding="utf-8")
    embed = ("embed", "--dataset", str(dataset), "--model", "lexical", "--shard-size", "128")
    assert cli(*embed).code == 0 and cli("build-index", "--type", "flat").code == 0
    title = lines[299].split("\t")[0]
    first = json.loads(cli("query", title, "--json", "-k", "1").stdout)["results"][0]
    assert first["title"] == title and cli("delete", first["id"]).code == 0
    dataset.write_text("".join(lines), encoding="utf-8")  # 100 more covers: shard 2 is made again, shard 3 is new
    assert cli(*embed).code == 0
    appended = cli("build-index", "--append", "--dataset", "covers")  # to the index built from those shards
    assert appended.code == 0, appended.stderr
    assert "cover-00002.parquet changed since it was indexed: retiring its 44 old vectors, adding its 128 rows" \
        in " ".join(appended.stderr.split())
    hits = json.loads(cli("query", lines[399].split("\t")[0], "--json", "-k", "400").stdout)["results"]
    ids = [h["id"] for h in hits]
    assert len(ids) == len(set(ids)) == 399 and first["id"] not in ids  # each cover once, the deleted one left out
    assert hits[0]["title"] == lines[399].split("\t")[0]
    assert cli("build-index", "--type", "hnsw", "--dataset", "covers").code == 0
    ambiguous = cli("build-index", "--append", "--dataset", "covers")
    assert ambiguous.code == 1 and "2 indexes are built from" in ambiguous.stderr and "--name" in ambiguous.stderr
    assert cli("build-index", "--append", "--dataset", "covers", "--type", "hnsw").code == 0
    clips = cli("build-index", "--append", "--dataset", "covers", "--kind", "clip")
    assert clips.code == 1 and "no clip index in" in clips.stderr


def test_bring_your_own_parquet_append_and_delete_from_the_cli(cli, workspace, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    vectors = np.random.default_rng(0).standard_normal((400, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def part(number, rows):
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].ravel()), 32)
        pq.write_table(pa.table({"key": [f"k{i}" for i in rows], "emb": column}), folder / f"{number}.parquet")

    part(0, range(0, 200))
    out = tmp_path / "byo-index"
    args = ("--embeddings", str(folder), "--id-column", "key", "--out", str(out))
    assert cli("build-index", "--type", "hnsw", *args).code == 0
    part(1, range(200, 400))
    appended = cli("build-index", "--type", "hnsw", "--append", *args)
    assert appended.code == 0 and "appended 200 vectors from 1 file;" in appended.stderr
    deleted = cli("delete", "k0", "k1", "missing", "--index", str(out))
    assert deleted.code == 0 and "2 ids deleted" in deleted.stderr and "missing" in deleted.stderr

    from vsearch.indexes import load_index

    index = load_index(out)
    _, ids = index.search(vectors[[0, 1, 300]], 1)
    assert ids[0, 0] not in ("k0", "k1") and ids[2, 0] == "k300" and len(index) == 398
    again = cli("delete", "k0", "k2", "--index", str(out))
    assert again.code == 0 and "1 id deleted" in again.stderr and "1 deleted already" in " ".join(again.stderr.split())
    typo = cli("delete", "k-typo", "--index", str(out))
    assert typo.code == 1 and typo.stderr.startswith("vsearch: error: no such id in") and "k-typo" in typo.stderr
    text = cli("query", "大宅门", "--index", str(out))
    assert text.code == 1 and "no recorded model" in text.stderr


def test_bring_your_own_embeddings_answer_text_queries_once_their_model_is_named(cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vsearch.embeddings import load_encoder

    titles = ["大宅门演员表", "周杰伦个人资料", "艾尔登法环马怎么获得", "汪汪队立大功"]
    vectors = load_encoder("lexical").encode_texts(titles) * 3.0  # another pipeline's vectors, not unit length
    folder = tmp_path / "theirs"
    folder.mkdir()
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    pq.write_table(pa.table({"id": [f"v{i}" for i in range(4)], "embedding": column, "title": titles}),
                   folder / "part-0.parquet")
    out = tmp_path / "index"
    built = cli("build-index", "--type", "flat", "--embeddings", str(folder), "--out", str(out), "--model", "lexical")
    assert built.code == 0, built.stderr
    hits = json.loads(cli("query", "周杰伦", "--index", str(out), "--json").stdout)["results"]
    assert hits[0]["id"] == "v1" and hits[0]["title"] == "周杰伦个人资料"
    wrong = cli("build-index", "--embeddings", str(folder), "--out", str(out), "--model", "lexical:64")
    assert wrong.code == 1 and "lexical:64 makes 64-d vectors, but" in wrong.stderr
    assert cli("embed", "--dataset", "demo", "--model", "lexical").code == 0
    shards = cli("build-index", "--dataset", "demo", "--model", "lexical")
    assert shards.code == 1 and "--model is for bring-your-own embeddings" in shards.stderr


def test_a_note_ending_in_a_long_path_stays_one_line_when_piped(cli, tmp_path):
    assert cli("embed", "--dataset", "demo", "--model", "lexical").code == 0
    out = tmp_path / ("a-folder-whose-name-alone-would-push-the-line-past-eighty-columns" * 2) / "index"
    built = cli("build-index", "--type", "flat", "--out", str(out))
    assert built.code == 0 and built.stderr.splitlines()[-1].endswith(f"-> {out}")


def test_clip_retrieval_output_is_indexed_appended_to_and_shows_its_captions_and_urls(cli, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vsearch.embeddings import load_encoder

    captions = ["大宅门演员表", "周杰伦个人资料", "艾尔登法环马怎么获得", "汪汪队立大功", "原神攻略"]
    folder = tmp_path / "clip-retrieval"
    for sub in ("img_emb", "metadata"):
        (folder / sub).mkdir(parents=True)

    def partition(number, rows):  # as clip-retrieval's webdataset run writes one: float16, key and url
        vectors = load_encoder("lexical").encode_texts([captions[i] for i in rows])  # another pipeline's vectors
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", vectors.astype(np.float16))
        pq.write_table(pa.table({"caption": [captions[i] for i in rows], "url": [f"http://c/{i}.jpg" for i in rows],
                                 "key": [f"{i:09d}" for i in rows], "status": ["success"] * len(rows)}),
                       folder / "metadata" / f"metadata_{number}.parquet")

    partition(0, [0, 1, 2])
    out = tmp_path / "index"
    built = cli("build-index", "--type", "flat", "--embeddings", str(folder), "--out", str(out), "--model", "lexical")
    assert built.code == 0 and "3 vectors indexed" in built.stderr
    partition(1, [3, 4])
    appended = cli("build-index", "--append", "--embeddings", str(folder), "--out", str(out))
    assert appended.code == 0 and "appended 2 vectors from 1 file;" in appended.stderr
    hits = json.loads(cli("query", "原神", "--index", str(out), "--json").stdout)["results"]
    assert (hits[0]["id"], hits[0]["title"], hits[0]["uri"]) == ("000000004", "原神攻略", "http://c/4.jpg")
    filtered = json.loads(cli("query", "周杰伦", "--index", str(out), "--json", "--where", "status = 'success'").stdout)
    assert filtered["results"][0]["title"] == "周杰伦个人资料"


@pytest.mark.parametrize("args, message", [
    (["build-index", "--type", "hnsw", "--engine", "annoy"], "index type hnsw has no engine 'annoy'"),
    (["build-index", "--memory-budget", "lots"], "bad size 'lots'"),
    (["build-index", "--target-recall", "1.5"], "--target-recall must be in (0, 1]"),
    (["delete", "--index", "nope"], "no ids to delete"),
    (["bench", "--sizes", "0"], "--sizes must each be at least 1,000 vectors"),
    (["build-index", "--out", "{file}"], "it is a file, not an index folder"),
    (["query", "--index", "demo-hnsw", "--file", "{file}", "--out", "/no/such/folder/out.jsonl"],
     "No such file or directory: /no/such/folder/out.jsonl"),
    (["build-index", "--type", "hnsw", "--param", "M=0"], "parameter M=0 is out of range: M must be at least 2"),
    (["build-index", "--type", "hnsw", "--param", "ef_search=0"], "ef_search must be at least 1"),
    (["build-index", "--type", "ivfpq", "--param", "opq=2"], "opq must be from 0 to 1"),
    (["build-index", "--threads", "0"], "--threads must be at least 1, or -1 for all cores"),
    (["build-index", "--kind", "clip"], "no clip vectors in"),
    (["query", "大宅门", "--weights", "ann=-1"], "bad weights ann=-1,lexical=0.3,semantic=0.5: each must be"),
    (["query", "大宅门", "--weights", "ann=0,lexical=0,semantic=0"], "and one above 0"),
    (["query", "大宅门", "--device", "gpu"], "unknown --device 'gpu'"),
])
def test_index_option_errors(args, message, cli, tmp_path):
    assert cli("embed", "--dataset", "demo", "--model", "lexical").code == 0
    assert cli("build-index").code == 0
    (tmp_path / "a-file.txt").write_text("大宅门\n", encoding="utf-8")
    result = cli(*[a.format(file=tmp_path / "a-file.txt") for a in args])
    assert result.code == 1 and message in result.stderr, result.stderr


def test_shards_and_indexes_never_share_a_folder(cli, workspace):
    """A build replaces its folder whole: shards inside it would be lost with the old index."""
    assert cli("embed", "--dataset", "demo", "--model", "lexical").code == 0
    shards = workspace.embeddings / "demo"
    assert cli("build-index", "--type", "flat").code == 0
    index = workspace.indexes / "demo-flat"
    before = sorted(p.name for p in shards.iterdir())

    into_index = cli("embed", "--dataset", "demo", "--model", "lexical", "--out", str(index))
    assert into_index.code == 1 and "is an index folder" in into_index.stderr
    for out in (shards, workspace.embeddings):
        over_shards = cli("build-index", "--type", "flat", "--embeddings", str(shards), "--out", str(out))
        assert over_shards.code == 1 and "it holds the embeddings being indexed" in over_shards.stderr
    inside = index / "shards"
    shutil.copytree(shards, inside)
    append = cli("build-index", "--append", "--embeddings", str(inside), "--out", str(index))
    assert append.code == 1 and "the embeddings are inside the index folder" in append.stderr
    assert sorted(p.name for p in shards.iterdir()) == before and sorted(p.name for p in inside.iterdir()) == before
    assert (index / "index.json").is_file()


def test_list_shows_what_the_workspace_holds_and_which_folders_are_the_defaults(cli, workspace, tmp_path):
    empty = cli("list")
    assert empty.code == 0 and "nothing here yet" in empty.stderr
    assert cli("demo").code == 0
    source = tmp_path / "more.txt"
    source.write_text("大宅门 第一集\thttp://covers.example/1.jpg\t大宅门\n", encoding="utf-8")
    assert cli("embed", "--dataset", str(source), "--model", "lexical:64").code == 0
    assert cli("build-index", "--type", "flat").code == 0
    listing = json.loads(cli("list", "--json").stdout)
    shards = {e["name"]: e for e in listing["embeddings"]}
    indexes = {e["name"]: e for e in listing["indexes"]}
    assert shards["demo"]["covers"] == 199 and shards["demo"]["model"] == "lexical"
    assert shards["more"]["model"] == "lexical:64" and shards["more"]["default"] and not shards["demo"]["default"]
    assert indexes["demo-hnsw"]["type"] == "hnsw" and indexes["demo-hnsw"]["vectors"] == 199
    assert indexes["more-flat"]["default"] and indexes["more-flat"]["recall@10"] == 1.0
    assert cli("delete", "--index", "demo-hnsw", *demo_relevant_ids()).code == 0
    listing = json.loads(cli("list", "--json").stdout)
    assert {e["name"]: e["vectors"] for e in listing["indexes"]}["demo-hnsw"] == 199 - len(demo_relevant_ids())
    shown = cli("list")
    assert shown.code == 0 and "demo-hnsw" in shown.stdout and "* used when no path is given" in shown.stdout
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    (workspace.index_dir("demo-hnsw") / "index.json").write_text("{broken", encoding="utf-8")
    damaged = json.loads(cli("list", "--json").stdout)
    assert "unreadable index manifest" in {e["name"]: e for e in damaged["indexes"]}["demo-hnsw"]["error"]
    assert cli("list").code == 0


def test_an_index_built_while_embed_still_writes_its_shards_says_it_holds_those_written_so_far(cli, workspace):
    from vsearch.files import lock_folder

    assert cli("embed", "--dataset", "demo", "--model", "lexical", "--shard-size", "50").code == 0
    with lock_folder(workspace.embeddings / "demo", "vsearch embed"):
        result = cli("build-index", "--type", "flat")
    assert result.code == 0
    assert ("note: vsearch embed is still writing " + str(workspace.embeddings / "demo") + ": this takes the 4 "
            "shards written so far, and build-index --append the rest later").replace(" ", "") in \
        "".join(result.stderr.split())
    assert "still writing" not in cli("build-index", "--type", "flat").stderr


def test_list_shows_the_checkpoints_a_stopped_build_left_until_it_is_run_again(cli, workspace, tmp_path, monkeypatch,
                                                                              every_batch):
    from vsearch.files import lock_folder
    from vsearch.indexes import BuildConfig
    from vsearch.indexes.backends import HnswlibBackend
    from vsearch.indexes.vectors import open_source
    from tests.test_build_resume import stopped_build
    from tests.test_indexes import clustered, write_parquet

    vectors = clustered(3000)
    for number in range(3):
        write_parquet(tmp_path / "parts", vectors[number * 1000:(number + 1) * 1000], number * 1000,
                      f"part-{number}.parquet")
    index = workspace.index_dir("mine")
    stopped_build(monkeypatch, HnswlibBackend, BuildConfig(), open_source(tmp_path / "parts"), index)
    [entry] = json.loads(cli("list", "--json").stdout)["checkpoints"]
    assert (entry["name"], entry["writes"], entry["job"]) == ("mine.partial", str(index), "vsearch build-index")
    assert entry["bytes"] > 1000 * 64 * 4 and not entry["running"]
    with lock_folder(index.with_name("mine.partial"), "test"):
        assert json.loads(cli("list", "--json").stdout)["checkpoints"][0]["running"]
    shown = cli("list")
    assert "mine.partial" in shown.stdout and "stopped" in shown.stdout
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())

    assert cli("build-index", "--type", "hnsw", "--embeddings", str(tmp_path / "parts"), "--name", "mine").code == 0
    assert json.loads(cli("list", "--json").stdout)["checkpoints"] == []
