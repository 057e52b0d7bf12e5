#!/usr/bin/env bash
# Wheels that a lent GPU machine lacks, for its Python 3.12 (it has torch, torchvision, transformers,
# pyarrow, typer, rich, fsspec, pillow, timm; nothing can be downloaded there). A call carries at
# most 64 MiB with the working tree, so they come in two sets:
#   .whl-embed/  open_clip_torch, ftfy, wcwidth, av                  embed, clips included
#   .whl-index/  open_clip_torch, ftfy, wcwidth, faiss-cpu, duckdb,  everything but clips: embed (covers),
#                hnswlib's source (no wheels on PyPI; built there,   build-index, query, bench, and
#                for that machine's CPU: it compiles with -march=native)  benchmarks/{embed_throughput,
#                                                                    rerank_latency,query_latency}.py
# Usage: scripts/device_wheels.sh [PYTHON]   (any Python with pip: it fetches for 3.12; DEVELOPERS.md, "Measuring on a lent GPU")
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
download() {
  local into=$1; shift
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$into" "$@"
}
rm -rf .whl-embed .whl-index
download .whl-embed open_clip_torch ftfy wcwidth av
download .whl-index open_clip_torch ftfy wcwidth faiss-cpu duckdb
"$python" -m pip download -q --no-deps --no-binary=hnswlib -d .whl-index hnswlib
du -sh .whl-embed .whl-index
