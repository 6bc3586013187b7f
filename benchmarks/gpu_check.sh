#!/usr/bin/env bash
# The GPU check in one call of < 10 minutes (a lent GPU: 15 minutes of device time in all).
# Runs from the repo root on a machine with an NVIDIA GPU, torch + Triton preinstalled and
# no network; peers (liger-kernel, cut-cross-entropy) travel as wheels in .whl/.
#
#   bash benchmarks/gpu_check.sh [window|perf] [--dry-run] [--only STAGE,...]
#
# window (default): benchmarks/gpu_window.py runs, most important first and each under its
# own limit inside GPU_CHECK_BUDGET_S (default 540 s, so that the device tool's 600 s
# limit is never reached): smoke (each launch path once, features, peers' imports),
# the knob sweep, the CE/softmax benchmark (its bandwidth targets), the linear CE benchmark
# (its matmul-floor targets), the launch dispatch timing, the GPU tests, the parity suite on CUDA and the
# gloo-on-CUDA tests.  perf: only smoke, sweep, ce and dispatch.  --dry-run: the same plan
# without a GPU (each stage parses its arguments and prints its plan; pytest collects).
# Results under $OUT (default ./bench-results): window.log (all output), window.json (one
# row per stage), gpu_smoke.json, gpu_sweep.json, gpu_bench.json, gpu_linear_bench.json;
# the summary with every target's PASS/FAIL is printed last.
set -u
SECONDS=0
TOTAL=${GPU_CHECK_BUDGET_S:-540}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=window
[ "${1:-}" = window ] || [ "${1:-}" = perf ] && { MODE=$1; shift; }
ARGS=("$@")
[ "$MODE" = perf ] && ARGS+=(--only smoke,sweep,ce,dispatch)
OUT=${OUT:-$PWD/bench-results}
mkdir -p "$OUT"
dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done

if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    # one wheel at a time: a wheel that fails to install is reported and the others still go in
    for w in .whl/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$w" || echo "peer wheel $w: install failed (its rows will say so)"
    done
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
# Compiled kernels kept under the git-ignored bench-results/: a second call on the same warm
# machine (it stays warm ~30 s) compiles nothing again; window.json counts each stage's compiles.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/bench-results/triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/bench-results/inductor-cache}
mkdir -p "$TRITON_CACHE_DIR"
unset TRITON_INTERPRET CROSSENT_BACKEND

if [ "$dry" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
    git log -1 --format='commit %H %cd' 2>/dev/null || true
fi
OUT=$OUT exec "$PY" benchmarks/gpu_window.py --budget-s $((TOTAL - SECONDS)) "${ARGS[@]}"
