"""Random sequences of builds, appends and deletes over bring-your-own files, against a model of
which vector each id should show; and random edits of a dataset file, re-embedded each time. Files are added, changed (rows kept, dropped, added) and removed,
and ids repeat within and across files, so upserts, retired vectors, replaced vectors shown again
and deleted ids meet in every order.

The model: rows in the order they went into the index (a build: its files by name; an append: the
files it adds or adds again, by name), each retired (its file changed since) or deleted or neither.
An id shows the vector of its last row not retired, unless that row is deleted. `vsearch delete`
deletes every row of an id. Ids deleted and shown by no row are still deleted: a rebuild leaves
them out, and a changed file that holds one again has that row deleted; a new file brings it back.
"""

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.errors import VsearchError
from vsearch.indexes import BuildConfig, append_index, build_index, delete_ids, load_index
from vsearch.indexes.vectors import open_source
from vsearch.workspace import Workspace
from tests.conftest import edit_lines, random_cover_line

DIM = 8


class Model:
    def __init__(self):
        self.rows: list[dict] = []
        self.left_out: set[str] = set()  # ids the last rebuild left out
        self.indexed: dict[str, list] = {}  # each file's rows as the index last took them

    def shown(self) -> dict[str, np.ndarray]:
        last = {row["id"]: row for row in self.rows if not row["retired"]}
        return {i: np.array(row["vector"]) for i, row in last.items() if not row["deleted"]}

    def still_deleted(self) -> set[str]:
        return ({row["id"] for row in self.rows if row["deleted"]} | self.left_out) - set(self.shown())

    def build(self, files: dict[str, tuple]) -> None:
        self.left_out = self.still_deleted()
        self.rows = [dict(file=name, id=i, vector=v, retired=False, deleted=False)
                     for name in sorted(files) for i, v in files[name][1] if i not in self.left_out]
        self.indexed = dict(files)

    def append(self, files: dict[str, tuple]) -> None:
        """`files`: name -> (title, rows); a file retitled is a file changed (an append takes up in
        place one whose rows all show, which shows what adding them again would)."""
        still = self.still_deleted()
        for name in sorted(files):
            changed = name in self.indexed
            if changed and self.indexed[name] == files[name]:
                continue
            for row in self.rows:
                row["retired"] |= row["file"] == name
            self.rows += [dict(file=name, id=i, vector=v, retired=False, deleted=changed and i in still)
                          for i, v in files[name][1]]
            self.indexed[name] = files[name]

    def delete(self, ids: set[str]) -> None:
        for row in self.rows:
            row["deleted"] |= row["id"] in ids


def _write(path, title: str, rows: list) -> None:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.array([v for _, v in rows], np.float32).ravel()), DIM)
    pq.write_table(pa.table({"id": pa.array([i for i, _ in rows], pa.string()), "embedding": vectors,
                             "title": [title] * len(rows)}), path)


def _check(path, model: Model, message: str) -> None:
    """The index shows the ids the model does, each with the model's vector (ivfpq keeps float16)."""
    index = load_index(path)
    live = np.setdiff1d(np.arange(index.rows.count), index.deleted)
    shown, want = dict(zip(index.ids[live], index.backend.vectors(live))), model.shown()
    assert len(shown) == len(live), f"an id shown twice; {message}"
    assert sorted(shown) == sorted(want), message
    assert all(shown[i] @ want[i] > 0.999 for i in want), message


def _play(seed: int, steps: int, index_type: str, engine: str | None, folder) -> None:
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    files: dict[str, tuple] = {}  # name -> (title, rows)
    model, log, built = Model(), [], False
    path, data = folder / "index", folder / "files"
    data.mkdir()

    def rows(count: int) -> list:
        vectors = rng.standard_normal((count, DIM))
        ids = pick.sample([f"id{i}" for i in range(40)], count)
        return list(zip(ids, map(tuple, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))))

    for step in range(steps):
        action = pick.choice(["add", "change", "retitle", "remove", "delete", "rebuild"]) if built else "add"
        if (action == "remove" and len(files) < 2) or (action == "delete" and not model.shown()):
            action = "add"
        if action == "add":
            name = f"part-{pick.randint(0, 99):02d}-{step}.parquet"
            files[name] = ("", rows(pick.randint(1, 6)))
        elif action == "change":
            name = pick.choice(sorted(files))
            kept = [row for row in files[name][1] if pick.random() < 0.6]
            files[name] = (files[name][0], kept + rows(pick.randint(0, 3)) or rows(1))
        elif action == "retitle":  # the same rows, another title
            name = pick.choice(sorted(files))
            files[name] = (f"title {step}", files[name][1])
        elif action == "remove":
            name = pick.choice(sorted(files))
            del files[name]
            (data / name).unlink()
        if action in ("add", "change", "retitle"):
            _write(data / name, *files[name])
        log.append((action, sorted(files)))
        if action == "delete":
            victims = pick.sample(sorted(model.shown()), min(len(model.shown()), pick.randint(1, 3)))
            delete_ids(path, victims)
            model.delete(set(victims))
        elif not built or action == "rebuild":
            try:
                build_index(BuildConfig(type=index_type, engine=engine), open_source(data), path)
            except VsearchError as exc:
                assert "nothing to index" in str(exc) or "cannot train" in str(exc)  # every id deleted, or ivfpq on 1
                return
            model.build(files)
            built = True
        else:
            append_index(path, open_source(data))
            model.append(files)
        _check(path, model, f"seed {seed}, after {log}")


