"""Overlapping a stage's reading with its work: the embed job's readers and GPU decoding with the
model, the index build's Parquet decoding with graph insertion."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, each next one produced on a thread while the caller works on the one before. Pays
    off where both sides release the GIL (Parquet decoding, numpy, hnswlib, faiss, torch)."""
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        ahead = pool.submit(next, items, end)
        while (item := ahead.result()) is not end:
            ahead = pool.submit(next, items, end)
            yield item
