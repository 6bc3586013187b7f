"""GPU sweep of the Triton launch knobs: the best configuration per benchmark shape.

For each shape (bf16 cross-entropy forward+gradient at the benchmark shapes, and
the softmax forward) every configuration below is timed kernel-only (CUDA graph
replay of the backend call, so host overhead is not in it; where capture fails, a
burst of eager calls between two events, marked "events") and reported as a
multiple of the bandwidth floor (bytes / copy bandwidth measured in this run):
  split    slice width (_SPLIT_BLOCK) x warps x prefetch x resident CTAs per SM
  twopass  class tile (_LOOP_BLOCK) x evict_last on the first pass (_KEEP_L2) x the
           gradient pass walking the tiles backwards (_REVERSE)
  cluster  classes per CTA (only where the installed Triton compiles cluster reductions)
The default configuration is timed first in each shape, so a ratio against it is
in the table; a configuration that fails (compile error, cooperative grid too
large) or a shape that does not fit is reported and skipped.  Each shape gets a
fair share of --budget-s; the JSON is rewritten after every row, and its
``best`` (per shape) is what ``gpu_bench.py --tuning`` applies.

Compile cost: each configuration compiles one kernel per shape (the split kernel's
slice count is a compile-time constant; the two-pass kernel is shared by the CE
shapes): ``--dry-run`` counts them (41 under Triton 3.6; tests/_launch_path.py
--sweep compiled all 52 launches in ~11 s of CPU on a CI-class core).

``--smoke`` (run first by benchmarks/gpu_window.py): each launch path once at a
small shape against torch in fp32 (two-pass first, the cooperative split path
last, which is the one that could hang), plus the device's features and the
peers' imports; $OUT/gpu_smoke.json says which path was wrong, failed or was
still running when the stage was stopped.

    python3 benchmarks/gpu_sweep.py --budget-s 60 --json bench-results/gpu_sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (CE_SHAPES, ROOT, SM_SHAPES, apply_knobs, copy_bandwidth, kernel_ms,  # noqa: E402
                         knob_values, parse_knobs, read_json, stamp, write_json)


def configs(cluster_ok: bool):
    """(label, knobs) in the order they are tried: the default first, then the likeliest."""
    yield "default", {}
    # class tile x evict_last on the first pass x the gradient pass walking the tiles backwards
    for block, keep, rev in [(4096, True, True), (8192, True, False), (8192, True, True), (16384, True, True),
                             (4096, False, True), (4096, True, False)]:
        yield f"twopass b{block} l2{int(keep)} r{int(rev)}", dict(
            _ROW_PATH="twopass", _LOOP_BLOCK=block, _KEEP_L2=keep, _REVERSE=rev)
    # the mean's W from one claiming program: no cooperative launch, one program per row
    for block in (4096, 8192):
        yield f"twopass b{block} claim", dict(_ROW_PATH="twopass", _LOOP_BLOCK=block, _MEAN_LAUNCH="claim")
    # (slice width, warps, prefetch, resident CTAs per SM); values per thread = width / (32 warps)
    for block, warps, pre, ctas in [(8192, 4, False, 8), (4096, 4, True, 8), (4096, 4, False, 8),
                                    (8192, 8, True, 8), (8192, 8, False, 8), (2048, 4, False, 8),
                                    (4096, 8, False, 8), (4096, 4, False, 2), (2048, 2, False, 16),
                                    (8192, 16, False, 4)]:
        yield f"split b{block} w{warps} pf{int(pre)} c{ctas}", dict(
            _ROW_PATH="split", _SPLIT_BLOCK=block, _SPLIT_WARPS=warps, _SPLIT_PREFETCH=pre, _SPLIT_CTAS=ctas)
    if cluster_ok:
        for block, warps in [(8192, 8), (16384, 16), (4096, 8)]:
            yield f"cluster b{block} w{warps}", dict(_ROW_PATH="cluster", _CLUSTER_BLOCK=block,
                                                    _CLUSTER_WARPS=warps)


def _knob_values():
    """The current value of every knob a configuration moves."""
    return knob_values(k for _, kn in configs(True) for k in kn)


def plan(forced: dict, cluster_ok: bool) -> list:
    """(label, knobs) to try: configs() less those that contradict a forced row path."""
    path = forced.get("_ROW_PATH")
    return [(label, kn) for label, kn in configs(cluster_ok) if path is None or kn.get("_ROW_PATH", path) == path]


def kernel_keys(todo: list, work: list) -> set:
    """The distinct kernels ``todo`` compiles over ``work`` ((op, (R, C)) pairs): what makes a
    compile is the kernel and its constexprs (split: slice width, slices, warps, prefetch;
    two-pass: the tile), computed from the launch plans, no GPU needed."""
    from crossent.backends.triton import ce, softmax, split
    cpu = torch.device("cpu")
    saved = _knob_values()
    keys = set()
    try:
        for label, knobs in todo:
            ce.configure(**{**saved, **knobs})
            for op, (R, C) in work:
                path = knobs.get("_ROW_PATH", saved.get("_ROW_PATH", "auto"))
                if path == "cluster":
                    keys.add((op, label, C))
                elif path != "twopass" and ce.row_path(True, C, True, cpu, "softmax" if op == "softmax" else "ce") \
                        == "split":
                    p = split.plan(R, C, cpu)
                    keys.add((op, "split", p["BLOCK"], p["NSPLIT"], p["num_warps"], p["PREFETCH"]))
                else:
                    kw = ce._plan(1, R, C, C, 1, True, 3, cpu)[1] if op == "cross_entropy" else \
                        softmax._plan(1, C, R, C, 1)[0]
                    keys.add((op, "twopass", tuple(sorted(kw.items())), op == "cross_entropy" and ce._MEAN_LAUNCH))
    finally:
        ce.configure(**saved)
    return keys


# ----------------------------------------------------------------------------- smoke

SMOKE_R = 512
# (check, row path forced, op, classes, reduction): the cooperative split path last
SMOKE = [("ce twopass none", "twopass", "cross_entropy", 128256, "none"),
         ("ce twopass mean", "twopass", "cross_entropy", 128256, "mean"),
         ("ce twopass mean, W claimed", "twopass+claim", "cross_entropy", 128256, "mean"),
         ("ce single mean", "auto", "cross_entropy", 8192, "mean"),
         ("ce split none", "split", "cross_entropy", 128256, "none"),
         ("ce split mean", "split", "cross_entropy", 128256, "mean"),
         ("softmax split", "split", "softmax", 128256, None)]
SMOKE_TOL = 1e-2   # max|ours - fp32 torch| / max|fp32 torch|: bf16 rounding is 4e-3; a broken handshake is O(1)


def _rel(a, ref) -> float:
    return ((a.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def smoke_check(op: str, C: int, reduction) -> dict:
    """crossent's public call at (SMOKE_R, C) bf16 against torch on the fp32 upcast."""
    import crossent
    torch.manual_seed(C)
    x = (torch.randn(SMOKE_R, C, device="cuda") * 3).to(torch.bfloat16)
    if op == "softmax":
        return dict(out_err=_rel(crossent.softmax(x, -1), torch.softmax(x.float(), -1)))
    y = torch.randint(0, C, (SMOKE_R,), device="cuda")
    xa, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    loss = crossent.cross_entropy(xa, y, reduction=reduction)
    ref = torch.nn.functional.cross_entropy(xr, y, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    ref.backward(torch.ones_like(ref))
    return dict(loss_err=_rel(loss, ref.detach()), grad_err=_rel(xa.grad, xr.grad))


def smoke(out: Path, dry_run: bool) -> int:
    """Features, peers' imports and each launch path once (see the module docstring)."""
    if dry_run:
        for check, path, op, C, red in SMOKE:
            print(f"smoke check {check}: {op} {SMOKE_R}x{C} reduction={red} row path {path}")
        write_json(out, dict(meta=dict(dry_run=True), rows=[]))
        return 0
    if not torch.cuda.is_available():
        print("gpu_sweep --smoke: no CUDA device", file=sys.stderr)
        return 1
    from crossent.backends.triton import _device, ce
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    meta = dict(stamp(), capability=list(torch.cuda.get_device_capability(dev)), sms=props.multi_processor_count,
                l2_mib=getattr(props, "L2_cache_size", 0) / 2 ** 20, total_gib=props.total_memory / 2 ** 30)
    rows: list = []

    def record(row):
        if not rows or rows[-1] is not row:
            rows.append(row)
        write_json(out, dict(meta=meta, rows=rows))
        print(json.dumps(row), flush=True)
    t0 = time.time()
    record(dict(check="cluster reductions compile", ok=True, value=_device.cluster_reductions(dev),
                seconds=round(time.time() - t0, 1)))
    for mod in ("liger_kernel", "cut_cross_entropy"):
        row = dict(check=f"import {mod}")
        try:
            m = __import__(mod)
            row.update(ok=True, value=getattr(m, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - a broken wheel is a result, not a stop
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
        record(row)
    saved = {"_ROW_PATH": ce._ROW_PATH, "_MEAN_LAUNCH": ce._MEAN_LAUNCH}
    for check, path, op, C, red in SMOKE:
        row = dict(check=check, path=path, shape=f"{SMOKE_R}x{C}", status="running")
        record(row)   # a hang leaves this row "running": the stage's limit ends it
        try:
            # "path+claim": the mean's W from one claiming program (ce._MEAN_LAUNCH)
            ce.configure(_ROW_PATH=path.split("+")[0], _MEAN_LAUNCH="claim" if path.endswith("+claim") else
                         saved["_MEAN_LAUNCH"])
            t0 = time.time()
            errs = smoke_check(op, C, red)
            torch.cuda.synchronize()
            used = ce._plan(1, SMOKE_R, C, C, 1, True, 0, dev)[0]
            row.update(status="done", seconds=round(time.time() - t0, 2), used=used, **errs,
                       ok=all(e <= SMOKE_TOL for e in errs.values()), cooperative=_device.cooperative(dev))
        except Exception as e:  # noqa: BLE001
            row.update(status="error", ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        record(row)
    ce.configure(**saved)
    return 0 if all(r.get("ok", True) for r in rows) else 3


# ----------------------------------------------------------------------------- sweep

def print_table(doc: dict) -> None:
    print("== best configuration per shape (kernel only, CUDA graph replay) ==")
    meta = doc.get("meta", {})
    if "copy_gbps" in meta:
        print(f"{meta.get('device')} triton {meta.get('triton')} copy {meta['copy_gbps']:.0f} GB/s; "
              f"cluster reductions: {meta.get('cluster_reductions')}; knobs: {meta.get('knobs') or 'defaults'}")
    for r in doc.get("best", []):
        print(f"{r['op']:13} {r['shape']:13} {r['config']:28} {r['ms']:8.3f} ms {r['x_floor']:5.2f}x floor "
              f"({r['vs_default']:.2f}x the default)")
    for r in doc.get("rows", []):
        if "error" in r:
            print(f"{r['op']:13} {r['shape']:13} {r['config']:28} {r['error'][:90]}")


def sweep_shape(op, N, V, todo, defaults, bw, shape_end, iters, best, rows, emit) -> None:
    from crossent.backends import load
    from crossent.backends.triton import ce
    be = load("triton")
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda")
    denom = torch.zeros((), device="cuda")
    floor_ms = 2 * x.nbytes / (bw * 1e9) * 1e3
    if op == "cross_entropy":
        # the default call's forward: cross_entropy(x, y) with reduction='mean' (the
        # gradient of the mean written too; the backward then does no N x V work)
        def call():
            ce.ce_forward_fused(x, y, None, denom, -100, 0.0, 0.0, 0.0, "mean", x.dtype, True, False)
    else:
        def call():
            be.softmax_forward(x, -1, False)
    base = None
    for label, knobs in todo:
        if time.time() > shape_end:
            print(f"  {op} {N}x{V}: budget reached, later configurations skipped")
            break
        ce.configure(**{**defaults, **knobs})
        row = dict(op=op, shape=f"{N}x{V}", config=label, knobs=knobs)
        try:
            ms, how = kernel_ms(call, iters=iters)
            row.update(ms=ms, x_floor=ms / floor_ms, timing=how)
            base = base or ms
            row["vs_default"] = ms / base
            if (op, row["shape"]) not in best or ms < best[(op, row["shape"])]["ms"]:
                best[(op, row["shape"])] = row
            print(f"  {op:13} {N}x{V:<7} {label:28} {ms:8.3f} ms  {ms / floor_ms:5.2f}x floor "
                  f"{ms / base:5.2f}x default ({how})", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing configuration is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  {op:13} {N}x{V:<7} {label:28} {row['error']}", flush=True)
        emit(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "gpu_sweep.json"))
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--knobs", default="", help="K=V,... launch knobs applied first (a forced _ROW_PATH "
                                                "keeps only its configurations)")
    ap.add_argument("--smoke", action="store_true", help="each launch path once, features, peers (see above)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print the plan and its compile count")
    ap.add_argument("--print-table", metavar="JSON", default=None, help="only print a JSON written earlier")
    args = ap.parse_args(argv)
    out = Path(args.json)
    if args.print_table:
        print_table(read_json(args.print_table))
        return 0
    if args.smoke:
        return smoke(out, args.dry_run)
    forced = parse_knobs(args.knobs)
    work = [("cross_entropy", s) for s in CE_SHAPES] + [("softmax", s) for s in SM_SHAPES]
    if args.dry_run:
        apply_knobs(forced)   # on the CPU too: the plans the compile count reads
        todo = plan(forced, cluster_ok=False)
        clusters = len(plan(forced, cluster_ok=True)) - len(todo)
        print(f"sweep plan: {len(todo)} configurations x {len(work)} shapes, "
              f"{len(kernel_keys(todo, work))} kernels to compile (+{clusters} cluster configurations where "
              f"clusters compile); budget {args.budget_s:.0f} s; knobs {forced or 'defaults'}")
        for label, kn in todo:
            print(f"  {label:28} {kn}")
        write_json(out, dict(meta=dict(dry_run=True, knobs=forced), rows=[], best=[]))
        return 0
    if not torch.cuda.is_available():
        print("gpu_sweep: no CUDA device", file=sys.stderr)
        return 1
    from crossent.backends.triton import _device, ce
    apply_knobs(forced)
    dev = torch.device("cuda", torch.cuda.current_device())
    defaults = _knob_values()
    cluster_ok = _device.cluster_reductions(dev)
    todo = plan(forced, cluster_ok)
    t_end = time.time() + args.budget_s
    bw = copy_bandwidth(1 << 30)
    meta = dict(stamp(), copy_gbps=bw, cluster_reductions=cluster_ok, knobs=forced)
    print(f"{meta['device']} triton {meta['triton']} copy {bw:.0f} GB/s; cluster reductions: {cluster_ok}; "
          f"{len(todo)} configurations, {len(kernel_keys(todo, work))} kernels to compile")
    rows, best = [], {}

    def emit(row):
        rows.append(row)
        write_json(out, dict(meta=meta, rows=rows, best=[{"op": k[0], "shape": k[1], **v} for k, v in best.items()]))
    for i, (op, (N, V)) in enumerate(work):
        shape_end = time.time() + (t_end - time.time()) / (len(work) - i)   # a fair share each
        try:
            sweep_shape(op, N, V, todo, defaults, bw, shape_end, args.iters, best, rows, emit)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest shape: the next shape runs
            emit(dict(op=op, shape=f"{N}x{V}", config="(shape)", knobs={}, error=f"{type(e).__name__}: {e}"))
            print(f"  {op} {N}x{V}: {rows[-1]['error'][:200]}", flush=True)
        ce.configure(**defaults)
        torch.cuda.empty_cache()
    print_table(dict(meta=meta, rows=rows, best=[{"op": k[0], "shape": k[1], **v} for k, v in best.items()]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
