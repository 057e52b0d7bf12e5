"""Fetching covers over http: the embed job's reader (a batch's covers fetched concurrently, one
`read_all` call) against one request at a time, on the demo covers served from this machine with
an added per-request latency standing in for a remote image server.

    python benchmarks/remote_covers.py [--covers 256] [--latency-ms 0 20 100]

Prints a table and writes JSON (default benchmarks/out/remote_covers.json). Both sides fetch the
same bytes from the same server; only the fetching differs. Covers/s here is per reader process.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vsearch.embeddings.datasets import open_dataset
from vsearch.embeddings.media import MediaError, read_all, read_bytes
from vsearch.workspace import Workspace


class SlowServer(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 would make the server the bottleneck
    daemon_threads = True
    latency = 0.0


class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(self.server.latency)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


def covers_per_second(fetch, urls: list[str]) -> float:
    started = time.perf_counter()
    fetch(urls)
    return len(urls) / (time.perf_counter() - started)


def one_at_a_time(urls: list[str]) -> None:
    for url in urls:
        read_bytes(url)


def batched(size: int):
    def fetch(urls: list[str]) -> None:
        for start in range(0, len(urls), size):
            if any(isinstance(data, MediaError) for data in read_all(urls[start:start + size])):
                raise SystemExit("a cover could not be fetched")
    return fetch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covers", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256, help="covers per read_all call (the embed batch)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20, 100])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "remote_covers.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        demo = [row.uri for row in open_dataset("demo", Workspace.resolve(scratch)).rows()]
        for number in range(args.covers):
            shutil.copy(demo[number % len(demo)], Path(scratch) / f"{number}.jpg")
        server = SlowServer(("127.0.0.1", 0), functools.partial(Handler, directory=scratch))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        urls = [f"http://127.0.0.1:{server.server_port}/{number}.jpg" for number in range(args.covers)]
        read_all(urls[:2])  # warm-up: the http session
        for latency in args.latency_ms:
            server.latency = latency / 1000
            serial = covers_per_second(one_at_a_time, urls)
            together = covers_per_second(batched(args.batch_size), urls)
            rows.append({"latency_ms": latency, "one_at_a_time_covers_per_s": round(serial, 1),
                         "batched_covers_per_s": round(together, 1), "ratio": round(together / serial, 2)})
        server.shutdown()

    table = Table(title=f"fetching {args.covers} covers over http, one reader, batches of {args.batch_size}")
    for column in ("latency ms", "one at a time, covers/s", "batched (vsearch), covers/s", "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['latency_ms']:g}", f"{row['one_at_a_time_covers_per_s']:,.0f}",
                      f"{row['batched_covers_per_s']:,.0f}", f"{row['ratio']:.1f}x")
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "covers": args.covers,
                                    "batch_size": args.batch_size, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
