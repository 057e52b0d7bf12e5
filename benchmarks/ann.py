"""ANN benchmark: recall@1/10/100 against exact search, QPS and single-query latency over sweeps
of ef_search and nprobe, build time, peak memory and size, for flat, hnsw (hnswlib and faiss)
and ivfpq, plus vsearch's search against the raw library call.

    python benchmarks/ann.py [--sizes 100000,1000000] [--dim 512] [--queries 1000] [--embeddings DIR]

The same as `vsearch bench` (all options: `vsearch bench -h`); writes benchmarks/out/ann.{json,md,png}.
"""

import sys

from vsearch.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
