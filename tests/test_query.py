"""What a user of `vsearch query` sees: filters, reranking and its parts, batches, errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vsearch.embeddings import load_encoder
from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings.media import load_image
from vsearch.query import Searcher
from vsearch.query.rerank import lexical_overlap
from vsearch.workspace import ENV_VAR
from tests.conftest import write_cbvs_covers


@pytest.fixture
def demo(cli):
    assert cli("demo").code == 0
    return cli


def results(cli, *args):
    result = cli("query", *args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_where_filters_on_metadata_and_widens_until_k_pass(demo):
    # 周杰伦 covers are far down the list for this query: the search must widen to find k of them.
    payload = results(demo, "大宅门演员表", "-k", "4", "--where", "title LIKE '%周杰伦%'")
    assert len(payload["results"]) == 4
    assert all("周杰伦" in hit["title"] for hit in payload["results"])
    nothing = results(demo, "大宅门演员表", "--where", "ocr = 'no cover says this'")
    assert nothing["results"] == [] and "nothing in the index passes --where ocr = 'no cover says this'" in nothing["notes"]


def test_a_selective_where_is_answered_exactly_from_the_rows_that_pass(cli, workspace, tmp_path, monkeypatch):
    assert cli("embed", "--dataset", str(write_cbvs_covers(tmp_path / "c.txt", 1000)), "--model", "lexical").code == 0
    assert cli("build-index", "--type", "hnsw").code == 0
    monkeypatch.setattr(Searcher, "widenings", 0)  # one ANN round, then every passing row scored exactly
    payload = results(cli, "大宅门演员表", "-k", "5", "--no-rerank", "--where", "title LIKE '% 第99_集'")
    shards = pa.concat_tables(pq.read_table(f) for f in sorted((workspace.embeddings / "c").glob("*.parquet")))
    passing = [row for row in shards.to_pylist() if re.search(r" 第99\d集$", row["title"])]
    query = load_encoder("lexical").encode_texts(["大宅门演员表"])[0]
    unit = [np.asarray(row["vector"], np.float32) / np.linalg.norm(np.asarray(row["vector"], np.float32))
            for row in passing]  # as indexes hold them: float16 shards, L2-normalised again
    exact = sorted(((float(np.dot(query, vector)), row["id"]) for vector, row in zip(unit, passing)), reverse=True)[:5]
    assert [hit["id"] for hit in payload["results"]] == [i for _, i in exact]
    assert [hit["score"] for hit in payload["results"]] == pytest.approx([s for s, _ in exact], abs=1e-5)


def test_an_index_answers_queries_without_the_shards_it_was_built_from(demo, workspace):
    expected = results(demo, "大宅门演员表", "-k", "5")
    shards = workspace.embeddings / "demo"
    shards.rename(shards.with_name("demo.away"))
    try:
        assert results(demo, "大宅门演员表", "-k", "5")["results"] == expected["results"]
    finally:
        shards.with_name("demo.away").rename(shards)


def test_a_bad_where_predicate_is_a_clear_error(demo):
    result = demo("query", "大宅门", "--where", "no_such_column = 1")
    assert result.code == 1 and result.stderr.startswith("vsearch: error: bad --where predicate")
    assert result.stderr.rstrip().endswith("(columns: id, kind, title, ocr, uri, cover)")


@pytest.mark.parametrize("where", [
    "1=1); COPY (SELECT 1) TO '{file}'; SELECT 1 AS _position WHERE (1",  # a second statement
    "(SELECT count(*) FROM read_text('{secret}')) > 0",  # a file beside the rows
    "1=1) UNION ALL SELECT 0 FROM read_text('{secret}') WHERE (1",
])
def test_a_where_predicate_reaches_only_the_rows(where, demo, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("大宅门")
    result = demo("query", "大宅门", "--where", where.format(file=tmp_path / "written.csv", secret=secret))
    assert result.code == 1 and result.stderr.startswith("vsearch: error: bad --where predicate")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "written.csv").exists()


def test_explain_shows_the_parts_of_the_score(demo):
    payload = results(demo, "大宅门演员表", "-k", "3", "--explain")
    for hit in payload["results"]:
        assert hit["score"] == pytest.approx(hit["parts"]["ann"] + 0.3 * hit["parts"]["lexical"])
    assert any("no OCR heads" in note for note in payload["notes"])
    assert set(payload["seconds"]) == {"encode", "search", "metadata", "rerank"}
    table = demo("query", "大宅门演员表", "-k", "3", "--explain")
    assert "lexical" in table.stdout and "note: semantic and presence parts dropped" in table.stderr


def test_an_explained_table_fits_80_columns_with_every_part_title_and_id_readable():
    from rich.console import Console

    from vsearch.console import hits_table
    from vsearch.query import Hit

    parts = {"ann": 0.785, "lexical": 1.0, "semantic": 0.912, "presence": 0.998}
    long_id = "covers/2026/" + "x" * 70 + "-end"
    hits = [Hit(rank, f"{rank:016x}", 1.5, "大宅门演员表 现在都怎么样了 完整版", "大宅门 演员表", None, parts)
            for rank in (1, 2)] + [Hit(3, long_id, 0.9, "周杰伦", "周杰伦", None, {"ann": 0.9, "lexical": 0.0})]
    console = Console(width=80, record=True, color_system=None)
    console.print(hits_table("大宅门演员表", hits, explain=True))
    lines = console.export_text().splitlines()
    assert max(console.measure(line).maximum for line in lines) <= 80
    shown = re.findall(r"(ann|lexical|semantic|presence) +(\d\.\d{3})", "\n".join(lines))
    assert shown == [(name, f"{value:.3f}") for name, value in parts.items()] * 2 + [("ann", "0.900"), ("lexical", "0.000")]
    assert any("大宅门演员表" in line for line in lines)
    id_cells = "".join(line.split("│")[-2].strip() for line in lines if line.startswith("│"))
    assert all(hit.id in id_cells for hit in hits)  # a long id wraps, whole

    console.print(hits_table("大宅门演员表", hits[:2], explain=True))
    lines = console.export_text().splitlines()
    assert all(any(hit.id in line for line in lines) for hit in hits[:2])  # short ids stay on one line


def test_no_rerank_ranks_by_ann_alone(demo):
    hits = results(demo, "大宅门演员表", "--no-rerank", "-k", "5")["results"]
    assert [h["parts"] for h in hits] == [{"ann": h["score"]} for h in hits]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_reranking_lifts_covers_whose_text_holds_the_query(demo):
    plain = results(demo, "演员表", "--no-rerank", "-k", "10")["results"]
    fused = results(demo, "演员表", "-k", "10")["results"]
    assert {h["id"] for h in fused} >= {h["id"] for h in plain if "演员表" in h["ocr"]}
    assert all("演员表" in (h["ocr"] + h["title"]) for h in fused[:5])


def test_a_query_nothing_resembles_says_so(demo):
    answer = results(demo, "x", "-k", "3")  # no demo cover holds an x (nor a hash collision with one)
    assert all(h["score"] == 0 for h in answer["results"])
    assert any("nothing in the index resembles the query" in note for note in answer["notes"])
    assert not any("resembles" in note for note in results(demo, "大宅门演员表")["notes"])


def test_a_file_of_queries_gives_json_lines(demo, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("大宅门演员表\n\n周杰伦个人资料\n", encoding="utf-8")
    result = demo("query", "--file", str(queries), "-k", "2")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["大宅门演员表", "周杰伦个人资料"]
    assert all(len(line["results"]) == 2 for line in lines)
    out = tmp_path / "out.jsonl"
    assert demo("query", "--file", str(queries), "--out", str(out)).code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    same = demo("query", "--file", str(queries), "--out", str(tmp_path / "." / "queries.txt"))
    assert same.code == 1 and "would erase the queries" in same.stderr
    assert queries.read_text(encoding="utf-8") == "大宅门演员表\n\n周杰伦个人资料\n"
    queries.write_text("\n  \n", encoding="utf-8")
    blank = demo("query", "--file", str(queries))
    assert blank.code == 1 and blank.stderr.strip() == f"vsearch: error: no queries in {queries}: every line is blank"


def test_a_query_that_cannot_be_searched_is_answered_with_its_error_and_the_batch_goes_on(demo, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("大宅门演员表\n！？…\n周杰伦个人资料\n", encoding="utf-8")
    result = demo("query", "--file", str(queries), "-k", "2")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["大宅门演员表", "！？…", "周杰伦个人资料"]
    assert lines[1]["error"] == "query '！？…' has no letters or digits to match" and "results" not in lines[1]
    assert len(lines[2]["results"]) == 2
    assert result.code == 1
    assert result.stderr.strip() == ("vsearch: error: 1 of 3 queries could not be searched "
                                     "(the error is in their JSON lines)")
    # A predicate is every query's: a bad one ends the batch at once.
    bad = demo("query", "--file", str(queries), "--where", "no_such_column = 1")
    assert bad.code == 1 and bad.stdout == "" and "bad --where predicate" in bad.stderr


def test_a_query_the_model_gives_no_finite_vector_for_is_answered_with_that_error(demo, tmp_path, monkeypatch):
    from vsearch.embeddings.lexical import LexicalEncoder

    real = LexicalEncoder.encode_texts

    def overflowing(self, texts):  # as fp16 can overflow on one query
        vectors = real(self, texts)
        vectors[["周杰伦" in text for text in texts]] = np.inf
        return vectors

    monkeypatch.setattr(LexicalEncoder, "encode_texts", overflowing)
    queries = tmp_path / "queries.txt"
    queries.write_text("大宅门演员表\n周杰伦个人资料\n", encoding="utf-8")
    lines = [json.loads(line) for line in demo("query", "--file", str(queries), "-k", "2").stdout.splitlines()]
    assert len(lines[0]["results"]) == 2 and "results" not in lines[1]
    assert re.fullmatch(r"\S+ gave a vector with NaN or infinite values for query '周杰伦个人资料'", lines[1]["error"])


def test_ids_to_delete_come_from_a_file_or_standard_input(demo, workspace, tmp_path):
    hits = [h["id"] for h in results(demo, "大宅门演员表", "-k", "4", "--no-rerank")["results"]]
    listed = tmp_path / "ids.txt"
    listed.write_text(f"{hits[0]}\n\n{hits[1]}\n", encoding="utf-8")
    assert demo("delete", "--ids-file", str(listed)).code == 0
    done = subprocess.run([sys.executable, "-m", "vsearch", "delete", "--ids-file", "-"], input=f"{hits[2]}\n",
                          capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, ENV_VAR: str(workspace.root)}, timeout=120)
    assert done.returncode == 0 and "1 id deleted" in done.stderr, done.stderr
    left = [h["id"] for h in results(demo, "大宅门演员表", "-k", "4", "--no-rerank")["results"]]
    assert left[0] == hits[3] and not set(hits[:3]) & set(left)


def test_queries_on_standard_input_are_answered_as_they_arrive(demo, workspace):
    with subprocess.Popen([sys.executable, "-m", "vsearch", "query", "--file", "-", "-k", "2"], text=True,
                          encoding="utf-8", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, ENV_VAR: str(workspace.root)}) as process:
        answers = []
        for text in ["大宅门演员表", "周杰伦个人资料"]:
            process.stdin.write(text + "\n")
            process.stdin.flush()
            answers.append(json.loads(process.stdout.readline()))  # before the next query is sent
        process.stdin.close()
        assert process.stdout.read() == "" and process.wait(timeout=60) == 0, process.stderr.read()
    assert [a["query"] for a in answers] == ["大宅门演员表", "周杰伦个人资料"]
    assert "大宅门" in answers[0]["results"][0]["title"] and "周杰伦" in answers[1]["results"][0]["title"]


def test_a_query_with_a_model_free_encoder_never_loads_torch(demo, workspace):
    # torch takes seconds to import: a lexical index must answer a one-off `vsearch query` without it.
    script = ("import sys\nfrom vsearch.cli import main\ntry:\n    main(['query', '大宅门', '--json'])\n"
              "finally:\n    print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8",
                          env={**os.environ, ENV_VAR: str(workspace.root)}, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["results"], done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_long_queries_are_truncated_with_a_note(demo):
    payload = results(demo, "大宅门" * 100, "-k", "1")
    assert payload["query"] == ("大宅门" * 100)[:128]
    assert "query truncated to its first 128 characters" in payload["notes"]


@pytest.mark.parametrize("args, message", [
    (["query"], "give a query text or --file"),
    (["query", "x", "--file", "q.txt"], "give a query text or --file FILE (one query per line), not both"),
    (["query", "--file", "/no/such/queries.txt"], "queries file not found"),
    (["query", "x", "--weights", "ann=high"], "bad --weights"),
    (["query", "x", "--weights", "ocr=1"], "unknown weight ocr"),
    (["query", "   "], "empty query"),
    (["query", "x", "--candidates", "0"], "--candidates must be at least 1"),
    (["query", "x", "--rerank-images", "-1"], "--rerank-images must be at least 0"),
])
def test_query_errors(args, message, demo):
    result = demo(*args)
    assert result.code == 1 and message in result.stderr, result.stderr


def test_lexical_overlap():
    assert lexical_overlap("大宅门", "大宅门 演员表") == 1.0
    assert lexical_overlap("大宅门", "原神") == 0.0
    assert 0 < lexical_overlap("大宅门演员表", "陈情令演员表") < 1
    assert lexical_overlap("!!!", "anything") == 0.0


@pytest.fixture
def uniclip_demo(cli, tiny_uniclip):
    spec = f"uniclip:{tiny_uniclip}"
    assert cli("embed", "--dataset", "demo", "--model", spec, "--device", "cpu", "--workers", "0").code == 0
    assert cli("build-index", "--type", "flat").code == 0
    return cli


def test_uniclip_heads_rerank_within_the_image_budget(uniclip_demo, tiny_uniclip):
    payload = results(uniclip_demo, "大宅门演员表", "-k", "10", "--candidates", "20", "--rerank-images", "6",
                      "--device", "cpu")
    hits = payload["results"]
    with_heads = [h for h in hits if "semantic" in h["parts"]]
    assert len(with_heads) == 6 and hits[:6] == with_heads  # the reranked six come first
    for hit in with_heads:
        parts = hit["parts"]
        assert 0 <= parts["semantic"] <= 1 and 0 <= parts["presence"] <= 1
        assert hit["score"] == pytest.approx(parts["ann"] + 0.3 * parts["lexical"]
                                             + 0.5 * parts["presence"] * parts["semantic"], abs=1e-6)
    # Ranks 7-10 are past the budget: the note says why they have no head parts.
    assert payload["notes"] == ["semantic and presence read for the 6 covers ranked best on ann and lexical "
                                "(--rerank-images 6); the rest follow them in that order"]
    # Each cover's parts are the heads' outputs for that cover (covers are read in parallel).
    encoder = load_encoder(f"uniclip:{tiny_uniclip}", "cpu")
    covers = [load_image(h["uri"]) for h in with_heads]
    assert [h["parts"]["presence"] for h in with_heads] == pytest.approx(encoder.presence(covers).tolist(), abs=1e-5)
    assert [h["parts"]["semantic"] for h in with_heads] == pytest.approx(
        encoder.match(["大宅门演员表"] * len(covers), covers).tolist(), abs=1e-5)


def test_candidates_from_another_engine_are_reranked_as_vsearch_query_reranks_its_own(uniclip_demo, workspace,
                                                                                     tiny_uniclip):
    # As README's "Serving from another engine" does it, with an exact search over the shards as the engine.
    from vsearch.query.rerank import Candidate, Weights, rerank

    shards = pa.concat_tables(pq.read_table(path) for path in sorted((workspace.embeddings / "demo").glob("*.parquet")))
    encoder = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    vector = encoder.encode_texts(["大宅门演员表"])[0]
    scores = np.asarray(shards.column("vector").to_pylist(), np.float32) @ vector
    best = np.argsort(-scores)[:20]
    candidates = [Candidate(row["id"], float(scores[i]), row["title"], row["ocr"], row["uri"])
                  for i, row in zip(best, shards.take(best).to_pylist())]
    ranked, notes = rerank(encoder, "大宅门演员表", candidates, Weights(), image_budget=6)
    ours = results(uniclip_demo, "大宅门演员表", "-k", "10", "--candidates", "20", "--rerank-images", "6",
                   "--device", "cpu")["results"]
    assert [c.id for c in ranked[:10]] == [hit["id"] for hit in ours]
    assert [c.score for c in ranked[:10]] == pytest.approx([hit["score"] for hit in ours], abs=1e-4)
    assert notes == [] and {"ann", "lexical", "semantic", "presence"} == set(ranked[0].parts)


def test_the_image_budget_goes_to_the_candidates_the_cheap_parts_rank_best(uniclip_demo):
    # Random weights make the ANN order arbitrary; the covers carrying the query's words must still
    # be the ones whose images are read.
    payload = results(uniclip_demo, "大宅门演员表", "-k", "40", "--candidates", "40", "--rerank-images", "2",
                      "--device", "cpu")
    hits = payload["results"]
    cheap = [h["parts"]["ann"] + 0.3 * h["parts"]["lexical"] for h in hits]
    with_heads, rest = [h for h in hits if "semantic" in h["parts"]], hits[2:]
    assert hits[:2] == with_heads and all("大宅门" in h["title"] for h in with_heads)
    assert min(cheap[:2]) >= max(cheap[2:])
    assert [h["score"] for h in rest] == sorted((h["score"] for h in rest), reverse=True)


def test_clips_are_reranked_on_the_cover_images_of_their_videos(cli, workspace, tiny_uniclip):
    spec = f"uniclip:{tiny_uniclip}"
    assert cli("embed", "--dataset", "demo", "--model", spec, "--kind", "clip", "--device", "cpu",
               "--workers", "0").code == 0
    assert cli("build-index", "--type", "flat", "--kind", "clip").code == 0
    payload = results(cli, "大宅门演员表", "-k", "3", "--rerank-images", "3", "--device", "cpu")
    hits = payload["results"]
    assert payload["notes"] == [] and all(h["uri"].endswith(".mp4") for h in hits)
    cover_of = {row.id: row.uri for row in open_dataset("demo", workspace).rows()}
    covers = [load_image(cover_of[h["id"]]) for h in hits]
    encoder = load_encoder(spec, "cpu")
    assert [h["parts"]["presence"] for h in hits] == pytest.approx(encoder.presence(covers).tolist(), abs=1e-5)


def test_a_slow_cover_server_holds_a_query_up_only_until_the_fetch_deadline(cli, workspace, tiny_uniclip,
                                                                           cover_server, tmp_path, monkeypatch):

    monkeypatch.setattr("vsearch.query.rerank.COVER_FETCH_SECONDS", 1.0)
    folder, base = cover_server
    for number, row in enumerate(list(open_dataset("demo", workspace).rows())[:2]):
        shutil.copy(row.uri, folder / f"{number}.jpg")
    fast, slow = f"{base}/0.jpg", f"{base}/trickle/1.jpg"  # the second takes 2.4 s, sending all the while
    source = tmp_path / "remote.txt"
    source.write_text(f"封面零\t{fast}\t封面\n封面一\t{slow}\t封面\n", encoding="utf-8")
    assert cli("embed", "--dataset", str(source), "--model", f"uniclip:{tiny_uniclip}", "--device", "cpu",
               "--workers", "0").code == 0  # the embed job waits for a server that keeps sending
    assert cli("build-index", "--type", "flat").code == 0
    payload = results(cli, "封面", "--rerank-images", "2", "--device", "cpu")
    parts = {h["uri"]: h["parts"] for h in payload["results"]}
    assert "semantic" in parts[fast] and "semantic" not in parts[slow]
    assert any("1 of 2 covers" in note and slow in note for note in payload["notes"])


def test_on_a_cpu_the_heads_read_one_cover_per_core_by_default(uniclip_demo):
    hits = results(uniclip_demo, "大宅门演员表", "-k", "60", "--device", "cpu")["results"]
    assert sum("semantic" in h["parts"] for h in hits) == min(50, torch.get_num_threads())


def test_threads_can_share_one_searcher(uniclip_demo, workspace):
    from concurrent.futures import ThreadPoolExecutor

    from vsearch.query import QueryConfig

    index = next(workspace.indexes.iterdir())
    searcher = Searcher(index, "cpu")
    queries = [("大宅门演员表", "title LIKE '%大宅门%'", 5), ("周杰伦个人资料", None, 12),
               ("艾尔登法环马怎么获得", "ocr_presence >= 0", 3), ("演员表", "ocr LIKE '%陈情令%'", 8)] * 12

    def answer(query):
        text, where, k = query
        result = searcher.search(QueryConfig(text, index, k=k, where=where, candidates=20, image_budget=4))
        return [(h.id, round(h.score, 5), sorted(h.parts)) for h in result.hits]

    alone = [answer(q) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(answer, queries)) == alone


def test_where_filters_on_per_row_model_outputs(uniclip_demo):
    everything = results(uniclip_demo, "大宅门", "-k", "5", "--no-rerank", "--device", "cpu",
                         "--where", "ocr_presence BETWEEN 0 AND 1")["results"]
    assert len(everything) == 5
    impossible = results(uniclip_demo, "大宅门", "--no-rerank", "--device", "cpu", "--where", "ocr_presence > 1")
    assert impossible["results"] == []


def test_unreachable_cover_images_drop_the_head_parts_with_a_note(uniclip_demo, workspace):

    import pyarrow.parquet as pq

    shard = next((workspace.embeddings / "demo").glob("cover-*.parquet"))
    table = pq.read_table(shard)
    first = table.column("uri")[0].as_py()
    moved = first + ".moved"
    shutil.move(first, moved)
    try:
        hit_id = table.column("id")[0].as_py()
        payload = results(uniclip_demo, table.column("ocr")[0].as_py(), "-k", "3", "--device", "cpu",
                          "--rerank-images", "50", "--candidates", "200")
        assert any("whose image cannot be read" in note and moved.removesuffix(".moved") in note
                   for note in payload["notes"])
        assert any(h["id"] == hit_id and "semantic" not in h["parts"] for h in payload["results"]) or \
            hit_id not in [h["id"] for h in payload["results"]]
    finally:
        shutil.move(moved, first)


def test_a_model_moved_since_the_index_was_built_is_named_with_model(uniclip_demo, tiny_uniclip, tmp_path):
    elsewhere = shutil.move(tiny_uniclip, tmp_path / "elsewhere.pt")  # or the index copied to a serving machine
    try:
        missing = uniclip_demo("query", "大宅门", "--device", "cpu")
        assert missing.code == 1 and missing.stderr.strip().endswith("name it with --model")
        found = uniclip_demo("query", "大宅门", "--device", "cpu", "--json", "--model", f"uniclip:{elsewhere}")
        assert found.code == 0 and json.loads(found.stdout)["results"]
        other = uniclip_demo("query", "大宅门", "--model", "lexical")
        assert other.code == 1 and "--model must name the model that made them" in other.stderr
    finally:
        shutil.move(elsewhere, tiny_uniclip)


def test_a_model_whose_weights_changed_is_refused(uniclip_demo, tiny_uniclip, tmp_path):
    saved = tmp_path / "original.pt"
    saved.write_bytes(tiny_uniclip.read_bytes())
    state = torch.load(tiny_uniclip, weights_only=True)
    state["step"] = 11  # same architecture, different file: a different fingerprint
    torch.save(state, tiny_uniclip)
    try:
        result = uniclip_demo("query", "大宅门", "--device", "cpu")
        assert result.code == 1 and "fingerprint" in result.stderr and "re-embed and rebuild" in result.stderr
    finally:
        tiny_uniclip.write_bytes(saved.read_bytes())


def test_covers_decoded_on_the_device_give_the_heads_what_the_threads_give(tiny_uniclip, workspace, tmp_path):
    # On a GPU the reranker decodes and resizes JPEG covers there (nvjpeg), as the embed job does;
    # here the same code runs on the CPU device. Other formats and unreadable files keep their place.
    from PIL import Image

    from vsearch.embeddings.media import MediaError, read_all
    from vsearch.query.rerank import _cover_inputs

    encoder = load_encoder(f"uniclip:{tiny_uniclip}", "cpu")
    uris = [row.uri for row in list(open_dataset("demo", workspace).rows())[:6]]
    Image.open(uris[1]).save(tmp_path / "cover.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    uris[1:1] = [str(tmp_path / "bad.jpg"), str(tmp_path / "cover.png")]
    fetched = read_all(uris)
    on_device, on_threads = (_cover_inputs(encoder, fetched, uris, on_device=flag) for flag in (True, False))
    readable = [not isinstance(p, MediaError) for p in on_device]
    assert readable == [not isinstance(p, MediaError) for p in on_threads] == [True, False] + [True] * 6
    texts = ["大宅门演员表"] * readable.count(True)
    heads = [encoder.match_and_presence(texts, torch.stack([p for p, ok in zip(inputs, readable) if ok]))
             for inputs in (on_device, on_threads)]
    for device_part, thread_part in zip(*heads):
        assert np.abs(device_part - thread_part).max() < 0.01
