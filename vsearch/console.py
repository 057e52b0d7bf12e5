"""Terminal output shared by the commands: progress bars and result tables."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from vsearch.query import Hit

stdout = Console(soft_wrap=False)
stderr = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. `1,234 covers/s`; blank until rich has measured a rate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} {self.unit}/s", style="cyan")


class Bar:
    """One progress bar: `bar(n)` advances it by n; `bar.expect(total)` sets the total once known;
    `bar.skip(n)` takes n items done by an earlier run off it."""

    def __init__(self, bars: Progress, task: TaskID, total: int | None = None):
        self.bars, self.task = bars, task
        self.total, self.skipped = total, 0
        self.description = next(t.description for t in bars.tasks if t.id == task)
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
def progress_bars(descriptions: list[str], total: int | None = None, unit: str = "rows") -> Iterator[list[Bar]]:
    """Progress bars on stderr, one per description, counting the same `unit` towards the same
    `total` (or one set later with `Bar.expect`), with rate and time left; filled when the
    block ends without an exception."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=False, disable=not stderr.is_terminal) as bars:
        made = [Bar(bars, bars.add_task(description, total=total), total) for description in descriptions]
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
