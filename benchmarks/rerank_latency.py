"""Where reranking with the UniCLIP heads spends its time: reading the candidates' covers,
preparing them for the image tower (on a pool of threads, and on the device as on a GPU), the heads
themselves, the query's text vector, and `rerank` of all parts together. The budget is 30 ms for
50 candidates on a GPU.

    python benchmarks/rerank_latency.py --uniclip CHECKPOINT [--device auto] [--candidates 50]

A checkpoint with random weights costs what the real weights cost (`embed_throughput.random_checkpoint`
writes one). The candidates are demo covers. Prints a table of medians and maxima over `--repeats`
runs (after two warm-ups) and writes JSON (default benchmarks/out/rerank_latency.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vsearch.embeddings import load_encoder
from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings.media import read_all
from vsearch.query.rerank import Candidate, Weights, _cover_inputs, rerank
from vsearch.workspace import Workspace

QUERY = "大宅门演员表"


def milliseconds(fn: Callable[[], object], synchronise: Callable[[], None], repeats: int) -> list[float]:
    fn(), fn()
    times = []
    for _ in range(repeats):
        synchronise()
        started = time.perf_counter()
        fn()
        synchronise()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uniclip", type=Path, required=True, help="a UniCLIP checkpoint in the released format")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "rerank_latency.json")
    args = parser.parse_args()

    encoder = load_encoder(f"uniclip:{args.uniclip}", args.device)
    synchronise = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as scratch:
        rows = list(open_dataset("demo", Workspace.resolve(Path(scratch))).rows())[:args.candidates]
    uris = [row.uri for row in rows]
    fetched = read_all(uris)
    pixels = torch.stack([p.to(encoder.device) for p in _cover_inputs(encoder, fetched, uris, on_device=True)])

    def candidates() -> list[Candidate]:
        return [Candidate(row.id, 0.5, row.title, row.ocr, row.uri) for row in rows]

    stages = {
        "read covers": lambda: read_all(uris),
        "prepare covers on threads": lambda: _cover_inputs(encoder, fetched, uris, on_device=False),
        f"prepare covers on {encoder.device.type}": lambda: _cover_inputs(encoder, fetched, uris, on_device=True),
        "heads on prepared covers": lambda: encoder.match_and_presence([QUERY] * len(rows), pixels),
        "query text vector": lambda: encoder.encode_texts([QUERY]),
        "rerank (all parts)": lambda: rerank(encoder, QUERY, candidates(), Weights(), len(rows)),
    }
    device = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else "cpu"
    table = Table(title=f"reranking {len(rows)} candidates with the UniCLIP heads on {device} "
                        f"(torch threads: {torch.get_num_threads()})")
    for column in ("stage", "median ms", "max ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    report = {"date": time.strftime("%Y-%m-%d"), "device": device, "candidates": len(rows),
              "torch_threads": torch.get_num_threads(), "stages": {}}
    for name, fn in stages.items():
        times = milliseconds(fn, synchronise, args.repeats)
        report["stages"][name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
        table.add_row(name, f"{statistics.median(times):.1f}", f"{max(times):.1f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
