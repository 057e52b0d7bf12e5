"""What every torch image encoder shares: device choice, fp16 autocast on CUDA, and the
split between CPU-side preprocessing (run in DataLoader workers) and GPU-side encoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize, PILToTensor

from vsearch.embeddings.encoders import DEVICES, l2_normalise
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
        raise VsearchError(f"unknown --device {device!r}: use {DEVICES}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise VsearchError(f"--device {device}: no Apple GPU (MPS) is available here (use --device cpu)")
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise VsearchError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        if (resolved.index or 0) >= count:
            raise VsearchError(f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return resolved


def rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB: a preprocessing step that reader processes unpickle from this light module."""
    return image.convert("RGB")


def split_preprocess(preprocess: Callable) -> tuple[Callable, Normalize | None]:
    """A model's `preprocess` (PIL image -> normalised float CHW tensor) as the steps up to the
    uint8 CHW image, which reader processes run, and its closing Normalize, left for the device:
    readers then send a quarter of the bytes float32 would take (1.6 times the covers/s from two
    readers here). A preprocess that does not end in to-tensor + Normalize is run whole by the readers."""
    steps = list(getattr(preprocess, "transforms", []))
    # open_clip's MaybeToTensor is ToTensor for the PIL images readers give it.
    if len(steps) >= 2 and isinstance(steps[-1], Normalize) and type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor"):
        return Compose([*steps[:-2], PILToTensor()]), steps[-1]
    return preprocess, None


class TorchImageEncoder:
    """Subclasses set `device`, `image_transform` and `normalisation` (from `split_preprocess`) and
    implement `_encode_pixels(model input) -> dict of tensors` with at least `vector`. "Pixels" are
    what `image_transform` makes, uint8 CHW at the model's input size; `model_input` finishes them on
    the device. Encoders that also define `tensor_transform` (uint8 NCHW images of one size on the
    device -> pixels) get JPEGs decoded on the GPU."""

    device: torch.device
    image_transform: Callable
    normalisation: Normalize | None
    extra_columns: dict[str, pa.DataType] = {}
    _normalising: tuple[torch.Tensor, torch.Tensor] | None = None

    def autocast(self) -> AbstractContextManager:
        # fp16 on CUDA doubles throughput; on the CPU autocast would only cost accuracy.
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of pixels on the device, scaled to [0, 1] and normalised as the model was trained."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.normalisation is None:
            return pixels
        mean, std = self._mean_and_std()
        return (pixels.float() / 255).sub_(mean).div_(std)  # Normalize's own steps, so the same values

    def _mean_and_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Made on the device once. torchvision's Normalize makes them from lists at every call and
        # reads back whether std has a zero: on a GPU the host then waits for all the work queued
        # there, so the embed job could not queue a batch before the one before it had finished.
        if self._normalising is None:
            self._normalising = tuple(torch.as_tensor(values, dtype=torch.float32, device=self.device).view(-1, 1, 1)
                                      for values in (self.normalisation.mean, self.normalisation.std))
        return self._normalising

    def _in_fp32_where_fp16_overflowed(self, compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
        """`compute()`'s arrays, computed under autocast (fp16 on CUDA), and all of them again in
        float32 where one holds a value that is not finite: fp16 overflows on rare inputs where
        float32 does not, and a batch here is small (a query is one text)."""
        with torch.inference_mode():
            with self.autocast():
                arrays = compute()
            if not all(np.isfinite(array).all() for array in arrays):
                arrays = compute()
        return arrays

    def _text_vectors(self, encode: Callable[[], torch.Tensor]) -> np.ndarray:
        """L2-normalised text vectors from `encode()` (see `_in_fp32_where_fp16_overflowed`)."""
        return self._in_fp32_where_fp16_overflowed(lambda: [l2_normalise(encode().float().cpu().numpy())])[0]

    def submit_pixels(self, pixels: torch.Tensor, fp32: bool = False) -> "PendingOutputs":
        """Start encoding a batch of pixels (in float32 throughout with `fp32`, no autocast); on CUDA
        this returns once the work is queued."""
        with torch.inference_mode(), nullcontext() if fp32 else self.autocast():
            return PendingOutputs(self._encode_pixels(self.model_input(pixels)))

    def encode_pixels(self, pixels: torch.Tensor, fp32: bool = False) -> dict[str, np.ndarray]:
        """Encode a batch of pixels; returns float32 arrays keyed by column name."""
        return self.submit_pixels(pixels, fp32).result()

    def pixels(self, images: Sequence) -> torch.Tensor:
        """A batch of pixels (`image_transform`ed images), on the CPU."""
        return torch.stack([self.image_transform(image) for image in images])

    def encode_images(self, images: Sequence) -> np.ndarray:
        return self.encode_pixels(self.pixels(images))["vector"]

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class PendingOutputs:
    """A batch's outputs on their way to the host. The embed job queues the next batch before it
    waits for these, so the GPU is never left without work while the host is busy elsewhere (a
    thread decoding JPEGs holds the host for tens of milliseconds a batch)."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        device = next(iter(outputs.values())).device
        on_cuda = device.type == "cuda"
        # On CUDA, copies to the host that do not wait: into pinned memory, done when `_copied` is.
        self._host = {name: value.float().to("cpu", non_blocking=on_cuda) for name, value in outputs.items()}
        self._copied = None
        if on_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(device))

    def result(self) -> dict[str, np.ndarray]:
        """Float32 arrays keyed by column name, the vectors L2-normalised; waits for the device."""
        if self._copied is not None:
            self._copied.synchronize()
        arrays = {name: value.numpy() for name, value in self._host.items()}
        arrays["vector"] = l2_normalise(arrays["vector"])
        return arrays
