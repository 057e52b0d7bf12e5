"""Checkpoint fingerprints: the SHA-256 of the file, remembered until the file changes."""

import hashlib
import os

import pytest

import vsearch.embeddings.checkpoints as checkpoints
from vsearch.embeddings.checkpoints import file_fingerprint


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_a_fingerprint_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights one")
    assert file_fingerprint(weights) == digest(weights)
    monkeypatch.setattr(checkpoints, "sha256_of", lambda path: pytest.fail("hashed again"))
    assert file_fingerprint(weights) == digest(weights)
    monkeypatch.undo()

    # Other weights of the same size, with the old modification time put back (as cp -p would).
    before = weights.stat()
    weights.write_bytes(b"weights two")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_fingerprint(weights) == digest(weights) != hashlib.sha256(b"weights one").hexdigest()[:16]


def test_without_a_usable_cache_the_file_is_hashed(tmp_path, user_cache):
    user_cache.parent.mkdir(parents=True, exist_ok=True)
    user_cache.write_text("not a folder")  # the cache folder cannot be made
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    assert file_fingerprint(weights) == file_fingerprint(weights) == digest(weights)


def test_a_damaged_cache_is_replaced(tmp_path, user_cache):
    (user_cache / "vsearch").mkdir(parents=True)
    (user_cache / "vsearch" / "fingerprints.json").write_text("{not json")
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    assert file_fingerprint(weights) == digest(weights)
    assert digest(weights) in (user_cache / "vsearch" / "fingerprints.json").read_text()
