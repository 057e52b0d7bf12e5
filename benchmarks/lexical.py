"""The lexical encoder on the CPU: texts encoded per second by `encode_texts` alone, and rows per
second of the embed job that uses it (a CBVS-10M-format file -> Parquet shards: reading the
file, encoding, writing), on titles and OCR texts made of real query texts.

    python benchmarks/lexical.py [--texts 100000] [--batch-size 256]

The texts come from `../shared/data/cbvs20k.txt` (else the demo titles), as in
`hard_negatives.py`. Prints a table and writes JSON (default benchmarks/out/lexical.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hard_negatives import write_cbvs10m_file  # a script beside this one (run as python benchmarks/lexical.py)
from vsearch.embeddings import load_encoder
from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.workspace import Workspace


def cover_texts(path: Path) -> list[str]:
    """What the embed job encodes for each line: title and OCR text, one per line."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        title, _, ocr = line.split("\t")
        texts.append(title if ocr == "\\N" else f"{title}\n{ocr}")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "lexical.json")
    args = parser.parse_args()

    encoder = load_encoder("lexical")
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "covers.txt"
        write_cbvs10m_file(source, args.texts)
        texts = cover_texts(source)
        random.Random(0).shuffle(texts)
        started = time.perf_counter()
        for start in range(0, len(texts), args.batch_size):
            encoder.encode_texts(texts[start:start + args.batch_size])
        encoding = time.perf_counter() - started
        started = time.perf_counter()
        run_embed(EmbedConfig(dataset=str(source), model="lexical", batch_size=args.batch_size,
                              out=Path(scratch) / "shards"), Workspace.resolve(scratch))
        job = time.perf_counter() - started
    rows = [{"stage": "encode_texts", "seconds": round(encoding, 2), "per_s": round(len(texts) / encoding)},
            {"stage": "embed job (file -> shards)", "seconds": round(job, 2), "per_s": round(len(texts) / job)}]

    table = Table(title=f"lexical encoder, {len(texts):,} cover texts, batches of {args.batch_size}, "
                        f"{os.cpu_count()} cores")
    for column in ("stage", "seconds", "texts/s"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for row in rows:
        table.add_row(row["stage"], f"{row['seconds']:.2f}", f"{row['per_s']:,}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "texts": len(texts),
                                    "batch_size": args.batch_size, "cores": os.cpu_count(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
