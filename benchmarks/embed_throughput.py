"""Embedding throughput: covers/s end to end (JPEG files -> Parquet shards) next to the model alone
(pre-made tensors already on the device) and the readers alone (the job's input side with no model
to wait for), for UniCLIP ViT-B/16 with random weights.

    python benchmarks/embed_throughput.py [--covers 2048] [--device auto] [--batch-size 256] [--workers 8]
                                          [--decode auto|device|workers]

Prints a table and writes JSON (default benchmarks/out/embed_throughput.json). The pipeline's goal
is at least 90% of model-only throughput: decoding and resizing must keep the device busy.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing
import platform
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from vsearch.embeddings import load_encoder
from vsearch.embeddings.datasets import Row
from vsearch.embeddings.job import EmbedConfig, encode_media_shards, one_in_flight, run_embed, total_workers
from vsearch.embeddings.torch_encoder import PendingOutputs
from vsearch.embeddings.uniclip import UniClip, UniClipConfig
from vsearch.workspace import Workspace

SIZES = [(640, 360), (360, 640), (480, 480), (720, 405)]  # typical cover shapes


def make_cover(folder: Path, index: int) -> None:
    """A JPEG cover of a realistic size with texture, so decoding costs what a real cover costs."""
    width, height = SIZES[index % len(SIZES)]
    base = np.random.default_rng(index).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(base).resize((width, height), Image.BILINEAR).save(folder / f"{index:06d}.jpg", quality=85)


def make_covers(folder: Path, count: int) -> None:
    with multiprocessing.get_context("spawn").Pool() as pool:  # tens of thousands for a GPU run
        pool.map(functools.partial(make_cover, folder), range(count), chunksize=256)


def random_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    torch.save({"state_dict": UniClip(UniClipConfig()).state_dict()}, path)


def covers_and_checkpoint(scratch: Path, count: int) -> tuple[Path, str]:
    """`count` covers in a folder of `scratch` and a UniCLIP checkpoint with random weights beside
    them: (the covers' folder, the encoder spec)."""
    (scratch / "covers").mkdir()
    make_covers(scratch / "covers", count)
    random_checkpoint(scratch / "uniclip-random.pt")
    return scratch / "covers", f"uniclip:{scratch / 'uniclip-random.pt'}"


def model_only(encoder, covers: int, batch_size: int) -> float:
    """Covers/s of the encoder alone on pre-made pixels already on its device, each batch queued
    before the one before it is read back, as the job does."""
    pixels = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=encoder.device)
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


def readers_only(encoder, folder: Path, args: argparse.Namespace) -> float:
    """Covers/s the job's input side delivers (reader processes, decoding on the device) with no
    model to wait for: below model-only, the readers bound the job and more workers help."""
    rows = [Row(path.stem, None, None, str(path)) for path in sorted(folder.iterdir())]
    config = EmbedConfig(batch_size=args.batch_size, workers=total_workers(args.workers, 1), decode=args.decode)
    started = time.perf_counter()
    for _ in encode_media_shards(NoModel(encoder), "cover", iter([(0, rows)]), config, lambda n: None):
        pass
    return len(rows) / (time.perf_counter() - started)


def end_to_end(encoder, folder: Path, workspace: Workspace, args: argparse.Namespace) -> dict[str, float]:
    """Covers/s of the whole job, covers/s once the first batch is out (a long job's rate: starting
    the reader processes no longer counts), and the job's seconds per stage."""
    # Shards of the job's default size, so that writing overlaps encoding as in a real job.
    config = EmbedConfig(dataset=str(folder), model=encoder.spec, device=str(encoder.device), batch_size=args.batch_size,
                         out=workspace.root / "shards", overwrite=True, workers=args.workers, decode=args.decode)
    batches: list[tuple[float, int]] = []
    started = time.perf_counter()
    result = run_embed(config, workspace, on_rows=lambda n: batches.append((time.perf_counter(), n)), encoder=encoder)
    elapsed = time.perf_counter() - started
    assert result.rows_written == args.covers, result
    # Between the first report and the one before last: a batch is reported once the next one is
    # queued, which on the CPU means computed, so the last two reports come together there.
    times, rows = [t for t, _ in batches], [n for _, n in batches]
    steady = sum(rows[1:-1]) / (times[-2] - times[0]) if len(batches) > 2 else float("nan")
    first, last = times[0], times[-1]
    return {"covers_per_s": args.covers / elapsed, "steady_covers_per_s": steady,
            "until_first_batch_s": first - started, "after_last_batch_s": started + elapsed - last,
            **{f"{stage}_s": round(seconds, 2) for stage, seconds in asdict(result.times).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covers", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default="auto", help="where JPEGs are decoded: auto, device or workers")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "embed_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        covers, spec = covers_and_checkpoint(Path(scratch), args.covers)
        encoder = load_encoder(spec, args.device)
        alone = model_only(encoder, args.covers, args.batch_size)
        reading = readers_only(encoder, covers, args)
        job = end_to_end(encoder, covers, Workspace.resolve(Path(scratch) / "ws"), args)
    pipeline, steady = job.pop("covers_per_s"), job.pop("steady_covers_per_s")
    before, after = job.pop("until_first_batch_s"), job.pop("after_last_batch_s")

    device = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "date": time.strftime("%Y-%m-%d"), "device": device, "model": "UniCLIP ViT-B/16 (random weights)",
        "covers": args.covers, "batch_size": args.batch_size, "workers": args.workers, "decode": args.decode,
        "model_only_covers_per_s": round(alone, 1), "readers_only_covers_per_s": round(reading, 1),
        "end_to_end_covers_per_s": round(pipeline, 1),
        "end_to_end_over_model_only": round(pipeline / alone, 3),
        "after_first_batch_covers_per_s": round(steady, 1), "until_first_batch_s": round(before, 2),
        "after_last_batch_s": round(after, 2), "job_seconds": job,
    }
    table = Table(title=f"embed throughput on {device}")
    for column in ("covers", "model only (covers/s)", "readers only", "end to end (covers/s)", "ratio",
                   "after 1st batch", "ratio"):
        table.add_column(column, justify="right")
    table.add_row(str(args.covers), f"{alone:,.1f}", f"{reading:,.1f}", f"{pipeline:,.1f}", f"{pipeline / alone:.1%}",
                  f"{steady:,.1f}", f"{steady / alone:.1%}")
    Console().print(table)
    Console().print("the job's seconds: " + ", ".join(f"{stage.removesuffix('_s')} {seconds}" for stage, seconds in job.items())
                    + f" (input: the model waiting for batches; output: for the shard writer; decoding: on the device, "
                      f"beside the model); {before:.1f} s until the first batch was encoded, {after:.1f} s after the last")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
