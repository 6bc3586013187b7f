"""What the GPU benchmarks share (gpu_bench.py, gpu_linear_bench.py, gpu_sweep.py).

Timing (CUDA events, CUDA graph replay, copy bandwidth), the run's state (time budget,
JSON path, environment stamp) and its rows (recorded one by one, the JSON rewritten
after each, so that a run cut short keeps every row before the cut), the options and
the two-pass plan both benchmarks take, and the triton backend's launch knobs.
Importing it puts the tree's src/ first on the path.  gpu_window.py does not import it:
the window runs these scripts as stages and imports no torch itself, so that a torch
that fails to import ends its stages, not the window and its report.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The benchmark shapes of gpu_bench.py, which gpu_sweep.py tunes the launch knobs for.
CE_SHAPES = [(8192, 32000), (8192, 128256), (16384, 256000)]
SM_SHAPES = [(8192, 128256)]
GiB = 1 << 30
COMPILE_LEFT_S = 60.0        # torch.compile spends tens of seconds compiling: only start it with this left
DEADLINE = [float("inf")]    # time.time() after which remaining providers are skipped
OUT_PATH = [None]            # the run's JSON, rewritten after every row
META: dict = {}              # the run's stamp, written into every row of the JSON


class Skip(Exception):
    """A provider not run (not installed, no room, no time): its row's error is the message alone."""


# ----------------------------------------------------------------------------- timing

def _q(xs, q):
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bench(fn, prep=None, iters=20, warmup=3):
    """fn(state) timed with CUDA events; prep() -> state runs outside the timed region.
    host_ms: the median time fn() took to return (to enqueue its work): near median_ms,
    the step is host-bound and the GPU waits on Python."""
    for _ in range(warmup):
        fn(prep() if prep else None)
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(iters):
        st = prep() if prep else None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn(st)
        host.append((time.perf_counter() - t0) * 1e3)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        del st
    st = prep() if prep else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(st)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / (1 << 20)
    del st
    return dict(median_ms=_q(times, 0.5), p10_ms=_q(times, 0.1), p90_ms=_q(times, 0.9),
                host_ms=_q(host, 0.5), extra_mib=extra)


def graph_ms(fn, iters=20, warmup=3):
    """Mean ms of fn() replayed from a CUDA graph (kernel time, no host overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):   # warm-up off the capture: compiles, caches, allocator pools
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def kernel_ms(fn, iters=20):
    """(ms, how): graph_ms, or, where fn cannot be captured in a CUDA graph, the mean over a
    burst of eager calls between two events (asynchronous launches: kernel time dominates
    at the benchmark shapes)."""
    try:
        return graph_ms(fn, iters), "graph"
    except Exception:  # noqa: BLE001 - e.g. a launch kind that stream capture refuses
        torch.cuda.synchronize()
        fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / iters, "events"


def copy_bandwidth(nbytes=4 * GiB):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    r = bench(lambda _: dst.copy_(src), iters=10, warmup=2)
    return 2 * nbytes / (r["median_ms"] * 1e-3) / 1e9   # GB/s, read + write


# ----------------------------------------------------------------------------- a provider's checks

def require_triton() -> None:
    """Raise unless crossent picks its triton backend for CUDA tensors (else the rows would time another)."""
    from crossent import backends
    if backends.select("cuda").name != "triton":
        raise RuntimeError("crossent does not select the triton backend on this device")


def left() -> float:
    """Seconds left of the run's budget."""
    return DEADLINE[0] - time.time()


def over_budget(compiles: bool) -> bool:
    """Whether a provider may no longer start (one that compiles needs COMPILE_LEFT_S left)."""
    return left() < (COMPILE_LEFT_S if compiles else 0)


def require_free(need: int, exc=Skip) -> None:
    """Raise ``exc`` where the GPU has less than ``need`` bytes free (a skip row, not an out-of-memory)."""
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        raise exc(f"skipped: needs ~{need / GiB:.0f} GiB, {free / GiB:.0f} GiB free")


