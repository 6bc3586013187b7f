"""GPU benchmark: bf16 cross-entropy fwd+bwd and softmax/log_softmax forward.

Providers: crossent (triton backend), crossent-inplace (inplace_backward=True),
torch eager, torch.compile, Liger (if importable).  Every provider is wrapped in
try/except: an error is printed and recorded, and the run goes on.

Timing: CUDA events around the op only (fresh input clones for providers that
overwrite their logits are made outside the timed region), warm-up, then the
median and p10/p90 over --iters iterations.  Extra peak memory: max allocated
during one call minus what was allocated before it (the inputs).
Floor: cross-entropy must read the logits and write the gradient (2 * N*V*2
bytes), softmax forward reads x and writes y; floor time = bytes / the
device-to-device copy bandwidth measured at the start of the same run.
Targets (issue 10), stated in each row with PASS/FAIL: crossent cross-entropy
<= 1.2x the floor; crossent softmax forward >= 85% of copy bandwidth.

Beside each eager crossent call: ``crossent-graph`` (the same fwd+bwd replayed
from a CUDA graph: kernel time without host overhead) and the parts timed apart
(``part:*``: the forward+gradient kernel alone, the backward's rescale with g == 1
and with g != 1), and the host overhead of tiny eager calls (op ``overhead``:
crossent <= torch + 20 us).  ``--profile`` prints a torch.profiler table of one crossent
step per shape.  ``--tuning gpu_sweep.json`` applies the sweep's best knobs per
shape before measuring crossent; ``--knobs K=V,...`` sets launch knobs for the whole run
(benchmarks/gpu_window.py passes ``_ROW_PATH=twopass`` when its smoke stage found the
split path hanging or wrong).

Order, for a short GPU window: every shape with crossent, torch eager and Liger first,
then torch.compile (``DEFERRED``: it spends tens of seconds compiling per shape) in a
second pass while the budget lasts; an error at one shape (out of memory at the largest)
is a row, and the next shape runs.

    python3 benchmarks/gpu_bench.py --json bench-results/gpu_bench.json
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (CE_SHAPES, META, SM_SHAPES, GiB, bench, common_args, copy_bandwidth,  # noqa: E402
                         dry_run, failed, finish, grouped, guarded, kernel_ms, knob_values, over_budget, parse,
                         passes, print_stamp, read_json, require_free, require_triton, start)
from _gpu_common import record as _record  # noqa: E402

DEFERRED = ("compile",)   # providers run in a second pass, after every shape's others


# ----------------------------------------------------------------------------- providers

def _crossent_ce(inplace=False):
    import crossent
    require_triton()
    return lambda x, y: crossent.cross_entropy(x, y, inplace_backward=inplace)


def _liger_ce():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        return lambda x, y: liger_cross_entropy(x, y)
    except ImportError:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        return LigerCrossEntropyLoss()


def ce_providers():
    return {
        # name: (factory, overwrites its logits?, eager-like memory?)
        "crossent": (lambda: _crossent_ce(False), False, False),
        "crossent-inplace": (lambda: _crossent_ce(True), True, False),
        "torch": (lambda: F.cross_entropy, False, True),
        "compile": (lambda: torch.compile(F.cross_entropy, dynamic=False), False, True),
        "liger": (_liger_ce, True, False),
    }


TUNING: dict = {}   # (op, shape) -> knobs, from gpu_sweep.py's JSON (--tuning)


_ACTIVE: dict = {}  # the knobs tuned() applied, recorded in crossent's rows


def tuned(op, shape):
    """Apply the sweep's best knobs for (op, shape); returns a function that restores the defaults."""
    knobs = TUNING.get((op, shape))
    if not knobs:
        return lambda: None
    from crossent.backends.triton import ce
    saved = knob_values(knobs)
    ce.configure(**knobs)
    _ACTIVE.update(knobs)

    def restore():
        ce.configure(**saved)
        _ACTIVE.clear()
    return restore


def record(rows, row, fmt):
    """_gpu_common.record, with the tuned knobs in crossent's rows (a row must say what ran)."""
    if _ACTIVE and row.get("provider", "").startswith(("crossent", "part:")):
        row["knobs"] = dict(_ACTIVE)
    _record(rows, row, fmt)


