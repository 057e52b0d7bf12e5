"""Where a batch of covers spends its device time: the embed job's steps for one batch of JPEG
covers, each timed alone (median over batches, the device synchronised around each), then run
as the job runs them, the next batch prepared on a thread while the model encodes this one.

    python benchmarks/embed_stages.py [--covers 4096] [--batch-size 512] [--device cuda]

Steps: reading the files (the readers' work, here in this process), JPEG decoding on the device
(host time of the call beside its device time: the part of decoding the host does), resizing the
decoded covers (`transform_by_size`), the model (image tower and presence head, vectors back on
the host), and on a GPU a candidate for the model: its weights in float16, timed and compared
with the job's outputs. "Overlapped" is the job's loop without its reader processes: each batch
waited for before the next is queued, and (as the job runs) the next batch queued on the device
before this one's outputs are waited for. Against `model`, it says how much of the job's
shortfall from model-only throughput the device's own preparation explains. Prints a table and
writes JSON (default benchmarks/out/embed_stages.json).
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

from embed_throughput import covers_and_checkpoint
from vsearch.embeddings import load_encoder
from vsearch.embeddings.job import one_in_flight
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


def overlapped_ms(batches: list[list[torch.Tensor]], encoder, in_flight: bool) -> float:
    """Milliseconds a batch of the job's loop: the next batch decoded and resized on a thread
    while the model runs on this one; `in_flight`: and queued on the device before this one's
    outputs are waited for, as the job does (else each batch is waited for before the next)."""
    torch.cuda.synchronize(encoder.device)
    started = time.perf_counter()
    prepared_batches = read_ahead(prepared(encoder, jpegs) for jpegs in batches)
    if in_flight:
        for _, outputs in one_in_flight(prepared_batches, encoder.submit_pixels):
            outputs.result()
    else:
        for pixels in prepared_batches:
            encoder.encode_pixels(pixels)
    return (time.perf_counter() - started) * 1e3 / len(batches)


def float16_encoder(spec: str, device: torch.device):
    """A candidate for the model's time: the encoder with its weights in float16, as OpenAI's CLIP
    and cn_clip run on a GPU (autocast then keeps only the layer norms in float32, and the residual
    stream stays in float16)."""
    fast = load_encoder(spec, str(device))
    fast.model.half()
    return fast


def differences(encoder, other, pixels: torch.Tensor) -> dict[str, float]:
    """How far `other`'s outputs are from `encoder`'s on the same pixels."""
    ours, theirs = encoder.encode_pixels(pixels), other.encode_pixels(pixels)
    cosines = (ours["vector"] * theirs["vector"]).sum(axis=1)
    return {"vector_cosine_min": float(cosines.min()), "vector_cosine_mean": float(cosines.mean()),
            "presence_max_abs_difference": float(abs(ours["ocr_presence"] - theirs["ocr_presence"]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covers", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "embed_stages.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        covers, spec = covers_and_checkpoint(Path(scratch), args.covers)
        encoder = load_encoder(spec, args.device)
        # float16 matrix products on the CPU are slow or missing: the candidate is the GPU's
        fast = float16_encoder(spec, encoder.device) if encoder.device.type == "cuda" else None
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
    candidate = {}
    if fast is not None:
        candidate = differences(encoder, fast, pixels[0])
        steps["model, float16 weights (a candidate)"] = median_ms(
            [timed(lambda p=p: fast.encode_pixels(p), device) for p in pixels * len(batches)])
    overlapped = {"overlapped, waiting for each batch": overlapped_ms(batches, encoder, in_flight=False),
                  "overlapped, a batch in flight": overlapped_ms(batches, encoder, in_flight=True)
                  } if device.type == "cuda" else {}

    size = args.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = Table(title=f"one batch of {size} covers on {name}")
    for column in ("step", "host ms", "device ms", "covers/s"):
        table.add_column(column, justify="right")
    for step, (host, whole) in steps.items():
        table.add_row(step, f"{host:.1f}", f"{whole:.1f}", f"{size / whole * 1e3:,.0f}")
    for step, whole in overlapped.items():
        table.add_row(step, "", f"{whole:.1f}", f"{size / whole * 1e3:,.0f}")
    Console().print(table)
    if candidate:
        print("float16 weights against float32 weights with autocast: " + ", ".join(
            f"{name} {value:.6f}" for name, value in candidate.items()))
    report = {"date": time.strftime("%Y-%m-%d"), "device": name, "batch_size": size, "batches": len(batches),
              "steps_ms": {step: {"host": round(h, 2), "device": round(d, 2)} for step, (h, d) in steps.items()},
              "overlapped_ms": {step: round(ms, 2) for step, ms in overlapped.items()},
              "float16_weights_against_autocast": candidate}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
