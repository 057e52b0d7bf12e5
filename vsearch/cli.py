"""The `vsearch` command line: thin typer commands over the pipeline's modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vsearch.errors import VsearchError
from vsearch.workspace import ENV_VAR, Workspace

app = typer.Typer(
    help="Vector search for short-video covers and clips: embed -> build-index -> query.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", envvar=ENV_VAR,
        help=f"Workspace root holding datasets/, embeddings/ and indexes/ (default ~/.vsearch; env {ENV_VAR}).",
    )] = None,
) -> None:
    ctx.obj = Workspace.resolve(workspace)


def _parse_params(pairs: list[str]) -> dict[str, int]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.strip().isdigit():
            raise VsearchError(f"bad --param {pair!r}: expected KEY=INTEGER, e.g. M=32")
        params[key.strip()] = int(value)
    return params


def _embeddings_dir(ws: Workspace, dataset: str | None, embeddings: Path | None) -> Path:
    if embeddings is not None:
        return embeddings
    if dataset is not None:
        return ws.embeddings_dir(dataset)
    from vsearch.embeddings.shards import MANIFEST

    latest = ws.latest(ws.embeddings, MANIFEST)
    if latest is None:
        raise VsearchError(f"no embeddings under {ws.embeddings}; run vsearch embed --dataset NAME first")
    return latest


def _index_dir(ws: Workspace, index: str | None) -> Path:
    from vsearch.indexes.store import MANIFEST

    if index is None:
        latest = ws.latest(ws.indexes, MANIFEST)
        if latest is None:
            raise VsearchError(f"no index under {ws.indexes}; run vsearch build-index (or vsearch demo) first")
        return latest
    named = ws.index_dir(index)
    if (named / MANIFEST).is_file():
        return named
    if "/" not in index and not Path(index).exists():
        built = sorted(path.parent.name for path in ws.indexes.glob(f"*/{MANIFEST}"))
        raise VsearchError(f"no index named {index!r} under {ws.indexes} (built: {', '.join(built) or 'none'})")
    return Path(index)


@app.command()
def embed(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="demo, cbvs20k, cbvs5m, cbvs10m (under the workspace), or a path/URL.")],
    model: Annotated[str, typer.Option(
        help="Encoder: uniclip (the checkpoint in $VSEARCH_UNICLIP or <workspace>/models), uniclip:PATH, "
             "open_clip:ARCH:PATH, or lexical[:DIM] (no weights).")] = "uniclip",
    kind: Annotated[str, typer.Option(help="cover (images), clip (frames sampled from videos, pooled) or both.")] = "cover",
    out: Annotated[Optional[Path], typer.Option(help="Shard folder (default <workspace>/embeddings/<dataset>).")] = None,
    images: Annotated[Optional[str], typer.Option(help="Folder of pre-downloaded covers named <id>.jpg.")] = None,
    videos: Annotated[Optional[str], typer.Option(help="Folder of videos named <id>.mp4 (default <stem>-videos/).")] = None,
    frames: Annotated[int, typer.Option(help="Frames sampled per video for clip vectors.")] = 12,
    shard_size: Annotated[int, typer.Option(help="Dataset rows per shard.")] = 10_000,
    batch_size: Annotated[int, typer.Option(help="Images per encoder call (halved on CUDA out-of-memory).")] = 256,
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding media (default: cores, at most 8).")] = None,
    decode: Annotated[str, typer.Option(help="Where JPEG covers are decoded: auto (GPU when there is one), device, workers.")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Embed only the first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete existing shards in the folder first.")] = False,
    device: Annotated[str, typer.Option(help="auto (every GPU, else CPU), cpu, cuda:N, or a list: cuda:0,cuda:1.")] = "auto",
) -> None:
    """Encode a dataset's covers or clips into Parquet shards (re-running resumes)."""
    from vsearch.console import progress, stderr
    from vsearch.embeddings.job import EmbedConfig, run_embed

    config = EmbedConfig(dataset=dataset, model=model, kind=kind, out=out, images=images, videos=videos,
                         frames=frames, decode=decode, shard_size=shard_size, batch_size=batch_size, limit=limit,
                         overwrite=overwrite, device=device)
    if workers is not None:
        config.workers = workers
    with progress(f"embed {dataset} ({kind})", limit, unit="rows") as advance:
        result = run_embed(config, ctx.obj, advance)
    stderr.print(
        f"{result.rows_written} vectors written in {result.shards_written} shards, "
        f"{result.shards_skipped} shards already done, {result.rows_failed} failed "
        f"(reasons in {result.directory / '_manifest.json'}) -> {result.directory}"
    )


