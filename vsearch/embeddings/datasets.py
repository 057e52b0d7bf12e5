"""Dataset readers: every source becomes a stream of `Row`s with stable ids.

Sources and their ids:

* CBVS-5M / CBVS-10M files (`title \\t url \\t ocr`, `\\N` for none, no id column):
  id = `url_id(url)`, the first 16 hex digits of the SHA-1 of the url as written.
* CBVS-20K (`query \\t docid \\t url \\t label`): id = docid; one row per distinct docid.
* A folder of images: id = the file's path relative to the folder, without extension.
* `demo`: the embedded demo, a CBVS-5M-format file shipped inside the package.

A row's `uri` is where its cover image is read from: `<images>/<id>.jpg` when the dataset
has an images folder (pre-downloaded covers; by default `<stem>-images/` beside the file),
otherwise its url, resolved against the dataset file's folder when relative. Local paths (the
dataset's, `--images`, `--videos`) are made absolute first, so that a shard's `uri` reads the same
file from any working directory, and names it the same way in every run.
Rows with an id seen before are skipped, so ids are unique within a dataset; so are lines with
too few fields or bytes that are not UTF-8 (a file whose first line is not UTF-8 is refused).

Videos (for clip vectors) are found the same way: `<videos>/<id>.<ext>`, by default in
`<stem>-videos/` beside the file (for a folder of images, `<folder>-videos/` beside it); rows
without a video there have no clip. A clip row's `uri` is its video and its `cover` the cover
image, which the reranker's OCR heads read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import PurePosixPath
from typing import Generic, TypeVar

import fsspec

from vsearch.errors import VsearchError
from vsearch.files import decoded_lines, url_to_fs
from vsearch.workspace import Workspace

T = TypeVar("T")
NULL = "\\N"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts")
DEMO_FILE = "demo.txt"


@dataclass(frozen=True)
class Row:
    id: str
    title: str | None
    ocr: str | None
    uri: str | None
    cover: str | None = None  # clip rows only: the cover image of the video at `uri`


class _Once(Generic[T]):
    """A value computed on first call, once even when threads ask at the same time."""

    def __init__(self, compute: Callable[[], T]):
        self.compute, self.value, self.lock = compute, None, threading.Lock()

    def __call__(self) -> T:
        with self.lock:
            if self.value is None:
                self.value = self.compute()
            return self.value


@dataclass
class Dataset:
    name: str
    source: str
    format: str
    has_text: bool
    _rows: Callable[[], Iterator[Row | None]] = field(repr=False)  # None for a line it cannot use
    _expected_rows: Callable[[], int | None] = field(repr=False)
    videos: str = ""  # the folder of its videos (see `_videos_folder`)
    duplicates: int = 0
    malformed: int = 0
    read: int = 0  # lines (or images) `rows()` has gone through so far, repeats and malformed ones included

    def __post_init__(self) -> None:
        # Listed once: a progress bar's count and the clip rows share one listing of the folder.
        self._videos_found = _Once(self._list_videos)

    @property
    def is_local(self) -> bool:
        """Whether the dataset is read from this machine's file system (reading it twice costs no network)."""
        return _is_local(url_to_fs(self.source)[0])

    def rows(self) -> Iterator[Row]:
        """Yield rows with unique ids, counting the lines skipped as repeats in `duplicates`, and
        those too short or not UTF-8 in `malformed`."""
        seen: set[str] = set()
        self.duplicates = self.malformed = self.read = 0
        for row in self._rows():
            self.read += 1
            if row is None:
                self.malformed += 1
                continue
            if row.id in seen:
                self.duplicates += 1
                continue
            seen.add(row.id)
            yield row

    def expected_rows(self, kind: str = "cover") -> int | None:
        """About how many rows `rows()` (kind cover) or `clip_rows()` (kind clip) will yield, for a
        progress bar: at most that many, as the lines of the file (repeats and malformed lines
        included) or the videos in the folder; None for a remote file, which counting would read twice."""
        return self._expected_rows() if kind == "cover" else len(self._videos_found())

    def _list_videos(self) -> dict[str, str]:
        """{id: where it is read from} of the videos in the videos folder."""
        if not _isdir(self.videos):
            raise VsearchError(f"dataset {self.name} has no videos folder {self.videos}: put videos named "
                               "<id>.mp4 there, or pass --videos DIR")
        fs, folder = url_to_fs(self.videos)
        location = (lambda path: path) if _is_local(fs) else (lambda path: fs.unstrip_protocol(path))
        # Searched recursively, as image folders are: the video of image `sub/a` is `sub/a.mp4`.
        return {str(PurePosixPath(path).relative_to(folder).with_suffix("")): location(path)
                for path in fs.find(folder) if path.lower().endswith(VIDEO_SUFFIXES)}

    def clip_rows(self) -> Iterator[Row]:
        """The rows that have a video, with `uri` pointing at it and `cover` at the cover image."""
        found = self._videos_found()
        for row in self.rows():
            if row.id in found:
                yield replace(row, uri=found[row.id], cover=row.uri)


