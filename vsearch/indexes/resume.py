"""Checkpoints of the jobs that run for hours at 10M (an index build, the cbvs10m-HNSW file): the
folder beside a job's output that keeps a stopped run's work, so that running the same command again
goes on from it.

The folder is locked while a run uses it, and its `checkpoint.json` records what the work was made
with (the settings a job's output depends on): a run with other settings is refused rather than mixed
into it. Saves are spaced to cost about `CHECKPOINT_SHARE` of the run: after a save that took s
seconds, the next waits until s / CHECKPOINT_SHARE seconds of work have passed. The graph grows in
between, and so does its save, so the share runs over by what saving a vector costs against adding
it (3.4% of a 300k-line cbvs10m-HNSW run, 0.9% at 1M lines: benchmarks/RESULTS.md). Spacing by the
save's predicted time instead would hold 2%, but where saving a vector costs more than 2% of adding
it (a 1M-vector build on 2 cores, or a slow disk) it never saves again. What the job saves, and how
it checks that its input is still the one the work was made from, is the job's own.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from vsearch.errors import VsearchError
from vsearch.files import lock_folder, write_json_atomic

CHECKPOINT_SHARE = 0.02  # of a run's time spent saving checkpoints, about (over it while the graph grows fast)
STATE = "checkpoint.json"


def partial_folder(out: Path) -> Path:
    """Where a run writing `out` (a file or an index folder) keeps its work until `out` is written."""
    return out.with_name(out.name + ".partial")


class CheckpointFolder:
    """`partial_folder(out)`, locked by this run of `job` until `close`. `made_with` holds the settings
    the saved work depends on; a key `model` only names the model in messages, where `fingerprint`
    decides."""

    def __init__(self, out: Path, job: str, made_with: dict[str, Any], note: Callable[[str], None]):
        self.path, self.made_with, self.note = partial_folder(out), made_with, note
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock: IO[str] | None = lock_folder(self.path, job)
        self.state = self.path / STATE
        self.saving_seconds, self.saved_at = 0.0, time.monotonic()
        self.checkpoints, self.checkpoint_seconds = 0, 0.0

    def saved(self) -> dict[str, Any] | None:
        """What the last checkpoint of a stopped run recorded (its `write_state`), or None where there is
        none; work made with other settings is refused."""
        if not self.state.exists():
            return None
        state = json.loads(self.state.read_text(encoding="utf-8"))
        for key, now in self.made_with.items():
            if key != "model" and state["made_with"].get(key) != now:
                made = (f"model {state['made_with'].get('model')}, not {self.made_with['model']}"
                        if key == "fingerprint" else f"{key}={state['made_with'].get(key)}, not {now}")
                raise VsearchError(f"{self.path} holds a stopped run made with {made}: run the command that started "
                                   "it to resume it, or delete the folder to start over")
        return state

    def due(self) -> bool:
        return self.saving_seconds <= CHECKPOINT_SHARE * (time.monotonic() - self.saved_at)

    def has_room(self, needed: int, last_saved: str | None) -> bool:
        """Whether the disk has `needed` bytes free for the next checkpoint. Where it has not, the run goes
        on without checkpoints and says so, and what a run stopped from here resumes from (the
        checkpoint of `last_saved`, "12 texts" say, or none): a library may write what fits and report
        nothing (hnswlib does)."""
        free = shutil.disk_usage(self.path).free
        if free >= needed:
            return True
        stopped_then = f"resumes from the last one ({last_saved})" if last_saved else "starts over"
        self.note(f"{free / 2**30:.1f} GiB free in {self.path}, a checkpoint needs about {needed / 2**30:.1f}: "
                  f"going on without; a run stopped from here {stopped_then}")
        self.saving_seconds = math.inf
        return False

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state, {"made_with": self.made_with, **state})

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Time a checkpoint's save, which sets when the next is due."""
        started = time.monotonic()
        yield
        self.saved_at = time.monotonic()
        self.saving_seconds = self.saved_at - started
        self.checkpoints, self.checkpoint_seconds = self.checkpoints + 1, self.checkpoint_seconds + self.saving_seconds

    def close(self) -> None:
        """Let go of the folder, which keeps a checkpoint for the next run; one that holds none is removed."""
        if self.lock is None:
            return
        if not self.state.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock.close()
        self.lock = None

    def remove(self) -> None:
        """Remove the folder: the job's output is written."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()
