"""One GPU window: every stage of the GPU check in one call, most important first,
each under its own time limit, inside one total budget (run by benchmarks/gpu_check.sh).

A lent GPU comes with 15 minutes of device time in all (the machine's start
included) and at most 10 minutes per command, so the whole check is one command
of ~9 minutes that must return something useful whatever goes wrong in it:
  - the stages run in order of importance (``STAGES``), each in its own process
    group, killed at its own limit; a hang or crash in one costs only its slot;
  - the limits adapt: a stage gets min(its cap, what is left minus the minimums
    of the stages after it), at least its own minimum while that much is left
    (the earlier stage wins), and is skipped below that;
  - every stage writes its JSON row by row under $OUT, and this script rewrites
    $OUT/window.json after each stage and copies all output to $OUT/window.log,
    so a call cut short still returns everything before the cut;
  - the smoke stage runs each launch path once at a small shape before anything
    is timed: if the cooperative split path hangs or computes wrong numbers there,
    the later stages run with ``--knobs _ROW_PATH=twopass`` instead of hanging too.
``--dry-run`` runs the same plan without a GPU: each stage's script parses its
arguments and prints what it would do, pytest only collects (tests/test_bench_harness.py).

    python3 benchmarks/gpu_window.py --budget-s 540 [--only smoke,sweep,ce] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FALLBACK_KNOBS = "_ROW_PATH=twopass"   # no cooperative launch: the path with no grid-wide wait


DRY_RUN = ["--dry-run"]                   # a benchmark: parse, print the plan, write an empty JSON
COLLECT = ["--collect-only", "-qq"]       # pytest: collect (imports every test module), run nothing


@dataclass
class Stage:
    """One step of the window.  ``argv(ctx, budget_s)`` is its command line, given the
    seconds its script may plan for (its limit minus ``margin_s``: start-up, the last
    row, the exit); its dry run is the same command line plus ``dry``."""
    name: str
    cap_s: float
    min_s: float
    argv: Callable[["Ctx", int], list]
    dry: list
    margin_s: float = 0.0
    env: dict = field(default_factory=dict)
    table: Callable[["Ctx"], list] | None = None   # prints its result as the summary's part


@dataclass
class Ctx:
    out: Path
    python: str
    knobs: str = ""                 # launch knobs every benchmark applies (the smoke's fallback)
    notes: list = field(default_factory=list)


def _py(ctx, script, *args):
    return [ctx.python, str(BENCH / script), *args]


def _bench(ctx, script, budget, name, *args):
    """A benchmark writing $OUT/<name>.json, with the run's knobs."""
    knobs = ["--knobs", ctx.knobs] if ctx.knobs else []
    return _py(ctx, script, "--budget-s", str(budget), "--json", str(ctx.out / f"{name}.json"), *args, *knobs)


def _table(script, name, *args):
    return lambda ctx: _py(ctx, script, *args, "--print-table", str(ctx.out / f"{name}.json"))


