"""The `open_clip:ARCH:PATH` encoder: any open_clip architecture with a local checkpoint.

ARCH is an open_clip model name (`ViT-B-32`, `ViT-B-16-quickgelu`, ...) or the path of a
model config JSON in open_clip's format, for architectures open_clip does not ship.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch

from vsearch.embeddings.checkpoints import existing_file, file_fingerprint, load_strict, read_state_dict
from vsearch.embeddings.torch_encoder import TorchImageEncoder, resolve_device, split_preprocess
from vsearch.errors import VsearchError


def _architecture(arch: str) -> str:
    if arch.endswith(".json"):
        config = existing_file(arch, "open_clip model config")
        open_clip.add_model_config(config)
        return config.stem
    if arch not in open_clip.list_models():
        raise VsearchError(
            f"unknown open_clip architecture {arch!r} (see open_clip.list_models(), "
            "or give the path of a model config .json)"
        )
    return arch


class OpenClipEncoder(TorchImageEncoder):
    def __init__(self, arch: str, path: str, device: str = "auto"):
        self.device = resolve_device(device)
        checkpoint = existing_file(path, "open_clip checkpoint")
        name = _architecture(arch)
        state = read_state_dict(checkpoint)
        # open_clip warns "initialized randomly" when it loads no weights; ours are loaded, strictly, next.
        logging.disable(logging.WARNING)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        state = {key.removeprefix("module."): value for key, value in state.items()}
        load_strict(model, state, checkpoint, f"open_clip {name}")
        try:
            self.tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # tokenizers that live on a hub fail offline in many ways
            raise VsearchError(f"cannot load the tokenizer of open_clip {name} offline: {exc}") from exc
        self.model = model.to(self.device).eval()
        self.image_transform, self.normalisation = split_preprocess(preprocess)
        # Absolute paths, so the spec recorded in manifests works from any directory.
        arch_part = str(Path(arch).resolve()) if arch.endswith(".json") else arch
        self.spec = f"open_clip:{arch_part}:{checkpoint.resolve()}"
        self.fingerprint = file_fingerprint(checkpoint)
        self.dim = int(model.visual.output_dim)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self._text_vectors(lambda: self.model.encode_text(tokens))

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"vector": self.model.encode_image(pixels)}