@pytest.mark.parametrize("index_type, engine", [("flat", None), ("hnsw", None), ("hnsw", "faiss")])
def test_random_updates_show_what_the_files_and_deletes_say(index_type, engine, tmp_path):
    for seed in range(15):
        (tmp_path / str(seed)).mkdir()
        _play(seed, 16, index_type, engine, tmp_path / str(seed))


@pytest.mark.slow
@pytest.mark.parametrize("index_type, engine", [("flat", None), ("hnsw", None), ("ivfpq", None)])
def test_long_random_updates_show_what_the_files_and_deletes_say(index_type, engine, tmp_path):
    for seed in range(25, 125):
        (tmp_path / str(seed)).mkdir()
        _play(seed, 40, index_type, engine, tmp_path / str(seed))


def _play_dataset_edits(seed: int, steps: int, folder) -> None:
    """Edit a CBVS-format file at random (lines added at the end or inside, dropped, rewritten, the
    file cut short), re-embed it and append (or rebuild): the index shows the shards' ids, less those
    deleted, with the shards' vectors. Urls repeat, so rows come and go as duplicates too."""
    pick = random.Random(seed)
    workspace = Workspace.resolve(folder / "workspace")
    dataset, path = folder / "covers.txt", folder / "index"
    lines = [random_cover_line(pick, i) for i in range(pick.randint(5, 40))]
    dataset.write_text("".join(lines), encoding="utf-8")
    config = EmbedConfig(model="lexical", dataset=str(dataset), shard_size=8, workers=1)
    shards = run_embed(config, workspace).directory
    build_index(BuildConfig(type="flat"), open_source(shards), path)
    deleted: set[str] = set()
    log = []
    for step in range(steps):
        action = pick.choice(["edit", "delete", "rebuild"])
        if action == "edit":
            action, lines = edit_lines(pick, lines, step)
        log.append((action, len(lines)))
        if action == "delete":
            index = load_index(path)
            shown = sorted(index.ids[np.setdiff1d(np.arange(index.rows.count), index.deleted)])
            victims = pick.sample(shown, min(2, len(shown)))
            delete_ids(path, victims)
            deleted |= set(victims)
            continue
        dataset.write_text("".join(lines), encoding="utf-8")
        run_embed(config, workspace)
        if action == "rebuild":
            try:
                build_index(BuildConfig(type="flat"), open_source(shards), path)
            except VsearchError as exc:
                assert "nothing to index" in str(exc)  # every id deleted
                return
        else:
            append_index(path, open_source(shards))
        table = pq.read_table(shards, columns=["id", "vector"])
        want = {i: np.asarray(v, np.float32) for i, v in zip(table.column("id").to_pylist(),
                                                             table.column("vector").to_numpy(zero_copy_only=False))
                if i not in deleted}
        index = load_index(path)
        live = np.setdiff1d(np.arange(index.rows.count), index.deleted)
        shown = dict(zip(index.ids[live], index.backend.vectors(live)))
        message = f"seed {seed}, after {log}"
        assert len(shown) == len(live) and sorted(shown) == sorted(want), message
        assert all(shown[i] @ want[i] > 0.999 for i in want), message


def test_random_dataset_edits_reembedded_and_appended_show_what_the_shards_hold(tmp_path):
    for seed in range(20):
        (tmp_path / str(seed)).mkdir()
        _play_dataset_edits(seed, 10, tmp_path / str(seed))
