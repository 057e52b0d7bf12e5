"""The reader half of the embed job: DataLoader workers decode and resize media in parallel.

The batch sampler is a generator over the pending shards' rows, run in the main process, so
workers only ever see the rows still to encode, batches keep dataset order, and each batch
belongs to exactly one shard.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
from torch.utils.data import DataLoader

from vsearch.embeddings.datasets import Row
from vsearch.embeddings.media import MediaError, decode_image, is_turned, read_all, sample_frames


JPEG_MAGIC = b"\xff\xd8\xff"
log = logging.getLogger(__name__)


def device_decodes(data: bytes) -> bool:
    """Whether the device's JPEG decoder can take a file: a JPEG, but not one stored turned, which
    the device would decode as stored (see `media.decode_image`)."""
    return data.startswith(JPEG_MAGIC) and not is_turned(data)


def jpeg_tensor(data: bytes) -> torch.Tensor | None:
    """A file's bytes as the device's JPEG decoder takes them, or None where it cannot (`device_decodes`)."""
    return _as_tensor(data) if device_decodes(data) else None


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class Batch:
    number: int  # the shard it belongs to
    rows: list[Row]  # rows whose media were read: those in `pixels` first, then those in `jpegs`
    pixels: torch.Tensor | None  # uint8, (n, 3, H, W) for covers, (n, frames, 3, H, W) for clips
    # Encoded JPEG files left for the device to decode, end to end in one buffer: a tensor crosses
    # from a worker process as a file descriptor, and a batch of 512 separate files ran the main
    # process out of descriptors on a 16-core GPU machine.
    jpeg_bytes: torch.Tensor
    jpeg_sizes: list[int]
    failed: list[tuple[Row, str]]
    reader_seconds: float = 0.0  # the reader process's time on this batch: reading, and decoding `pixels`
    reader_jpegs: int = 0  # JPEGs of `pixels` that the reader decoded although the device could have
    reader_jpeg_seconds: float = 0.0  # the time it took to decode and resize those

    @property
    def jpegs(self) -> list[torch.Tensor]:
        return list(torch.split(self.jpeg_bytes, self.jpeg_sizes))

    def pin_memory(self) -> "Batch":
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class Item:
    number: int
    row: Row
    pixels: torch.Tensor | None = None
    jpeg: torch.Tensor | None = None
    error: str | None = None
    seconds: float = 0.0  # reading's share and decoding
    jpeg_decoded_here: bool = False


# Where the reader processes' pace is not yet measured, they take this share of each batch's JPEGs
# (on an H200 with 15 readers the job settles near half).
FIRST_READER_SHARE = 0.5
# They are given this much less work than their measured pace allows, so that they stay ahead of
# the device: a batch they are late with leaves the model waiting.
READER_MARGIN = 0.85
# The share never falls below this, so the readers' pace stays measured.
LEAST_READER_SHARE = 0.02
SMOOTHING = 0.2  # the weight of each batch's figures in their running averages


class JpegSplit:
    """The share of each batch's JPEG covers that the reader processes decode on their cores; the
    device decodes the rest. Decoding on the GPU is not free: nvjpeg's calls return only once the
    model's queued work is done, so each JPEG the device decodes lengthens the model's batches,
    while the readers' cores are otherwise idle (they only read files).

    The main process watches both sides and sets the share that the readers can just keep up with:
    their time per JPEG and per batch for everything else, against the time the device takes for
    a batch, the time spent waiting for the readers left out. The readers read it, through shared
    memory, as they start each batch."""

    def __init__(self, readers: int):
        self.readers = readers
        self._share = multiprocessing.get_context().RawValue("d", FIRST_READER_SHARE if readers else 0.0)
        self._jpeg_seconds: float | None = None
        self._other_seconds: float | None = None
        self._device_seconds: float | None = None
        self._jpegs: float | None = None  # a batch's; averaged too, as a shard's last batch is a short one

    @property
    def share(self) -> float:
        return self._share.value

    def readers_take(self, jpegs: int) -> int:
        """How many of a batch's `jpegs` a reader decodes itself."""
        return round(self._share.value * jpegs)

    def observe(self, batch: Batch, device_seconds: float, waited: float = 0.0) -> None:
        """Learn from one batch that the device took `device_seconds` to deal with, after waiting
        `waited` seconds for the readers to hand it over."""
        log.debug("JPEGs decoded by the readers %d of %d, device %.4f s, waited %.4f s, share %.3f", batch.reader_jpegs,
                  batch.reader_jpegs + len(batch.jpeg_sizes), device_seconds, waited, self.share)
        if not self.readers:
            return
        if batch.reader_jpegs:
            self._jpeg_seconds = _smoothed(self._jpeg_seconds, batch.reader_jpeg_seconds / batch.reader_jpegs)
        self._other_seconds = _smoothed(self._other_seconds, batch.reader_seconds - batch.reader_jpeg_seconds)
        self._device_seconds = _smoothed(self._device_seconds, device_seconds)
        self._jpegs = _smoothed(self._jpegs, batch.reader_jpegs + len(batch.jpeg_sizes))
        if self._jpeg_seconds and self._jpegs:
            spare = READER_MARGIN * self.readers * self._device_seconds - self._other_seconds
            self._share.value = min(1.0, max(LEAST_READER_SHARE, spare / (self._jpeg_seconds * self._jpegs)))


