#!/usr/bin/env bash
# GPU check: GPU test tier (tests/gpu, incl. test_gpu_linear.py, + tests/test_parity.py),
# then the cross-entropy benchmark, then the linear + cross-entropy benchmark.
# Runs from the repo root on a machine with an NVIDIA GPU, torch + triton
# preinstalled, and no network.  Results: $OUT/gpu_bench.json and
# $OUT/gpu_linear_bench.json (OUT defaults to ./bench-results); both tables are
# printed again at the end.
# Time: tests <= 170 s, gloo-on-CUDA tests <= 90 s, CE bench <= 180 s (providers start within 140 s), linear
# bench gets what is left of GPU_CHECK_BUDGET_S (default 555 s: < 9.5 min in all),
# at most 220 s, providers starting within its timeout minus 50 s.
#
# `bash benchmarks/gpu_check.sh perf`: perf first, for a short GPU window (< 9.5 min):
# the knob sweep (<= 170 s, best configuration per shape; $OUT/gpu_sweep.json),
# then the CE/softmax benchmark with those knobs, kernel-only rows (CUDA graph
# replay), the parts timed apart, targets with PASS/FAIL and a torch.profiler
# table (<= 200 s; $OUT/gpu_bench.json), then the Triton GPU tests and the
# parity suite on CUDA (<= 170 s).  No linear benchmark in this mode.
set -u
SECONDS=0
TOTAL=${GPU_CHECK_BUDGET_S:-555}
MODE=${1:-full}
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then   # peers (liger-kernel, cut-cross-entropy) travel as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-$PWD/bench-results}
mkdir -p "$OUT"
rm -f "$OUT/gpu_bench.json" "$OUT/gpu_linear_bench.json" "$OUT/gpu_sweep.json"   # no stale tables
unset TRITON_INTERPRET CROSSENT_BACKEND

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "$MODE" = "perf" ]; then
    echo "== sweep of the launch knobs =="
    timeout 170 python3 benchmarks/gpu_sweep.py --budget-s 140 --json "$OUT/gpu_sweep.json"
    sweep_rc=$?
    echo "sweep exit code: $sweep_rc (${SECONDS}s elapsed)"
    echo "== GPU benchmark: cross-entropy, softmax (sweep's best knobs) =="
    timeout 200 python3 benchmarks/gpu_bench.py --budget-s 150 --profile --tuning "$OUT/gpu_sweep.json" \
        --json "$OUT/gpu_bench.json"
    bench_rc=$?
    echo "bench exit code: $bench_rc (${SECONDS}s elapsed)"
    echo "== GPU tests (triton tier + parity on CUDA) =="
    tests="tests/gpu/test_gpu_triton.py"
    [ -f tests/test_parity.py ] && tests="$tests tests/test_parity.py"
    CROSSENT_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q --maxfail=10 -p no:cacheprovider \
        --durations=8 $tests 2>&1 | tail -40
    test_rc=${PIPESTATUS[0]}
    echo "== Summary (perf mode) =="
    echo "sweep $sweep_rc, CE bench $bench_rc, tests $test_rc; ${SECONDS}s"
    [ -f "$OUT/gpu_bench.json" ] && python3 benchmarks/gpu_bench.py --print-table "$OUT/gpu_bench.json"
    [ "$sweep_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
    exit $?
fi

echo "== GPU tests =="
tests="tests/gpu"
[ -f tests/test_parity.py ] && tests="$tests tests/test_parity.py"
# CROSSENT_TEST_DEVICE=cuda: the CPU differential suite (tests/test_parity.py) runs on the GPU too.
CROSSENT_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q --maxfail=10 -p no:cacheprovider --durations=8 \
    --ignore=tests/gpu/test_gpu_distributed.py $tests 2>&1 | tail -40
test_rc=${PIPESTATUS[0]}
echo "tests exit code: $test_rc (${SECONDS}s elapsed)"

# The vocab-parallel and DTensor gloo cases on CUDA tensors (two ranks sharing the GPU).
echo "== GPU distributed (gloo, CUDA tensors, world 2) =="
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_distributed.py -k 2 2>&1 | tail -15
dist_rc=${PIPESTATUS[0]}
echo "distributed exit code: $dist_rc (${SECONDS}s elapsed)"
test_rc=$(( test_rc != 0 ? test_rc : dist_rc ))

echo "== GPU benchmark: cross-entropy =="
timeout 180 python3 benchmarks/gpu_bench.py --budget-s 140 --json "$OUT/gpu_bench.json"
bench_rc=$?
echo "bench exit code: $bench_rc (${SECONDS}s elapsed)"

echo "== GPU benchmark: linear + cross-entropy =="
left=$((TOTAL - SECONDS))
lin_t=$(( left < 220 ? left : 220 ))
if [ "$lin_t" -ge 60 ]; then
    timeout "$lin_t" python3 benchmarks/gpu_linear_bench.py --budget-s $((lin_t - 50)) \
        --json "$OUT/gpu_linear_bench.json"
    lin_rc=$?
else
    echo "skipped: only ${left}s left of ${TOTAL}s"
    lin_rc=1
fi
echo "linear bench exit code: $lin_rc (${SECONDS}s elapsed)"

echo "== Summary =="
echo "tests $test_rc, CE bench $bench_rc, linear bench $lin_rc; ${SECONDS}s"
[ -f "$OUT/gpu_bench.json" ] && python3 benchmarks/gpu_bench.py --print-table "$OUT/gpu_bench.json"
[ -f "$OUT/gpu_linear_bench.json" ] && python3 benchmarks/gpu_linear_bench.py --print-table "$OUT/gpu_linear_bench.json"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$lin_rc" -eq 0 ]
