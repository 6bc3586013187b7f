"""GPU benchmark: bf16 linear + cross-entropy (LM head) forward + backward.

loss = cross_entropy(h @ W.T, t), h (N, D), W (V, D), bf16, reduction 'mean';
one timed call = forward + backward (dh and dW; the grads are set to None
before every call, as zero_grad(set_to_none=True) does).

Providers (each in try/except: an error or a skip is recorded and the run goes on):
  3-matmul           the baseline: three bare bf16 matmuls, logits = h @ W.T,
                     dh = g @ W, dW = g.T @ h (g: an N x V bf16 tensor), outputs
                     preallocated; also timed one by one (mm_*_ms columns)
  crossent-accurate  crossent.linear_cross_entropy(acc_policy="accurate")
  crossent-compact   crossent.linear_cross_entropy(acc_policy="compact")
  torch-eager        F.cross_entropy(h @ W.T, t)
  torch-compile      torch.compile of the same function
  torch-chunked      F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())
                     (skipped when this torch has no F.linear_cross_entropy)
  liger-flce         Liger's fused linear cross-entropy (liger_kernel)
  cce                Apple's cut_cross_entropy.linear_cross_entropy (default impl)
  cce-std1           the same on W / 2 (logits of std 1 instead of the inputs' 2): CCE skips
                     the backward's tiles whose |gradient| is below bf16 eps / 32 everywhere,
                     which at std 2 is no tile and at std 1 most of them (no accuracy columns:
                     other inputs).  Every other provider's time does not depend on the values.
  cce-compile        the same with impl="torch_compile"

Columns: median ms (p10-p90, CUDA events, after warm-up); host ms: the median time the call
took to return (near the median: the GPU waits on the host); x3mm: median / the 3-matmul
median of the same shape and run; TFLOP/s: 6*N*D*V / median; extra GiB: peak allocated in
one call beyond what was allocated before it (the gradients count), beyond-grads: less dh
and dW; dW / dh err: max|g - ref| / max|ref| against a float64 reference (bf16 inputs upcast,
row chunks, once per shape, kept in fp32); loss err relative.  Providers that would not fit in
free GPU memory are skipped, none starts after --budget-s (torch.compile ones need 60 s
left).  The JSON is rewritten after every row.

Targets (PASS/FAIL at the end, and rows with op "target" in the JSON): accurate <= 1.10x
the three matmuls (1.15x at 16384 x 2304 x 256000) in <= gradients + one chunk; compact
<= 1.45x (at the two D = 4096 shapes: the issue sets none at 16384 x 2304 x 256000) in <=
gradients + 256 MiB; at 16384 x 2304 x 256000 accurate ahead of Liger and
CCE (this run, CCE's faster row of cce and cce-std1; else the anchors: 133.0 and 111.2 ms
on an H200); dW error <= eager bf16's.  Liger and CCE come as wheels installed with
--no-deps (benchmarks/gpu_check.sh); without them their rows say "not installed".

Order, for a short GPU window: every shape with the matmuls, crossent, torch eager,
torch's chunked path, Liger and CCE first (what the targets need), then the
torch.compile providers (``DEFERRED``: tens of seconds of compiling each) in a
second pass while the budget lasts, timed against the first pass's matmuls and
without the accuracy columns.  An error at one shape (out of memory) is a row.
``--knobs K=V,...`` sets triton launch knobs for the run (see gpu_bench.py).  ``--profile``
(off by default) ends the run with three back-to-back forward + backward steps of
crossent-accurate and crossent-compact at the first shape under torch.profiler: their
kernels by time, the GPU's idle time and longest gaps with the host op running in each
(benchmarks/_gpu_profile.py), the first host sync a step makes (if any, with its line),
rows with op "profile" in the JSON, and a Chrome trace each beside the JSON.

Timing, the env stamp, JSON writing and the options come from benchmarks/_gpu_common.py; the
rows' lines, the targets and the table from _linear_report.py.

    python3 benchmarks/gpu_linear_bench.py --json bench-results/gpu_linear_bench.json
    python3 benchmarks/gpu_linear_bench.py --print-table bench-results/gpu_linear_bench.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (META, GiB, Skip, bench, common_args, dry_run, failed, finish, guarded,  # noqa: E402
                         left, linear_ce_reference, over_budget, parse, passes, read_json, record, rel_err,
                         require_free, require_triton, start)
from _gpu_profile import first_sync, profile_steps  # noqa: E402
from _linear_report import HEADER, fmt, print_table, targets  # noqa: E402

# The anchor shape first (--quick runs only it); all three are issue 11's.
SHAPES = [(8192, 4096, 128256), (16384, 2304, 256000), (4096, 4096, 128256)]
REF_LEFT_S = 15.0       # only compute the fp64 reference with this much budget left
DEFERRED = ("torch-compile", "cce-compile")   # second pass (see the module docstring)
OTHER_VALUES = ("cce-std1",)   # run on other inputs than the reference's: no accuracy columns


# ----------------------------------------------------------------------------- providers
# Each factory(h, W, t) -> (fn() -> scalar loss); need(h, W) -> estimated
# bytes it allocates beyond the inputs (gradients included).

def _grads_bytes(N, D, V):
    return (N * D + V * D) * 2


def _est(f):
    """need(h, W) from f(N, D, V)."""
    return lambda h, W: f(h.shape[0], h.shape[1], W.shape[0])


def _crossent(policy):
    def factory(h, W, t):
        import crossent
        require_triton()
        opts = crossent.LinearCrossEntropyOptions(acc_policy=policy)
        return lambda: crossent.linear_cross_entropy(h, W, t, options=opts)

    def need(h, W):   # crossent's own estimate (beyond inputs and gradients)
        import crossent
        plan = crossent.linear_cross_entropy_plan(
            h, W, options=crossent.LinearCrossEntropyOptions(acc_policy=policy))
        return plan.extra_bytes + _grads_bytes(h.shape[0], h.shape[1], W.shape[0])
    return factory, need


def _eager(h, W, t):
    return lambda: F.cross_entropy(h @ W.T, t)


def _compiled(h, W, t):
    f = torch.compile(lambda h, W, t: F.cross_entropy(h @ W.T, t))
    return lambda: f(h, W, t)


def _torch_chunked(h, W, t):
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        raise Skip(f"skipped: torch {torch.__version__} has no F.linear_cross_entropy")
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda: F.linear_cross_entropy(h, W, t, options=opts)


def _loss_of(out):
    """Liger returns a tensor, a tuple or a CrossEntropyOutput depending on version."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "loss", out)