def target(row):
    """(target, PASS/FAIL) of a row, where issue 10 sets one."""
    if "target" in row:
        return row["target"], row["verdict"]
    if "median_ms" not in row or not row["provider"].startswith("crossent"):
        return "-", ""
    if row["op"] == "cross_entropy" and not row["provider"].startswith("part:"):
        return "<=1.2x floor", "PASS" if row["x_floor"] <= 1.2 else "FAIL"
    if row["op"] == "softmax":
        return ">=85% copy", "PASS" if row["x_floor"] <= 1 / 0.85 else "FAIL"
    return "-", ""


def run_parts(x0, y, rows, copy_bw):
    """crossent without host overhead: fwd+bwd replayed from a CUDA graph, and its kernels apart."""
    import crossent
    from crossent.backends import load
    be = load("triton")
    N, V = x0.shape
    floor_ms = 2 * x0.nbytes / (copy_bw * 1e9) * 1e3
    x = x0.detach().requires_grad_()
    g = torch.empty_like(x0)
    one, minus = torch.ones((), device="cuda"), -torch.ones((), device="cuda")

    def step():
        x.grad = None
        crossent.cross_entropy(x, y).backward()
    parts = {
        "crossent-graph": step,
        "part:fwd+grad kernel": lambda: be.ce_forward(x0, y, None, -100, 0.0, 0.0, 0.0, one, True, grad_into=g),
        "part:loss only": lambda: be.ce_forward(x0, y, None, -100, 0.0, 0.0, 0.0, one, False),
        "part:rescale g=1": lambda: be.rescale_(g, one),
        "part:rescale g=-1": lambda: be.rescale_(g, minus),
    }
    for name, fn in parts.items():
        row = dict(op="cross_entropy", provider=name, shape=f"{N}x{V}", dtype="bfloat16")
        try:
            ms, how = kernel_ms(fn)
            row.update(median_ms=ms, p10_ms=ms, p90_ms=ms, extra_mib=float("nan"), timing=how,
                       gbps=2 * x0.nbytes / (ms * 1e-3) / 1e9, x_floor=ms / floor_ms)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        record(rows, row, fmt)
    x.grad = None


