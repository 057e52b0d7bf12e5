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

from vsearch.errors import VsearchError, human_size
from vsearch.files import LOCK_FILE, check_room, lock_folder, write_json_atomic

CHECKPOINT_SHARE = 0.02  # of a run's time spent saving checkpoints, about (over it while the graph grows fast)
STATE = "checkpoint.json"


def held_bytes(folder: Path, keep: tuple[str, ...] = ()) -> int:
    """The disk space a checkpoint folder's work takes, less its files named in `keep`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name not in (LOCK_FILE, *keep))


def partial_folder(out: Path) -> Path:
    """Where a run writing `out` (a file or an index folder) keeps its work until `out` is written."""
    return out.with_name(out.name + ".partial")


class CheckpointFolder:
    """`partial_folder(out)`, locked by this run of `job` until `close`. `made_with` holds the settings
    the saved work depends on; a key `model` only names the model in messages, where `fingerprint`
    decides."""

    def __init__(self, out: Path, job: str, made_with: dict[str, Any], note: Callable[[str], None]):
        self.path, self.job, self.made_with, self.note = partial_folder(out), job, made_with, note
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
        """Whether to save a checkpoint now, spaced as the module says."""
        return self.saving_seconds <= CHECKPOINT_SHARE * (time.monotonic() - self.saved_at)

    @property
    def saves_checkpoints(self) -> bool:
        """Whether the run still saves checkpoints: it goes on without once one found no room or failed."""
        return self.saving_seconds != math.inf

    def has_room(self, needed: int, last_saved: str | None) -> bool:
        """Whether the disk has `needed` bytes free for the next checkpoint. Where it has not, the run goes
        on without checkpoints and says so, and what a run stopped from here resumes from (the
        checkpoint of `last_saved`, "12 texts" say, or none)."""
        free = shutil.disk_usage(self.path).free
        if free >= needed:
            return True
        self._go_on_without(f"{human_size(free)} free in {self.path}, a checkpoint needs about {human_size(needed)}",
                            last_saved)
        return False

    def _go_on_without(self, reason: str, last_saved: str | None) -> None:
        stopped_then = f"resumes from the last one ({last_saved})" if last_saved else "starts over"
        self.note(f"{reason}: going on without; a run stopped from here {stopped_then}")
        self.saving_seconds = math.inf

    def room_for_output(self, needed: int, directory: Path, output: str, make: bool, keep: tuple[str, ...] = ()) -> None:
        """Stop unless the disk of `directory` can take the job's `output`, about `needed` bytes,
        counting the space of the checkpoint, which the output supersedes, as free. With `make`
        (the output is about to be written), remove the checkpoint where its space is needed: the
        alternative is a run that has done all its work failing at its last step. Files named in
        `keep` the job still reads while writing its output: they are neither counted nor removed."""
        held = held_bytes(self.path, keep)
        then = ("the checkpoint is kept: free some space and run the same command again to resume from it"
                if make and held else "free some space or write elsewhere")
        if not check_room(directory, needed, output, (held, f"the checkpoint in {self.path}"), then) or not make:
            return
        self.note(f"removing the checkpoint in {self.path} ({human_size(held)}) to make room for {output}; a run "
                  "stopped from here starts over")
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child.name not in (LOCK_FILE, *keep):
                child.unlink()

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state, {"job": self.job, "made_with": self.made_with, **state})

    @contextlib.contextmanager
    def saving(self, last_saved: str | None, staging: Path) -> Iterator[None]:
        """Time a checkpoint's save into `staging` (then moved into place), which sets when the next
        is due. A save that fails to write (a full disk) leaves the last checkpoint as it was, and the
        run goes on without more."""
        started = time.monotonic()
        try:
            yield
        except OSError as exc:
            staging.unlink(missing_ok=True)
            self._go_on_without(f"cannot save a checkpoint ({exc.strerror or exc})", last_saved)
            return
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
