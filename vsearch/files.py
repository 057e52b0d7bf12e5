"""File helpers shared by every stage: opening URLs, reading text, checksums and crash-safe writes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

from vsearch.errors import VsearchError, first_line, human_size

# A server silent this long fails the request: a stalled cover server costs that row (recorded
# as failed), not aiohttp's default five minutes a request, while a long download that keeps
# sending (a dataset file, a video) is not cut off.
HTTP_TIMEOUT_SECONDS = 30
LOCK_FILE = ".lock"  # what `lock_folder` locks, in the folder it guards


def url_to_fs(url: str, deadline: float | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for a local path or URL. An unknown protocol, or one whose
    package is not installed (s3fs for s3://, gcsfs for gs://), is a one-line `VsearchError`.
    An http request fails when its server is silent for `HTTP_TIMEOUT_SECONDS` or, given a
    `deadline`, when it takes longer than that many seconds in all."""
    options: dict[str, Any] = {}
    if url.startswith(("http://", "https://")):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
            total=deadline, sock_connect=HTTP_TIMEOUT_SECONDS, sock_read=HTTP_TIMEOUT_SECONDS)}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise VsearchError(f"cannot open {url}: {exc}") from None


def decoded_lines(raw: Iterable[bytes], name: str) -> Iterator[str | None]:
    """Each line of `raw` as UTF-8 text without its line end (a leading byte-order mark dropped),
    or None for a line that is not UTF-8. A first line that is not UTF-8 is an error: the whole
    file is in another encoding (GBK, say), which would make every line None."""
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            if number == 1:
                raise VsearchError(f"{name} is not UTF-8 text; convert it, e.g. iconv -f GBK -t UTF-8") from None
            yield None


def text_lines(handle: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of a file a user wrote (queries, ids, scores), read as it
    comes; a line that is not UTF-8 is an error naming it."""
    for number, line in enumerate(decoded_lines(handle, name), start=1):
        if line is None:
            raise VsearchError(f"{name}:{number}: not UTF-8 text; convert the file, e.g. iconv -f GBK -t UTF-8")
        yield number, line


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new, never half."""
    temporary = path.with_name(path.name + ".tmp")
    with errors_naming(temporary), open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def errors_naming(path: Path) -> Iterator[None]:
    """Name `path` in an OSError raised while writing it: Python's writes and Arrow's name no file,
    and "No space left on device" alone does not say which disk."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        reason = os.strerror(exc.errno) if isinstance(exc.errno, int) else first_line(exc)
        raise OSError(exc.errno, reason, str(path)) from exc


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=1))


def check_room(directory: Path, needed: int, output: str, replaced: tuple[int, str] = (0, ""),
               then: str = "free some space or write elsewhere") -> bool:
    """Stop unless the disk of `directory` has room for `output`, about `needed` bytes, counting the
    `replaced` bytes (of the files it supersedes, named) as free; whether it needs them."""
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return False
    size, name = replaced
    if free + size < needed:
        counting = f" and {human_size(size)} in {name}, which it would replace" if size else ""
        raise VsearchError(f"no room for {output}: it needs about {human_size(needed)}, and {directory} has "
                           f"{human_size(free)} free{counting}; {then}")
    return True


def is_locked(directory: Path) -> bool:
    """Whether a process holds `directory`'s lock (`lock_folder`) now."""
    try:
        handle = open(directory / LOCK_FILE, encoding="utf-8")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def lock_folder(directory: Path, job: str) -> IO[str]:
    """An exclusive lock on `directory` (its `.lock` file), held until the returned handle is closed,
    so that two runs of `job` never write it at once; the kernel releases it when its process ends,
    however it ends."""
    handle = open(directory / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise VsearchError(f"another {job} (process {holder or 'unknown'}) is writing to {directory}; "
                           "wait for it to finish, or pass --out for another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
