"""Where a batch of covers spends its device time: the embed job's steps for one batch of JPEG
covers, each timed alone (median over batches, the device synchronised around each), then run
as the job runs them, the next batch prepared on a thread while the model encodes this one.

    python benchmarks/embed_stages.py [--covers 4096] [--batch-size 512] [--device cuda] [--model SPEC]

Steps: reading the files (the readers' work, here in this process), JPEG decoding on the device
(host time of the call beside its device time: the part of decoding the host does), resizing the
decoded covers (`transform_by_size`), the model (image tower and presence head, vectors back on
the host), and on a GPU the decoding again while another stream has about 100 ms of matrix
products queued (its host ms: whether decoding waits for the device's other work). "Overlapped"
is the job's loop without its reader processes: each batch waited for before the next is queued,
and (as the job runs) the next batch queued on the device before this one's outputs are waited
for. Their host ms is the median time to prepare a batch beside the model. Against
`model`, it says how much of the job's shortfall from model-only throughput the device's own
preparation explains. Prints a table and writes JSON (default benchmarks/out/embed_stages.json).
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
from torchvision.io import ImageReadMode, decode_jpeg

from embed_throughput import RANDOM_MODEL, covers_and_encoder, encode_in_flight
from vsearch.embeddings.reader import decode_jpegs, jpeg_tensor, transform_by_size
from vsearch.overlap import read_ahead


def timed(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(host ms until the call returns, ms until the device has finished it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    returned = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (returned - started) * 1e3, (time.perf_counter() - started) * 1e3


def median_ms(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def prepared(encoder, jpegs: list[torch.Tensor]) -> torch.Tensor:
    """A batch's JPEGs decoded and resized on the encoder's device, as the job does it."""
    return decode_jpegs(jpegs, [None] * len(jpegs), encoder.device, encoder.tensor_transform,
                        encoder.image_transform)[0]


def overlapped_ms(batches: list[list[torch.Tensor]], encoder, in_flight: bool) -> tuple[float, float]:
    """Milliseconds a batch of the job's loop, and the median milliseconds the thread took to prepare
    a batch: the next batch decoded and resized on a thread while the model runs on this one;
    `in_flight`: and queued on the device before this one's outputs are waited for, as the job does
    (else each batch is waited for before the next)."""
    preparing: list[float] = []

    def timed_prepared(jpegs: list[torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        pixels = prepared(encoder, jpegs)
        preparing.append((time.perf_counter() - started) * 1e3)
        return pixels

    torch.cuda.synchronize(encoder.device)
    started = time.perf_counter()
    prepared_batches = read_ahead(map(timed_prepared, batches))
    if in_flight:
        encode_in_flight(encoder, prepared_batches)
    else:
        for pixels in prepared_batches:
            encoder.encode_pixels(pixels)
    return (time.perf_counter() - started) * 1e3 / len(batches), statistics.median(preparing)


def beside_busy_device(step: Callable[[], object], device: torch.device) -> float:
    """Host ms of `step` while another stream has about 100 ms of matrix products queued: how much
    the device's other work slows it, with no Python running beside it."""
    left = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    product = torch.empty_like(left)
    torch.cuda.synchronize(device)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        for _ in range(60):
            torch.mm(left, left, out=product)
    started = time.perf_counter()
    step()
    host = (time.perf_counter() - started) * 1e3
    torch.cuda.synchronize(device)
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covers", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help=f"an image model's spec (default: {RANDOM_MODEL})")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "embed_stages.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        covers, encoder = covers_and_encoder(Path(scratch), args.covers, args.model, args.device)
        files = sorted(covers.iterdir())
        read_runs, batches = [], []
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            started = time.perf_counter()
            batches.append([jpeg_tensor(path.read_bytes()) for path in chunk])
            elapsed = (time.perf_counter() - started) * 1e3
            read_runs.append((elapsed, elapsed))
        device = encoder.device
        if len(batches[-1]) < args.batch_size and len(batches) > 1:
            batches.pop()  # every timed batch the same size
        pixels = [prepared(encoder, b) for b in batches[:2]]
        encoder.encode_pixels(pixels[0])  # warm-up: kernels, autotuning, the decoder's handle

        decoded: list = []
        steps = {
            "read files": median_ms(read_runs),
            "decode JPEGs": median_ms([timed(lambda b=b: decoded.append(
                decode_jpeg(b, mode=ImageReadMode.RGB, device=device)), device) for b in batches]),
            "resize": median_ms([timed(lambda d=d: transform_by_size(d, encoder.tensor_transform), device)
                                 for d in decoded]),
            "model": median_ms([timed(lambda p=p: encoder.encode_pixels(p), device) for p in pixels * len(batches)]),
        }
        overlapped = {}
        if device.type == "cuda":
            overlapped = {
                "overlapped, waiting for each batch": overlapped_ms(batches, encoder, in_flight=False),
                "overlapped, a batch in flight": overlapped_ms(batches, encoder, in_flight=True),
            }
            steps["decode JPEGs, another stream busy"] = (statistics.median(
                beside_busy_device(lambda b=b: decode_jpeg(b, mode=ImageReadMode.RGB, device=device), device)
                for b in batches),) * 2

        size = args.batch_size
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        table = Table(title=f"one batch of {size} covers on {name}")
        for column in ("step", "host ms", "device ms", "covers/s"):
            table.add_column(column, justify="right")
        for step, (host, whole) in steps.items():
            table.add_row(step, f"{host:.1f}", f"{whole:.1f}", f"{size / whole * 1e3:,.0f}")
        for step, (whole, preparing) in overlapped.items():
            table.add_row(step, f"{preparing:.1f}", f"{whole:.1f}", f"{size / whole * 1e3:,.0f}")
        Console().print(table)
        report = {"date": time.strftime("%Y-%m-%d"), "device": name, "model": args.model or RANDOM_MODEL,
                  "batch_size": size, "batches": len(batches),
                  "steps_ms": {step: {"host": round(h, 2), "device": round(d, 2)} for step, (h, d) in steps.items()},
                  "overlapped_ms": {step: {"batch": round(ms, 2), "preparing": round(preparing, 2)}
                                    for step, (ms, preparing) in overlapped.items()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
