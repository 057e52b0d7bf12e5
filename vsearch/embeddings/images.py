"""Reading cover images from local paths or fsspec URLs."""

from __future__ import annotations

import fsspec
from PIL import Image, UnidentifiedImageError


class ImageError(Exception):
    """One image could not be read; the job records the reason and goes on."""


def load_image(uri: str | None) -> Image.Image:
    if uri is None:
        raise ImageError("no image url")
    try:
        with fsspec.open(uri, "rb") as handle:
            image = Image.open(handle)
            image.load()
    except FileNotFoundError:
        raise ImageError(f"image not found: {uri}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image {uri}: {exc}") from None
    return image.convert("RGB")
