"""Progress bars on a terminal: a total can arrive after the work starts, and finished work shows full."""

import io

import pytest
from rich.console import Console

from vsearch import console


@pytest.fixture
def terminal(monkeypatch):
    screen = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(console, "stderr", screen)
    return screen


def totals(bar):
    return [(task.completed, task.total) for task in bar.bars.tasks]


def test_a_total_found_later_is_shown_and_finished_work_fills_the_bar(terminal):
    with console.progress("embed", unit="covers") as bar:
        bar(3)
        assert totals(bar) == [(3, None)]
        bar.expect(10)  # an upper bound: fewer rows turned out to be usable
        bar(4)
        assert totals(bar) == [(7, 10)]
    assert totals(bar) == [(7, 7)]
    assert "7/7" in terminal.file.getvalue()


def test_interrupted_work_is_not_shown_as_finished(terminal):
    with pytest.raises(KeyboardInterrupt):
        with console.progress("embed", 10, unit="covers") as bar:
            bar(4)
            raise KeyboardInterrupt
    assert totals(bar) == [(4, 10)]
    assert "4/10" in terminal.file.getvalue()


def test_one_total_can_be_set_on_several_bars(terminal):
    with console.progress_bars(["encode", "neighbours"], unit="texts") as bars:
        console.expect_on_all(bars)(5)
        assert totals(bars[0]) == [(0, 5), (0, 5)]


def test_work_done_before_leaves_the_total_and_not_the_rate(terminal):
    with console.progress("embed", unit="covers") as bar:
        bar.skip(6000)  # a resumed job finds these shards written: no rate of 6,000 covers in no time
        bar.expect(10000)  # the count comes later, done rows included
        bar(100)
        bar.skip(1000)
        assert totals(bar) == [(100, 3000)]
        assert bar.bars.tasks[0].speed is None or bar.bars.tasks[0].speed < 6000
    assert totals(bar) == [(100, 100)]
    assert "7,000 done before" in terminal.file.getvalue()


def test_ten_million_rows_fit_an_80_column_terminal(monkeypatch):
    screen = Console(file=io.StringIO(), force_terminal=True, width=80, record=True)
    monkeypatch.setattr(console, "stderr", screen)
    with console.progress_bars(["read cbvs10m, encode its OCR texts", "find their nearest neighbours"], 10_000_000,
                               unit=["lines", "texts"]) as (read, listed):
        read(2_500_000)
        listed(12_345)
        read.bars.stop()  # the live display drawing on: the table is read alone
        screen.export_text()
        screen.print(read.bars.make_tasks_table(read.bars.tasks))
        lines = screen.export_text().splitlines()
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    assert "2.5/10.0M" in lines[0] and "0.0/10.0M" in lines[1]  # the figures stay whole; the description gives way
    assert lines[0].startswith("read cbvs10m") and "…" in lines[0]
