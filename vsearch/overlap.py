"""Overlapping a stage's reading with its work: the embed job's readers and GPU decoding with the
model, the index build's Parquet decoding with graph insertion, counting a dataset's lines while
the job that reads them starts; and the processes a command starts for such work, which end
with it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from vsearch.errors import VsearchError

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


def in_background(compute: Callable[[], T | None], on_result: Callable[[T], None]) -> threading.Thread:
    """Run `compute` on a daemon thread and pass its result, unless None, to `on_result`. For a
    figure the work can start without (a progress bar's total): a dataset it cannot read is left for
    the work itself to report."""

    def run() -> None:
        try:
            result = compute()
        except (OSError, VsearchError):
            return
        if result is not None:
            on_result(result)

    thread = threading.Thread(target=run, name=getattr(compute, "__name__", "background"), daemon=True)
    thread.start()
    return thread


def exit_with_parent(parent: int) -> None:
    """End this process once `parent` has gone (SIGKILL gives it no chance to stop its children),
    rather than go on working for a command no one waits for: an embed job's processes writing
    shards that no manifest will list, beside the job that resumes it; a benchmark's build."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
