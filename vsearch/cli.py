"""The `vsearch` command line: thin typer commands over the pipeline's modules."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from vsearch.errors import VsearchError, counted, os_error_line
from vsearch.workspace import ENV_VAR, Workspace

if TYPE_CHECKING:
    from vsearch.embeddings.job import StageTimes

app = typer.Typer(
    help="Vector search for short-video covers and clips: embed -> build-index -> query.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", envvar=ENV_VAR,
        help=f"Workspace root holding datasets/, embeddings/ and indexes/ (default ~/.vsearch; env {ENV_VAR}).",
    )] = None,
    version: Annotated[bool, typer.Option("--version", help="Print vsearch's version and exit.")] = False,
) -> None:
    if version:
        from vsearch import __version__

        print(f"vsearch {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit(2)
    ctx.obj = Workspace.resolve(workspace)
    if ctx.obj.root.exists() and not ctx.obj.root.is_dir():
        raise VsearchError(f"workspace {ctx.obj.root} is a file, not a folder (--workspace or {ENV_VAR})")


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
    from vsearch.indexes.index import MANIFEST

    if index is None:
        latest = ws.latest(ws.indexes, MANIFEST)
        if latest is None:
            raise VsearchError(f"no index under {ws.indexes}; run vsearch build-index (or vsearch demo) first")
        return latest
    named = ws.index_dir(index)
    if (named / MANIFEST).is_file():
        return named
    if "/" not in index and not Path(index).exists():
        built = [path.name for path in ws.holding(ws.indexes, MANIFEST)]
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
    workers: Annotated[Optional[int], typer.Option(
        help="Processes reading and decoding media, shared by the GPUs; with lexical, processes encoding "
             "the text (default: the cores, at most 16 a GPU).")] = None,
    decode: Annotated[str, typer.Option(
        help="Where JPEG covers are decoded: auto (both with a GPU, else workers), device, workers, or both "
             "(the readers as many as they keep up with, the device the rest).")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Embed only the first N rows.")] = None,
    ocr: Annotated[bool, typer.Option(
        "--ocr", help="Read the text on covers whose row has none, with RapidOCR (pip install 'vsearch[ocr]'); "
                      "about 0.3 s of a core per cover, by the --workers processes.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete existing shards in the folder first.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Encode the rows that failed in earlier runs again (covers a server did not send, "
                               "say), rewriting only their shards.")] = False,
    device: Annotated[str, typer.Option(help="auto (every GPU, else CPU), cpu, cuda:N, or a list: cuda:0,cuda:1.")] = "auto",
) -> None:
    """Encode a dataset's covers or clips into Parquet shards (re-running resumes)."""
    from vsearch.console import expect_on_all, progress_bars, stderr
    from vsearch.embeddings.job import EmbedConfig, run_embed
    from vsearch.indexes.index import MANIFEST

    if out is not None and (out / MANIFEST).is_file():
        raise VsearchError(f"--out {out} is an index folder, which rebuilding the index replaces whole; "
                           "give the shards a folder of their own")
    config = EmbedConfig(dataset=dataset, model=model, kind=kind, out=out, images=images, videos=videos,
                         frames=frames, decode=decode, shard_size=shard_size, batch_size=batch_size, limit=limit,
                         overwrite=overwrite, device=device, workers=workers, ocr=ocr, retry_failed=retry_failed)
    unit = {"cover": "covers", "clip": "videos"}.get(kind, "rows")
    try:
        bars = [f"embed {dataset} ({kind})"] + (["read cover text (--ocr)"] if ocr else [])
        with progress_bars(bars, limit, unit=unit) as shown:
            result = run_embed(config, ctx.obj, shown[0], on_text=shown[-1] if ocr else lambda n: None,
                               on_total=expect_on_all(shown), on_done=shown[0].skip,
                               note=lambda line: stderr.print(line))
    except KeyboardInterrupt:
        stderr.print("the shards finished are kept: run the same command again to resume")
        raise
    skipped = {"repeated ids": result.manifest.duplicates, "malformed lines": result.manifest.malformed_lines}
    changed = {"shards made again, their rows having changed since the last run": result.shards_redone,
               "shards removed, past the dataset's new end": result.shards_removed,
               "shards written again with their rows' new titles, OCR text or paths, vectors kept":
                   result.shards_refreshed,
               "rows that failed before, encoded again": result.rows_retried}
    stderr.print(
        f"{counted(result.rows_written, 'vector')} written in {counted(result.shards_written, 'shard')}, "
        f"{counted(result.shards_skipped, 'shard')} already done, {result.rows_failed:,} failed "
        f"(reasons in {result.directory / '_manifest.json'}) -> {result.directory}"
        + "".join(f"; {count:,} {what} skipped" for what, count in skipped.items() if count)
        + "".join(f"; {what}: {count:,}" for what, count in changed.items() if count)
    )
    if result.rows_failed:
        stderr.print(_commonest_failure(result.manifest.failed))
    if result.shards_written or result.shards_removed:
        for line in _appends_owed(ctx.obj, result.directory):
            stderr.print(line, soft_wrap=True)  # a command, whole, to copy
    if result.times.model + result.times.input + result.times.output >= 10:  # long enough to be worth tuning
        stderr.print(_stage_line(result.times))


