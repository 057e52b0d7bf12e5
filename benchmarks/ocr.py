"""Reading cover text (`vsearch embed --ocr`): the job's pass over a shard with a pool of reader
processes (one ONNX thread each) against RapidOCR called in this process with every core (the
plain library call: `--workers 0`), on the demo covers, and how often the text read equals the text
drawn on them (spaces ignored: RapidOCR puts one between the lines of a wrapped title).

    python benchmarks/ocr.py [--covers 199] [--workers 0 2]

Prints a table and writes JSON (default benchmarks/out/ocr.json). A pool's time includes starting
its processes, as each embed job does once.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings.ocr import with_cover_text
from vsearch.workspace import Workspace


def without_spaces(text: str | None) -> str:
    return "".join((text or "").split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covers", type=int, default=199)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "ocr.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        drawn = [row for row in open_dataset("demo", Workspace.resolve(scratch)).rows()][:args.covers]
    blank = [replace(row, ocr=None) for row in drawn]
    rows = []
    for workers in args.workers:
        started = time.perf_counter()
        (_, read), = with_cover_text(iter([(0, blank)]), "cover", workers)
        seconds = time.perf_counter() - started
        exact = sum(without_spaces(r.ocr) == without_spaces(d.ocr) for r, d in zip(read, drawn))
        rows.append({"workers": workers, "covers": len(blank), "seconds": round(seconds, 2),
                     "covers_per_s": round(len(blank) / seconds, 2), "exact": exact})
    for row in rows:
        row["speed_vs_in_process"] = round(row["covers_per_s"] / rows[0]["covers_per_s"], 2)

    engine = f"rapidocr {version('rapidocr')}, onnxruntime {version('onnxruntime')}"
    table = Table(title=f"{engine} on {len(blank)} demo covers, {os.cpu_count()} cores")
    for column in ("workers", "seconds", "covers/s", "× in-process", "read exactly"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row("0 (in process)" if row["workers"] == 0 else str(row["workers"]), f"{row['seconds']:.1f}",
                      f"{row['covers_per_s']:.1f}", f"{row['speed_vs_in_process']:.2f}",
                      f"{row['exact']} of {row['covers']}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "engine": engine, "cores": os.cpu_count(),
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
