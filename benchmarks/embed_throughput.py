"""Embedding throughput: covers/s end to end (JPEG files -> Parquet shards) next to the model alone
(pre-made tensors already on the device) and the readers alone (the job's input side with no model
to wait for), for UniCLIP ViT-B/16 with random weights, or the image model `--model` names (its
checkpoint: uniclip:PATH, open_clip:ARCH:PATH).

    python benchmarks/embed_throughput.py [--covers 2048] [--device auto] [--batch-size 256] [--workers 8]
                                          [--decode auto|both|device|workers[,...]] [--model SPEC]

Prints a table and writes JSON (default benchmarks/out/embed_throughput.json). The pipeline's goal
is at least 90% of model-only throughput: decoding and resizing must keep the device busy.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import multiprocessing
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from vsearch.embeddings import load_encoder, reader
from vsearch.embeddings.datasets import Row
from vsearch.embeddings.job import EmbedConfig, encode_media_shards, one_in_flight, run_embed, total_workers
from vsearch.embeddings.torch_encoder import PendingOutputs
from vsearch.embeddings.uniclip import UniClip, UniClipConfig
from vsearch.errors import VsearchError
from vsearch.workspace import Workspace

SIZES = [(640, 360), (360, 640), (480, 480), (720, 405)]  # typical cover shapes


def make_cover(folder: Path, index: int) -> None:
    """A JPEG cover of a realistic size with texture, so decoding costs what a real cover costs."""
    width, height = SIZES[index % len(SIZES)]
    base = np.random.default_rng(index).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(base).resize((width, height), Image.BILINEAR).save(folder / f"{index:06d}.jpg", quality=85)


def make_covers(folder: Path, count: int) -> None:
    # A cover takes about 3 ms and a spawned worker's start (this script, torch, open_clip) about
    # 5 s: workers only where each has 2,048 or more to make (a GPU run's tens of thousands).
    workers = min(multiprocessing.cpu_count(), count // 2048)
    if workers < 2:
        for index in range(count):
            make_cover(folder, index)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(functools.partial(make_cover, folder), range(count), chunksize=256)


def random_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    torch.save({"state_dict": UniClip(UniClipConfig()).state_dict()}, path)


RANDOM_MODEL = "UniCLIP ViT-B/16 (random weights)"


def covers_and_encoder(scratch: Path, count: int, model: str | None, device: str) -> tuple[Path, Any]:
    """`count` covers in a folder of `scratch`, and the encoder of `model` (a spec; None: UniCLIP
    with random weights, its checkpoint saved in `scratch`) on `device`."""
    if model is None:
        random_checkpoint(scratch / "uniclip-random.pt")
    try:
        encoder = load_encoder(model or f"uniclip:{scratch / 'uniclip-random.pt'}", device)
    except VsearchError as exc:
        raise SystemExit(f"--model {model}: {exc}") from None
    if not hasattr(encoder, "encode_pixels"):
        raise SystemExit(f"--model {model}: covers need an image model (uniclip:PATH or open_clip:ARCH:PATH)")
    (scratch / "covers").mkdir()
    make_covers(scratch / "covers", count)
    return scratch / "covers", encoder


def model_only(encoder, covers: int, batch_size: int) -> float:
    """Covers/s of the encoder alone on pre-made pixels already on its device, each batch queued
    before the one before it is read back, as the job does."""
    shape = encoder.pixels([Image.new("RGB", SIZES[0])]).shape[1:]  # the model's input size
    pixels = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, device=encoder.device)
    encoder.encode_pixels(pixels)  # warm-up: kernels, autotuning
    batches = max(1, covers // batch_size)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    encode_in_flight(encoder, itertools.repeat(pixels, batches))
    return batches * batch_size / (time.perf_counter() - started)


def encode_in_flight(encoder, batches: Iterable[torch.Tensor]) -> None:
    """Encode batches of pixels as the job does: each queued before the one before it is read back."""
    for _, outputs in one_in_flight(batches, encoder.submit_pixels):
        outputs.result()


class NoModel:
    """The encoder with its model taken out: what the job's readers and device decoding deliver."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)

    def submit_pixels(self, pixels: torch.Tensor) -> PendingOutputs:
        if pixels.is_cuda:
            torch.cuda.synchronize(pixels.device)  # the batch's decoding and resizing, done
        return PendingOutputs({"vector": torch.ones((len(pixels), self.encoder.dim)),
                               "ocr_presence": torch.zeros(len(pixels))})