def _smoothed(average: float | None, value: float) -> float:
    return value if average is None else average + SMOOTHING * (value - average)


class MediaRows(torch.utils.data.Dataset):
    """Indexed by (shard number, row); reads and prepares that row's media.

    The DataLoader asks for a whole batch at once (`__getitems__`), so a batch's remote covers are
    fetched concurrently. With a `split`, the JPEG covers it does not give the readers are passed on
    undecoded for the device to decode; other formats are decoded here, as everything is without it.
    """

    def __init__(self, kind: str, transform: Callable, frames: int, split: JpegSplit | None = None):
        self.kind, self.transform, self.frames, self.split = kind, transform, frames, split

    def __getitem__(self, index: tuple[int, Row]) -> Item:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[tuple[int, Row]]) -> list[Item]:
        items = [Item(*index) for index in indices]
        if self.kind == "clip":
            for item in items:
                try:
                    item.pixels = torch.stack([self.transform(f) for f in sample_frames(item.row.uri, self.frames)])
                except MediaError as exc:
                    item.error = str(exc)
            return items
        started = time.perf_counter()
        datas = read_all([item.row.uri for item in items])
        reading = (time.perf_counter() - started) / len(items)
        jpegs = [bool(self.split) and isinstance(data, bytes) and device_decodes(data) for data in datas]
        to_decode_here = self.split.readers_take(sum(jpegs)) if self.split else 0
        for item, data, jpeg in zip(items, datas, jpegs):
            started = time.perf_counter()
            if isinstance(data, MediaError):
                item.error = str(data)
            elif jpeg and not to_decode_here:
                item.jpeg = _as_tensor(data)
            else:
                if jpeg:
                    to_decode_here -= 1
                    item.jpeg_decoded_here = True
                try:
                    item.pixels = self.transform(decode_image(data, item.row.uri))
                except MediaError as exc:
                    item.error = str(exc)
            item.seconds = reading + time.perf_counter() - started
        return items


def collate(items: list[Item]) -> Batch:
    decoded = [item for item in items if item.pixels is not None]
    encoded = [item for item in items if item.jpeg is not None]
    return Batch(
        number=items[0].number,
        rows=[item.row for item in decoded + encoded],
        pixels=torch.stack([item.pixels for item in decoded]) if decoded else None,
        jpeg_bytes=torch.cat([item.jpeg for item in encoded]) if encoded else torch.empty(0, dtype=torch.uint8),
        jpeg_sizes=[len(item.jpeg) for item in encoded],
        failed=[(item.row, item.error) for item in items if item.error is not None],
        reader_seconds=sum(item.seconds for item in items),
        reader_jpegs=sum(item.jpeg_decoded_here for item in items),
        reader_jpeg_seconds=sum(item.seconds for item in items if item.jpeg_decoded_here),
    )


# Values a call of the tensor transform takes at most: it makes float copies of its input.
TRANSFORM_VALUES = 2 ** 26


def decodes_jpegs_on_device(encoder: object) -> bool:
    """Whether `encoder` can take covers decoded on its device: it prepares uint8 images there
    (`tensor_transform`), and this torchvision still decodes JPEGs (its image decoding is
    deprecated since 0.29 in favour of TorchCodec, and to be removed)."""
    import torchvision.io

    return hasattr(encoder, "tensor_transform") and hasattr(torchvision.io, "decode_jpeg")


