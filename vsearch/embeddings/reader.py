"""The reader half of the embed job: DataLoader workers decode and resize media in parallel.

The batch sampler is a generator over the pending shards' rows, run in the main process, so
workers only ever see the rows still to encode, batches keep dataset order, and each batch
belongs to exactly one shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
from torch.utils.data import DataLoader

from vsearch.embeddings.datasets import Row
from vsearch.embeddings.media import MediaError, load_image, sample_frames


@dataclass
class Batch:
    number: int  # the shard it belongs to
    input_rows: int  # how many dataset rows that shard covers
    rows: list[Row]  # rows whose media were read, in order
    pixels: torch.Tensor | None  # (n, 3, H, W) for covers, (n, frames, 3, H, W) for clips
    failed: list[tuple[Row, str]]

    def pin_memory(self) -> "Batch":
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class MediaRows(torch.utils.data.Dataset):
    """Indexed by (shard number, shard input rows, row); returns the row's preprocessed pixels or why not."""

    def __init__(self, kind: str, transform: Callable, frames: int):
        self.kind, self.transform, self.frames = kind, transform, frames

    def __getitem__(self, item: tuple[int, int, Row]) -> tuple[int, int, Row, torch.Tensor | None, str | None]:
        number, input_rows, row = item
        try:
            if self.kind == "cover":
                pixels = self.transform(load_image(row.uri))
            else:
                pixels = torch.stack([self.transform(frame) for frame in sample_frames(row.uri, self.frames)])
        except MediaError as exc:
            return number, input_rows, row, None, str(exc)
        return number, input_rows, row, pixels, None


def collate(items: list[tuple[int, int, Row, torch.Tensor | None, str | None]]) -> Batch:
    read = [item for item in items if item[3] is not None]
    return Batch(
        number=items[0][0],
        input_rows=items[0][1],
        rows=[item[2] for item in read],
        pixels=torch.stack([item[3] for item in read]) if read else None,
        failed=[(item[2], item[4]) for item in items if item[3] is None],
    )


def _batch_plan(shards: Iterator[tuple[int, list[Row]]], batch_rows: int) -> Iterator[list[tuple[int, int, Row]]]:
    for number, rows in shards:
        it = iter(rows)
        while batch := list(islice(it, batch_rows)):
            yield [(number, len(rows), row) for row in batch]


def media_batches(shards: Iterator[tuple[int, list[Row]]], kind: str, transform: Callable, frames: int,
                  batch_rows: int, workers: int, pin_memory: bool) -> Iterator[Batch]:
    """Batches of preprocessed media for the given shards, read by `workers` processes."""
    loader = DataLoader(
        MediaRows(kind, transform, frames),
        batch_sampler=_batch_plan(shards, batch_rows),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)
