"""What every torch image encoder shares: device choice, fp16 autocast on CUDA, and the
split between CPU-side preprocessing (run in DataLoader workers) and GPU-side encoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import pyarrow as pa
import torch

from vsearch.embeddings.encoders import l2_normalise
from vsearch.errors import VsearchError


def resolve_device(device: str) -> torch.device:
    """`auto` is the GPU when there is one; a device this machine lacks is an error, not a crash later."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise VsearchError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise VsearchError(f"--device {device}: no Apple GPU (MPS) is available here (use --device cpu)")
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise VsearchError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        if (resolved.index or 0) >= count:
            raise VsearchError(f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return resolved


class TorchImageEncoder:
    """Subclasses set `device`, `image_transform` (PIL image -> CHW float tensor) and implement
    `_encode_pixels(pixels) -> dict of tensors` with at least `vector`. Those that also define
    `tensor_transform` (uint8 NCHW images of one size on the device -> the same input) get JPEGs
    decoded on the GPU."""

    device: torch.device
    image_transform: Callable
    extra_columns: dict[str, pa.DataType] = {}

    def autocast(self) -> AbstractContextManager:
        # fp16 on CUDA doubles throughput; on the CPU autocast would only cost accuracy.
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def encode_pixels(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """Encode a batch of preprocessed images; returns float32 arrays keyed by column name."""
        with torch.inference_mode(), self.autocast():
            outputs = self._encode_pixels(pixels.to(self.device, non_blocking=True))
        arrays = {name: value.float().cpu().numpy() for name, value in outputs.items()}
        arrays["vector"] = l2_normalise(arrays["vector"])
        return arrays

    def pixels(self, images: Sequence) -> torch.Tensor:
        """A batch of `image_transform`ed images, on the CPU."""
        return torch.stack([self.image_transform(image) for image in images])

    def encode_images(self, images: Sequence) -> np.ndarray:
        return self.encode_pixels(self.pixels(images))["vector"]

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
