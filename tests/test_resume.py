"""Kill a job part-way (SIGKILL, Ctrl-C): an embed, whose re-run must equal an uninterrupted run exactly, and
the cbvs10m-HNSW file, whose re-run goes on from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vsearch.embeddings.shards import MANIFEST
from tests.conftest import write_cbvs_covers

ROWS, SHARD = 60_000, 1_000


def vsearch(*arguments, window=None):
    """`vsearch ARGUMENTS…` started in a process of its own, its output captured; hnswlib graphs
    inserted `window` vectors at a time where it is given."""
    python = ["-c", "from vsearch.indexes.backends import HnswlibBackend; "
                    f"HnswlibBackend.insertion_window = {window}; from vsearch.cli import main; main()"] \
        if window else ["-m", "vsearch"]
    # Ctrl-C must reach it even where the test runner was started with SIGINT ignored (a background job).
    return subprocess.Popen([sys.executable, *python, *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def embed(source, out, workspace, workers=2):
    """`workers` 2 runs the job in two processes, 0 in this one."""
    return vsearch("--workspace", str(workspace.root), "embed", "--dataset", str(source), "--model", "lexical",
                   "--out", str(out), "--shard-size", str(SHARD), "--batch-size", "100", "--workers", str(workers))


def wait_for_shards(process, out, count):
    deadline = time.monotonic() + 120
    while len(recorded_shards(out)) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the embed finished before it could be stopped; raise ROWS"


def recorded_shards(out):
    try:
        return json.loads((out / MANIFEST).read_text())["shards"]
    except (FileNotFoundError, ValueError):
        return []


def table(out):
    shards = json.loads((out / MANIFEST).read_text())["shards"]
    return pa.concat_tables(pq.read_table(out / s["name"]) for s in shards).sort_by("id")


def children(pid):
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pids, seconds=20):
    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.mark.parametrize("workers", [0, 2], ids=["one process", "two processes"])
def test_sigkill_then_rerun_gives_exactly_the_rows_of_an_uninterrupted_run(workers, tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "covers.txt", ROWS)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"

    process = embed(source, interrupted, workspace, workers)
    wait_for_shards(process, interrupted, 3)
    helpers = children(process.pid)
    assert len(helpers) >= workers  # and, with processes, multiprocessing's resource tracker
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(interrupted.glob("*.parquet")))
    assert gone(helpers)
    # A process may finish the shard it was writing, but none goes on to the rest of its share.
    assert len(list(interrupted.glob("*.parquet"))) <= written + 4 * workers
    done_before = len(recorded_shards(interrupted))
    assert 3 <= done_before < ROWS // SHARD

    resumed = embed(source, interrupted, workspace, workers)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{done_before} shards already done" in " ".join(err.split())
    assert embed(source, reference, workspace, workers=0).wait(timeout=300) == 0

    got, want = table(interrupted), table(reference)
    assert got.num_rows == want.num_rows == ROWS
    assert len(set(got.column("id").to_pylist())) == ROWS
    assert got.equals(want)
    assert sorted(p.name for p in interrupted.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not list(interrupted.glob("*.tmp"))


@pytest.mark.parametrize("workers", [0, 2], ids=["one process", "two processes"])
def test_ctrl_c_says_how_to_resume_and_the_rerun_completes_the_job(workers, tmp_path, workspace):
    source = write_cbvs_covers(tmp_path / "covers.txt", ROWS)
    out = tmp_path / "shards"
    process = embed(source, out, workspace, workers)
    wait_for_shards(process, out, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-2:] == ["the shards finished are kept: run the same command again to resume",
                                             "vsearch: interrupted"]
    done_before = len(recorded_shards(out))
    assert not list(out.glob("*.tmp"))

    resumed = embed(source, out, workspace, workers)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{done_before} shards already done" in " ".join(err.split())
    ids = table(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS


TEXTS = 20_000  # ten of the job's batches of 2,048
WINDOW = 4_096  # texts inserted at a time: two batches; the first checkpoint follows the first window


def write_ocr_texts(workspace):
    workspace.datasets.mkdir(parents=True, exist_ok=True)
    texts = [f"大宅门 演员表 第{i}集" for i in range(TEXTS)]
    lines = [f"标题{i}\thttp://c/{i}.jpg\t{text}" for i, text in enumerate(texts)]
    (workspace.datasets / "cbvs10m.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return texts


def hard_negatives(workspace):
    return vsearch("--workspace", str(workspace.root), "build-index", "--layout", "cbvs10m-hnsw",
                   "--dataset", "cbvs10m", "--model", "lexical", window=WINDOW)


def wait_for_checkpoint(process, graph):
    """Until the job has saved `graph`, its first checkpoint."""
    deadline = time.monotonic() + 120
    while not graph.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the job finished before it could be stopped; give it more to do"


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_stopped_cbvs10m_hnsw_job_resumes_from_its_last_checkpoint(stop, workspace):
    texts = write_ocr_texts(workspace)
    out, partial = workspace.datasets / "cbvs10m-HNSW", workspace.datasets / "cbvs10m-HNSW.partial"
    process = hard_negatives(workspace)
    wait_for_checkpoint(process, partial / "graph.hnsw")
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in err
        assert "".join(err.split()).endswith(f"thetextsencodedandthelineswrittenuptothelastcheckpointarekeptin{partial}:"
                                             "runthesamecommandagaintoresumevsearch:interrupted")
    assert not out.exists()

    resumed = hard_negatives(workspace)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    said = "".join(err.split())  # the console wraps long paths
    saved = int(said.split(f"resumingthestoppedrunin{partial}:")[1].split("texts")[0].replace(",", ""))
    assert 0 < saved < TEXTS and saved % WINDOW == 0  # whole windows, from the checkpoint
    lines = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert [fields[0] for fields in lines] == texts
    assert all(len(fields) == 11 and fields[0] not in fields[1:] for fields in lines)
    assert not partial.exists()


VECTORS, FILE_ROWS = 40_000, 2_000  # twenty files, a record batch each; the first checkpoint follows the first


def build(parts, out):
    return vsearch("build-index", "--type", "hnsw", "--embeddings", str(parts), "--out", str(out))


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_stopped_index_build_resumes_from_its_last_checkpoint(stop, tmp_path):
    from tests.test_indexes import clustered, write_parquet
    from vsearch.indexes import load_index

    vectors = clustered(VECTORS, dim=128)
    for start in range(0, VECTORS, FILE_ROWS):
        write_parquet(tmp_path / "parts", vectors[start:start + FILE_ROWS], start, f"part-{start:06d}.parquet")
    out, partial = tmp_path / "index", tmp_path / "index.partial"
    process = build(tmp_path / "parts", out)
    wait_for_checkpoint(process, partial / "index.hnsw")
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in err
        assert "".join(err.split()).endswith(f"thevectorsindexeduptothelastcheckpointarekeptin{partial}:"
                                             "runthesamecommandagaintoresumevsearch:interrupted")
    assert not out.exists()

    resumed = build(tmp_path / "parts", out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    said = "".join(err.split())
    saved = int(said.split(f"resumingthestoppedbuildin{partial}:")[1].split("vectors")[0].replace(",", ""))
    assert 0 < saved < VECTORS
    index = load_index(out)
    assert len(index) == VECTORS and not partial.exists()
    _, ids = index.search(vectors[:20], 1)
    assert [row[0] for row in ids] == [f"doc{i}" for i in range(20)]
