"""Terminal output shared by the commands: progress bars and result tables."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import pick_unit_and_suffix
from rich.progress import (BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column, Table
from rich.text import Text

from vsearch.errors import human_size
from vsearch.query import Hit

stdout = Console(soft_wrap=False)
# Notes and summaries are lines of text, often ending in a path: one piped into a log or a script
# stays one line (a terminal wraps it as it shows it); rich would cut it at 80 columns.
stderr = Console(stderr=True, soft_wrap=True)


class CountColumn(ProgressColumn):
    """Done and total in the total's unit, e.g. `2.5/10.0M covers`: 10 million rows counted in full
    would push the rate off an 80-column line."""

    def render(self, task: Task) -> Text:
        completed = int(task.completed)
        if task.total is None:
            return Text(f"{completed:,}", style="progress.download")
        unit, suffix = pick_unit_and_suffix(int(task.total), ["", "k", "M", "G"], 1000)
        digits = 0 if unit == 1 else 1
        return Text(f"{completed / unit:,.{digits}f}/{task.total / unit:,.{digits}f}{suffix}", style="progress.download")


class RateColumn(ProgressColumn):
    """Items per second in the bar's unit, e.g. `1,234 covers/s`; blank until rich has measured a rate."""

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} {task.fields['unit']}/s", style="cyan")


class Bar:
    """One progress bar: `bar(n)` advances it by n; `bar.expect(total)` sets the total once known;
    `bar.skip(n)` takes n items done by an earlier run off it."""

    def __init__(self, bars: Progress, description: str, total: int | None, unit: str):
        self.bars, self.description = bars, description
        self.task = bars.add_task(description, total=total, unit=unit)
        self.total, self.skipped = total, 0
        self.lock = threading.Lock()  # `expect` may come from another thread than `skip`

    def __call__(self, n: int) -> None:
        self.bars.advance(self.task, n)

    def expect(self, total: int) -> None:
        with self.lock:
            self.total = total
            self._show_total()

    def skip(self, n: int) -> None:
        """Items a resumed job finds done leave the total rather than fill the bar, which would show
        a rate many times the real one, and too little time left, for rich's 30-second window."""
        with self.lock:
            self.skipped += n
            self.bars.update(self.task, description=f"{self.description} ({self.skipped:,} done before)")
            self._show_total()

    def _show_total(self) -> None:
        if self.total is not None:
            self.bars.update(self.task, total=max(self.total - self.skipped, 0))

    def finish(self) -> None:
        """Fill the bar: the work is done, whatever total was expected (an estimate may be high)."""
        completed = next(task.completed for task in self.bars.tasks if task.id == self.task)
        self.bars.update(self.task, total=completed)


def expect_on_all(bars: list[Bar]) -> Callable[[int], None]:
    """A callback that sets the total of every one of `bars` to the number it is given."""

    def expect(total: int) -> None:
        for bar in bars:
            bar.expect(total)

    return expect


@contextmanager
def progress_bars(descriptions: list[str], total: int | None = None,
                  unit: str | list[str] = "rows") -> Iterator[list[Bar]]:
    """Progress bars on stderr, one per description, counting `unit` (one for all, or one per bar)
    towards the same `total` (or one set later with `Bar.expect`), with rate and time left; filled
    when the block ends without an exception."""
    units = [unit] * len(descriptions) if isinstance(unit, str) else unit
    # On a narrow terminal the description gives way, not the figures: these take about 56 columns
    # with a bar of 10.
    description = Column(no_wrap=True, overflow="ellipsis", max_width=max(12, stderr.width - 56))
    figure = Column(no_wrap=True)
    columns = [TextColumn("{task.description}", table_column=description), BarColumn(),
               CountColumn(table_column=figure), RateColumn(table_column=figure), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=False, disable=not stderr.is_terminal) as bars:
        made = [Bar(bars, description, total, unit) for description, unit in zip(descriptions, units, strict=True)]
        yield made
        for bar in made:
            bar.finish()


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "rows") -> Iterator[Bar]:
    """One progress bar (see `progress_bars`)."""
    with progress_bars([description], total, unit) as (bar,):
        yield bar


def _snippet(text: str | None, width: int = 40) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


PARTS = ("ann", "lexical", "semantic", "presence")


def _parts_cell(parts: dict[str, float], shown: list[str]) -> str:
    width = max(map(len, shown))
    return "\n".join(f"{part:<{width}} {parts[part]:.3f}" if part in parts else f"{part:<{width}}     –"
                     for part in shown)


