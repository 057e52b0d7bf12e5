"""The cbvs10m-HNSW file at scale: time, OCR texts per second and peak memory of writing it for a
CBVS-10M-format file of `--lines` rows, the ef_search it chose and the recall@10 it measured, and
the recall@10 of the lists in the file, checked here against exact search over all its texts (a
listed neighbour scoring as high as the exact 10th counts as found) on a sample of other texts.

    python benchmarks/hard_negatives.py [--lines 300000] [--phrases N] [--sorted] [--model lexical] [--sample 1000]
                                        [--m 32] [--ef-construction 200] [--ef-search N]

The job's checkpoints (see `vsearch/indexes/hard_negatives.py`) are counted with the time they took,
and the whole time is split into its phases: the graph (reading, encoding and inserting every text),
the tuning of its search (`ef_search`; its time includes the checkpoint of the whole graph taken
before it), and the neighbour lists (searched and written; from the end of their first batch, which
the tuning's time includes).

The file is made from real query texts (`../shared/data/cbvs20k.txt`, else the demo titles): a
title and an OCR text of two queries each, every fifth OCR text `\\N`, so texts repeat and share
words as real covers' do. With P queries to draw from (all of them, or `--phrases`), L lines hold
about P² (1 - exp(-0.8 L / P²)) distinct OCR texts, so `--phrases` sets how many distinct texts a
file of the real 10M lines holds. Prints a table and writes JSON (default
benchmarks/out/hard_negatives.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vsearch.embeddings import load_encoder
from vsearch.embeddings.datasets import demo_source, open_dataset
from vsearch.indexes.bench import peak_resident_bytes
from vsearch.indexes.hard_negatives import GRAPH, NEIGHBOURS, read_as_trained, write_hard_negatives
from vsearch.indexes.tuning import TIE_TOLERANCE
from vsearch.workspace import Workspace

SHARED_QUERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cbvs20k.txt"


def phrases(count: int | None = None, seed: int = 0) -> list[str]:
    """Distinct short Chinese texts to build titles and OCR texts from: all of them, or `count`
    drawn at random."""
    source = SHARED_QUERIES if SHARED_QUERIES.is_file() else Path(demo_source())
    every = sorted({line.split("\t")[0] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()})
    if count is None:
        return every
    if not 2 <= count <= len(every):
        raise SystemExit(f"--phrases must be between 2 and {len(every)} (the queries there are to draw from)")
    return sorted(random.Random(seed).sample(every, count))


def write_cbvs10m_file(path: Path, lines: int, words: list[str] | None = None, seed: int = 0,
                       by_ocr: bool = False) -> None:
    """A CBVS-10M-format file of `lines` rows; `by_ocr`: its lines sorted by their OCR text, as a
    table exported in that column's order would be, so that texts sharing their first words follow
    each other (sorted by `sort`, so that this process's peak memory stays the job's)."""
    rng = random.Random(seed)
    words = words or phrases()
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            ocr = "\\N" if i % 5 == 0 else f"{rng.choice(words)} {rng.choice(words)}"
            handle.write(f"{rng.choice(words)} {rng.randrange(1000)}\thttp://covers.example/{i}.jpg\t{ocr}\n")
    if by_ocr:
        subprocess.run(["sort", "-t", "\t", "-k3,3", "-o", str(path), str(path)], check=True,
                       env={**os.environ, "LC_ALL": "C"})


def neighbour_recall(path: Path, encoder, sample: int, seed: int = 0) -> float:
    """Recall@10 of the file's neighbour lists for `sample` of its texts, against exact search."""
    lines = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    position = {fields[0]: i for i, fields in enumerate(lines)}
    vectors = np.concatenate([encoder.encode_texts([f[0] for f in lines[start:start + 4096]])
                              for start in range(0, len(lines), 4096)])
    chosen = np.random.default_rng(seed + 1).choice(len(lines), min(sample, len(lines)), replace=False)
    scores = vectors[chosen] @ vectors.T
    scores[np.arange(len(chosen)), chosen] = -np.inf  # a text is not its own neighbour
    tenth = np.partition(scores, -NEIGHBOURS, axis=1)[:, -NEIGHBOURS]
    found = sum(int(np.sum(scores[row, [position[n] for n in lines[i][1:]]] >= tenth[row] - TIE_TOLERANCE))
                for row, i in enumerate(chosen))
    return found / (len(chosen) * NEIGHBOURS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--phrases", type=int, help="queries to draw titles and OCR texts from (default: all)")
    parser.add_argument("--model", default="lexical", help="encoder spec (a local checkpoint for uniclip:PATH)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--m", type=int, default=GRAPH["M"], help="the graph's M")
    parser.add_argument("--ef-construction", type=int, default=GRAPH["ef_construction"])
    parser.add_argument("--ef-search", type=int, help="search the lists at this ef_search, measured, not tuned: "
                                                      "runs alike in the lists' work (default: tuned to the target)")
    parser.add_argument("--sorted", action="store_true", help="the file's lines in the order of their OCR texts")
    parser.add_argument("--sample", type=int, default=1000, help="texts whose neighbours are checked")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/hard_negatives.json"))
    args = parser.parse_args()
    words = phrases(args.phrases)
    encoder = read_as_trained(load_encoder(args.model, args.device))
    with tempfile.TemporaryDirectory() as scratch:
        source, out = Path(scratch) / "cbvs10m.txt", Path(scratch) / "cbvs10m-HNSW"
        write_cbvs10m_file(source, args.lines, words, by_ocr=args.sorted)
        started = time.perf_counter()
        dataset = open_dataset(str(source), Workspace.resolve(Path(scratch) / "ws"))
        marks: dict[str, float] = {}  # when every text is in the graph, and when its first lists are searched

        def mark(name: str):
            return lambda n: marks.setdefault(name, time.perf_counter() - started)

        written = write_hard_negatives(dataset, encoder, out, target_recall=args.target_recall,
                                       params={"M": args.m, "ef_construction": args.ef_construction,
                                               **({"ef_search": args.ef_search} if args.ef_search else {})},
                                       on_texts=mark("graph"), on_written=mark("tuned"))
        seconds = time.perf_counter() - started
        phases = {"graph": marks["graph"], "tuning": marks["tuned"] - marks["graph"], "lists": seconds - marks["tuned"]}
        peak = peak_resident_bytes()
        checked = neighbour_recall(out, encoder, args.sample)
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "lines": args.lines, "sorted": args.sorted,
              "phrases": len(words),
              "texts": written.texts, "M": written.params["M"], "ef_construction": written.params["ef_construction"],
              "seconds": round(seconds, 1), **{f"{name}_seconds": round(t, 1) for name, t in phases.items()},
              "texts_per_second": round(written.texts / seconds),
              "peak_rss_mib": peak >> 20, "ef_search": written.ef_search, "recall@10_measured": round(written.recall, 4),
              "recall@10_checked": round(checked, 4), "checkpoints": written.checkpoints,
              "checkpoint_seconds": round(written.checkpoint_seconds, 1)}
    order = ", sorted by OCR text" if args.sorted else ""
    table = Table(title=f"cbvs10m-HNSW from {args.lines:,} lines{order} ({args.model})")
    for column in ("distinct OCR texts", "seconds", "graph / tuning / lists", "texts/s", "peak MiB", "ef_search",
                   "recall@10 measured", "recall@10 checked", "checkpoints (s)"):
        table.add_column(column, justify="right")
    table.add_row(f"{written.texts:,}", f"{seconds:.1f}", " / ".join(f"{t:.1f}" for t in phases.values()),
                  f"{result['texts_per_second']:,}",
                  f"{peak >> 20:,}", str(written.ef_search), f"{written.recall:.3f}", f"{checked:.3f}",
                  f"{written.checkpoints} ({written.checkpoint_seconds:.1f})")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
