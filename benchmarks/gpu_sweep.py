"""GPU sweep of the Triton launch knobs: the best configuration per benchmark shape.

For each shape (bf16 cross-entropy forward+gradient at the benchmark shapes, and
the softmax forward) every configuration below is timed kernel-only (CUDA graph
replay of the backend call, so host overhead is not in it; where capture fails, a
burst of eager calls between two events, marked "events") and reported as a
multiple of the bandwidth floor (bytes / copy bandwidth measured in this run):
  split    slice width (_SPLIT_BLOCK) x warps x prefetch x resident CTAs per SM
  twopass  class tile (_LOOP_BLOCK) x evict_last on the first pass (_KEEP_L2)
  cluster  classes per CTA (only where the installed Triton compiles cluster reductions)
The default configuration is timed first in each shape, so a ratio against it is
in the table; a configuration that fails (compile error, cooperative grid too
large) is reported and skipped.  Stops starting new configurations after
--budget-s seconds.  Best per shape goes to the JSON (``best``), which
``gpu_bench.py --tuning`` applies.

    python3 benchmarks/gpu_sweep.py --budget-s 150 --json bench-results/gpu_sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import CE_SHAPES, ROOT, SM_SHAPES, copy_bandwidth, kernel_ms, stamp  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


def configs(cluster_ok: bool):
    """(label, knobs) in the order they are tried: the default first, then the likeliest."""
    yield "default", {}
    # (slice width, warps, prefetch, resident CTAs per SM); values per thread = width / (32 warps)
    for block, warps, pre, ctas in [(4096, 4, True, 8), (8192, 8, False, 8), (8192, 8, True, 8),
                                    (2048, 4, False, 8), (4096, 8, False, 8), (4096, 4, False, 2),
                                    (8192, 4, False, 8), (2048, 2, False, 16), (8192, 16, False, 4)]:
        yield f"split b{block} w{warps} pf{int(pre)} c{ctas}", dict(
            _ROW_PATH="split", _SPLIT_BLOCK=block, _SPLIT_WARPS=warps, _SPLIT_PREFETCH=pre, _SPLIT_CTAS=ctas)
    for block, keep in [(8192, True), (8192, False), (4096, True)]:
        yield f"twopass b{block} l2{int(keep)}", dict(_ROW_PATH="twopass", _LOOP_BLOCK=block, _KEEP_L2=keep)
    if cluster_ok:
        for block, warps in [(8192, 8), (16384, 16), (4096, 8)]:
            yield f"cluster b{block} w{warps}", dict(_ROW_PATH="cluster", _CLUSTER_BLOCK=block,
                                                    _CLUSTER_WARPS=warps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "gpu_sweep.json"))
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sweep: no CUDA device", file=sys.stderr)
        return 1
    from crossent.backends import load
    from crossent.backends.triton import _device, ce, split
    be = load("triton")
    dev = torch.device("cuda", torch.cuda.current_device())
    defaults = {k: getattr(split if hasattr(split, k) else ce, k)
                for _, kn in configs(True) for k in kn}
    cluster_ok = _device.cluster_reductions(dev)
    t_end = time.time() + args.budget_s
    bw = copy_bandwidth(1 << 30)
    meta = dict(stamp(), copy_gbps=bw, cluster_reductions=cluster_ok)
    print(f"{meta['device']} triton {meta['triton']} copy {bw:.0f} GB/s; cluster reductions: {cluster_ok}")
    rows, best = [], {}
    work = [("cross_entropy", s) for s in CE_SHAPES] + [("softmax", s) for s in SM_SHAPES]
    for i, (op, (N, V)) in enumerate(work):
        x = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
        y = torch.randint(0, V, (N,), device=dev)
        one = torch.ones((), device=dev)
        floor_ms = 2 * x.nbytes / (bw * 1e9) * 1e3
        if op == "cross_entropy":
            g = torch.empty_like(x)

            def call():
                be.ce_forward(x, y, None, -100, 0.0, 0.0, 0.0, one, True, grad_into=g)
        else:
            def call():
                be.softmax_forward(x, -1, False)
        shape_end = time.time() + (t_end - time.time()) / (len(work) - i)   # a fair share each
        base = None
        for label, knobs in configs(cluster_ok):
            if time.time() > shape_end:
                print(f"  {op} {N}x{V}: budget reached, later configurations skipped")
                break
            ce.configure(**{**defaults, **knobs})
            row = dict(op=op, shape=f"{N}x{V}", config=label, knobs=knobs)
            try:
                ms, how = kernel_ms(call, iters=args.iters)
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
            rows.append(row)
        ce.configure(**defaults)
        del x, y
        torch.cuda.empty_cache()
    print("== best configuration per shape (kernel only, CUDA graph replay) ==")
    for (op, shape), r in best.items():
        print(f"{op:13} {shape:13} {r['config']:28} {r['ms']:8.3f} ms {r['x_floor']:5.2f}x floor "
              f"({r['vs_default']:.2f}x the default)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows,
                                   best=[{"op": k[0], "shape": k[1], **v} for k, v in best.items()]),
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