def failed(row: dict, e: Exception, where: str) -> None:
    """``e`` as the row's error (a Skip: its message alone), also on stderr; with
    GPU_BENCH_TRACE set, an unexpected error's traceback too."""
    row["error"] = str(e) if isinstance(e, Skip) else f"{type(e).__name__}: {e}"
    print(f"[{where}] {row['error']}", file=sys.stderr)
    if os.environ.get("GPU_BENCH_TRACE") and not isinstance(e, Skip):
        traceback.print_exc()


# ----------------------------------------------------------------------------- rows and the JSON

def write_json(path, doc) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def flush(rows) -> None:
    """Rewrite the run's JSON: every row so far, with the run's stamp."""
    if OUT_PATH[0]:
        write_json(OUT_PATH[0], [{**r, **META} for r in rows])


def record(rows, row, fmt) -> None:
    """Add a row: printed as ``fmt`` formats it, and written to the JSON."""
    rows.append(row)
    print(fmt(row), flush=True)
    flush(rows)


def guarded(run, op, shape, rows, *args, fmt):
    """run(*args) with an error of the shape itself (out of memory allocating its inputs,
    a CUDA error) recorded as a row instead of ending the benchmark."""
    try:
        run(*args)
    except Exception as e:  # noqa: BLE001
        record(rows, dict(op=op, provider="(shape)", shape=shape, dtype="bfloat16",
                          error=f"{type(e).__name__}: {e}"), fmt)
        torch.cuda.empty_cache()


def grouped(rows, key=lambda r: (r["op"], r["shape"])):
    """rows ordered by their group's first appearance (a second pass appends to earlier shapes)."""
    first: dict = {}
    for i, r in enumerate(rows):
        first.setdefault(key(r), i)
    return sorted(rows, key=lambda r: first[key(r)])


def stamp():
    # The device machine gets a copy of the working tree whose .git can be an older snapshot
    # (H100 run 2 read the previous run's commit there): the commit the caller names wins.
    commit = os.environ.get("GPU_CHECK_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except Exception:
            commit = None
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = None
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=tv,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=commit)


def print_stamp(rows) -> None:
    """Card, versions, commit, date (and copy bandwidth) of a run, from its first row's stamp."""
    r = rows[0] if rows else {}
    if r.get("device"):
        bw = f"  copy {r['copy_gbps']:.0f} GB/s" if "copy_gbps" in r else ""
        print(f"{r['device']}  torch {r.get('torch')}  triton {r.get('triton')}  "
              f"commit {str(r.get('git_commit'))[:12]}  {r.get('date')}{bw}")


# ----------------------------------------------------------------------------- a run

def common_args(doc: str, iters: int, budget_s: float, quick_help: str) -> argparse.ArgumentParser:
    """The options both GPU benchmarks take (gpu_bench.py and gpu_linear_bench.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=None, help="write rows here (default: $OUT or ./bench-results)")
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--skip", default="", help="comma-separated providers to skip")
    ap.add_argument("--budget-s", type=float, default=budget_s,
                    help="skip providers not started within this many seconds (rows say so)")
    ap.add_argument("--print-table", metavar="JSON", default=None,
                    help="only print the table of a JSON written earlier (no GPU needed)")
    ap.add_argument("--targets-only", action="store_true", help="with --print-table: only the target rows")
    ap.add_argument("--knobs", default="", help="K=V,... triton launch knobs for the whole run")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print the plan, write an empty JSON")
    return ap


def parse(ap: argparse.ArgumentParser, argv, name: str) -> tuple:
    """(args, the JSON path: --json, else $OUT or ./bench-results/<name>.json, the providers to skip)."""
    args = ap.parse_args(argv)
    out = args.json or str(Path(os.environ.get("OUT") or ROOT / "bench-results") / f"{name}.json")
    return args, out, {s.strip() for s in args.skip.split(",") if s.strip()}


def read_json(path):
    return json.loads(Path(path).read_text())


def passes(skip: set, names, deferred) -> list:
    """The providers' skip sets of the two passes: every provider but ``deferred``, then those."""
    names = set(names)
    out = [skip | set(deferred), skip | (names - set(deferred))]
    return [s for s in out if names - s]