def _liger(h, W, t):
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        raise Skip(f"skipped: liger_kernel not installed ({e})")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
        return lambda: _loss_of(flce(h, W, t))
    except ImportError:
        pass
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    mod = LigerFusedLinearCrossEntropyLoss()
    return lambda: _loss_of(mod(W, h, t))      # the module takes (lin_weight, input, target)


def _cce(impl, w_scale=None):
    def factory(h, W, t):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_lce
        except ImportError as e:
            raise Skip(f"skipped: cut_cross_entropy not installed ({e})")
        kw = {} if impl is None else dict(impl=impl)
        if w_scale is None:
            return lambda: cce_lce(h, W, t, **kw)
        Ws = (W.detach() * w_scale).requires_grad_()

        def call():
            Ws.grad = None   # (bench's prep clears W.grad, not this copy's)
            return cce_lce(h, Ws, t, **kw)
        return call
    return factory


def _plan(name, h, W):
    import crossent
    return crossent.linear_cross_entropy_plan(
        h, W, options=crossent.LinearCrossEntropyOptions(acc_policy=name.split("-")[1]))


def providers():
    """name: (factory, need(h, W) -> bytes, uses torch.compile)"""
    g = _grads_bytes
    return {
        "crossent-accurate": (*_crossent("accurate"), False),
        "crossent-compact": (*_crossent("compact"), False),
        # logits, log-softmax, their grads (measured: +46.9 GiB at 16384 x 256000, i.e. 6 * N*V*2)
        "torch-eager": (_eager, _est(lambda N, D, V: 6 * N * V * 2 + g(N, D, V)), False),
        # measured by the anchors: +7.8 GiB at 16384 x 256000 (CE alone), ~3 GiB at 8192 x 128256
        "torch-compile": (_compiled, _est(lambda N, D, V: 3 * N * V * 2 + g(N, D, V)), True),
        "torch-chunked": (_torch_chunked, _est(lambda N, D, V: V * D * 4 + 2 * GiB + g(N, D, V)), False),
        "liger-flce": (_liger, _est(lambda N, D, V: 2 * g(N, D, V) + 2 * GiB), False),
        "cce": (_cce(None), _est(lambda N, D, V: g(N, D, V) + GiB), False),
        # + its own copy of W (the scaled weight) and that copy's gradient
        "cce-std1": (_cce(None, 0.5), _est(lambda N, D, V: g(N, D, V) + 2 * V * D * 2 + GiB), False),
        "cce-compile": (_cce("torch_compile"), _est(lambda N, D, V: 2 * N * V * 2 + g(N, D, V) + GiB), True),
    }


