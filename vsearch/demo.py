"""`vsearch demo`: the whole pipeline on the embedded demo covers, in the user's workspace."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from vsearch.embeddings.job import EmbedConfig, EmbedResult, run_embed
from vsearch.embeddings.shards import MANIFEST, Manifest
from vsearch.indexes import BuildConfig, build_index
from vsearch.indexes.vectors import open_source
from vsearch.query import Hit, QueryConfig, search
from vsearch.workspace import Workspace

EXAMPLE_QUERIES = ("大宅门演员表", "艾尔登法环马怎么获得", "周杰伦个人资料")
MODEL = "lexical"
INDEX_TYPE = "hnsw"

Progress = Callable[[str, int | None], AbstractContextManager[Callable[[int], None]]]


@dataclass
class DemoRun:
    embed: EmbedResult
    index_dir: Path
    results: list[tuple[str, list[Hit]]]


def demo_embeddings_dir(workspace: Workspace) -> Path:
    """`embeddings/demo`, unless it holds another model's vectors (`vsearch embed --dataset demo
    --model …`, the tour's next step): then `embeddings/demo-lexical`, so the demo leaves them, and
    the index built from them, alone."""
    default = workspace.embeddings_dir("demo")
    if not (default / MANIFEST).is_file() or Manifest.read(default).encoder["spec"] == MODEL:
        return default
    return workspace.embeddings_dir(f"demo-{MODEL}")


def run_demo(workspace: Workspace, progress: Progress, k: int = 5) -> DemoRun:
    """Embed the demo covers with `lexical`, build an HNSW index, and run the example queries."""
    embeddings = demo_embeddings_dir(workspace)
    with progress("embed demo covers", None) as advance:
        embedded = run_embed(EmbedConfig(dataset="demo", model=MODEL, out=embeddings), workspace, advance,
                             on_done=advance)
    index_dir = workspace.index_dir(f"{embeddings.name}-{INDEX_TYPE}")
    with progress("build hnsw index", embedded.manifest.rows("cover")) as advance:
        build_index(BuildConfig(type=INDEX_TYPE), open_source(embedded.directory), index_dir, advance)
    results = [(text, search(QueryConfig(text, index_dir, k=k))) for text in EXAMPLE_QUERIES]
    return DemoRun(embedded, index_dir, results)
