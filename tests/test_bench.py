import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vsearch.indexes.bench import AnonymousPeak, BenchConfig, clip_like, run_bench


def test_synthetic_vectors_are_unit_norm_clustered_and_reproducible():
    first = next(clip_like(2000, 64, seed=3))
    again = next(clip_like(2000, 64, seed=3))
    assert first.dtype == np.float32 and (first == again).all() and abs(float((first ** 2).sum(axis=1).mean()) - 1) < 1e-5
    # clustered: the nearest neighbour is much closer than a random vector
    similarity = first[:100] @ first.T
    similarity[range(100), range(100)] = -1
    assert similarity.max(axis=1).mean() > similarity.mean() + 0.3


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_anonymous_peak_sees_memory_freed_before_the_end_and_not_a_mapped_file(tmp_path):
    mapped = tmp_path / "file.npy"
    np.save(mapped, np.ones(64 << 20, np.uint8))
    with AnonymousPeak(interval=0.01) as peak:
        size = 64 << 20
        held = np.ones(size, np.uint8)  # written: every page resident
        time.sleep(0.1)
        del held
        start = peak.peak
        read = np.load(mapped, mmap_mode="r")
        assert int(read.sum()) == size  # every page of the file mapped in
        time.sleep(0.1)
    assert peak.bytes >= size and peak.bytes - start < size // 2


def test_bench_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    config = BenchConfig(sizes=[3000], dim=32, queries=60, latency_queries=10, out=tmp_path / "ann")
    written = run_bench(config, tmp_path / "scratch", say=lambda line: None)
    results = json.loads(written["json"].read_text())["results"]
    assert [(r["type"], r["engine"]) for r in results] == [
        ("flat", "faiss"), ("hnsw", "hnswlib"), ("hnsw", "faiss"), ("ivfpq", "faiss")]
    flat = results[0]["at_chosen"]
    assert flat["recall@1"] == flat["recall@10"] == flat["recall@100"] == 1.0
    for result in results:
        assert result["at_chosen"]["recall@10"] >= 0.9
        assert 0 < result["build_peak_bytes"] <= result["build_peak_resident_bytes"]
        assert result["overhead"]["batch"] > 0 and result["sweep"]
    assert "| 3,000 | hnsw (hnswlib) |" in written["markdown"].read_text()
    assert written["plot"].read_bytes()[:4] == b"\x89PNG"


def test_an_index_too_large_for_the_machines_memory_is_skipped_and_the_others_measured(tmp_path, monkeypatch):
    import vsearch.indexes.bench as bench
    from vsearch.errors import TooLargeForMemory, VsearchError

    real = bench._build
    too_large = "flat with 3,000 x 32-d vectors needs about 375.0 KiB, more than this machine's 300.0 KiB of memory"

    def build(index_type, engine, source, path):  # the check runs in the build's own process, out of reach here
        if index_type == "flat":
            raise TooLargeForMemory(too_large)
        return real(index_type, engine, source, path)

    monkeypatch.setattr(bench, "_build", build)
    said = []
    config = BenchConfig(sizes=[3000], dim=32, queries=60, latency_queries=10, indexes=["flat", "hnsw"],
                         out=tmp_path / "ann")
    written = run_bench(config, tmp_path / "scratch", say=said.append)
    assert [r["type"] for r in json.loads(written["json"].read_text())["results"]] == ["hnsw"]
    assert f"skipped flat: {too_large}" in said
    with pytest.raises(VsearchError, match="no index was measured: none fits this machine's memory"):
        run_bench(replace(config, indexes=["flat"]), tmp_path / "scratch", say=said.append)


def test_bench_makes_its_scratch_folder(cli, tmp_path):
    scratch = tmp_path / "not" / "there"
    result = cli("bench", "--sizes", "1000", "--dim", "16", "--queries", "20", "--indexes", "flat",
                 "--out", str(tmp_path / "ann"), "--scratch", str(scratch))
    assert result.code == 0, result.err
    assert scratch.is_dir() and list(scratch.iterdir()) == []  # its temporary folder is gone
    assert "| 1,000 | flat (faiss) |" in (tmp_path / "ann.md").read_text()