# ----------------------------------------------------------------------------- running

def _time_matmuls(h, W, iters, warmup) -> dict:
    """bench() of the three matmuls together, then each one's median (mm_*_ms); their
    outputs (the N x V one too) are freed on return."""
    L = torch.empty(h.shape[0], W.shape[0], dtype=h.dtype, device="cuda")
    dh = torch.empty_like(h)
    dW = torch.empty_like(W)
    torch.mm(h, W.t(), out=L)           # values for g: the logits themselves

    def step(_):
        torch.mm(h, W.t(), out=L)
        torch.mm(L, W, out=dh)
        torch.mm(L.t(), h, out=dW)
    times = bench(step, iters=iters, warmup=warmup)
    for name, one in (("logits", lambda _: torch.mm(h, W.t(), out=L)),
                      ("dh", lambda _: torch.mm(L, W, out=dh)),
                      ("dW", lambda _: torch.mm(L.t(), h, out=dW))):
        times[f"mm_{name}_ms"] = bench(one, iters=iters, warmup=1)["median_ms"]
    return times


def run_matmuls(N, D, V, h, W, iters, warmup, rows):
    """The three bare bf16 matmuls of a linear-CE step; returns the median ms or None."""
    row = dict(op="linear_cross_entropy", provider="3-matmul", shape=f"{N}x{D}x{V}", dtype="bfloat16")
    ms = None
    try:
        torch.cuda.empty_cache()
        require_free(N * V * 2 + _grads_bytes(N, D, V) + GiB)
        row.update(_time_matmuls(h, W, iters, warmup))
        ms = row["median_ms"]
        row["x3mm"] = 1.0
        row["tflops"] = 6 * N * D * V / (ms * 1e-3) / 1e12
        row["extra_gib"] = row.pop("extra_mib") / 1024
    except Exception as e:  # noqa: BLE001
        failed(row, e, f"3-matmul {N}x{D}x{V}")
    record(rows, row, fmt)
    torch.cuda.empty_cache()
    return ms


