"""Reading covers and videos from local paths or fsspec URLs; a bad file raises `MediaError`."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vsearch.errors import VsearchError
from vsearch.files import url_to_fs

if TYPE_CHECKING:  # PyAV is imported where videos are read: it costs 150 ms, which every query would pay
    import av

# Targets closer than this to the last decoded frame are reached by decoding on, not seeking:
# a seek lands on the previous keyframe, so seeking within a GOP would decode it again.
SEEK_GAP_SECONDS = 2.0


class MediaError(Exception):
    """One image or video could not be read; the job records the reason and goes on."""


def _unreadable(uri: str, exc: BaseException) -> MediaError:
    if isinstance(exc, FileNotFoundError):
        return MediaError(f"image not found: {uri}")
    if isinstance(exc, VsearchError):
        return MediaError(str(exc))
    return MediaError(f"cannot read image {uri}: {str(exc) or type(exc).__name__}")  # some (timeouts) have no message


def read_all(uris: list[str | None], deadline: float | None = None) -> list[bytes | MediaError]:
    """The bytes of each uri, or the `MediaError` saying why not. Each async filesystem's files
    (http, s3, gcs) are fetched concurrently in one call: a cover is one small request, and a
    reader fetching them one after another would mostly wait on the network. An http fetch
    taking more than `deadline` seconds fails (see `url_to_fs`)."""
    results: list[bytes | MediaError] = [MediaError("no image url")] * len(uris)
    remote: dict[fsspec.AbstractFileSystem, list[tuple[int, str]]] = defaultdict(list)
    for position, uri in enumerate(uris):
        if uri is None:
            continue
        try:
            fs, path = url_to_fs(uri, deadline)
            if fs.async_impl:
                remote[fs].append((position, path))
            else:
                results[position] = fs.cat_file(path)
        except Exception as exc:  # each filesystem raises its own errors (aiohttp's, botocore's): this file is unreadable
            results[position] = _unreadable(uri, exc)
    for fs, wanted in remote.items():
        # cat_ranges, not cat: cat expands its paths as globs, and a url's "?" is a glob character.
        fetched = fs.cat_ranges([path for _, path in wanted], None, None, on_error="return")
        for (position, _), data in zip(wanted, fetched):
            results[position] = data if isinstance(data, bytes) else _unreadable(uris[position], data)
    return results


def read_bytes(uri: str | None) -> bytes:
    (data,) = read_all([uri])
    if isinstance(data, MediaError):
        raise data
    return data


def decode_image(data: bytes, uri: str | None) -> Image.Image:
    """The image in `data` (read from `uri`), as RGB, upright: a camera stores a photo taken on
    its side as it was taken and says in the EXIF orientation how to turn it, which browsers
    apply."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:  # whose message names the BytesIO object, different each time
        raise MediaError(f"cannot decode image {uri}: not in an image format Pillow reads") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"cannot decode image {uri}: {exc}") from None
    return image.convert("RGB")


def is_turned(data: bytes) -> bool:
    """Whether an image file says it is stored turned (an EXIF orientation other than 1), as
    `decode_image` turns it back; most covers carry no EXIF at all, which is told without parsing."""
    if data.find(b"Exif\x00\x00", 0, 65536) < 0:
        return False
    try:
        return Image.open(io.BytesIO(data)).getexif().get(ExifTags.Base.Orientation, 1) != 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def load_image(uri: str | None) -> Image.Image:
    return decode_image(read_bytes(uri), uri)


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    import av

    return (container.duration or 0) / av.time_base


def _frames_from(container, stream) -> Iterator[av.VideoFrame]:
    for frame in container.decode(stream):
        if frame.pts is not None:
            yield frame


def _upright(frame: av.VideoFrame) -> Image.Image:
    """The frame as a player shows it: phones store a portrait video as landscape frames and the
    turn that stands them up (the container's display matrix), which ffmpeg applies by default
    and PyAV leaves to its caller. (PIL turns counter-clockwise, as `frame.rotation` counts.)"""
    image = frame.to_image()
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


def sample_frames(uri: str, count: int) -> list[Image.Image]:
    """`count` frames at uniform times over the video (CLIP4Clip's sampling), reached by seeking,
    so a long video costs about `count` short decodes rather than a full one; each frame is turned
    upright as the container says (see `_upright`).

    A target past the last decodable frame repeats that frame. Videos that are empty, have no
    duration, or yield fewer than two distinct frames raise `MediaError`.
    """
    import av

    try:
        fs, path = url_to_fs(uri)
        with fs.open(path, "rb") as handle, av.open(handle) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream in {uri}")
            stream = container.streams.video[0]
            seconds = _duration(container, stream)
            if seconds <= 0:
                raise MediaError(f"zero-length video: {uri}")
            start = stream.start_time or 0
            sampled: list[av.VideoFrame] = []
            decoder, last = iter(()), None
            for index in range(count):
                target = start + int((index + 0.5) * seconds / count / stream.time_base)
                if last is None or (target - last.pts) * stream.time_base > SEEK_GAP_SECONDS:
                    container.seek(target, stream=stream, backward=True)
                    decoder = _frames_from(container, stream)
                for frame in decoder:
                    last = frame
                    if frame.pts >= target:
                        break
                if last is not None:
                    sampled.append(last)
            images = [_upright(frame) for frame in sampled]
    except VsearchError as exc:
        raise MediaError(str(exc)) from None
    except FileNotFoundError:
        raise MediaError(f"video not found: {uri}") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"cannot decode video {uri}: {exc}") from None
    distinct = len({frame.pts for frame in sampled})
    if distinct < 2:
        raise MediaError(f"video too short: {distinct} distinct frame(s) in {uri}")
    return images