def transform_by_size(images: list[torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`transform` applied to same-sized images together (up to TRANSFORM_VALUES at a time),
    results in input order: covers come in a few sizes, and one resize per image cost the GPU
    machine's CPU more than the model."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    out = None
    for positions in groups.values():
        step = max(1, TRANSFORM_VALUES // images[positions[0]].numel())
        for start in range(0, len(positions), step):
            chunk = positions[start:start + step]
            prepared = transform(torch.stack([images[i] for i in chunk]))
            if out is None:
                out = prepared.new_empty((len(images), *prepared.shape[1:]))
            out[chunk] = prepared
    return out


def decode_jpegs(jpegs: list[torch.Tensor], uris: list[str | None], device: torch.device,
                 transform: Callable[[torch.Tensor], torch.Tensor],
                 host_transform: Callable) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Decode JPEG bytes on `device` (nvjpeg on CUDA) and resize them with the encoder's tensor
    transform; returns the pixels of those that decoded and the reasons of those that did not.
    A JPEG the device cannot decode (nvjpeg rejects some chroma subsamplings and colour spaces that
    PIL reads) is decoded on the host, as the workers would have, with `host_transform`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def on_device(data: torch.Tensor | list[torch.Tensor]):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a file it rejects, or out of memory (one at a time needs less)
            return None

    images = on_device(jpegs)  # one file the device rejects fails the whole call: then one by one
    if images is not None:
        return transform_by_size(images, transform), {}
    inputs, failed = [], {}
    for position, (data, uri) in enumerate(zip(jpegs, uris)):
        image = on_device(data)
        if image is not None:
            inputs.append(transform(image[None])[0])
            continue
        try:
            inputs.append(host_transform(decode_image(data.numpy().tobytes(), uri)).to(device))
        except MediaError as exc:
            failed[position] = str(exc)
    return (torch.stack(inputs) if inputs else None), failed


def device_pixels(batch: Batch, device: torch.device, transform: Callable | None, host_transform: Callable
                  ) -> tuple[torch.Tensor | None, list[Row], list[tuple[Row, str]]]:
    """(pixels on `device`, their rows, the batch's failures) for one batch: the pixels the
    workers prepared, then the JPEGs decoded on the device."""
    ready = 0 if batch.pixels is None else len(batch.pixels)
    undecoded = batch.rows[ready:]
    decoded, undecodable = (decode_jpegs(batch.jpegs, [row.uri for row in undecoded], device, transform, host_transform)
                            if batch.jpeg_sizes else (None, {}))
    rows = batch.rows[:ready] + [row for i, row in enumerate(undecoded) if i not in undecodable]
    failed = batch.failed + [(undecoded[i], reason) for i, reason in undecodable.items()]
    parts = [p for p in (None if batch.pixels is None else batch.pixels.to(device, non_blocking=True), decoded)
             if p is not None]
    return (torch.cat(parts) if parts else None), rows, failed


def _batch_plan(shards: Iterator[tuple[int, list[Row]]], batch_rows: int) -> Iterator[list[tuple[int, Row]]]:
    for number, rows in shards:
        it = iter(rows)
        while batch := list(islice(it, batch_rows)):
            yield [(number, row) for row in batch]


def media_batches(shards: Iterator[tuple[int, list[Row]]], kind: str, transform: Callable, frames: int,
                  batch_rows: int, workers: int, pin_memory: bool, split: JpegSplit | None = None) -> Iterator[Batch]:
    """Batches of preprocessed media for the given shards, read by `workers` processes; with a
    `split`, some JPEGs left for the device to decode, as many as the readers cannot keep up with."""
    loader = DataLoader(
        MediaRows(kind, transform, frames, split),
        batch_sampler=_batch_plan(shards, batch_rows),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        # Batches a reader has been asked for were shared as the split stood then: a deeper queue
        # only delays the split's corrections (4 a reader kept a 60,000-cover run on its first guess
        # for half its batches).
        prefetch_factor=2 if workers else None,
    )
    return iter(loader) if split is None else _observed(iter(loader), split)


def _observed(batches: Iterator[Batch], split: JpegSplit) -> Iterator[Batch]:
    """`batches`, each one shown to `split` once its consumer asks for the next: the time in
    between is the device's for that batch, the time spent waiting for the readers left out. Not
    the first: the next is asked for before the model has anything queued (on an H200, 44 ms
    against 110 for later batches, which set the share to a third of its settled value)."""
    asked = time.perf_counter()
    for number, batch in enumerate(batches):
        handed = time.perf_counter()
        yield batch
        asked_again = time.perf_counter()
        if number:
            split.observe(batch, device_seconds=asked_again - handed, waited=handed - asked)
        asked = asked_again
