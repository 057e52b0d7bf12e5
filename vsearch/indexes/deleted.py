"""deleted.parquet: the rows an index holds but no longer shows, as `label`, `id` and `replaced`.

Three kinds of row: ids deleted by `vsearch delete`; vectors replaced by a later one with the same
id (appends are upserts), with their id and `replaced` true, shown again should the vector that
replaced one be retired while no other shows the id; and, with a null id, the retired vectors of
files changed or gone since they were indexed. A rebuild into the same folder leaves deleted ids
out and keeps them here with label -1, so a deleted id stays deleted but while an appended new file
shows it again. Those listed when an index is written are also hidden from the library's own
search where it can (hnswlib's mark_deleted); a loaded index filters them all out of its results.
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
    """The index's deleted rows: `label` (-1 for an id a rebuild left out), `id`, `replaced` (false
    in the file of an index written before vsearch recorded it)."""
    if not (path / DELETED).is_file():
        return deleted_rows(np.empty(0, np.int64), pa.array([], pa.string()))
    try:
        table = pq.read_table(path / DELETED)
    except (pa.ArrowException, OSError) as exc:
        raise VsearchError(f"index {path} is damaged ({first_line(exc)} in {DELETED}); rebuild it") from None
    if "replaced" not in table.column_names:
        table = table.append_column("replaced", pa.array(np.zeros(len(table), bool)))
    return table.select(["label", "id", "replaced"])


def write_deleted(path: Path, deleted: pa.Table) -> None:
    temporary = path / (DELETED + ".tmp")
    pq.write_table(deleted, temporary)
    os.replace(temporary, path / DELETED)


def deleted_rows(labels: np.ndarray, ids: pa.Array | pa.ChunkedArray, replaced: bool = False) -> pa.Table:
    return pa.table({"label": pa.array(labels, pa.int64()), "id": ids,
                     "replaced": pa.array(np.full(len(labels), replaced))})


def held_labels(deleted: pa.Table) -> np.ndarray:
    """The labels of deleted rows the index still holds (-1 marks an id a rebuild left out)."""
    labels = deleted.column("label").to_numpy()
    return labels[labels >= 0]


def delete_by_id(deleted: pa.Table, labels: np.ndarray, ids: pa.Array) -> pa.Table:
    """`deleted` with the vectors at `labels` deleted by id (`ids`: each one's id). Those marked
    replaced are now deleted ids too: shown again, should the vector that replaced one be retired,
    they would bring back an id deleted."""
    table_labels = deleted.column("label").to_numpy()
    replaced = deleted.column("replaced").to_numpy(zero_copy_only=False) & ~np.isin(table_labels, labels)
    deleted = deleted.set_column(2, "replaced", pa.array(replaced))
    fresh = ~np.isin(labels, table_labels)
    return pa.concat_tables([deleted, deleted_rows(labels[fresh], ids.filter(pa.array(fresh)))])


def retire(deleted: pa.Table, labels: np.ndarray) -> pa.Table:
    """`deleted` with the vectors at `labels` retired (their files changed or went): rows with no id,
    for they are not deleted ids, which a rebuild leaves out, only vectors no longer shown. A row
    that deleted one of them by id stays; one that marked it replaced gives way."""
    table_labels = deleted.column("label").to_numpy()
    replaced = deleted.column("replaced").to_numpy(zero_copy_only=False)
    deleted = deleted.filter(pa.array(~(replaced & np.isin(table_labels, labels))))
    fresh = np.setdiff1d(labels, deleted.column("label").to_numpy())
    return pa.concat_tables([deleted, deleted_rows(fresh, pa.nulls(len(fresh), pa.string()))])


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


def mark_superseded(work: Path, deleted: pa.Table, order: np.ndarray, note: Callable[[str], None],
                    hidden: np.ndarray | None = None) -> None:
    """Write the built index's deleted rows: `deleted` and the vectors later ones replace; `order`
    is each label's place in the files (labels follow it, but for rows held out to measure recall).
    Where an append retired vectors it showed until then (`hidden`), an id no vector shows any more
    gets back the last vector that one had replaced: while a file holds the id, it is shown."""
    ids = Rows(work / ROWS).ids()
    replaced = np.setdiff1d(_superseded(ids, order), deleted.column("label").to_numpy())
    replaced = replaced[np.argsort(order[replaced], kind="stable")]  # rows in the order the vectors were replaced
    if len(replaced):
        note(f"{len(replaced):,} vectors replaced by later ones with the same id")
        deleted = pa.concat_tables([deleted, deleted_rows(replaced, ids.take(pa.array(replaced)), replaced=True)])
    if hidden is not None and len(hidden):
        deleted = _shown_again(deleted, ids, hidden, note)
    if len(deleted):
        write_deleted(work, deleted)


def _shown_again(deleted: pa.Table, ids: pa.ChunkedArray, hidden: np.ndarray,
                 note: Callable[[str], None]) -> pa.Table:
    """`deleted` less the rows of the vectors to show again: for each id whose shown vector was
    `hidden` and that no vector shows now, the one replaced last (its row is the last: rows are
    added in the order vectors are replaced), which was shown until then."""
    shown = np.ones(len(ids), bool)
    shown[held_labels(deleted)] = False
    wanted = pc.unique(ids.take(pa.array(hidden)))
    lost = wanted.filter(pc.invert(pc.is_in(wanted, value_set=_held_by(ids, shown, wanted))))
    labels = deleted.column("label").to_numpy()
    rows = deleted.append_column("row", pa.array(np.arange(len(deleted))))
    candidates = rows.filter(pa.array(deleted.column("replaced").to_numpy(zero_copy_only=False) & (labels >= 0)))
    candidates = candidates.filter(pc.is_in(candidates.column("id"), value_set=lost))
    if not len(candidates):
        return deleted
    back = candidates.group_by("id").aggregate([("row", "max")]).column("row_max").to_numpy()
    note(f"{len(back):,} replaced vectors shown again: the vectors that replaced them were retired")
    keep = np.ones(len(deleted), bool)
    keep[back] = False
    return deleted.filter(pa.array(keep))


def _held_by(ids: pa.ChunkedArray, holding: np.ndarray, wanted: pa.Array) -> pa.Array:
    """Those of the `wanted` ids that a label in the mask `holding` has (`ids`: every label's): one
    pass over the ids with a set of the wanted ones, where a set of every held id took 27 times as
    long at 10M labels (4.4 s against 0.16)."""
    holders = pc.indices_nonzero(pc.is_in(ids, value_set=wanted)).to_numpy()
    return pc.unique(ids.take(pa.array(holders[holding[holders]])))


def still_deleted(path: Path) -> pa.Table:
    """The ids deleted from the index at `path` that it does not hold again (an append can bring a
    deleted id back), as deleted rows of label -1 for the index that replaces it."""
    every_deleted = read_deleted(path)
    # Retired and replaced vectors are not deleted ids.
    deleted = every_deleted.filter(pc.and_(pc.is_valid(every_deleted.column("id")),
                                           pc.invert(every_deleted.column("replaced"))))
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
        back = pc.is_in(ids, value_set=_held_by(every, live, pc.unique(ids)))
        gone = ids.filter(pc.invert(back))
    gone = pc.unique(gone)
    return deleted_rows(np.full(len(gone), -1), gone)


def shown_count(path: Path, info: dict[str, Any]) -> int:
    """How many vectors the index at `path` (manifest `info`) shows: those it holds, less the
    deleted, replaced and retired ones."""
    return int(info["count"]) - len(held_labels(read_deleted(path)))
