"""CPU benchmark of the fused linear + cross-entropy (forward + backward).

Providers, each measured in a fresh subprocess (so peak RSS and allocator
state cannot leak between them):
  crossent-accurate   crossent.linear_cross_entropy(acc_policy="accurate")
  crossent-compact    crossent.linear_cross_entropy(acc_policy="compact")
                      (a suffix @M sets chunk_bytes to M MiB: crossent-accurate@32)
  torch-chunked       F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())
  torch-eager         F.cross_entropy(F.linear(h, W), t)

Reported: median and p10/p90 ms per fwd+bwd, extra peak RSS (peak during the
timed loop minus RSS before it; VmHWM reset via /proc/self/clear_refs, else
ru_maxrss), TFLOP/s against 6*N*D*V, and each median over torch-chunked's.
Rows are JSON-stamped (date, host, CPU, torch/crossent versions, commit)
with crossent._bench's helpers.

  PYTHONPATH=src python benchmarks/linear_bench.py [--shape 4096x512x32000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crossent import _bench as H  # noqa: E402  (shared stats/stamp/RSS helpers)

PROVIDERS = ("crossent-accurate", "crossent-compact", "torch-chunked", "torch-eager")


def _worker(spec: dict) -> dict:
    import gc
    import torch
    import torch.nn.functional as F
    N, D, V = spec["shape"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g) * 0.5).to(dtype).requires_grad_(True)
    W = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    p = spec["provider"]
    if p.startswith("crossent"):
        from crossent.linear import LinearCrossEntropyOptions, linear_cross_entropy
        policy, _, mib = p.split("-", 1)[1].partition("@")
        opts = LinearCrossEntropyOptions(acc_policy=policy, chunk_bytes=int(mib) << 20 if mib else None)

        def fn():
            return linear_cross_entropy(h, W, t, options=opts)
    elif p == "torch-chunked":
        opts = torch.nn.LinearCrossEntropyOptions()

        def fn():
            return F.linear_cross_entropy(h, W, t, options=opts)
    elif p == "torch-eager":
        def fn():
            return F.cross_entropy(F.linear(h, W), t)
    else:
        raise ValueError(p)

    def step():
        h.grad = W.grad = None
        fn().backward()

    step()
    t0 = time.perf_counter()
    step()
    one = time.perf_counter() - t0
    iters = spec.get("iters") or max(3, min(20, int(spec.get("seconds", 8.0) / max(one, 1e-6))))
    h.grad = W.grad = None
    gc.collect()
    base = H._rss_kib("VmRSS")
    method = H._reset_peak()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = H._peak_kib(method)
    out = {"iters": iters, **H.summarize(times), "extra_peak_mib": max(0, peak - base) / 1024,
           "rss_method": method, "threads": torch.get_num_threads(), "dtype": str(dtype)[6:]}
    out["tflops"] = 6 * N * D * V / (out["median_ms"] / 1e3) / 1e12
    return out


def _spawn(spec: dict, timeout: float) -> dict:
    return H.spawn_worker([sys.executable, __file__, "--worker", json.dumps(spec)], timeout)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        try:
            res = _worker(json.loads(argv[1]))
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        print("@@RESULT " + json.dumps(res), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x512x32000", help="NxDxV")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--iters", type=int)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=1, help="run every provider this many times (interleaved)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args(argv)
    shape = [int(s) for s in a.shape.split("x")]
    stamp = H.env_stamp()
    rows = []
    for rep in range(a.repeat):
        for p in a.providers.split(","):
            print(f"[{rep + 1}/{a.repeat}] {p} {a.shape} ...", file=sys.stderr, flush=True)
            res = _spawn({"provider": p, "shape": shape, "dtype": a.dtype, "iters": a.iters,
                          "seconds": a.seconds}, a.timeout)
            rows.append({**stamp, "bench": "linear_cross_entropy", "provider": p, "shape": shape,
                         "repeat": rep, **res})
    for r in rows:
        ref = [x for x in rows if x["provider"] == "torch-chunked" and x["repeat"] == r["repeat"]]
        r["ratio_vs_torch_chunked"] = (r["median_ms"] / ref[0]["median_ms"]
                                       if ref and "median_ms" in r and "median_ms" in ref[0] else None)
    print(f"crossent {stamp['crossent']} (commit {stamp['git_commit']}), torch {stamp['torch']}, "
          f"{stamp['cpu']}, {stamp['cores']} cores, {stamp['torch_threads']} threads; N x D x V = {a.shape} "
          f"{a.dtype}; fwd+bwd")
    hdr = f"{'provider':18} {'rep':>3} {'median ms':>10} {'p10-p90 ms':>17} {'extra MiB':>10} {'TFLOP/s':>8} {'vs torch-chunked':>16}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['provider']:18} {r['repeat']:>3} error: {r['error']}")
            continue
        ratio = "-" if r["ratio_vs_torch_chunked"] is None else f"{r['ratio_vs_torch_chunked']:.3f}"
        print(f"{r['provider']:18} {r['repeat']:>3} {r['median_ms']:>10.1f} "
              f"{r['p10_ms']:>8.1f}-{r['p90_ms']:<8.1f} {r['extra_peak_mib']:>10.1f} {r['tflops']:>8.3f} {ratio:>16}")
    if a.json:
        H.write_json(a.json, rows)
        print(f"wrote {len(rows)} rows to {a.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
