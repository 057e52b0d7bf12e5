"""`vsearch list`: what a workspace holds, read from the manifests (and an index's list of deleted
rows) alone: no shard or index is opened.

The embeddings and the index marked `default` are the ones `build-index` and `query` use when given
no path: the folder whose manifest was written last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vsearch.embeddings.shards import MANIFEST as SHARDS_MANIFEST, Manifest
from vsearch.errors import VsearchError
from vsearch.files import is_locked
from vsearch.indexes.deleted import shown_count
from vsearch.indexes.index import MANIFEST as INDEX_MANIFEST, read_index_manifest
from vsearch.indexes.resume import STATE, held_bytes
from vsearch.workspace import Workspace


def embeddings_listing(workspace: Workspace) -> list[dict[str, Any]]:
    """One entry per shard folder: its dataset, model, rows of each kind, failed rows, last update."""
    default = workspace.latest(workspace.embeddings, SHARDS_MANIFEST)
    entries = []
    for folder in workspace.holding(workspace.embeddings, SHARDS_MANIFEST):
        try:
            manifest = Manifest.read(folder)
        except VsearchError as exc:
            entries.append({"name": folder.name, "path": str(folder), "error": str(exc)})
            continue
        entries.append({"name": folder.name, "path": str(folder), "default": folder == default,
                        "dataset": manifest.dataset, "model": manifest.encoder["spec"],
                        "covers": manifest.rows("cover"), "clips": manifest.rows("clip"),
                        "failed": len(manifest.failed), "updated": manifest.updated_at or manifest.created_at})
    return entries


def indexes_listing(workspace: Workspace) -> list[dict[str, Any]]:
    """One entry per index folder: its type and engine, kind, vectors, model, measured recall, build time."""
    default = workspace.latest(workspace.indexes, INDEX_MANIFEST)
    entries = []
    for folder in workspace.holding(workspace.indexes, INDEX_MANIFEST):
        try:
            info = read_index_manifest(folder)
            shown = shown_count(folder, info)
        except VsearchError as exc:
            entries.append({"name": folder.name, "path": str(folder), "error": str(exc)})
            continue
        entries.append({"name": folder.name, "path": str(folder), "default": folder == default,
                        "type": info["type"], "engine": info["engine"], "kind": info.get("kind", "cover"),
                        "vectors": shown, "model": (info.get("encoder") or {}).get("spec"),
                        "embeddings": info.get("embeddings"), "files": len(info["shards"]),
                        "behind": shards_behind(info),
                        "recall@10": info["recall"]["recall@10"], "built": info["built_at"],
                        "appends": len(info.get("appends", []))})
    return entries


def checkpoints_listing(workspace: Workspace) -> list[dict[str, Any]]:
    """One entry per checkpoint folder (`<out>.partial/`, resume.py) of an index build or the
    cbvs10m-HNSW job in the workspace: the job, what it writes, its size (at 10M, a 22 GB graph),
    when it last saved, and whether a run holds it now. One whose command is run again with another
    --out, or never again, stays: this is where it shows."""
    entries = []
    for folder in [*sorted(workspace.indexes.glob("*.partial")), *sorted(workspace.datasets.glob("*.partial"))]:
        state = folder / STATE
        if not state.is_file():
            continue
        saved = state.stat().st_mtime
        entries.append({"name": folder.name, "path": str(folder), "writes": str(folder.with_suffix("")),
                        "job": _job_of(state), "bytes": held_bytes(folder),
                        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(saved)),
                        "running": is_locked(folder)})
    return entries


def _job_of(state: Path) -> str | None:
    try:
        return json.loads(state.read_text(encoding="utf-8")).get("job")
    except (OSError, ValueError):  # written whole (write_json_atomic), so a damaged one is someone else's doing
        return None


def shards_behind(info: dict[str, Any]) -> int | None:
    """How many shard files of the folder an index was built from (its `embeddings`) the index has
    not taken up as they are now, new or changed since, or still holds though the folder has them
    no more: what `build-index --append` would take up. None where that folder is no vsearch
    shard folder (bring-your-own files, or gone)."""
    folder = Path(info.get("embeddings") or "")
    try:
        manifest = Manifest.read(folder)
    except VsearchError:
        return None
    kind = info.get("kind", "cover")
    current = {str((folder / s["name"]).resolve()): s["sha256"] for s in manifest.shards if s["kind"] == kind}
    indexed = {s["path"]: s["sha256"] for s in info["shards"] if Path(s["path"]).parent == folder.resolve()}
    return sum(indexed.get(path) != sha for path, sha in current.items()) + len(indexed.keys() - current.keys())


def indexes_built_from(workspace: Workspace, embeddings: Path) -> list[dict[str, Any]]:
    """The `indexes_listing` entries of the indexes built from the vectors in `embeddings`."""
    return [entry for entry in indexes_listing(workspace) if entry.get("embeddings") == str(embeddings.resolve())]


def index_built_from(workspace: Workspace, embeddings: Path, kind: str, index_type: str | None) -> Path:
    """The one index in the workspace built from the vectors in `embeddings` (its `kind`, and
    `index_type` when given): the one `build-index --append` adds to when given no name."""
    found = [Path(entry["path"]) for entry in indexes_built_from(workspace, embeddings)
             if entry.get("kind") == kind and index_type in (None, entry.get("type"))]
    if len(found) == 1:
        return found[0]
    what = " ".join(filter(None, [kind, index_type, "index"]))
    if not found:
        raise VsearchError(f"no {what} in {workspace.indexes} is built from {embeddings}: build one with "
                           f"vsearch build-index, or name the index to append to with --name or --out")
    raise VsearchError(f"{len(found)} indexes are built from {embeddings} ({', '.join(p.name for p in found)}): "
                       f"pass --name, or --type to pick one")
