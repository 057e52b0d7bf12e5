"""Reading the text on covers whose dataset row has none (`vsearch embed --ocr`), with RapidOCR.

A CBVS row carries the OCR text its platform read off the cover; a folder of images carries none,
and without it the lexical encoder has nothing to encode, the reranker's lexical part nothing to
match and `--where "ocr LIKE …"` nothing to filter. RapidOCR (the `rapidocr` package, 3.x) runs
PP-OCR's Chinese and English models, shipped inside its wheel (nothing is downloaded), on ONNX
Runtime. A small cover costs about 0.3 s of one core, far more than encoding it, so a shard's
covers are read by a pool of processes with one ONNX thread each before the shard is encoded.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

from vsearch.embeddings.datasets import Row
from vsearch.embeddings.media import MediaError, load_image
from vsearch.errors import VsearchError

ENGINE = "rapidocr"
PACKAGES = ("rapidocr", "onnxruntime")
# RapidOCR scales an image's short side up to 30 pixels and pads thin lines of text: a 30×2000
# image took it 19 s and 5 GB, a 3×2000 one 4 GB and a MemoryError (or the kernel's OOM killer).
# Covers are 16:9 or 9:16; an image this far from square is not read.
MAX_ASPECT = 10

_engine: Any = None  # this process's RapidOCR, started by `_start_engine`


def require_engine() -> None:
    """Refuse `--ocr` up front, before any work, when RapidOCR or its runtime is not installed or
    cannot start: some releases fetch models or fonts from the internet as they start (3.8 does,
    3.9 and later do not), which fails offline."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise VsearchError(f"--ocr needs RapidOCR: pip install 'vsearch[ocr]' (missing: {', '.join(missing)})")
    try:
        _new_engine(1)
    except Exception as exc:
        raise VsearchError(f"RapidOCR cannot start ({type(exc).__name__}: {exc}); "
                           "pip install 'rapidocr>=3.9', whose models ship in its wheel") from None


def _new_engine(threads: int) -> Any:
    from rapidocr import RapidOCR

    return RapidOCR(params={"Global.log_level": "error",
                            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                            "EngineConfig.onnxruntime.inter_op_num_threads": 1})


def _start_engine(threads: int) -> None:
    global _engine
    _engine = _new_engine(threads)


def read_text(uri: str) -> str | None:
    """The text on the image at `uri`, its lines in reading order joined by spaces; None when it
    carries none, cannot be read (an image encoder records why when it fails to read it too) or
    is more than MAX_ASPECT times as long as it is wide."""
    try:
        image = load_image(uri)
    except MediaError:
        return None
    if max(image.size) > MAX_ASPECT * min(image.size):
        return None
    try:
        found = _engine(image)
    except Exception:  # RapidOCR's own errors (and OpenCV's) on shapes it cannot resize: one cover, not the job
        return None
    return " ".join(found.txts or ()) or None


@contextmanager
def _text_reader(workers: int) -> Iterator[Callable[[list[str]], Iterable[str | None]]]:
    """`read_text` over a list of uris, by a pool of `workers` processes, or by this one for 0."""
    if workers == 0:
        if _engine is None:
            _start_engine(-1)  # the one engine uses every core
        yield partial(map, read_text)
        return
    # spawn, not fork: the job's process holds torch's threads and the shard writer's.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_engine, initargs=(1,)) as pool:
        yield partial(pool.map, read_text)


def with_cover_text(shards: Iterator[tuple[int, list[Row]]], kind: str, workers: int,
                    on_rows: Callable[[int], None] = lambda n: None) -> Iterator[tuple[int, list[Row]]]:
    """`shards` with the text read off the cover of each row that has no OCR text (for a clip, its
    video's cover), by `workers` processes; `on_rows(n)` as each cover is read (a whole shard must be
    read before it is encoded, so the job's own progress moves a shard at a time)."""
    with _text_reader(workers) as read_texts:
        for number, rows in shards:
            blank = [i for i, row in enumerate(rows) if not row.ocr and _image(row, kind)]
            rows = list(rows)
            for i, text in zip(blank, read_texts([_image(rows[i], kind) for i in blank])):
                rows[i] = replace(rows[i], ocr=text)
                on_rows(1)
            on_rows(len(rows) - len(blank))
            yield number, rows


def _image(row: Row, kind: str) -> str | None:
    return row.cover if kind == "clip" else row.uri
