"""Reading local model checkpoints with errors a user can act on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vsearch.errors import VsearchError
from vsearch.files import sha256_of, write_json_atomic

REMEMBERED_FINGERPRINTS = 64


def fingerprint_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vsearch" / "fingerprints.json"


def file_fingerprint(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256: identifies the weights, not the path.

    Hashing reads the whole file, 1.7 s of every query's start for a 1 GB UniCLIP checkpoint, so
    the digest is remembered in the user's cache under what changes whenever the file does: its
    path, device, inode, size, and modification and change times (no tool sets a change time
    back). A cache that cannot be read or written is no cache: the file is hashed."""
    stat = path.stat()
    key = "|".join(map(str, (path.resolve(), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                             stat.st_ctime_ns)))
    cache = fingerprint_cache()
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(key), str):
        return known[key]
    fingerprint = sha256_of(path)[:16]
    kept = dict(list(known.items())[-(REMEMBERED_FINGERPRINTS - 1):])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {**kept, key: fingerprint})
    except OSError:
        pass
    return fingerprint


def existing_file(path: str, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise VsearchError(f"{what} not found: {path}")
    return resolved


def _load(path: Path) -> Any:
    """Memory-mapped where the file allows it (torch.save's zip format, since PyTorch 1.6): a model
    built to take the tensors themselves then reads its weights from the page cache, with no copy."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zipfile" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Path) -> dict[str, Any]:
    """torch.load a checkpoint and return its state dict (a bare one or under `state_dict`)."""
    try:
        loaded = _load(path)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        lines = str(exc).strip().splitlines()
        detail = lines[0] if lines and len(lines[0]) <= 120 else type(exc).__name__
        raise VsearchError(f"unreadable checkpoint {path}: not a PyTorch checkpoint of tensors ({detail})") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise VsearchError(f"unreadable checkpoint {path}: no state dict inside")
    return loaded


def _named(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(module: Any, state: dict[str, Any], path: Path, what: str, assign: bool = False) -> None:
    """Load `state` into `module`, naming any missing, unexpected or mis-shaped key in one line.
    With `assign`, the module takes the tensors themselves (for a module built on the meta device)."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    problems = [f"missing {_named(missing)}" if missing else "",
                f"unexpected {_named(unexpected)}" if unexpected else ""]
    if missing or unexpected:
        raise VsearchError(f"checkpoint {path} does not fit {what}: " + "; ".join(p for p in problems if p))
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise VsearchError(f"checkpoint {path} does not fit {what}: {mismatch}") from exc
