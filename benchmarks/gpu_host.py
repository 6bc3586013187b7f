"""Host (Python) cost of crossent's triton call path, and the launches it makes.

On a GPU machine: eager fwd+bwd of a tiny problem, where the kernels take a few
microseconds and the host path is what is timed, against torch's own eager
cross_entropy, interleaved (issue 10, item 3: <= torch + 20 us).

Without a GPU (``--stub``): the same call path on tiny CPU tensors with every
Triton launch replaced by a no-op, so what is timed is crossent's Python from
``crossent.cross_entropy(...)`` to the launch calls and after them, plus the
torch ops it runs (each of which would be one more launch on CUDA).

    PYTHONPATH=src python benchmarks/gpu_host.py [--stub] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _stub_launches():
    """Replace every Triton kernel of the backend by a launcher that does nothing, and
    switch off the two checks crossent makes only on CPU tensors (target bounds, a
    finite upstream gradient), as on CUDA, so the path timed is the CUDA one."""
    from crossent import _autograd, _validate
    from crossent.backends.triton import ce, split
    _validate.check_target_bounds = lambda *a: None
    _autograd._rescalable = lambda g: True

    class Stub:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **k: None

        def __getattr__(self, name):
            return getattr(self.fn, name)

    for mod in (ce, split):
        for name in dir(mod):
            obj = getattr(mod, name)
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(mod, name, Stub(obj))


def _time(fn, n: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stub", action="store_true", help="no GPU: CPU tensors, launches stubbed")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    if args.stub:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CROSSENT_BACKEND"] = "triton"
    import crossent
    dev = "cuda" if torch.cuda.is_available() and not args.stub else "cpu"
    if args.stub:
        _stub_launches()
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    # C above the single-tile limit: the (R, C) split path, as at the benchmark shapes
    R, C = 4, 20000
    x = torch.randn(R, C, device=dev, dtype=dt, requires_grad=True)
    y = torch.randint(0, C, (R,), device=dev)
    w = torch.rand(C, device=dev, dtype=dt)
    cases = {
        "mean": dict(),
        "sum": dict(reduction="sum"),
        "none": dict(reduction="none"),
        "mean+w+smooth": dict(weight=w, label_smoothing=0.1),
    }
    print(f"device {dev}{' (launches stubbed)' if args.stub else ''}, {tuple(x.shape)} {dt}; "
          f"{'best' if args.stub else 'median'} of {args.rounds} interleaved rounds, us per fwd+bwd call")
    print(f"{'case':16} {'crossent':>9} {'torch':>9} {'diff':>8}   (torch: only on a GPU)")
    for name, kw in cases.items():
        seed = torch.ones((), device=dev, dtype=dt) if kw.get("reduction") != "none" else \
            torch.ones(R, device=dev, dtype=dt)

        def ours():
            x.grad = None
            crossent.cross_entropy(x, y, **kw).backward(seed)

        def theirs():
            x.grad = None
            F.cross_entropy(x, y, **kw).backward(seed)
        a, b = [], []
        for _ in range(args.rounds):
            a.append(_time(ours, args.calls))
            b.append(float("nan") if args.stub else _time(theirs, args.calls))
        # stub: the fastest round (a shared CPU only ever adds time); GPU: the median
        ma, mb = (min(a), min(b)) if args.stub else (statistics.median(a), statistics.median(b))
        print(f"{name:16} {ma:9.1f} {mb:9.1f} {ma - mb:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
