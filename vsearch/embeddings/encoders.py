"""The one registry of encoders: a spec string names an encoder and how to load it.

    lexical[:DIM]              hashed character n-grams of title + OCR text; no weights
    uniclip:PATH               the UniCLIP model (CBVS paper) from its released checkpoint
    open_clip:ARCH:PATH        any open_clip architecture with a local checkpoint

Every encoder has `spec`, `dim`, `fingerprint` (identifies its weights, so shards and
indexes can refuse to mix vectors from different models) and `encode_texts`; image
encoders also have `encode_images`. Vectors are float32 and L2-normalised.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from vsearch.errors import VsearchError


@runtime_checkable
class Encoder(Protocol):
    spec: str
    dim: int
    fingerprint: str

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class ImageEncoder(Encoder, Protocol):
    def encode_images(self, images: Sequence) -> np.ndarray: ...


Factory = Callable[[str, str], Encoder]

DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(device: str) -> None:
    """Refuse a misspelt device without importing torch: an encoder that runs on no device (lexical)
    would otherwise ignore it. Whether this machine has the device is `torch_encoder.resolve_device`'s
    question."""
    if not _DEVICE_NAME.fullmatch(device):
        raise VsearchError(f"unknown --device {device!r}: use {DEVICES}")


@dataclass(frozen=True)
class _Registered:
    factory: Factory
    usage: str
    on_device: bool  # runs on a torch device (a GPU when there is one); lexical runs on no device


_REGISTRY: dict[str, _Registered] = {}


def register_encoder(name: str, factory: Factory, usage: str, on_device: bool = True) -> None:
    """Register `factory(args, device)`, called for specs `name` or `name:args`."""
    _REGISTRY[name] = _Registered(factory, usage, on_device)


def encoder_usages() -> list[str]:
    return [entry.usage for entry in _REGISTRY.values()]


def _registered(spec: str) -> tuple[_Registered, str]:
    name, _, args = spec.partition(":")
    if name not in _REGISTRY:
        raise VsearchError(f"unknown model spec {spec!r}: use one of {', '.join(encoder_usages())}")
    return _REGISTRY[name], args


def load_encoder(spec: str, device: str = "auto") -> Encoder:
    """Load the encoder a spec names, e.g. `lexical` or `open_clip:ViT-B-32:/models/b32.pt`."""
    entry, args = _registered(spec)
    if not entry.on_device:
        check_device_name(device)
    return entry.factory(args, device)


def runs_on_device(spec: str) -> bool:
    """Whether the encoder `spec` names runs on a torch device: a job with one that does not needs
    no devices counted, nor torch imported (a second and 600 MB)."""
    return _registered(spec)[0].on_device


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a row with NaN or infinity stays so, for its caller to refuse
        return vectors / np.maximum(norms, 1e-12)


def _lexical(args: str, device: str) -> Encoder:
    from vsearch.embeddings.lexical import LexicalEncoder

    if not args:
        return LexicalEncoder()
    if not args.isdigit() or int(args) < 16:
        raise VsearchError(f"bad lexical spec 'lexical:{args}': expected lexical:DIM with DIM >= 16")
    return LexicalEncoder(dim=int(args))


def _open_clip(args: str, device: str) -> Encoder:
    from vsearch.embeddings.openclip import OpenClipEncoder

    arch, _, path = args.partition(":")
    if not arch or not path:
        raise VsearchError(f"bad open_clip spec 'open_clip:{args}': expected open_clip:ARCH:PATH")
    return OpenClipEncoder(arch, path, device)


def _uniclip(args: str, device: str) -> Encoder:
    from vsearch.embeddings.uniclip import UniClipEncoder

    if not args:
        raise VsearchError("bad uniclip spec 'uniclip': expected uniclip:PATH")
    return UniClipEncoder(args, device)


register_encoder("lexical", _lexical, "lexical[:DIM]", on_device=False)
register_encoder("uniclip", _uniclip, "uniclip:PATH")
register_encoder("open_clip", _open_clip, "open_clip:ARCH:PATH")
