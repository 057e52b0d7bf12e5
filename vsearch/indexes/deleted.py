"""deleted.parquet: the rows an index holds but no longer shows, as `label` and `id`.

Three kinds of row: ids deleted by `vsearch delete`; vectors replaced by a later one with the same
id (appends are upserts), with their id too; and, with a null id, the retired vectors of files
changed or gone since they were indexed. A rebuild into the same folder leaves deleted ids out and
keeps them here with label -1, so a deleted id stays deleted until an appended new file brings it
back. Those listed when an index is written are also hidden from the library's own search where it
can (hnswlib's mark_deleted); a loaded index filters them all out of its results.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vsearch.errors import VsearchError, first_line
from vsearch.indexes.rows import ROWS, Rows

DELETED = "deleted.parquet"


def read_deleted(path: Path) -> pa.Table:
    """The index's deleted rows: `label` (-1 for an id a rebuild left out) and `id`."""
    if not (path / DELETED).is_file():
        return pa.table({"label": pa.array([], pa.int64()), "id": pa.array([], pa.string())})
    try:
        return pq.read_table(path / DELETED, columns=["label", "id"])
    except (pa.ArrowException, OSError) as exc:
        raise VsearchError(f"index {path} is damaged ({first_line(exc)} in {DELETED}); rebuild it") from None


def write_deleted(path: Path, deleted: pa.Table) -> None:
    temporary = path / (DELETED + ".tmp")
    pq.write_table(deleted, temporary)
    os.replace(temporary, path / DELETED)


def deleted_rows(labels: np.ndarray, ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    return pa.table({"label": pa.array(labels, pa.int64()), "id": ids})


def held_labels(deleted: pa.Table) -> np.ndarray:
    """The labels of deleted rows the index still holds (-1 marks an id a rebuild left out)."""
    labels = deleted.column("label").to_numpy()
    return labels[labels >= 0]


def retired_rows(labels: np.ndarray, deleted: pa.Table) -> pa.Table:
    """Deleted rows for the retired vectors of files changed or gone, those not deleted already. They
    have no id: they are not deleted ids, which a rebuild leaves out, only vectors no longer shown."""
    fresh = np.setdiff1d(labels, deleted.column("label").to_numpy())
    return deleted_rows(fresh, pa.nulls(len(fresh), pa.string()))


def deleted_again(path: Path, work: Path, labels: np.ndarray) -> pa.Table:
    """Deleted rows for the ids deleted from the index at `path` that the new versions of changed files
    (their rows at `labels` in the index written in `work`) hold again: a file re-embedded is not a
    request to bring them back."""
    gone = still_deleted(path).column("id").combine_chunks() if len(labels) else []
    if not len(gone):
        return deleted_rows(np.empty(0, np.int64), pa.array([], pa.string()))
    ids = Rows(work / ROWS).take(labels).column("id")
    hit = pc.is_in(ids, value_set=gone).to_numpy(zero_copy_only=False)
    return deleted_rows(labels[hit], ids.filter(pa.array(hit)))


def _superseded(ids: pa.ChunkedArray, order: np.ndarray) -> np.ndarray:
    """Labels whose id comes again later in `order` (each label's place in the files): the later
    vector replaces the earlier one (an append bringing an id again, an id repeated in
    bring-your-own files)."""
    latest = pa.table({"id": ids, "order": order}).group_by("id").aggregate([("order", "max")])
    kept = np.zeros(len(ids), bool)
    kept[np.argsort(order)[latest.column("order_max").to_numpy()]] = True
    return np.flatnonzero(~kept)


def mark_superseded(work: Path, deleted: pa.Table, order: np.ndarray, note: Callable[[str], None]) -> None:
    """Write the built index's deleted rows: `deleted` and the vectors later ones replace; `order`
    is each label's place in the files (labels follow it, but for rows held out to measure recall)."""
    ids = Rows(work / ROWS).ids()
    replaced = np.setdiff1d(_superseded(ids, order), deleted.column("label").to_numpy())
    if len(replaced):
        note(f"{len(replaced):,} vectors replaced by later ones with the same id")
        deleted = pa.concat_tables([deleted, deleted_rows(replaced, ids.take(pa.array(replaced)))])
    if len(deleted):
        write_deleted(work, deleted)


def still_deleted(path: Path) -> pa.Table:
    """The ids deleted from the index at `path` that it does not hold again (an append can bring a
    deleted id back), as deleted rows of label -1 for the index that replaces it."""
    every_deleted = read_deleted(path)
    deleted = every_deleted.filter(pc.is_valid(every_deleted.column("id")))  # retired vectors are not deleted ids
    if not len(deleted):
        return deleted
    ids = deleted.column("id").combine_chunks()
    try:
        every = Rows(path / ROWS).ids()
    except VsearchError:  # a damaged index being rebuilt: keep every deletion
        gone = ids
    else:
        live = np.ones(len(every), bool)
        live[held_labels(every_deleted)] = False  # nor do retired vectors hold an id again
        back = pc.is_in(ids, value_set=every.filter(pa.array(live)).combine_chunks())
        gone = ids.filter(pc.invert(back))
    gone = pc.unique(gone)
    return deleted_rows(np.full(len(gone), -1), gone)


def shown_count(path: Path, info: dict[str, Any]) -> int:
    """How many vectors the index at `path` (manifest `info`) shows: those it holds, less the
    deleted, replaced and retired ones."""
    return int(info["count"]) - len(held_labels(read_deleted(path)))