def _commonest_failure(failed: list[dict]) -> str:
    """The reason most of a shard folder's failed rows share (each names its row's file, left out
    here): a job whose covers all failed for one cause says so without a look into the manifest."""
    from vsearch.embeddings.shards import commonest_failure

    reason, count = commonest_failure(failed)
    return (f"commonest failure ({count:,} of the folder's {len(failed):,} failed rows): {reason} "
            "(--retry-failed tries failed rows again)")


def _appends_owed(workspace: Workspace, shards: Path) -> list[str]:
    """For each index built from the `shards` folder that a job just changed, the command that
    brings it up to date: an append, or a rebuild too where most of its files changed (an append
    keeps their old vectors, retired, until a rebuild; a moved workspace changes them all)."""
    from vsearch.listing import indexes_built_from

    folder = "" if shards.resolve().parent == workspace.embeddings.resolve() else f" --embeddings {shards}"
    lines = []
    for entry in indexes_built_from(workspace, shards):
        options = f" --name {entry['name']}{folder}" + (" --kind clip" if entry["kind"] == "clip" else "")
        line = f"index {entry['name']} lacks what this run changed: vsearch build-index --append{options}"
        if 2 * (entry["behind"] or 0) > entry["files"]:
            engine = f" --engine {entry['engine']}" if entry["type"] == "hnsw" else ""
            line += (f" (or, as {entry['behind']:,} of its {entry['files']:,} files changed, rebuild it smaller: "
                     f"vsearch build-index --type {entry['type']}{engine}{options})")
        lines.append(line)
    return lines


def _stage_line(times: StageTimes) -> str:
    """Where an embed job's time went, and what bounded it."""
    decoding = (f" (decoding {times.decoded_on_device:,} covers on the device {times.decoding:.1f} s, beside the model)"
                if times.decoding else "")
    line = (f"time: model {times.model:.1f} s, waiting for input {times.input:.1f} s{decoding}, "
            f"waiting for the disk {times.output:.1f} s")
    if times.input > times.model:
        line += "; reading bounds this job: more --workers may help"
    return line


def _refuse_overwriting(out: Path | None, source: Path, why: str) -> None:
    """Refuse an --out that is the command's own input file, saying `why`."""
    if out is not None and out.exists() and out.resolve() == source.resolve():
        raise VsearchError(f"--out {out} is {why}")


