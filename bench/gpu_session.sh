#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in one device call: the test suite compiled for the
# GPU (correctness against cuDNN and fp64 references), then the benchmark. Logs and result files
# go to $OUT (the device tool's return folder) when set, else bench/results: commit what it writes.
#   bash bench/gpu_session.sh          tests + headline + full grid
#   bash bench/gpu_session.sh quick    tests + headline only
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1   # the GPU machine reaches no package index: run from the checkout

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -m pytest -n 8 -rs tests 2>&1 | tee "$out/gpu-tests.log" | tail -n 40
python3 -m bench --headline --out "$out" 2>&1 | tee "$out/bench-headline.log" | tail -n 20
if [ "${1:-}" != quick ]; then
    python3 -m bench --out "$out" 2>&1 | tee "$out/bench-grid.log" | tail -n 60
fi