def hits_table(query: str, hits: list[Hit], caption: str | None = None, explain: bool = False) -> Table:
    """Results as a table; with `explain`, the parts of each final score stacked beside it (a column
    per part would leave the title and OCR text no room in 80 columns)."""
    table = Table(title=f"[bold]{query}[/]", caption=caption, title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    shown = [p for p in PARTS if any(p in hit.parts for hit in hits)] if explain else []
    if shown:
        table.add_column("parts", style="cyan", no_wrap=True)
    table.add_column("title", overflow="fold")
    table.add_column("OCR text", overflow="fold")
    # An id is what a user copies into `vsearch delete` or a lookup: the title and OCR text narrow
    # before ids of up to 32 characters do; where one is longer, the ids wrap rather than lose their end.
    table.add_column("id", style="dim", overflow="fold", no_wrap=all(len(hit.id) <= 32 for hit in hits))
    for hit in hits:
        parts = [_parts_cell(hit.parts, shown)] if shown else []
        table.add_row(str(hit.rank), f"{hit.score:.3f}", *parts, _snippet(hit.title), _snippet(hit.ocr), hit.id)
    return table


def _model_cell(spec: str | None) -> str:
    """A model spec with its checkpoint's folder left out (a path can take the whole line)."""
    if spec is None:
        return "(not recorded)"
    head, sep, path = spec.rpartition(":")
    return f"{head}{sep}{Path(path).name}" if "/" in path else spec


_COUNTS = ("covers", "clips", "failed", "vectors", "behind", "recall@10")  # right-aligned


def _listing_table(title: str, entries: list[dict[str, Any]], columns: dict[str, Callable[[dict], str]],
                   notes: tuple[str, ...] = ()) -> Table:
    """A table of `entries` with a `*` column for the default, then `columns` (heading: cell), and
    `notes` under it; an entry whose manifest could not be read shows why in its row."""
    notes = ("* used when no path is given",) * any(e.get("default") for e in entries) + notes
    table = Table(title=title, title_justify="left", caption="\n".join(notes) or None)
    table.add_column("")
    table.add_column("name", no_wrap=True)
    for heading, _ in columns.items():
        table.add_column(heading, justify="right" if heading in _COUNTS else "left", overflow="fold")
    for entry in entries:
        cells = [Text(entry["error"], style="red")] if "error" in entry else [cell(entry) for cell in columns.values()]
        table.add_row("*" if entry.get("default") else "", entry["name"], *cells)
    return table


def _index_type_cell(entry: dict[str, Any]) -> str:
    """The index type, and its engine where it is not the type's default (hnsw/faiss)."""
    from vsearch.indexes.backends import backend_class

    default = backend_class(entry["type"]).engine
    return entry["type"] if entry["engine"] == default else f"{entry['type']}/{entry['engine']}"


def listing_tables(embeddings: list[dict[str, Any]], indexes: list[dict[str, Any]],
                   checkpoints: list[dict[str, Any]]) -> list[Table]:
    """The workspace's shard folders, indexes and checkpoints (see `vsearch.listing`); clips, failed
    rows and an index's kind only where some differ from nothing (or covers), checkpoints only where
    there are some, so that the rest fits 80 columns."""
    shard_columns: dict[str, Callable[[dict], str]] = {
        "dataset": lambda e: e["dataset"], "model": lambda e: _model_cell(e["model"]),
        "covers": lambda e: f"{e['covers']:,}"}
    for count in ("clips", "failed"):
        if any(e.get(count) for e in embeddings):
            shard_columns[count] = lambda e, count=count: f"{e[count]:,}"
    shard_columns["updated"] = lambda e: e["updated"][:10]
    index_columns: dict[str, Callable[[dict], str]] = {"type": _index_type_cell}
    if any(e.get("kind", "cover") != "cover" for e in indexes):
        index_columns["kind"] = lambda e: e["kind"]
    index_columns.update({"vectors": lambda e: f"{e['vectors']:,}", "model": lambda e: _model_cell(e["model"])})
    behind: tuple[str, ...] = ()
    if any(e.get("behind") for e in indexes):
        index_columns["behind"] = lambda e: f"{e['behind']:,}" if e.get("behind") else ""
        behind = ("behind: shard files changed since, for build-index --append",)
    index_columns["recall@10"] = lambda e: f"{e['recall@10']:.3f}"
    tables = [_listing_table("embeddings", embeddings, shard_columns),
              _listing_table("indexes", indexes, index_columns, behind)]
    if checkpoints:
        checkpoint_columns: dict[str, Callable[[dict], str]] = {
            "job": lambda e: e["job"] or "?", "size": lambda e: human_size(e["bytes"]),
            "saved": lambda e: e["saved"][:16].replace("T", " "),
            "state": lambda e: "running" if e["running"] else "stopped"}
        tables.append(_listing_table("checkpoints", checkpoints, checkpoint_columns,
                                     ("the job's command resumes a stopped one; deleting the folder gives its work up",)))
    return tables
