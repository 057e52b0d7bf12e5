"""Reading local model checkpoints with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vsearch.errors import VsearchError
from vsearch.files import sha256_of


def file_fingerprint(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256: identifies the weights, not the path."""
    return sha256_of(path)[:16]


def existing_file(path: str, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise VsearchError(f"{what} not found: {path}")
    return resolved


def read_state_dict(path: Path) -> dict[str, Any]:
    """torch.load a checkpoint and return its state dict (a bare one or under `state_dict`)."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VsearchError(f"unreadable checkpoint {path}: {reason}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise VsearchError(f"unreadable checkpoint {path}: no state dict inside")
    return loaded
