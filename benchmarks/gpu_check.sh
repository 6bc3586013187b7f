#!/usr/bin/env bash
# GPU check: GPU test tier, then the GPU benchmark.  Runs from the repo root on a
# machine with an NVIDIA GPU, torch + triton preinstalled, and no network.
# Results: $OUT/gpu_bench.json (OUT defaults to ./bench-results).  Budget: < 8 min.
set -u
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then   # peers (liger-kernel, cut-cross-entropy) travel as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-$PWD/bench-results}
mkdir -p "$OUT"
unset TRITON_INTERPRET CROSSENT_BACKEND

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== GPU tests =="
tests="tests/gpu"
[ -f tests/test_parity.py ] && tests="$tests tests/test_parity.py"
timeout 200 python3 -m pytest -q --maxfail=10 -p no:cacheprovider $tests 2>&1 | tail -25
test_rc=${PIPESTATUS[0]}
echo "tests exit code: $test_rc"

echo "== GPU benchmark =="
timeout 270 python3 benchmarks/gpu_bench.py --budget-s 210 --json "$OUT/gpu_bench.json"
bench_rc=$?
echo "bench exit code: $bench_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