def run_overhead(rows, n=100, rounds=7):
    """Host overhead: per-call time of tiny eager fwd+bwd calls (64 x 1000 fp32, so the kernels
    are negligible), in ``rounds`` rounds of ``n`` calls alternating torch and crossent (one
    sample once read 2.3x another run's: a stall inside the window); the median round, with
    the fastest and slowest as p10 / p90.  Target (issue 10): crossent <= torch + 20 us."""
    import crossent
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (64,), device="cuda")
    fns = (("torch", F.cross_entropy), ("crossent", crossent.cross_entropy))
    times = {name: [] for name, _ in fns}
    for _, fn in fns:
        for _ in range(20):
            fn(x, y).backward()
    for _ in range(rounds):
        for name, fn in fns:
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn(x, y).backward()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / n * 1e3)
    per_call = {}
    for name, _ in fns:
        ts = sorted(times[name])
        per_call[name] = ts[len(ts) // 2]
        row = dict(op="overhead", provider=name, shape="64x1000", dtype="float32",
                   median_ms=per_call[name], p10_ms=ts[0], p90_ms=ts[-1],
                   extra_mib=float("nan"), gbps=float("nan"), x_floor=float("nan"))
        if name == "crossent":
            row["target"] = "<=torch+20us"
            row["verdict"] = "PASS" if per_call["crossent"] <= per_call["torch"] + 0.020 else "FAIL"
        record(rows, row, fmt)


def _device_events(prof) -> int:
    """Kernels, memsets and copies the GPU ran under ``prof``."""
    cuda = getattr(torch.autograd.DeviceType, "CUDA", None)
    return sum(1 for e in prof.events() if e.device_type == cuda)


def profile_step(x0, y, rows):
    """Launches per crossent fwd+bwd (target, issue 10: <= 2), counted by torch.profiler as
    the kernels, memsets and copies the GPU ran, for each reduction and a variant with every
    option; the autograd seed (``ones`` for loss.backward()) is made outside the count.
    Then a torch.profiler table of the mean's fwd+bwd."""
    import crossent
    from torch.profiler import ProfilerActivity, profile
    N, V = x0.shape
    w = torch.rand(V, device=x0.device, dtype=x0.dtype)
    variants = {"mean": dict(), "sum": dict(reduction="sum"), "none": dict(reduction="none"),
                "mean+all": dict(weight=w, label_smoothing=0.1, ignore_index=0, z_loss=1e-4)}
    x = x0.detach().requires_grad_()
    for name, kw in variants.items():
        crossent.cross_entropy(x, y, **kw).sum().backward()   # warm: plans, workspace
        x.grad = None
        seed = torch.ones(N if name == "none" else (), device=x0.device, dtype=x0.dtype)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            crossent.cross_entropy(x, y, **kw).backward(seed)
            torch.cuda.synchronize()
        n = _device_events(prof)
        row = dict(op="launches", provider=f"crossent {name}", shape=f"{N}x{V}", dtype="bfloat16",
                   launches=n, target="<=2 per fwd+bwd", verdict="PASS" if n <= 2 else "FAIL")
        record(rows, row, fmt)
        x.grad = None
        if name == "mean":
            avg = prof.key_averages()
            try:
                print(avg.table(sort_by="cuda_time_total", row_limit=14))
            except Exception:  # noqa: BLE001 - the sort key's name moved between torch versions
                print(avg.table(sort_by="device_time_total", row_limit=14))


def run_ce(N, V, iters, rows, copy_bw, skip, profile=False):
    x0 = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda")
    nbytes = 2 * x0.numel() * x0.element_size()
    restore = tuned("cross_entropy", f"{N}x{V}")
    try:
        _run_ce(x0, y, nbytes, iters, rows, copy_bw, skip, profile)
    finally:
        restore()
    del x0, y
    torch.cuda.empty_cache()


def _run_ce(x0, y, nbytes, iters, rows, copy_bw, skip, profile):
    N, V = x0.shape
    if "crossent" not in skip:
        run_parts(x0, y, rows, copy_bw)
        if profile:
            profile_step(x0, y, rows)
    for name, (factory, clobbers, heavy) in ce_providers().items():
        if name in skip:
            continue
        row = dict(op="cross_entropy", provider=name, shape=f"{N}x{V}", dtype="bfloat16")
        try:
            if over_budget(name in DEFERRED):
                raise RuntimeError("skipped: time budget")
            require_free(x0.nbytes * (4 if heavy else 2) + GiB, RuntimeError)
            fn = factory()
            if clobbers:   # the logits are overwritten: a fresh leaf per iteration, untimed
                def prep():
                    return x0.clone().requires_grad_()
            else:
                x = x0.detach().requires_grad_()

                def prep():
                    x.grad = None
                    return x

            def step(x):
                fn(x, y).backward()
            row.update(bench(step, prep, iters=iters))
            row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
            row["x_floor"] = row["median_ms"] / (nbytes / (copy_bw * 1e9) * 1e3)
        except Exception as e:  # keep going: one provider failing must not hide the others
            failed(row, e, f"{name} {N}x{V}")
        record(rows, row, fmt)
        x = None
        torch.cuda.empty_cache()


def run_softmax(N, V, iters, rows, copy_bw, skip):
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * x.nbytes
    restore = tuned("softmax", f"{N}x{V}")
    try:
        _run_softmax(x, nbytes, iters, rows, copy_bw, skip)
    finally:
        restore()
    del x
    torch.cuda.empty_cache()


def _run_softmax(x, nbytes, iters, rows, copy_bw, skip):
    N, V = x.shape
    for log in (False, True):
        op = "log_softmax" if log else "softmax"
        tfn = torch.log_softmax if log else torch.softmax
        provs = {"torch": lambda: (lambda t: tfn(t, -1)),
                 "compile": lambda: torch.compile(lambda t: tfn(t, -1), dynamic=False)}

        def _ours():
            import crossent
            f = crossent.log_softmax if log else crossent.softmax
            return lambda t: f(t, -1)
        provs = {"crossent": _ours, **provs}
        for name, factory in provs.items():
            if name in skip:
                continue
            row = dict(op=op, provider=name, shape=f"{N}x{V}", dtype="bfloat16")
            try:
                if over_budget(name in DEFERRED):
                    raise RuntimeError("skipped: time budget")
                fn = factory()
                row.update(bench(lambda _: fn(x), iters=iters))
                row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                row["x_floor"] = row["median_ms"] / (nbytes / (copy_bw * 1e9) * 1e3)
            except Exception as e:  # noqa: BLE001
                failed(row, e, f"{name} {op}")
            record(rows, row, fmt)


# ----------------------------------------------------------------------------- output

def fmt(r):
    if "error" in r:
        return f"{r['provider']:<20} {r['op']:<13} {r['shape']:<13} {r['error'][:70]}"
    tgt, verdict = target(r)
    if "launches" in r:
        return (f"{r['provider']:<20} {r['op']:<13} {r['shape']:<13} {r['launches']:9d} launches{'':36}"
                f"{tgt:<13} {verdict}")
    return (f"{r['provider']:<20} {r['op']:<13} {r['shape']:<13} {r['median_ms']:9.3f} "
            f"({r['p10_ms']:.3f}-{r['p90_ms']:.3f}) {r['gbps']:8.1f} {r['x_floor']:7.2f} "
            f"{r['extra_mib']:10.1f}  {tgt:<13} {verdict}")


HEADER = (f"{'provider':<20} {'op':<13} {'shape':<13} {'median ms':>9} (p10-p90)  "
          f"{'GB/s':>8} {'x floor':>7} {'extra MiB':>10}  {'target':<13} verdict")


def print_table(rows, title="cross-entropy / softmax (bf16)", targets_only=False):
    """The rows (as written to the JSON) as one table; targets_only: the rows with a
    target (PASS/FAIL) and crossent's errors."""
    if targets_only:
        rows = [r for r in rows if target(r)[1] or ("error" in r and r["provider"].startswith(("crossent", "(")))]
        title += ": targets"
    print(f"== {title} ==")
    print_stamp(rows)
    print(HEADER)
    for r in grouped(rows):
        print(fmt(r))


def main(argv=None):
    ap = common_args(__doc__, 20, 240.0, "only the smallest CE shape")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table per CE shape")
    ap.add_argument("--tuning", default=None, help="gpu_sweep.py's JSON: its best knobs per shape")
    args, out, skip = parse(ap, argv, "gpu_bench")
    if args.print_table:
        print_table(read_json(args.print_table), targets_only=args.targets_only)
        return 0
    ce_shapes = CE_SHAPES[:1] if args.quick else CE_SHAPES
    sm_shapes = [] if args.quick else SM_SHAPES
    names = list(ce_providers()) + ["overhead"]
    if args.dry_run:
        return dry_run(args, out, skip, names, [f"{n}x{v}" for n, v in ce_shapes] +
                       [f"softmax {n}x{v}" for n, v in sm_shapes], DEFERRED)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 1
    t0 = start(args, out)
    if args.tuning and Path(args.tuning).exists():   # absent when the sweep did not run
        for b in read_json(args.tuning).get("best", []):
            TUNING[(b["op"], b["shape"])] = b["knobs"]
    copy_bw = copy_bandwidth()
    META.update(copy_gbps=copy_bw)
    print(f"{META['device']}  torch {META['torch']}  triton {META['triton']}  "
          f"copy bandwidth {copy_bw:.0f} GB/s (read+write)")
    print(HEADER)
    rows = []
    if "crossent" not in skip and "overhead" not in skip:
        guarded(run_overhead, "overhead", "64x1000", rows, rows, fmt=fmt)
    for pass_skip in passes(skip | {"overhead"}, names, DEFERRED):
        for N, V in ce_shapes:
            guarded(run_ce, "cross_entropy", f"{N}x{V}", rows, N, V, args.iters, rows, copy_bw, pass_skip,
                    args.profile, fmt=fmt)
        for N, V in sm_shapes:
            guarded(run_softmax, "softmax", f"{N}x{V}", rows, N, V, args.iters, rows, copy_bw, pass_skip,
                    fmt=fmt)
    finish(rows, out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
