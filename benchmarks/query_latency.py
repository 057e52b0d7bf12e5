"""End-to-end query latency: p50/p99 and QPS of `vsearch query` (encode, ANN search, DuckDB metadata
join, rerank), with and without reranking, and the share of time per stage.

    python benchmarks/query_latency.py [--synthetic 1000000] [--queries 200] [--uniclip CHECKPOINT]

Indexes measured: the demo index (199 covers, lexical encoder), and with --synthetic N an HNSW
index over N synthetic covers: CLIP-like vectors from vsearch.indexes.bench with Chinese titles and
OCR text in the shards, encoded queries from the lexical encoder. Its results are meaningless (the
vectors are not the texts'), its timings are not: every stage does the work it does on real data.
It is also queried with a --where filter that about one cover in 12 passes (found by widening the
ANN search) and one that about one in 1,300 passes (found by DuckDB over every row, then scored
exactly); the same predicate for every query, as in a `vsearch query --file` batch.
With --uniclip (a checkpoint in the released format; random weights are fine for timing) the demo
is also embedded with UniCLIP so reranking includes the OCR heads on the cover images.
Prints a table and writes JSON (default benchmarks/out/query_latency.json).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings.encoders import load_encoder
from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.embeddings.shards import Manifest, ShardWriter
from vsearch.indexes import BuildConfig, build_index
from vsearch.indexes.bench import clip_like
from vsearch.indexes.vectors import open_source
from vsearch.query import QueryConfig, Searcher
from vsearch.workspace import Workspace

WORDS = ["大宅门", "演员表", "原神", "攻略", "周杰伦", "免费观看", "完整版", "汪汪队", "王者荣耀", "第二部", "精彩片段", "解说"]


BROAD, SELECTIVE = f"title LIKE '{WORDS[0]}%'", f"title = '{WORDS[0]}{WORDS[2]}{WORDS[3]}'"


def measure(searcher: Searcher, index: Path, queries: list[str], rerank: bool, device: str,
            where: str | None = None) -> dict:
    totals, stages = [], {"encode": 0.0, "search": 0.0, "metadata": 0.0, "rerank": 0.0}
    searcher.search(QueryConfig(queries[0], index, rerank=rerank, device=device, where=where))  # warm-up
    searcher.index.settle()
    started = time.perf_counter()
    for text in queries:
        begin = time.perf_counter()
        result = searcher.search(QueryConfig(text, index, rerank=rerank, device=device, where=where))
        totals.append((time.perf_counter() - begin) * 1000)
        for stage, seconds in result.seconds.items():
            stages[stage] += seconds
    wall = time.perf_counter() - started
    spent = sum(stages.values())
    return {"rerank": rerank, "where": where, "queries": len(queries), "p50_ms": float(np.percentile(totals, 50)),
            "p99_ms": float(np.percentile(totals, 99)), "qps": len(queries) / wall,
            "share": {stage: seconds / spent for stage, seconds in stages.items()}}


def synthetic_index(workspace: Workspace, count: int) -> Path:
    """Shards of `count` synthetic covers recorded as lexical-encoder output, and an HNSW index over them."""
    encoder = load_encoder("lexical")
    rng = random.Random(0)
    directory = workspace.embeddings_dir("synthetic")
    manifest = Manifest(dataset="synthetic", source="benchmarks/query_latency.py",
                        encoder={"spec": encoder.spec, "fingerprint": encoder.fingerprint},
                        dim=encoder.dim, shard_size=100_000)
    start = 0
    with ShardWriter.open(directory, manifest) as writer:
        for number, vectors in enumerate(clip_like(count, encoder.dim, seed=5)):
            ids = [f"s{i}" for i in range(start, start + len(vectors))]
            titles = ["".join(rng.sample(WORDS, 3)) for _ in ids]
            writer.write("cover", number, {"id": ids, "vector": vectors, "title": titles,
                                           "ocr": [t[:6] for t in titles], "uri": [None] * len(ids)}, [])
            start += len(vectors)
    destination = workspace.index_dir("synthetic-hnsw")
    build_index(BuildConfig(type="hnsw", recall_queries=200), open_source(directory), destination)
    return destination


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=0, help="also measure an HNSW index of N synthetic covers")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--uniclip", type=Path, help="a UniCLIP checkpoint: also measure reranking with the heads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "query_latency.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workspace = Workspace.resolve(scratch)
        demo_rows = list(open_dataset("demo", workspace).rows())
        queries = [random.Random(i).choice(demo_rows).ocr for i in range(args.queries)]
        models = [("lexical", "lexical")] + ([("uniclip", f"uniclip:{args.uniclip}")] if args.uniclip else [])
        for label, spec in models:
            embedded = run_embed(EmbedConfig(dataset="demo", model=spec, device=args.device,
                                             out=workspace.embeddings_dir(f"demo-{label}")), workspace)
            index = workspace.index_dir(f"demo-{label}")
            build_index(BuildConfig(type="hnsw"), open_source(embedded.directory), index)
            searcher = Searcher(index, args.device)
            rows += [{"index": f"demo, {label}", **measure(searcher, index, queries, rerank, args.device)}
                     for rerank in (False, True)]
        if args.synthetic:
            index = synthetic_index(workspace, args.synthetic)
            searcher = Searcher(index, args.device)
            texts = ["".join(random.Random(i).sample(WORDS, 2)) for i in range(args.queries)]
            name = f"synthetic {args.synthetic:,}, lexical"
            rows += [{"index": name, **measure(searcher, index, texts, r, args.device)} for r in (False, True)]
            rows += [{"index": name, **measure(searcher, index, texts, False, args.device, where)}
                     for where in (BROAD, SELECTIVE)]

    table = Table(title="query latency (k = 10, 100 candidates when reranking)")
    for column in ("index", "rerank", "where", "p50 ms", "p99 ms", "QPS", "encode", "search", "metadata", "rerank share"):
        table.add_column(column, justify="left" if column in ("index", "where") else "right")
    for row in rows:
        share = row["share"]
        table.add_row(row["index"], "yes" if row["rerank"] else "no", row["where"] or "", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
                      f"{row['qps']:,.0f}", *(f"{share[s]:.0%}" for s in ("encode", "search", "metadata", "rerank")))
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