class SplitRecords(logging.Handler):
    """The readers' share of each batch's JPEGs and what it was set from, batch by batch, as the
    job logs them (`reader.JpegSplit.observe`)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rows: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.rows.append([round(value, 4) for value in record.args])

    @contextmanager
    def recording(self) -> Iterator[None]:
        logger = logging.getLogger(reader.__name__)
        level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


def readers_only(encoder, folder: Path, args: argparse.Namespace, decode: str) -> float:
    """Covers/s the job's input side delivers (reader processes, decoding on the device) with no
    model to wait for: below model-only, the readers bound the job and more workers help."""
    rows = [Row(path.stem, None, None, str(path)) for path in sorted(folder.iterdir())]
    config = EmbedConfig(batch_size=args.batch_size, workers=total_workers(args.workers, 1), decode=decode)
    started = time.perf_counter()
    for _ in encode_media_shards(NoModel(encoder), "cover", iter([(0, rows)]), config, lambda n: None):
        pass
    return len(rows) / (time.perf_counter() - started)


def end_to_end(encoder, folder: Path, workspace: Workspace, args: argparse.Namespace, decode: str) -> dict:
    """Covers/s of the whole job, covers/s once the first batch is out (a long job's rate: starting
    the reader processes no longer counts), the job's seconds per stage and the covers it decoded
    on the device."""
    # Shards of the job's default size, so that writing overlaps encoding as in a real job.
    config = EmbedConfig(dataset=str(folder), model=encoder.spec, device=str(encoder.device), batch_size=args.batch_size,
                         out=workspace.root / "shards", overwrite=True, workers=args.workers, decode=decode)
    batches: list[tuple[float, int]] = []
    splits = SplitRecords()
    started = time.perf_counter()
    with splits.recording():
        result = run_embed(config, workspace, on_rows=lambda n: batches.append((time.perf_counter(), n)), encoder=encoder)
    elapsed = time.perf_counter() - started
    assert result.rows_written == args.covers, result
    # Between the first report and the one before last: a batch is reported once the next one is
    # queued, which on the CPU means computed, so the last two reports come together there.
    times, rows = [t for t, _ in batches], [n for _, n in batches]
    steady = sum(rows[1:-1]) / (times[-2] - times[0]) if len(batches) > 2 else float("nan")
    # With `both`, the batches the readers took before the job had measured its pace were shared
    # at a first guess: the second half shows the share the job settles on.
    half = len(batches) // 2
    settled = sum(rows[half:-1]) / (times[-2] - times[half - 1]) if len(batches) > 3 else float("nan")
    seconds = asdict(result.times)
    return {"covers_per_s": args.covers / elapsed, "steady_covers_per_s": steady, "settled_covers_per_s": settled,
            "until_first_batch_s": times[0] - started, "after_last_batch_s": started + elapsed - times[-1],
            "decoded_on_device": seconds.pop("decoded_on_device"), "split": splits.rows,
            "job_seconds": {f"{stage}_s": round(value, 2) for stage, value in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covers", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default="auto",
                        help="where JPEGs are decoded: auto, both, device or workers; several, comma-separated, "
                             "are each run on the same covers")
    parser.add_argument("--model", default=None, help=f"an image model's spec (default: {RANDOM_MODEL})")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "embed_throughput.json")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        covers, encoder = covers_and_encoder(Path(scratch), args.covers, args.model, args.device)
        alone = model_only(encoder, args.covers, args.batch_size)
        for decode in args.decode.split(","):
            reading = readers_only(encoder, covers, args, decode)
            job = end_to_end(encoder, covers, Workspace.resolve(Path(scratch) / "ws"), args, decode)
            runs.append({"decode": decode, "readers_only_covers_per_s": round(reading, 1),
                         "end_to_end_covers_per_s": round(job["covers_per_s"], 1),
                         "end_to_end_over_model_only": round(job["covers_per_s"] / alone, 3),
                         "after_first_batch_covers_per_s": round(job["steady_covers_per_s"], 1),
                         "after_first_batch_over_model_only": round(job["steady_covers_per_s"] / alone, 3),
                         "second_half_covers_per_s": round(job["settled_covers_per_s"], 1),
                         "second_half_over_model_only": round(job["settled_covers_per_s"] / alone, 3),
                         "until_first_batch_s": round(job["until_first_batch_s"], 2),
                         "after_last_batch_s": round(job["after_last_batch_s"], 2),
                         "decoded_on_device": job["decoded_on_device"], "job_seconds": job["job_seconds"],
                         "split": {"columns": ["reader_jpegs", "jpegs", "device_s", "waited_s", "share"],
                                   "batches": job["split"]}})

    device = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "date": time.strftime("%Y-%m-%d"), "device": device, "model": args.model or RANDOM_MODEL,
        "covers": args.covers, "batch_size": args.batch_size, "workers": args.workers,
        "model_only_covers_per_s": round(alone, 1), "runs": runs,
    }
    table = Table(title=f"embed throughput on {device}, {args.covers:,} covers; model only {alone:,.1f} covers/s")
    for column in ("decode", "readers only", "end to end (covers/s)", "ratio", "after 1st batch", "ratio",
                   "2nd half", "ratio", "decoded on the device"):
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(run["decode"], f"{run['readers_only_covers_per_s']:,.1f}", f"{run['end_to_end_covers_per_s']:,.1f}",
                      f"{run['end_to_end_over_model_only']:.1%}", f"{run['after_first_batch_covers_per_s']:,.1f}",
                      f"{run['after_first_batch_over_model_only']:.1%}", f"{run['second_half_covers_per_s']:,.1f}",
                      f"{run['second_half_over_model_only']:.1%}", f"{run['decoded_on_device'] / args.covers:.0%}")
    console = Console()
    console.print(table)
    for run in runs:
        console.print(f"{run['decode']}: the job's seconds: "
                      + ", ".join(f"{stage.removesuffix('_s')} {value}" for stage, value in run["job_seconds"].items())
                      + f"; {run['until_first_batch_s']:.1f} s until the first batch was encoded, "
                        f"{run['after_last_batch_s']:.1f} s after the last")
    console.print("(input: the model waiting for batches; output: for the shard writer; decoding: on the device, "
                  "beside the model)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
