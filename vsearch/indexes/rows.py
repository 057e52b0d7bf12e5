"""The index's row table: the id and metadata (title, OCR text, uri, per-row model outputs) of
every library label, in label order.

It is an Arrow IPC file read memory-mapped, so fetching the rows of k candidates costs O(k) whatever
the index size, and a query needs neither the shards nor a scan of them. Parquet cannot do that: its
smallest readable unit is a compressed row group, and a scan of every shard's id column (the join it
replaces) took 30 ms per query at 1M covers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from vsearch.errors import VsearchError
from vsearch.files import errors_naming

ROWS = "rows.arrow"


def conform(table: pa.Table, schema: pa.Schema, origin: str) -> pa.Table:
    """`table` with exactly `schema`'s columns: missing ones null, extra ones dropped."""
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(len(table), field.type))
            continue
        try:
            columns.append(table.column(field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise VsearchError(f"column {field.name!r} of {origin} does not fit the index's "
                               f"{field.type} column: {exc}") from None
    return pa.Table.from_arrays(columns, schema=schema)


class RowsWriter:
    """Appends tables, conformed to one schema, to a new row file."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        with errors_naming(path):
            self._writer = ipc.new_file(str(path), schema)

    def write(self, table: pa.Table, origin: str) -> None:
        with errors_naming(self.path):
            self._writer.write_table(conform(table, self.schema, origin))

    def __enter__(self) -> RowsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        with errors_naming(self.path):
            self._writer.close()


class Rows:
    """A row file, memory-mapped."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise VsearchError(f"index rows {path} are missing; rebuild the index")
        reader = ipc.open_file(pa.memory_map(str(path)))
        self.schema = reader.schema
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [len(b) for b in self.batches])
        self.count = int(self.starts[-1])

    def ids(self) -> pa.ChunkedArray:
        """Every id, in label order."""
        return pa.chunked_array([b.column(0) for b in self.batches], pa.string())

    def take(self, labels: np.ndarray) -> pa.Table:
        """The rows of `labels`, in their order, as one chunk. A few rows are zero-copy slices of their
        record batches, then copied together: a `take` per record batch costs 10-20 µs each (0.4 ms
        for 10 candidates, 1.8 ms for 100 at 1M rows), a slice about 2 µs a row. Past about 8 rows
        a record batch (a search widened for a --where filter) one `take` per record batch wins: at
        1M rows in 100 batches, 1,600 rows cost 3.6 ms in slices and 1.7 ms in takes, a million rows
        8 s and 0.8 s."""
        labels = np.asarray(labels, np.int64)
        which = np.searchsorted(self.starts, labels, side="right") - 1
        offsets = labels - self.starts[which]
        if len(labels) <= 8 * len(self.batches):
            parts = [self.batches[b].slice(offset, 1) for b, offset in zip(which.tolist(), offsets.tolist())]
            return pa.Table.from_batches(parts, schema=self.schema).combine_chunks()
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(self.batches) + 1))
        parts = [self.batches[b].take(pa.array(offsets[order[bounds[b]:bounds[b + 1]]]))
                 for b in range(len(self.batches)) if bounds[b + 1] > bounds[b]]
        grouped = pa.Table.from_batches(parts, schema=self.schema)
        return grouped.take(pa.array(np.argsort(order))).combine_chunks()

    def table(self) -> pa.Table:
        """Every row, zero-copy over the mapped file."""
        return pa.Table.from_batches(self.batches, schema=self.schema)

    def tables(self) -> Iterator[pa.Table]:
        for batch in self.batches:
            yield pa.Table.from_batches([batch])