def dry_run(args, out, skip, names, shapes, deferred) -> int:
    """The run's plan, without a GPU: what each pass would run; the JSON path is written (empty)."""
    for i, s in enumerate(passes(skip, names, deferred)):
        print(f"pass {i + 1}: {', '.join(n for n in names if n not in s)} at {', '.join(shapes)}")
    print(f"budget {args.budget_s:.0f} s, iters {args.iters}, knobs {parse_knobs(args.knobs) or 'defaults'}")
    write_json(out, [])
    return 0


def start(args, out) -> float:
    """A run begins: its launch knobs set, its budget and JSON path, META stamped; returns its start time."""
    apply_knobs(parse_knobs(args.knobs))
    t0 = time.time()
    DEADLINE[0] = t0 + args.budget_s
    OUT_PATH[0] = out
    META.update(stamp())
    return t0


def finish(rows, out, t0) -> None:
    """The run's last JSON write, and where it went."""
    flush(rows)
    print(f"wrote {len(rows)} rows to {out} in {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------- accuracy (gpu_linear_bench.py)

@torch.no_grad()
def linear_ce_reference(h, W, t, chunk_bytes=2 * GiB):
    """(loss, dh, dW) of mean cross_entropy(h @ W.T, t), computed in float64 in row chunks
    (the issue's reference) and kept in fp32: that rounding (6e-8 relative) is nothing next
    to the bf16 errors it judges (~2e-3), and an fp32 copy leaves the other providers the
    memory they had.  Transient peak: W and dW in fp64 plus one chunk of logits."""
    N, D = h.shape
    V = W.shape[0]
    f64 = torch.float64
    Wd = W.to(f64)
    dW = torch.zeros_like(Wd)
    dh = torch.empty(N, D, dtype=torch.float32, device=h.device)
    loss = torch.zeros((), dtype=f64, device=h.device)
    step = max(1, chunk_bytes // (V * 8))
    for c0 in range(0, N, step):
        c1 = min(N, c0 + step)
        hc, tc = h[c0:c1].to(f64), t[c0:c1]
        z = hc @ Wd.T
        lse = torch.logsumexp(z, 1)
        loss += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
        p = z.sub_(lse[:, None]).exp_()
        p[torch.arange(c1 - c0, device=h.device), tc] -= 1
        p.div_(N)
        dh[c0:c1] = p @ Wd
        dW.addmm_(p.t(), hc)
        del z, p
    del Wd
    return (loss / N).float(), dh, dW.float()


@torch.no_grad()
def rel_err(a, ref, rows=1 << 15):
    """max|a - ref| / max|ref|, in row blocks (no full-size fp32 temporaries)."""
    num = torch.zeros((), device=ref.device)
    den = torch.zeros((), device=ref.device)
    for r0 in range(0, ref.shape[0], rows):
        r = ref[r0:r0 + rows]
        num = torch.maximum(num, (a[r0:r0 + rows].float() - r).abs().max())
        den = torch.maximum(den, r.abs().max())
    return (num / den).item()


# ----------------------------------------------------------------------------- launch knobs

def parse_knobs(spec: str) -> dict:
    """"_ROW_PATH=twopass,_SPLIT_WARPS=8" -> {"_ROW_PATH": "twopass", "_SPLIT_WARPS": 8}."""
    knobs = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"knob {item!r}: expected NAME=VALUE")
        try:
            knobs[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            knobs[name.strip()] = value.strip()   # a bare word: a string (twopass)
    return knobs


def apply_knobs(knobs: dict) -> None:
    """Set launch knobs of the triton backend for the rest of the run (ce.configure checks the names)."""
    if knobs:
        from crossent.backends.triton import ce
        ce.configure(**knobs)


def knob_values(names) -> dict:
    """The current values of the named knobs (each lives in ce or in split), to restore them after."""
    from crossent.backends.triton import ce, split
    return {k: getattr(split if hasattr(split, k) else ce, k) for k in names}
