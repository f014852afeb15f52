#!/usr/bin/env bash
# What a session with a lent GPU runs. Logs and result files go to $OUT (the device tool's return
# folder) when set, else bench/results: commit what it writes. Stages, in the order given:
#   tests      the test suite compiled for the GPU: correctness against cuDNN and fp64 references
#   headline   LSTM B=16 T=1024 H=768 fp16/bf16, persistent scheme; the persistent step's skeleton
#              (python -m bench.skeleton: L2 round trip, barrier, the exchanges of h with the barrier
#              and tagged, against the cost model's constants); the headline under the stepwise
#              scheme for comparison
#   grid       the full grid (persistent scheme)
#   drift      |h - h_fp64| over T=10,000 steps in fp16/bf16/fp32 (python -m bench.drift)
#   second_order  the headline shape at T=256: forward+backward and a gradient penalty (second
#              derivatives, against torch.nn without cuDNN, which refuses them)
#   partial    the headline's forward+backward with the backward summing parts instead of
#              gathering (FUSED_RNN_BACKWARD=partial): what the gathering backward gains
#   packed     the headline (fp16) with a PackedSequence of unequal lengths as both modules' input:
#              the kernels' lengths path against cuDNN's packed RNN, forward and forward+backward
#   short      LSTM and GRU at T=1 and 16 (B=16, H=256 and 768, fp16): where the host's work per
#              call, not the steps, sets the time (a decoder stepping a token at a time)
#   bash bench/gpu_session.sh                  the first four (may not fit one 10-minute call)
#   bash bench/gpu_session.sh tests headline   one call (at most 580 s of stages); then `... grid`
# Every stage runs under `timeout`, and each test under pytest-timeout where the machine has it, so
# a hung kernel costs minutes, not the session.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1   # the GPU machine reaches no package index: run from the checkout
# The device tool brings back at most 8 files from $OUT: there the logs stay in $OUT and the result
# files (JSON, PNG) go to a folder packed into $OUT/results.tgz after every step, so that a step
# cut off by the call's limit leaves the results of those before it.
results="$out"
[[ -n "${OUT:-}" ]] && results="$(mktemp -d)"
pack() { [[ "$results" == "$out" ]] || tar czf "$out/results.tgz" -C "$results" .; }
# The tests leave out the compile checks (tests/test_compiled_kernels.py), CPU work that CI does; a
# test that hangs fails alone after 180 s.
per_test_timeout=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 180 --timeout-method thread")

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
for stage in "${@:-tests headline grid drift}"; do
    for step in $stage; do
        case "$step" in
            tests)
                # test_gpu.py first, so that a stage cut off by its timeout has run it; 8 workers, each
                # computing its float64 references with 2 CPU threads, not 16.
                OMP_NUM_THREADS=2 timeout 330 python3 -m pytest -n 8 -rs -q $per_test_timeout tests/test_gpu.py \
                    $(ls tests/test_*.py | grep -v -e test_gpu.py -e test_compiled_kernels.py) 2>&1 \
                    | tee "$out/gpu-tests.log" | tail -n 40 ;;
            headline)
                timeout 100 python3 -m bench --headline --no-progress --out "$results" 2>&1 | tee "$out/bench-headline.log" | tail -n 12
                pack
                timeout 60 python3 -m bench.skeleton --out "$results" 2>&1 | tee "$out/skeleton.log" | tail -n 18
                pack
                FUSED_RNN_SCHEME=stepwise timeout 90 python3 -m bench --headline --no-progress --out "$results" 2>&1 \
                    | tee "$out/bench-headline-stepwise.log" | tail -n 12 ;;
            grid)
                timeout 540 python3 -m bench --no-progress --out "$results" 2>&1 | tee "$out/bench-grid.log" | tail -n 60 ;;
            drift)
                timeout 300 python3 -m bench.drift --out "$results" 2>&1 | tee "$out/drift.log" | tail -n 20 ;;
            second_order)
                timeout 240 python3 -m bench --headline --seq 256 --mode forward_backward gradient_penalty \
                    --no-progress --out "$results" 2>&1 | tee "$out/bench-second-order.log" | tail -n 8 ;;
            partial)
                FUSED_RNN_BACKWARD=partial timeout 120 python3 -m bench --headline --mode forward_backward \
                    --no-progress --out "$results" 2>&1 | tee "$out/bench-headline-partial.log" | tail -n 8 ;;
            packed)
                timeout 120 python3 -m bench --headline --dtype float16 --mode packed_forward packed_forward_backward \
                    --no-progress --out "$results" 2>&1 | tee "$out/bench-headline-packed.log" | tail -n 8 ;;
            short)
                timeout 150 python3 -m bench --batch 16 --hidden 256 768 --seq 1 16 --dtype float16 \
                    --no-progress --out "$results" 2>&1 | tee "$out/bench-short.log" | tail -n 24 ;;
            *)
                echo "unknown stage: $step (tests, headline, grid, drift, second_order, partial, packed, short)"; exit 2 ;;
        esac
        pack
    done
done