def test_a_killed_bench_leaves_no_build_running(tmp_path):
    from tests.test_indexes import clustered, write_parquet
    from tests.test_resume import children, gone

    write_parquet(tmp_path / "byo", clustered(150_000, dim=32))  # a build of ten seconds or so
    command = [sys.executable, "-m", "vsearch", "bench", "--embeddings", str(tmp_path / "byo"), "--indexes", "hnsw",
               "--out", str(tmp_path / "ann"), "--scratch", str(tmp_path / "scratch")]
    bench = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(children(bench.pid)) < 2 and bench.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the build's process, beside multiprocessing's resource tracker
    helpers = children(bench.pid)
    assert len(helpers) >= 2, "the bench finished before it could be stopped"
    os.kill(bench.pid, signal.SIGKILL)
    bench.wait()
    assert gone(helpers, seconds=5)  # the build alone would take several more


def run_script(script: str, *args: str, returncode: int = 0, here: bool = False) -> subprocess.CompletedProcess:
    """Run a benchmark script as `python benchmarks/SCRIPT ARGS` does; `here`, in this process, for
    the scripts that import torch and the model code (7-8 s a process), which this one holds already.
    Scripts that set FAISS's thread count for their process stay apart."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    if not here:
        done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(path.parents[1])})
        assert done.returncode == returncode, done.stderr[-2000:]
        return done
    out, err, argv, search_path, code = io.StringIO(), io.StringIO(), sys.argv, list(sys.path), 0
    sys.argv, sys.path[:0] = [str(path), *args], [str(path.parent)]  # as python puts a script's folder first
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv, sys.path[:] = argv, search_path
    assert code == returncode, err.getvalue()[-2000:]
    return subprocess.CompletedProcess([str(path), *args], code, out.getvalue(), err.getvalue())


def test_embed_throughput_compares_the_pipeline_with_the_model_alone(tmp_path, tiny_uniclip):
    out = tmp_path / "embed.json"
    run_script("embed_throughput.py", "--covers", "12", "--batch-size", "4", "--workers", "1", "--device", "cpu",
               "--decode", "workers,both", "--model", f"uniclip:{tiny_uniclip}", "--out", str(out), here=True)
    report = json.loads(out.read_text())
    assert report["covers"] == 12 and report["model_only_covers_per_s"] > 0
    workers, both = report["runs"]
    assert (workers["decode"], both["decode"]) == ("workers", "both")
    assert workers["decoded_on_device"] == 0 < both["decoded_on_device"] < 12
    # How the readers' share was set, batch by batch: (their JPEGs, the batch's, ...)
    assert workers["split"]["batches"] == [] and [row[:2] for row in both["split"]["batches"]][0] == [2, 4]
    for run in report["runs"]:
        # The rates are rounded to 0.1 covers/s in the report, a few per cent of a CPU's rate.
        assert run["end_to_end_over_model_only"] == pytest.approx(
            run["end_to_end_covers_per_s"] / report["model_only_covers_per_s"], rel=0.05)
        assert run["after_first_batch_covers_per_s"] > 0  # three batches of 4: the second one's rate
        assert run["until_first_batch_s"] > 0 and run["after_last_batch_s"] >= 0
        assert run["job_seconds"]["model_s"] > 0 and set(run["job_seconds"]) == {
            "input_s", "model_s", "output_s", "decoding_s"}


def test_embed_stages_times_each_step_of_a_batch_of_the_model_named(tmp_path, tiny_uniclip):
    out = tmp_path / "stages.json"
    run_script("embed_stages.py", "--covers", "8", "--batch-size", "4", "--device", "cpu",
               "--model", f"uniclip:{tiny_uniclip}", "--out", str(out), here=True)
    report = json.loads(out.read_text())
    assert report["batches"] == 2 and report["model"] == f"uniclip:{tiny_uniclip}"
    assert set(report["steps_ms"]) == {"read files", "decode JPEGs", "resize", "model"}
    assert all(0 < step["host"] <= step["device"] for step in report["steps_ms"].values())
    assert report["overlapped_ms"] == {}  # the loop's overlap is the GPU's alone


def test_the_embed_benchmarks_refuse_a_model_without_an_image_tower(tmp_path, monkeypatch):
    # Both scripts take their covers and encoder from here; in this process, it spares a start of torch.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from embed_throughput import covers_and_encoder

    with pytest.raises(SystemExit) as refused:
        covers_and_encoder(tmp_path, 8, "lexical", "cpu")
    assert str(refused.value) == "--model lexical: covers need an image model (uniclip:PATH or open_clip:ARCH:PATH)"
    assert list(tmp_path.iterdir()) == []  # no covers made


def test_build_threads_compares_the_hnsw_build_with_hnswlib_at_each_thread_count(tmp_path):
    out = tmp_path / "threads.json"
    run_script("build_threads.py", "--count", "3000", "--dim", "32", "--threads", "2,1", "--out", str(out))
    report = json.loads(out.read_text())
    assert [row["threads"] for row in report["rows"]] == [1, 2]
    first = report["rows"][0]
    assert first["vsearch_scaling"] == first["hnswlib_scaling"] == 1.0
    assert all(row["vsearch_build_vectors_per_s"] > 0 and row["hnswlib_add_items_vectors_per_s"] > 0
               for row in report["rows"])
    assert (report["params"]["M"], report["params"]["ef_construction"]) == (32, 200)  # the build's defaults
    assert all(row["checkpoints"] >= 1 and row["checkpoint_seconds"] >= 0 for row in report["rows"])  # the first is due at once


def test_hnsw_growth_times_each_step_of_one_build_for_each_engine_and_graph(tmp_path):
    out = tmp_path / "growth.json"
    run_script("hnsw_growth.py", "--count", "3000", "--step", "1000", "--dim", "32", "--threads", "1",
               "--queries", "50", "--engines", "hnswlib,vsearch,faiss-sq8", "--graphs", "32/200,8/40",
               "--extrapolate", "30000", "--out", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert [(run["engine"], run["M"], run["ef_construction"]) for run in runs] == [
        (engine, *graph) for graph in ((32, 200), (8, 40)) for engine in ("hnswlib", "vsearch", "faiss-sq8")]
    for run in runs:
        assert [step["up_to"] for step in run["steps"]] == [1000, 2000, 3000]
        assert all(step["vectors_per_s"] > 0 for step in run["steps"])
        assert [row["ef_search"] for row in run["search"]] == [32, 64, 128, 256]
        assert all(row["qps"] > 0 for row in run["search"]) and run["search"][-1]["recall_at_10"] >= 0.9
        # The estimate for 30,000: the last step's rate held to the end, and at most that as the rate falls.
        estimate = run["extrapolated"]
        held = run["seconds"] + 27000 / run["steps"][-1]["vectors_per_s"]
        assert estimate["to"] == 30000 and estimate["low_s"] == pytest.approx(held, abs=0.1)
        assert estimate["high_s"] >= estimate["low_s"] and estimate["exponent"] >= 0


def test_hnsw_growth_names_a_malformed_graph_setting():
    done = run_script("hnsw_growth.py", "--graphs", "32", returncode=2)
    assert "M/ef_construction pairs" in done.stderr
    done = run_script("hnsw_growth.py", "--count", "3000", "--step", "2000", "--extrapolate", "10000", returncode=2)
    assert "--extrapolate needs" in done.stderr


def device_check(out: Path, *parts: str, returncode: int = 0, **sizes: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts" / "device_check.sh"), *parts], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **sizes})
    assert done.returncode == returncode, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_device_check_records_the_machine_and_the_hnsw_growth_with_its_estimate_at_10m(tmp_path):
    done = device_check(tmp_path, "machine", "growth", COUNT="2000", STEP="1000")
    assert "Model name" in (tmp_path / "machine.txt").read_text()
    assert (tmp_path / "log.txt").read_text() == done.stdout  # the log holds all the call printed
    runs = json.loads((tmp_path / "growth.json").read_text())["runs"]
    assert [(run["engine"], run["M"], run["ef_construction"], run["extrapolated"]["to"]) for run in runs] == [
        ("hnswlib", 32, 200, 10_000_000), ("vsearch", 32, 200, 10_000_000)]
    assert "== growth: exit 0" in done.stdout and "up to 2,000 at" in done.stdout


def test_device_check_refuses_an_unknown_part_before_running_any(tmp_path):
    done = device_check(tmp_path / "out", "machine", "bench", returncode=2)
    assert "unknown part bench" in done.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_device_check_times_the_embed_job_against_the_model_alone(tmp_path):
    device_check(tmp_path, "embed", DEVICE="cpu", COVERS="8", BATCH="4", WORKERS="1")
    report = json.loads((tmp_path / "embed.json").read_text())
    assert report["covers"] == 8 and report["runs"][0]["decode"] == "both"


def test_loaded_hnsw_compares_vsearchs_load_with_hnswlibs_own(tmp_path):
    out = tmp_path / "loaded.json"
    run_script("loaded_hnsw.py", "--count", "3000", "--dim", "32", "--queries", "50", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["count"] == 3000 and report["ef_search"] >= 16
    assert report["open_seconds"] > 0 and report["hnswlib_open_seconds"] > 0 and report["huge_pages_seconds"] >= 0
    assert set(report["time_over_hnswlib"]) == {"batch", "single"}
    assert all(ratio > 0 for ratio in report["time_over_hnswlib"].values())


def test_coarse_lists_compares_the_centroid_scan_with_the_hnsw_graph(tmp_path):
    out = tmp_path / "coarse.json"
    run_script("coarse_lists.py", "--lists", "256,512", "--nprobe", "4,16", "--dim", "32", "--queries", "20",
               "--assign", "500", "--kmeans-iterations", "2", "--out", str(out))
    report = json.loads(out.read_text())
    results = report["results"]
    assert [r["lists"] for r in results] == [256, 512] and report["kmeans_iterations"] == 2
    for result in results:
        assert [row["nprobe"] for row in result["search"]] == [4, 16]
        assert all(row["scan_ms"] > 0 and row["graph_ms"] > 0 and row["lists_shared"] >= 0.9
                   for row in result["search"])
        assert result["assign"]["vectors"] == 500 and result["assign"]["same_list"] >= 0.9
    done = run_script("coarse_lists.py", "--lists", "4k", returncode=2)
    assert "--lists and --nprobe take comma-separated whole numbers" in done.stderr
    assert "--kmeans-iterations must be at least 1" in run_script("coarse_lists.py", "--kmeans-iterations", "0",
                                                                 returncode=2).stderr


def test_file_order_builds_the_same_vectors_in_random_and_topic_order_and_sweeps_their_recall(tmp_path):
    out = tmp_path / "order.json"
    run_script("file_order.py", "--count", "3000", "--dim", "32", "--queries", "20", "--scratch", str(tmp_path / "s"),
               "--raw", "--out", str(out))
    report = json.loads(out.read_text())
    assert [(r["order"], r["built_by"]) for r in report["results"]] == [
        ("random", "vsearch (hnswlib)"), ("random", "hnswlib add_items"),
        ("by topic", "vsearch (hnswlib)"), ("by topic", "hnswlib add_items")] and report["count"] == 3000
    for result in report["results"]:
        assert result["build_seconds"] > 0 and (result["tuned_ef_search"] or 16) >= 16
        assert [row["ef_search"] for row in result["sweep"]] == [16, 32, 64, 128, 256]
        assert result["sweep"][-1]["recall@10"] >= 0.95
    assert list((tmp_path / "s").iterdir()) == []  # its files and indexes removed
    assert "--count must be at least 1000" in run_script("file_order.py", "--count", "10", returncode=2).stderr


def test_query_latency_reports_each_stage_with_and_without_reranking_and_filters(tmp_path):
    out = tmp_path / "latency.json"
    run_script("query_latency.py", "--queries", "5", "--synthetic", "3000", "--device", "cpu", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(row["rerank"], row["where"] is not None) for row in rows] == [
        (False, False), (True, False), (False, False), (True, False), (False, True), (False, True)]
    for row in rows:
        assert row["queries"] == 5 and row["p99_ms"] >= row["p50_ms"] > 0
        assert set(row["share"]) == {"encode", "search", "metadata", "rerank"}
        assert sum(row["share"].values()) == pytest.approx(1)


def test_remote_covers_compares_batched_fetching_with_one_request_at_a_time(tmp_path):
    out = tmp_path / "remote.json"
    run_script("remote_covers.py", "--covers", "8", "--batch-size", "4", "--latency-ms", "0", "5", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [row["latency_ms"] for row in rows] == [0, 5]
    assert all(row["batched_covers_per_s"] > 0 and row["one_at_a_time_covers_per_s"] > 0 for row in rows)


def test_hard_negatives_reports_the_files_recall_as_measured_and_as_checked(tmp_path):
    out = tmp_path / "hard_negatives.json"
    run_script("hard_negatives.py", "--lines", "2000", "--sample", "100", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["lines"] == 2000 and 0 < report["texts"] <= 1600  # every fifth OCR text is \N
    assert report["ef_search"] >= 16 and report["recall@10_measured"] >= 0.95
    assert report["recall@10_checked"] >= 0.9 and report["peak_rss_mib"] > 0
    assert report["checkpoints"] == 1 and report["checkpoint_seconds"] >= 0  # one batch, saved once


def test_hard_negatives_draws_its_texts_from_fewer_phrases_on_the_graph_asked_for(tmp_path):
    out = tmp_path / "hard_negatives.json"
    run_script("hard_negatives.py", "--lines", "2000", "--phrases", "10", "--sample", "50", "--m", "8",
               "--ef-construction", "40", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["phrases"] == 10 and report["texts"] <= 100  # OCR texts are pairs of the 10
    assert report["M"] == 8 and report["ef_construction"] == 40


def test_append_bench_compares_an_append_with_a_rebuild_of_a_grown_dataset(tmp_path):
    out = tmp_path / "append.json"
    run_script("append.py", "--count", "3000", "--last", "300", "--grown", "200", "--added", "500", "--dim", "32",
               "--queries", "100", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["append_seconds"] > 0 and report["rebuild_seconds"] > 0
    assert min(report["measured_recall@10"].values()) >= 0.9 and report["reported_recall@10"]["append"] >= 0.9


def test_lexical_bench_times_the_encoder_and_the_embed_job(tmp_path):
    out = tmp_path / "lexical.json"
    run_script("lexical.py", "--texts", "1000", "--batch-size", "64", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["texts"] == 1000 and [row["stage"] for row in report["rows"]] == [
        "encode_texts", "embed job (file -> shards)"]
    assert all(row["per_s"] > 0 for row in report["rows"])


def test_ocr_bench_compares_the_reader_pool_with_the_library_in_process(tmp_path):
    out = tmp_path / "ocr.json"
    run_script("ocr.py", "--covers", "3", "--workers", "0", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [row["workers"] for row in rows] == [0, 1]
    assert all(row["covers"] == 3 and row["exact"] == 3 and row["covers_per_s"] > 0 for row in rows)
    assert rows[0]["speed_vs_in_process"] == 1


def test_rerank_latency_times_each_stage_of_reranking_with_the_heads(tmp_path, tiny_uniclip):
    out = tmp_path / "rerank.json"
    run_script("rerank_latency.py", "--uniclip", str(tiny_uniclip), "--device", "cpu", "--candidates", "4",
               "--repeats", "3", "--out", str(out), here=True)
    report = json.loads(out.read_text())
    assert report["candidates"] == 4 and list(report["stages"]) == [
        "read covers", "prepare covers on threads", "prepare covers on cpu", "heads on prepared covers",
        "query text vector", "rerank (all parts)"]
    assert all(stage["max_ms"] >= stage["median_ms"] > 0 for stage in report["stages"].values())