@app.command("build-index")
def build_index_command(
    ctx: typer.Context,
    type: Annotated[str, typer.Option("--type", "-t", help="flat or hnsw.")] = "hnsw",
    dataset: Annotated[Optional[str], typer.Option(help="Dataset whose shards to index (default: the last embedded).")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help="Shard folder to index instead of a dataset's.")] = None,
    kind: Annotated[str, typer.Option(help="Index the cover or the clip vectors.")] = "cover",
    name: Annotated[Optional[str], typer.Option(
        help="Index name under <workspace>/indexes (default <dataset>-<type>, <dataset>-clip-<type> for clips).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Index folder (overrides --name).")] = None,
    param: Annotated[list[str], typer.Option(help="Index parameter KEY=VALUE, repeatable (hnsw: M, ef_construction, ef_search).")] = [],
    threads: Annotated[int, typer.Option(help="Threads for building (-1: all cores).")] = -1,
) -> None:
    """Build an index from embedding shards."""
    from vsearch.console import progress, stderr
    from vsearch.embeddings.shards import Manifest
    from vsearch.indexes import BuildConfig, build_index
    from vsearch.indexes.backends import backend_class

    ws: Workspace = ctx.obj
    backend_class(type)
    if kind not in ("cover", "clip"):
        raise VsearchError(f"unknown --kind {kind!r}: use cover or clip")
    config = BuildConfig(type=type, kind=kind, params=_parse_params(param), threads=threads)
    source = _embeddings_dir(ws, dataset, embeddings)
    count = Manifest.read(source).rows(config.kind)
    default_name = f"{source.name}-{type}" if kind == "cover" else f"{source.name}-clip-{type}"
    destination = out or ws.index_dir(name or default_name)
    with progress(f"build {type} index", count, unit="vectors") as advance:
        info = build_index(config, source, destination, advance)
    stderr.print(f"{info['count']} vectors indexed ({type}, {info['engine']}) in {info['build_seconds']:.1f}s -> {destination}")


@app.command()
def query(
    ctx: typer.Context,
    text: Annotated[str, typer.Argument(help="What to search for.")],
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 10,
    index: Annotated[Optional[str], typer.Option(help="Index name or folder (default: the last built).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Search an index with a text query."""
    from vsearch.query import QueryConfig, search

    index_dir = _index_dir(ctx.obj, index)
    hits = search(QueryConfig(text, index_dir, k, device))
    if as_json:
        payload = {"query": text, "index": str(index_dir), "results": [hit.to_dict() for hit in hits]}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
        return
    from vsearch.console import hits_table, stdout

    stdout.print(hits_table(text, hits, caption=f"index {index_dir}"))


@app.command()
def demo(ctx: typer.Context, k: Annotated[int, typer.Option("-k", help="Results per query.")] = 5) -> None:
    """Run embed -> build-index -> query on the embedded demo covers."""
    from vsearch.console import hits_table, progress, stderr, stdout
    from vsearch.demo import run_demo

    ws: Workspace = ctx.obj
    stderr.print(f"workspace: {ws.root} (change it with --workspace or {ENV_VAR})")
    run = run_demo(ws, progress, k=k)
    stderr.print(f"{run.embed.manifest.rows('cover')} demo covers in {run.embed.directory}, index in {run.index_dir}")
    for text, hits in run.results:
        stdout.print(hits_table(text, hits))
    stdout.print('Try your own: vsearch query "大宅门演员表"  (add --json for machine-readable output)')


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="vsearch")
    except VsearchError as exc:
        print(f"vsearch: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("vsearch: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
