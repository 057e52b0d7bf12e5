#!/usr/bin/env bash
# The checks still owed on a lent GPU machine, as one call that fits a session's 15 minutes of device
# time (a start takes one or two): the embed job end to end against the model alone (issue 3: at
# least 4,000 covers/s and 90% of model-only on an H100, about 2 minutes), then the default HNSW
# graph grown to 1.5M a step at a time by hnswlib's own calls and as vsearch builds it, each with its
# time at 10M estimated from its steps (issue 4: at most 20 minutes on 16 cores; about 4 minutes). A
# 10M build itself takes longer than a session's device time. DEVELOPERS.md, "Measuring on a lent
# GPU", says more.
#
#   scripts/device_wheels.sh                                # here, once: makes .whl-index/
#   run(command="bash scripts/device_check.sh", carry=[".whl-index"], timeout_s=560)
#   run(command="bash scripts/device_check.sh growth")      # one part again, while the machine is warm
#
# Parts: machine, embed, growth (default: all three). Each runs under its own time limit, so one that
# hangs leaves the others their time. Everything lands in $OUT (or benchmarks/out/device): log.txt,
# machine.txt, embed.json, growth.json. The sizes can be set for a trial run on a CPU, e.g.
#   DEVICE=cpu COVERS=16 BATCH=8 WORKERS=1 COUNT=4000 STEP=1000 PYTHON=.venv/bin/python scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
parts=${*:-machine embed growth}
for name in $parts; do
  case $name in machine | embed | growth) ;; *) echo "device_check: unknown part $name: use machine, embed or growth"; exit 2 ;; esac
done
out=${OUT:-benchmarks/out/device}
python=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 COLUMNS=${COLUMNS:-160}  # tables as wide as their columns in the log

# The machine has torch, transformers and pyarrow; faiss, hnswlib, duckdb and open_clip come as wheels
# (hnswlib as source, built there for its CPU), installed once while the machine stays warm.
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl-index ] && ! "$python" -c "import faiss, hnswlib, open_clip, duckdb" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl-index/*.whl &&
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl-index/hnswlib-*.tar.gz ||
    { echo "device_check: installing .whl-index failed"; exit 1; }
fi

part() {  # part NAME SECONDS COMMAND...: run one part under its limit and say how it ended
  local name=$1 limit=$2 began=$SECONDS status
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@"
  status=$?
  echo "== $name: exit $status after $((SECONDS - began)) s"
  failed=$((failed + (status != 0)))
}

machine() {  # what the figures depend on: the cores and their cache, huge pages, the GPU, the disk
  date -u; uname -r; nproc; free -g; df -h .
  lscpu | grep -E "Model name|Thread|Core|Socket|NUMA|L3"
  echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "no nvidia-smi"; fi
}

failed=0
for name in $parts; do
  case $name in
    machine) echo "== machine"; machine 2>&1 | tee "$out/machine.txt" ;;
    embed) part embed 200 "$python" benchmarks/embed_throughput.py --device "${DEVICE:-cuda}" \
             --covers "${COVERS:-60000}" --batch-size "${BATCH:-512}" --workers "${WORKERS:-15}" --decode both \
             --out "$out/embed.json" ;;
    growth) part growth 330 "$python" benchmarks/hnsw_growth.py --count "${COUNT:-1500000}" --step "${STEP:-250000}" \
              --engines hnswlib,vsearch --graphs 32/200 --extrapolate 10000000 --out "$out/growth.json" ;;
  esac
done
exit $((failed > 0))