def _parse_size(text: str) -> int:
    """Bytes from `8GiB`, `500MB`, `2G` or a plain number."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    number = text.strip().rstrip("bB")
    suffix = "".join(c for c in number if c.isalpha()).lower()
    try:
        return int(float(number[: len(number) - len(suffix)]) * units[suffix])
    except (KeyError, ValueError):
        raise VsearchError(f"bad size {text!r}: expected e.g. 8GiB, 500MB or a number of bytes") from None


def _say_where_the_work_is_kept(destination: Path, work: str) -> None:
    """After Ctrl-C: where a job writing `destination` keeps its `work`, if it saved any."""
    from vsearch.console import stderr
    from vsearch.indexes.resume import partial_folder

    if partial_folder(destination).exists():
        stderr.print(f"{work} are kept in {partial_folder(destination)}: run the same command again to resume")


def _write_hard_negatives(ws: Workspace, dataset: str | None, model: str, out: Path | None, device: str,
                          target_recall: float, params: dict[str, int], threads: int) -> None:
    from vsearch.console import progress_bars, stderr
    from vsearch.embeddings import load_encoder
    from vsearch.embeddings.datasets import open_dataset
    from vsearch.embeddings.job import resolve_model
    from vsearch.indexes.hard_negatives import graph_params, read_as_trained, write_hard_negatives
    from vsearch.indexes.tuning import shortfall_hint

    graph_params(params)  # a bad --param is named before the dataset and the model are opened
    source = open_dataset(dataset or "cbvs10m", ws)
    encoder = read_as_trained(load_encoder(resolve_model(model, ws), device))
    destination = out or ws.datasets / f"{source.name}-HNSW"
    _refuse_overwriting(destination, Path(source.source.removeprefix("file://")),
                        "the dataset file: writing the hard negatives would erase it")
    try:
        with progress_bars([f"read {source.name}, encode its OCR texts", "find their nearest neighbours"],
                           unit=["lines", "texts"]) as (read, listed):
            written = write_hard_negatives(source, encoder, destination, target_recall=target_recall,
                                           params=params, threads=threads, on_lines=read, on_line_count=read.expect,
                                           on_texts=listed.expect, on_written=listed,
                                           note=lambda line: stderr.print(line))
    except KeyboardInterrupt:
        _say_where_the_work_is_kept(destination, "the texts encoded and the lines written up to the last checkpoint")
        raise
    stderr.print(f"{written.texts:,} OCR texts with their nearest neighbours (recall@10 {written.recall:.3f} against "
                 f"exact search at ef_search={written.ef_search}) -> {destination}")
    if written.recall < target_recall:
        stderr.print(f"that is below the target recall@10 {target_recall}: "
                     + shortfall_hint("hnsw", written.params, encoder.dim))


@app.command("build-index")
def build_index_command(
    ctx: typer.Context,
    type: Annotated[Optional[str], typer.Option(
        "--type", "-t", help="flat (exact), hnsw (the default) or ivfpq; with --append, picks the index.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="hnsw: hnswlib (default) or faiss.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset whose shards to index (default: the last embedded).")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(
        help="Shard folder, or any folder of Parquet files with an id and a vector column, to index.")] = None,
    kind: Annotated[str, typer.Option(help="Index the cover or the clip vectors.")] = "cover",
    name: Annotated[Optional[str], typer.Option(
        help="Index name under <workspace>/indexes (default <dataset>-<type>, <dataset>-clip-<type> for clips).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Index folder (overrides --name), or the cbvs10m-HNSW file.")] = None,
    param: Annotated[list[str], typer.Option(
        help="Parameter KEY=VALUE, repeatable. hnsw (--layout cbvs10m-hnsw too): M, ef_construction, ef_search; "
             "ivfpq: nlist, m, nbits, opq, train_size, opq_iterations, nprobe, k_factor.")] = [],
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory the loaded index may use, e.g. 8GiB (default: this machine's).")] = None,
    target_recall: Annotated[float, typer.Option(help="Recall@10 the chosen parameters must reach.")] = 0.95,
    append: Annotated[bool, typer.Option(
        help="Add shards the index has not seen, and shards that changed, instead of rebuilding "
             "(default index: the one built from these shards).")] = False,
    id_column: Annotated[Optional[str], typer.Option(
        help="Id column of bring-your-own embeddings (default id; in clip-retrieval's output id, key or image_path).")] = None,
    vector_column: Annotated[Optional[str], typer.Option(
        help="Vector column of bring-your-own Parquet; text_emb for clip-retrieval's text vectors.")] = None,
    layout: Annotated[Optional[str], typer.Option(
        help="cbvs10m-hnsw: write the OCR-text hard-negative file UniCLIP's trainer reads.")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="The model that made bring-your-own --embeddings, so that `vsearch query` can encode text; "
             "or the text encoder for --layout cbvs10m-hnsw (default uniclip).")] = None,
    device: Annotated[str, typer.Option(help="Device for loading --model.")] = "auto",
    threads: Annotated[int, typer.Option(help="Threads for building, appending or writing the cbvs10m-HNSW file (-1: all cores).")] = -1,
) -> None:
    """Build an index from embedding shards (or add to one with --append); a stopped HNSW or IVF-PQ build resumes."""
    from vsearch.console import progress, stderr
    from vsearch.files import is_locked
    from vsearch.indexes import BuildConfig, append_index, build_index
    from vsearch.indexes.backends import backend_class
    from vsearch.indexes.vectors import open_source

    ws: Workspace = ctx.obj
    backend_class(type or "hnsw", engine)
    if not 0 < target_recall <= 1:
        raise VsearchError("--target-recall must be in (0, 1]")
    if threads == 0 or threads < -1:
        raise VsearchError("--threads must be at least 1, or -1 for all cores")
    if name is not None and (name.startswith(".") or "/" in name or os.sep in name or not name):
        raise VsearchError(f"--name {name!r} is not an index name, which names a folder of {ws.indexes}: give "
                           "one without '/' or a leading '.', or --out DIR for a folder elsewhere")
    if layout is not None:
        if layout != "cbvs10m-hnsw" or type not in (None, "hnsw"):
            raise VsearchError(f"unknown layout {layout!r} for --type {type or 'hnsw'}: the one layout is cbvs10m-hnsw (hnsw)")
        given = {"--engine": engine not in (None, "hnswlib"), "--embeddings": embeddings is not None,
                 "--kind": kind != "cover", "--name": name is not None, "--memory-budget": memory_budget is not None,
                 "--append": append, "--id-column": id_column is not None, "--vector-column": vector_column is not None}
        if any(given.values()):
            raise VsearchError(f"{', '.join(flag for flag, set_ in given.items() if set_)}: not for --layout "
                               "cbvs10m-hnsw, which writes one file from a dataset's OCR texts with hnswlib")
        _write_hard_negatives(ws, dataset, model or "uniclip", out, device, target_recall, _parse_params(param),
                              threads)
        return
    if kind not in ("cover", "clip"):
        raise VsearchError(f"unknown --kind {kind!r}: use cover or clip")
    source = open_source(_embeddings_dir(ws, dataset, embeddings), kind, id_column, vector_column)
    if is_locked(source.directory):
        stderr.print(f"note: vsearch embed is still writing {source.directory}: this takes the "
                     f"{counted(len(source.files), 'shard')} written so far, and build-index --append the rest later")
    if model is not None:
        from vsearch.embeddings import load_encoder
        from vsearch.embeddings.job import resolve_model
        from vsearch.indexes.vectors import made_by

        source = made_by(source, load_encoder(resolve_model(model, ws), device))
    if append:
        from vsearch.listing import index_built_from

        destination = out or (ws.index_dir(name) if name else index_built_from(ws, source.directory, kind, type))
        with progress(f"append to {destination.name}", None, unit="vectors") as bar:
            append_index(destination, source, bar, note=lambda line: stderr.print(line), on_total=bar.expect,
                         threads=threads)
        return
    type = type or "hnsw"
    default_name = f"{source.directory.name}-{type}" if kind == "cover" else f"{source.directory.name}-clip-{type}"
    destination = out or ws.index_dir(name or default_name)
    config = BuildConfig(type=type, engine=engine, kind=kind, params=_parse_params(param), threads=threads,
                         memory_budget=_parse_size(memory_budget) if memory_budget else None,
                         target_recall=target_recall)
    try:
        with progress(f"build {type} index", source.count, unit="vectors") as advance:
            info = build_index(config, source, destination, advance, note=lambda line: stderr.print(line))
    except KeyboardInterrupt:
        _say_where_the_work_is_kept(destination, "the trained quantisers" if backend_class(type, engine).trains
                                    else "the vectors indexed up to the last checkpoint")
        raise
    stderr.print(f"{info['count']:,} vectors indexed ({type}, {info['engine']}) in {info['build_seconds']:.1f}s, "
                 f"recall@10 {info['recall']['recall@10']} -> {destination}")


@contextlib.contextmanager
def _nonblank_lines(file: Path) -> Iterator[Iterator[str]]:
    """The non-blank lines of `file`, or of standard input for `-`, read as they come."""
    from vsearch.files import text_lines

    stdin = str(file) == "-"
    with contextlib.nullcontext(sys.stdin.buffer) if stdin else open(file, "rb") as handle:
        yield (line for _, line in text_lines(handle, "standard input" if stdin else str(file)) if line.strip())


@app.command()
def delete(
    ctx: typer.Context,
    ids: Annotated[Optional[list[str]], typer.Argument(help="Ids to delete.")] = None,
    index: Annotated[Optional[str], typer.Option(help="Index name or folder (default: the last built).")] = None,
    ids_file: Annotated[Optional[Path], typer.Option(help="File with one id per line ('-': standard input).")] = None,
) -> None:
    """Delete ids from an index (they stop appearing in results at once; rebuild to reclaim space)."""
    from vsearch.console import stderr
    from vsearch.indexes import delete_ids

    wanted = list(ids or [])
    if ids_file is not None:
        if str(ids_file) != "-" and not ids_file.is_file():
            raise VsearchError(f"ids file not found: {ids_file}")
        with _nonblank_lines(ids_file) as lines:
            wanted += [line.strip() for line in lines]
    if not wanted:
        raise VsearchError("no ids to delete: give ids or --ids-file")
    index_dir = _index_dir(ctx.obj, index)
    deleted, unknown = delete_ids(index_dir, wanted)
    listed = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
    if len(unknown) == len(set(wanted)):  # most likely a mistyped id or the wrong index: nothing was done
        raise VsearchError(f"no such id in {index_dir}: {listed}")
    already = len(set(wanted)) - len(unknown) - deleted
    stderr.print(f"{counted(deleted, 'id')} deleted from {index_dir}" + (f"; {already:,} deleted already" if already else "")
                 + (f"; not in the index: {listed}" if unknown else ""))


def _parse_weights(text: str | None):
    from vsearch.query import Weights

    if not text:
        return Weights()
    values = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise VsearchError(f"bad --weights {text!r}: expected e.g. ann=1,lexical=0.3,semantic=0.5") from None
        if not sep:
            raise VsearchError(f"bad --weights {text!r}: expected e.g. ann=1,lexical=0.3,semantic=0.5")
    unknown = set(values) - set(Weights.__dataclass_fields__)
    if unknown:
        raise VsearchError(f"unknown weight {', '.join(sorted(unknown))}: use ann, lexical, semantic")
    return Weights(**values)


@app.command()
def query(
    ctx: typer.Context,
    text: Annotated[Optional[str], typer.Argument(help="What to search for (or --file).")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 10,
    index: Annotated[Optional[str], typer.Option(help="Index name or folder (default: the last built).")] = None,
    where: Annotated[Optional[str], typer.Option(help="SQL predicate on the metadata, e.g. \"ocr LIKE '%演员%'\".")] = None,
    rerank: Annotated[bool, typer.Option("--rerank/--no-rerank", help="OCR-aware reranking of the candidates.")] = True,
    explain: Annotated[bool, typer.Option(help="Show each part of the final score.")] = False,
    file: Annotated[Optional[Path], typer.Option(
        help="Run every line of this file as a query; JSON lines out. '-' reads standard input, answering each "
             "line as it arrives (the model loads once).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="With --file: write the JSON lines here instead of stdout.")] = None,
    candidates: Annotated[Optional[int], typer.Option(help="ANN candidates to rerank (default 10 k).")] = None,
    rerank_images: Annotated[Optional[int], typer.Option(
        help="Covers whose images the UniCLIP heads read (default 50 on a GPU, one per core on a CPU).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Fusion weights, e.g. ann=1,lexical=0.3,semantic=0.5.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    model: Annotated[Optional[str], typer.Option(
        help="The index's model, where it is now (default: as the index records it; its weights must match).")] = None,
) -> None:
    """Search an index with a text query (or a file of them)."""
    from vsearch.console import hits_table, stderr, stdout
    from vsearch.query import QueryConfig, QueryTextError, Searcher

    if (text is None) == (file is None):
        raise VsearchError("give a query text or --file FILE (one query per line)"
                           + (", not both" if text is not None else ""))
    if file is not None and str(file) != "-" and not file.is_file():
        raise VsearchError(f"queries file not found: {file}")
    if file is not None:
        _refuse_overwriting(out, file, "the queries file: writing the results would erase the queries")
    index_dir = _index_dir(ctx.obj, index)
    searcher = Searcher(index_dir, device, model)

    def run(query_text: str):
        return searcher.search(QueryConfig(query_text, index_dir, k=k, where=where, rerank=rerank,
                                           candidates=candidates, image_budget=rerank_images,
                                           weights=_parse_weights(weights), device=device))

    def payload(result) -> dict:
        return {"query": result.query, "index": str(index_dir), "results": [h.to_dict() for h in result.hits],
                "notes": result.notes, "seconds": result.seconds}

    if file is not None:
        answered, failed = 0, 0
        with _nonblank_lines(file) as lines, \
                open(out, "w", encoding="utf-8") if out else contextlib.nullcontext(sys.stdout) as sink:
            for line in lines:
                try:
                    answer = payload(run(line))
                except QueryTextError as exc:  # this query's answer; the batch goes on
                    answer = {"query": line, "index": str(index_dir), "error": str(exc)}
                    failed += 1
                sink.write(json.dumps(answer, ensure_ascii=False) + "\n")
                sink.flush()
                answered += 1
        if not answered:
            raise VsearchError(f"no queries in {'standard input' if str(file) == '-' else file}: every line is blank")
        if out:
            stderr.print(f"{answered} queries -> {out}")
        if failed:
            raise VsearchError(f"{failed} of {answered} queries could not be searched (the error is in their JSON lines)")
        return
    result = run(text)
    if as_json:
        sys.stdout.write(json.dumps(payload(result), ensure_ascii=False, indent=1) + "\n")
        return
    for note in result.notes:
        stderr.print(f"note: {note}")
    stdout.print(hits_table(result.query, result.hits, caption=f"index {index_dir}", explain=explain))


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
    stdout.print('Try your own: vsearch query "大宅门演员表" (--json for machine-readable output)')


@app.command("list")
def list_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the listing as a JSON object.")] = False,
) -> None:
    """What the workspace holds: shard folders, indexes and the checkpoints of stopped runs, with the defaults marked."""
    from vsearch.console import listing_tables, stderr, stdout
    from vsearch.listing import checkpoints_listing, embeddings_listing, indexes_listing

    ws: Workspace = ctx.obj
    listing = {"workspace": str(ws.root), "embeddings": embeddings_listing(ws), "indexes": indexes_listing(ws),
               "checkpoints": checkpoints_listing(ws)}
    if as_json:
        sys.stdout.write(json.dumps(listing, ensure_ascii=False, indent=1) + "\n")
        return
    stderr.print(f"workspace: {ws.root}")
    if not any(listing[part] for part in ("embeddings", "indexes", "checkpoints")):
        stderr.print("nothing here yet: run vsearch demo, or vsearch embed --dataset NAME")
        return
    for table in listing_tables(listing["embeddings"], listing["indexes"], listing["checkpoints"]):
        stdout.print(table)


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="cbvs20k (under the workspace) or the path of a CBVS-20K file.")] = "cbvs20k",
    scores: Annotated[Optional[Path], typer.Option(help="Per-pair scores: label\tquery\tdocid\tscore.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Score the pairs with this model instead (needs --images).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of CBVS-20K covers named <docid>.jpg.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the model's per-pair scores here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as a JSON object.")] = False,
) -> None:
    """CBVS-20K ranking metrics (PNR, NDCG@k, MAP; R@k with a model), beside the paper's UniCLIP row."""
    from vsearch.console import progress, stderr
    from vsearch.query import evaluate

    ws: Workspace = ctx.obj
    if (scores is None) == (model is None):
        raise VsearchError("give either --scores FILE or --model SPEC with --images DIR")
    extra: dict[str, object] = {}
    source = ws.datasets / "cbvs20k.txt" if dataset == "cbvs20k" else Path(dataset)
    if scores is not None:
        scored_pairs = evaluate.read_scores(scores)
        if source.is_file() or dataset != "cbvs20k":
            notes = evaluate.coverage_notes(scored_pairs, evaluate.read_pairs(source), source)
        else:
            notes = [f"no CBVS-20K file at {source}: whether the scores cover its pairs is not checked"]
        for line in notes:
            stderr.print(f"note: {line}")
        metrics = evaluate.ranking_metrics(scored_pairs)
    else:
        if images is None or not images.is_dir():
            raise VsearchError(f"--model needs --images DIR, a folder of covers named <docid>.jpg (got {images})")
        from vsearch.embeddings import load_encoder
        from vsearch.embeddings.job import resolve_model

        _refuse_overwriting(out, source, "the CBVS-20K file: writing the scores would erase it")
        encoder = load_encoder(resolve_model(model, ws), device)
        pairs = evaluate.read_pairs(source)
        with progress("encode CBVS-20K covers", len({p.docid for p in pairs}), unit="covers") as advance:
            scored = evaluate.score_with_model(encoder, pairs, images, on_covers=advance)
        if out is not None:
            evaluate.write_scores(scored.pairs, out)
        metrics = {**scored.retrieval, **evaluate.ranking_metrics(scored.pairs)}
        extra = {"pairs scored": len(scored.pairs), "covers missing or unreadable": scored.missing_covers}
    if as_json:  # null where a metric has no value: no query qualifies, or PNR with no discordant pair
        sys.stdout.write(json.dumps({k: v if math.isfinite(v) else None for k, v in metrics.items()}) + "\n")
        return
    from rich.table import Table

    from vsearch.console import stdout

    table = Table(title="CBVS-20K", caption=", ".join(f"{k}: {v:,}" for k, v in extra.items()) or None)
    for column in ("metric", "vsearch", "paper (UniCLIP)", "difference"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name, value in metrics.items():
        paper = evaluate.PAPER_UNICLIP.get(name)
        table.add_row(name, f"{value:.4f}", "" if paper is None else f"{paper:.3f}",
                      "" if paper is None else f"{value - paper:+.4f}")
    stdout.print(table)


@app.command()
def bench(
    sizes: Annotated[str, typer.Option(help="Comma-separated vector counts.")] = "100000,1000000",
    dim: Annotated[int, typer.Option(help="Dimension of the synthetic vectors.")] = 512,
    queries: Annotated[int, typer.Option(help="Queries per measurement.")] = 1000,
    indexes: Annotated[str, typer.Option(help="Comma-separated: flat, hnsw, hnsw:faiss, ivfpq.")] = "flat,hnsw,hnsw:faiss,ivfpq",
    embeddings: Annotated[Optional[Path], typer.Option(help="Benchmark on these shards instead of synthetic vectors.")] = None,
    out: Annotated[Path, typer.Option(help="Output prefix: writes .json, .md and .png.")] = Path("benchmarks/out/ann"),
    scratch: Annotated[Optional[Path], typer.Option(help="Folder for temporary vectors and indexes (default: system temp).")] = None,
) -> None:
    """Recall, QPS, latency, build time and memory of every index type (see benchmarks/ann.py)."""
    import tempfile

    from vsearch.console import stderr
    from vsearch.indexes.bench import BenchConfig, run_bench

    try:
        counts = [int(size) for size in sizes.split(",") if size.strip()]
    except ValueError:
        raise VsearchError(f"bad --sizes {sizes!r}: expected numbers like 100000,1000000") from None
    config = BenchConfig(sizes=counts, dim=dim, queries=queries, indexes=[i.strip() for i in indexes.split(",")],
                         embeddings=embeddings, out=out)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        written = run_bench(config, Path(folder), say=stderr.print)
    print(written["markdown"].read_text())
    stderr.print("wrote " + ", ".join(str(path) for path in written.values()))


def _fail(message: str, code: int) -> None:
    print(f"vsearch: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        # Not standalone, so that typer's own errors (an unknown option or command, a value of the
        # wrong type) come here to be said in one line, as every other error is.
        code = app(args=argv, prog_name="vsearch", standalone_mode=False)
    except typer.TyperException as exc:
        command = getattr(exc, "ctx", None)
        _fail(exc.format_message() + (f" (see '{command.command_path} -h')" if command else ""), exc.exit_code)
    except VsearchError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the output's reader stopped (`vsearch … | head`): nothing to say,
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor when stdout flushes at exit
            sys.exit(1)
        # a path that cannot be written or read (a missing folder, no permission, a full disk)
        _fail(os_error_line(exc), 1)
    if code == 130:  # how typer ends a command that Ctrl-C (KeyboardInterrupt) stopped
        print("vsearch: interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