def _pytest(ctx, *args):
    return [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def _have(python: str, module: str) -> bool:
    """Whether ``python`` can import ``module`` (pytest plugins: an unknown option aborts pytest)."""
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def _per_test(ctx, seconds: int) -> list:
    # a per-test limit where pytest-timeout is there: one hung test then fails, the rest run
    return [f"--timeout={seconds}"] if _have(ctx.python, "pytest_timeout") else []


GPU_TESTS = ["tests/gpu/test_gpu_lean_launch.py", "tests/gpu/test_gpu_triton.py", "tests/gpu/test_gpu_linear.py",
             "tests/gpu/test_gpu_logprobs.py", "tests/gpu/test_gpu_compile.py", "tests/gpu/test_gpu_autocast.py",
             "tests/gpu/test_gpu_paths.py", "tests/test_autocast.py"]   # (the last: its CUDA cases run where a GPU is)
# 1336 small differential cases: host-bound, so several pytest workers share the GPU
PARITY_WORKERS = 6
# The GPU tier compiles ~210 Triton kernels on a cold cache (one launch path, dtype and
# option set each), CPU-bound work that one pytest process did serially past its 130 s:
# several workers compile side by side (16 cores) and share the on-disk Triton cache.
GPU_TEST_WORKERS = 8


def _workers(ctx, n: int) -> list:
    return ["-n", str(n)] if _have(ctx.python, "xdist") else []

STAGES = [
    Stage("smoke", 75, 30, lambda c, b: _py(c, "gpu_sweep.py", "--smoke", "--json", str(c.out / "gpu_smoke.json")),
          DRY_RUN),
    Stage("sweep", 90, 30, lambda c, b: _bench(c, "gpu_sweep.py", b, "gpu_sweep"), DRY_RUN, margin_s=20,
          table=_table("gpu_sweep.py", "gpu_sweep")),
    Stage("ce", 170, 60, lambda c, b: _bench(c, "gpu_bench.py", b, "gpu_bench", "--profile", "--tuning",
                                             str(c.out / "gpu_sweep.json")),
          DRY_RUN, margin_s=30, table=_table("gpu_bench.py", "gpu_bench", "--targets-only")),
    # --profile: where compact's wall time beyond its kernels goes (idle gaps, Chrome traces)
    Stage("linear", 170, 60, lambda c, b: _bench(c, "gpu_linear_bench.py", b, "gpu_linear_bench", "--profile"),
          DRY_RUN, margin_s=30, table=_table("gpu_linear_bench.py", "gpu_linear_bench", "--targets-only")),
    # launch dispatch on the real GPU: Triton's JIT vs crossent's lean path (the host-overhead target)
    Stage("dispatch", 45, 20, lambda c, b: _py(c, "gpu_host.py", "--dispatch"), ["--help"]),
    # (each worker compiles inductor's kernels in-process: no pool of compile processes per worker)
    Stage("tests-gpu", 130, 40,
          lambda c, b: _pytest(c, "--maxfail=20", "-rfE", "--durations=5", *_per_test(c, 90),
                               *_workers(c, GPU_TEST_WORKERS), *GPU_TESTS),
          COLLECT, env={"TORCHINDUCTOR_COMPILE_THREADS": "1"}),
    Stage("tests-parity", 120, 40,
          lambda c, b: _pytest(c, "--maxfail=25", "-rfE", *_per_test(c, 60), *_workers(c, PARITY_WORKERS),
                               "tests/test_parity.py"),
          # auto: the triton backend on CUDA, what users get (tests/conftest.py defaults the suite to
          # the torch backend; run 1 ran parity that way on CUDA: 1336 passed)
          COLLECT, env={"CROSSENT_TEST_DEVICE": "cuda", "CROSSENT_BACKEND": "auto"}),
    # the vocab-parallel and DTensor gloo cases on CUDA tensors (two ranks share the GPU),
    # the two launches side by side; each kills its ranks at its own deadline (45 s)
    # before the per-test limit, and reports where they were
    Stage("tests-dist", 75, 25, lambda c, b: _pytest(c, *_per_test(c, 60), *_workers(c, 2), "-k", "2",
                                                     "tests/gpu/test_gpu_distributed.py"), COLLECT),
]


# ----------------------------------------------------------------------------- running a stage

def limit(stages: list, i: int, left: float) -> float:
    """Seconds stage i may run when ``left`` seconds remain: its cap, less the minimums
    of the stages after it, but at least its own minimum; 0 (skip) below that minimum."""
    st = stages[i]
    if left < st.min_s:
        return 0.0
    reserve = sum(s.min_s for s in stages[i + 1:])
    return min(st.cap_s, left, max(st.min_s, left - reserve))


def _compiled(cache: str | None) -> int | None:
    """Kernels in the Triton cache (one folder each): the difference across a stage is what it compiled."""
    if not cache or not os.path.isdir(cache):
        return None
    return sum(1 for e in os.scandir(cache) if e.is_dir())


def run(argv: list, timeout_s: float, log, env: dict) -> tuple[str, int | None]:
    """(status, exit code) of argv, its output copied line by line to stdout and ``log``;
    at ``timeout_s`` its whole process group (pytest workers, benchmark subprocesses) is
    sent SIGTERM, then SIGKILL 5 s later."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)

    def copy():
        for line in iter(proc.stdout.readline, b""):
            text = line.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)
            log.flush()
    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else "failed"
        try:   # what it left running (a worker, a rank) must not hold the GPU in the next stage
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        rc, status = proc.poll(), "timeout"
    reader.join(timeout=5)   # a process that left the group may hold the pipe: don't wait for it
    return status, rc


def _smoke_fallback(ctx: Ctx, status: str) -> None:
    """After the smoke stage: the later benchmarks avoid the split path if it hung or was wrong."""
    bad = []
    path = ctx.out / "gpu_smoke.json"
    if path.exists():
        try:
            rows = json.loads(path.read_text()).get("rows", [])
        except ValueError:
            rows = []
        bad = [r for r in rows if r.get("path") in ("split", "cluster") and not r.get("ok", True)]
    if status == "timeout" or bad:
        what = "timed out" if status == "timeout" else "; ".join(f"{r['check']}: {r.get('error') or 'wrong'}"
                                                                 for r in bad)
        ctx.knobs = ",".join(k for k in (ctx.knobs, FALLBACK_KNOBS) if k)
        ctx.notes.append(f"smoke: split path {what}; later benchmarks run with --knobs {ctx.knobs}")
        print(f"== {ctx.notes[-1]} ==", flush=True)


def run_plan(stages: list, ctx: Ctx, budget_s: float, dry_run: bool = False, log_name="window.log") -> list:
    """Run the stages in order inside budget_s seconds; returns (and writes to
    $OUT/window.json after each stage) one row per stage."""
    t_end = time.time() + budget_s
    cache = os.environ.get("TRITON_CACHE_DIR")
    rows: list = []
    ctx.out.mkdir(parents=True, exist_ok=True)
    meta = dict(budget_s=budget_s, dry_run=dry_run, stages=[(s.name, s.cap_s, s.min_s) for s in stages])
    with open(ctx.out / log_name, "a") as log:
        for i, st in enumerate(stages):
            left = t_end - time.time()
            t = limit(stages, i, left)
            row = dict(stage=st.name, limit_s=round(t), left_s=round(left))
            if t <= 0:
                row.update(status="skipped", note=f"{left:.0f} s left, needs {st.min_s:.0f}")
            else:
                argv = st.argv(ctx, max(1, int(t - st.margin_s))) + (st.dry if dry_run else [])
                head = f"== stage {st.name}: limit {t:.0f} s of {left:.0f} s left ==\n$ {' '.join(argv)}\n"
                print(head, end="", flush=True)
                log.write(head)
                log.flush()
                before, t0 = _compiled(cache), time.time()
                status, rc = run(argv, t, log, st.env)
                after = _compiled(cache)
                row.update(status=status, rc=rc, seconds=round(time.time() - t0, 1), argv=argv,
                           compiled=None if before is None or after is None else after - before)
                if st.name == "smoke" and not dry_run:
                    _smoke_fallback(ctx, status)
            rows.append(row)
            print(f"== stage {st.name}: {row['status']} ({row.get('seconds', 0)} s) ==", flush=True)
            (ctx.out / "window.json").write_text(json.dumps(dict(meta=meta, notes=ctx.notes, stages=rows),
                                                            indent=1) + "\n")
    return rows


def summary(stages: list, rows: list, ctx: Ctx) -> None:
    """The stages' outcomes, then each stage's own short table (targets with PASS/FAIL),
    last: the device tool returns the end of the output."""
    by_name = {s.name: s for s in stages}
    for r in rows:
        st = by_name[r["stage"]]
        argv = st.table(ctx) if st.table else None
        if argv and Path(argv[-1]).exists():   # the stage's JSON: rows written before any cut
            print(flush=True)
            try:   # after the budget: short, so that the call stays inside the device tool's limit
                subprocess.run(argv, cwd=ROOT, timeout=20)
            except subprocess.TimeoutExpired:
                print(f"{st.name}: its table took over 20 s")
    print("\n== window summary ==")
    print(f"{'stage':14} {'status':8} {'seconds':>8} {'limit':>6} {'compiled':>8}  note")
    for r in rows:
        comp = "-" if r.get("compiled") is None else str(r["compiled"])
        print(f"{r['stage']:14} {r['status']:8} {r.get('seconds', 0):8.0f} {r['limit_s']:6d} {comp:>8}  "
              f"{r.get('note', '')}")
    for n in ctx.notes:
        print(f"note: {n}")
    print(f"files under {ctx.out}: " + " ".join(sorted(p.name for p in ctx.out.iterdir() if p.is_file())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for all stages together")
    ap.add_argument("--only", default=None, help="comma-separated stages, in plan order (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: every stage's dry run, pytest collects")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench-results"))
    args = ap.parse_args(argv)
    names = [s.name for s in STAGES]
    wanted = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages: {','.join(names)}")
    stages = [s for s in STAGES if s.name in wanted]
    ctx = Ctx(out=Path(args.out), python=sys.executable)
    for stale in ("window.json", "window.log", "gpu_smoke.json", "gpu_sweep.json", "gpu_bench.json",
                  "gpu_linear_bench.json"):
        (ctx.out / stale).unlink(missing_ok=True)
    print("plan: " + ", ".join(f"{s.name} <= {s.cap_s:.0f} s (min {s.min_s:.0f})" for s in stages)
          + f"; budget {args.budget_s:.0f} s")
    rows = run_plan(stages, ctx, args.budget_s, args.dry_run)
    summary(stages, rows, ctx)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