def _inputs(N, D, V, device="cuda"):
    """h, W (bf16, requiring grad) and class targets t of one shape, seeded: logits of std 2."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(V, D, device=device, generator=g) * (2 / D ** 0.5)).to(torch.bfloat16).requires_grad_()
    return h, W, torch.randint(0, V, (N,), device=device, generator=g)


@torch.no_grad()
def cce_filtered(N, D, V, w_scale=1.0, tile=128) -> float:
    """The fraction of CCE's backward tiles (tile x tile logits) that its default filter
    skips on this benchmark's inputs (W times ``w_scale``), computed on the CPU: a tile is
    skipped where |softmax - one-hot| < bf16 eps / 32 on all of it (cut_cross_entropy's
    filter_eps="high").  --cce-filter prints it for the benchmark's shapes at N tokens."""
    h, W, t = _inputs(N, D, V, device="cpu")
    g = torch.softmax(h.float() @ (W.float() * w_scale).T, 1)
    g[torch.arange(N), t] -= 1
    Vp = -(-V // tile) * tile
    a = torch.zeros(N, Vp)
    a[:, :V] = g.abs()
    worst = a[:N // tile * tile].view(N // tile, tile, Vp // tile, tile).amax((1, 3))
    return (worst < torch.finfo(torch.bfloat16).eps / 32).float().mean().item()


def run_shape(N, D, V, args, rows, skip, accuracy=True):
    """Every provider not in ``skip`` at one shape (the 3-matmul baseline only if it is not
    in skip either; else x3mm uses this shape's baseline row from an earlier pass)."""
    h, W, t = _inputs(N, D, V)
    torch.cuda.empty_cache()
    _run_shape(h, W, t, args, rows, skip, accuracy)
    del h, W, t
    torch.cuda.empty_cache()


def _run_shape(h, W, t, args, rows, skip, accuracy):
    (N, D), V = h.shape, W.shape[0]
    shape = f"{N}x{D}x{V}"
    if "3-matmul" in skip:
        base_ms = next((r["median_ms"] for r in rows if r["shape"] == shape and r["provider"] == "3-matmul"
                        and "median_ms" in r), None)
    else:
        base_ms = run_matmuls(N, D, V, h.detach(), W.detach(), args.iters, args.warmup, rows)
    ref = None
    grads_gib = _grads_bytes(N, D, V) / GiB
    for name, (factory, need, compiles) in providers().items():
        if name in skip:
            continue
        row = dict(op="linear_cross_entropy", provider=name, shape=shape, dtype="bfloat16")
        try:
            if over_budget(compiles):
                raise Skip("skipped: time budget")
            torch.cuda.empty_cache()
            require_free(need(h, W) + GiB)
            fn = factory(h, W, t)
            if name.startswith("crossent"):   # what it will run, read before the timed calls
                plan = _plan(name, h, W)
                row.update(policy=plan.policy, num_chunks=plan.num_chunks,
                           chunk_gib=min(plan.chunk_size, N) * V * 2 / GiB)

            def prep():
                h.grad = None
                W.grad = None

            def step(_):
                fn().backward()
            row.update(bench(step, prep, iters=args.iters, warmup=args.warmup))
            ms = row["median_ms"]
            row["tflops"] = 6 * N * D * V / (ms * 1e-3) / 1e12
            row["extra_gib"] = row.pop("extra_mib") / 1024
            row["beyond_grads_gib"] = row["extra_gib"] - grads_gib
            if base_ms:
                row["x3mm"] = ms / base_ms
            # accuracy: one more call, against the fp64 reference (computed once per shape)
            try:
                own = name not in OTHER_VALUES   # computed from h, W (the reference's inputs)
                if own and ref is None and accuracy and not args.no_accuracy and left() > REF_LEFT_S:
                    prep()
                    torch.cuda.empty_cache()
                    ref = linear_ce_reference(h.detach(), W.detach(), t)
                if own and ref is not None:
                    prep()
                    loss = fn()
                    loss.backward()
                    row["loss_err"] = abs(loss.item() - ref[0].item()) / abs(ref[0].item())
                    row["dW_err"] = rel_err(W.grad, ref[2])
                    row["dh_err"] = rel_err(h.grad, ref[1])
                    del loss
            except Exception as e:   # keep the timing row
                row["accuracy_error"] = f"{type(e).__name__}: {e}"
                print(f"[{name} {shape}] accuracy: {row['accuracy_error']}", file=sys.stderr)
        except Exception as e:  # one provider failing must not hide the others
            failed(row, e, f"{name} {shape}")
        h.grad = None
        W.grad = None
        fn = None
        record(rows, row, fmt)
        torch.cuda.empty_cache()


PROFILED = ("crossent-accurate", "crossent-compact")


def profile_kernels(N, D, V, trace_dir=None, steps=3) -> list:
    """--profile: ``steps`` back-to-back forward + backward steps of each PROFILED provider
    at N x D x V under torch.profiler, after one untimed step (compiles, allocator): its
    kernels by time and the GPU's idle gaps with what the host did in them
    (_gpu_profile.py), and a Chrome trace in ``trace_dir``; before them one step under
    CUDA's sync debug mode (the first host sync, which would leave the GPU idle while
    the host refills its queue).  Returns one row per provider."""
    h, W, t = _inputs(N, D, V)
    rows = []
    for name in PROFILED:
        fn = _crossent(name.split("-", 1)[1])[0](h, W, t)

        def step():
            h.grad = W.grad = None
            fn().backward()
        step()
        sync = first_sync(step)
        print(f"{name} {N}x{D}x{V}: host sync in a step: {sync or 'none'}")
        trace = None if trace_dir is None else Path(trace_dir) / f"trace_{name}_{N}x{D}x{V}.json"
        summary = profile_steps(step, steps, f"{name} {N}x{D}x{V}", trace)
        rows.append(dict(op="profile", provider=name, shape=f"{N}x{D}x{V}", dtype="bfloat16",
                         host_sync=sync, **summary))
        fn = None
    h.grad = W.grad = None   # (h, W, t are freed on return: the closures hold them till then)
    return rows



def _shapes(spec):
    out = []
    for s in spec.split(","):
        N, D, V = (int(v) for v in s.lower().split("x"))
        out.append((N, D, V))
    return out


def main(argv=None):
    ap = common_args(__doc__, 10, 170.0, "only the first shape")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shapes", default=None, help="NxDxV[,NxDxV...] instead of the two default shapes")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the fp64 reference and error columns")
    ap.add_argument("--profile", action="store_true",
                    help="after the run: three fwd+bwd steps of crossent-accurate and crossent-compact "
                         "at the first shape under torch.profiler (kernels, idle gaps, Chrome traces)")
    ap.add_argument("--cce-filter", action="store_true",
                    help="on the CPU: the share of CCE's backward tiles its filter skips on these inputs")
    args, out, skip = parse(ap, argv, "gpu_linear_bench")
    if args.print_table:
        print_table(read_json(args.print_table), targets_only=args.targets_only)
        return 0
    if args.cce_filter:
        for N, D, V in _shapes(args.shapes) if args.shapes else SHAPES[:2]:
            for name, scale in (("W (cce)", 1.0), ("W / 2 (cce-std1)", 0.5)):
                print(f"{N}x{D}x{V} at 256 tokens, {name}: CCE skips "
                      f"{100 * cce_filtered(256, D, V, scale):.0f}% of its backward tiles")
        return 0
    shapes = _shapes(args.shapes) if args.shapes else SHAPES
    if args.quick:
        shapes = shapes[:1]
    names = ["3-matmul", *providers()]
    if args.dry_run:
        rc = dry_run(args, out, skip, names, [f"{N}x{D}x{V}" for N, D, V in shapes], DEFERRED)
        if args.profile:
            N, D, V = shapes[0]
            print(f"then profile: {', '.join(PROFILED)} at {N}x{D}x{V} (three fwd+bwd each, torch.profiler)")
        return rc
    if not torch.cuda.is_available():
        print("gpu_linear_bench: no CUDA device", file=sys.stderr)
        return 1
    t0 = start(args, out)
    META.update(free_gib_at_start=torch.cuda.mem_get_info()[0] / GiB, total_gib=torch.cuda.mem_get_info()[1] / GiB)
    print(f"{META['device']}  torch {META['torch']}  triton {META['triton']}  {META['total_gib']:.0f} GiB")
    print(HEADER)
    rows: list = []
    for i, pass_skip in enumerate(passes(skip, names, DEFERRED)):
        for N, D, V in shapes:
            guarded(run_shape, "linear_cross_entropy", f"{N}x{D}x{V}", rows, N, D, V, args, rows, pass_skip,
                    i == 0, fmt=fmt)
    finish(rows + targets(rows), out, t0)
    print_table([{**r, **META} for r in rows])
    if args.profile:
        try:
            prof = profile_kernels(*shapes[0], trace_dir=Path(out).parent)
            finish(rows + targets(rows) + [{**r, **META} for r in prof], out, t0)
        except Exception as e:  # noqa: BLE001 - the rows are written already
            print(f"profile failed: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