def url_id(url: str) -> str:
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def file_version(uri: str | None) -> str:
    """Which version of a local file `uri` is, as its size and modification time ("missing" where
    there is none), as make and rsync tell a changed file; "" for a remote one, which would cost
    a request to look at."""
    if uri is None or is_remote(uri):
        return ""
    try:
        stat = os.stat(uri.removeprefix("file://"))
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def is_remote(uri: str) -> bool:
    """Whether `uri` is read over a network (http, an object store) rather than from a local file."""
    return _protocol(uri) != "file"


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _join(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative


def _absolute(url: str) -> str:
    """A local path made absolute (against the working directory); a URL as it is."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _is_relative(url: str) -> bool:
    return "://" not in url and not url.startswith("/")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _isdir(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.isdir(path)


def _line_count(url: str) -> int | None:
    """The lines of a local file (a last line without a line end counts), None for a remote one."""
    fs, path = url_to_fs(url)
    if not _is_local(fs):
        return None
    count, last = 0, b"\n"
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _lines(url: str) -> Iterator[list[str] | None]:
    """The tab-separated fields of each non-empty line, None for a line that is not UTF-8."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as handle:
            for line in decoded_lines(handle, f"dataset {url}"):
                if line is None or line:
                    yield None if line is None else line.split("\t")
    except (OSError, ValueError) as exc:
        raise VsearchError(f"cannot read dataset {url}: {exc}") from exc


def _value(field_: str) -> str | None:
    field_ = field_.strip()
    return None if field_ in ("", NULL) else field_


def _image_locator(source: str, images: str | None) -> Callable[[str, str | None], str | None]:
    """Return f(id, url) -> where that row's cover image is read from."""
    base = _parent(source)
    if images is None:
        default = _join(base, PurePosixPath(source).stem + "-images")
        images = default if _isdir(default) else None
    elif not _isdir(images):  # else every row fails, "image not found"; a filesystem package missing fails here too
        raise VsearchError(f"--images {images}: no such folder")
    if images is not None:
        folder = images
        return lambda id_, url: _join(folder, f"{id_}.jpg")

    checked: set[str] = set()

    def from_url(id_: str, url: str | None) -> str | None:
        if url is None:
            return None
        located = _join(base, url) if _is_relative(url) else url
        protocol = _protocol(located)
        if protocol not in checked:  # as above, once per protocol
            url_to_fs(located)
            checked.add(protocol)
        return located

    return from_url


def _videos_folder(source: str, videos: str | None) -> str:
    """`--videos`, else `<stem>-videos` beside the dataset file or folder."""
    source = source.rstrip("/")
    return videos or _join(_parent(source), PurePosixPath(source).stem + "-videos")


def cbvs_covers(source: str, name: str, images: str | None = None, videos: str | None = None) -> Dataset:
    """CBVS-5M / CBVS-10M: `title \\t url \\t ocr`; lines with fewer than 3 fields are skipped."""
    locate = _image_locator(source, images)

    def rows() -> Iterator[Row | None]:
        for fields in _lines(source):
            if fields is None or len(fields) < 3 or _value(fields[1]) is None:
                yield None
                continue
            url = fields[1].strip()
            id_ = url_id(url)
            yield Row(id_, _value(fields[0]), _value(fields[2]), locate(id_, url))

    return Dataset(name, source, "cbvs-covers", True, rows, lambda: _line_count(source), _videos_folder(source, videos))


def cbvs20k(source: str, name: str, images: str | None = None, videos: str | None = None) -> Dataset:
    """CBVS-20K: `query \\t docid \\t url \\t label`; one row per distinct docid, no text."""
    locate = _image_locator(source, images)

    def rows() -> Iterator[Row | None]:
        for fields in _lines(source):
            if fields is None or len(fields) < 4:
                yield None
                continue
            docid, url = fields[1].strip(), _value(fields[2])
            yield Row(docid, None, None, locate(docid, url))

    return Dataset(name, source, "cbvs20k", False, rows, lambda: _line_count(source), _videos_folder(source, videos))


def image_folder(source: str, name: str, videos: str | None = None) -> Dataset:
    """A folder of images, searched recursively; id = relative path without extension."""
    fs, root = url_to_fs(source)
    # Listed once: a progress bar's count and the rows share one walk of a folder of millions.
    images = _Once(lambda: sorted(path for path in fs.find(root) if path.lower().endswith(IMAGE_SUFFIXES)))

    def rows() -> Iterator[Row]:
        for path in images():
            relative = PurePosixPath(path).relative_to(PurePosixPath(root).as_posix())
            uri = path if _is_local(fs) else fs.unstrip_protocol(path)
            yield Row(str(relative.with_suffix("")), None, None, uri)

    return Dataset(name, source, "image-folder", False, rows, lambda: len(images()), _videos_folder(source, videos))


def demo_source() -> str:
    return str(resources.files("vsearch") / "demo_data" / DEMO_FILE)


REGISTERED = {
    "cbvs20k": "cbvs20k.txt",
    "cbvs5m": "cbvs5m.txt",
    "cbvs10m": "cbvs10m.txt",
}


def is_registered(name: str) -> bool:
    """Whether `name` is a dataset known by its name (demo, cbvs20k, cbvs5m, cbvs10m), found in the
    package or the workspace, wherever that is now."""
    return name == "demo" or name in REGISTERED


def _sniff(source: str) -> str:
    """Tell CBVS-20K (4 fields, label last) from CBVS-5M/10M (3 fields) by the first lines."""
    count = -1
    for count, fields in enumerate(_lines(source)):
        if fields is None:
            continue
        if len(fields) == 4 and fields[3].strip() in ("0", "1", "2"):
            return "cbvs20k"
        if len(fields) == 3:
            return "cbvs-covers"
        if count >= 100:
            break
    if count < 0:
        raise VsearchError(f"dataset {source} is empty: no line of it holds any text")
    raise VsearchError(
        f"cannot tell the format of {source}: expected CBVS-5M/10M lines "
        "(title\\turl\\tocr) or CBVS-20K lines (query\\tdocid\\turl\\tlabel)"
    )


def open_dataset(spec: str, workspace: Workspace, images: str | None = None,
                 videos: str | None = None) -> Dataset:
    """Resolve `--dataset`: a registered name (demo, cbvs20k, cbvs5m, cbvs10m) or a path/URL."""
    images, videos = (_absolute(folder) if folder else None for folder in (images, videos))
    if spec == "demo":
        return cbvs_covers(demo_source(), "demo", images, videos)
    if spec in REGISTERED:
        source = str(workspace.datasets / REGISTERED[spec])
        if not _exists(source):
            raise VsearchError(
                f"dataset {spec} not found: expected {source} "
                f"(put the {REGISTERED[spec]} file from the CBVS release there, or pass a path)"
            )
        reader = cbvs20k if spec == "cbvs20k" else cbvs_covers
        return reader(source, spec, images, videos)
    if not _exists(spec):
        known = ", ".join(["demo", *REGISTERED])
        raise VsearchError(f"dataset not found: {spec} (give a path or one of {known})")
    spec = _absolute(spec)
    name = PurePosixPath(spec.rstrip("/")).stem
    if _isdir(spec):
        return image_folder(spec, name, videos)
    return (cbvs20k if _sniff(spec) == "cbvs20k" else cbvs_covers)(spec, name, images, videos)
