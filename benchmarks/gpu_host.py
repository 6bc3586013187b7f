"""Host (Python) cost of crossent's triton call path, without a GPU (issue 10, item 3).

The eager CUDA call path is timed on the GPU by ``gpu_bench.py`` (its ``overhead`` rows,
target crossent <= torch + 20 us).  Without a GPU this script times the same call path
on tiny CPU tensors, with every Triton launch replaced by a no-op and the two checks
crossent makes only on CPU tensors (target bounds, a finite upstream gradient) switched
off as on CUDA: what is timed is crossent's Python from ``crossent.cross_entropy(...)``
to the launch calls and after them, plus the torch ops it runs (each of which is one more
launch on CUDA).  The best of several rounds of this thread's CPU time is reported: a shared CPU only adds time.

    PYTHONPATH=src python benchmarks/gpu_host.py [--rounds 7] [--calls 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: CPU tensors
os.environ["CROSSENT_BACKEND"] = "triton"

import torch  # noqa: E402


def stub_launches() -> None:
    """Every Triton kernel of the backend becomes a launcher that does nothing; the
    CPU-only checks are switched off, as on CUDA."""
    from crossent import _autograd, _validate
    from crossent.backends.triton import ce, split

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    for mod in (ce, split):
        for name in dir(mod):
            if type(getattr(mod, name)).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(mod, name, Stub())
    _validate.check_target_bounds = lambda *a: None
    _autograd.ce._rescalable = lambda g: True


def _best_us(fn, calls: int, rounds: int) -> float:
    """Best per-call CPU time of this thread: on a shared machine wall time also counts
    the time other processes hold the core (torch runs single-threaded here, so the
    calling thread does all the work, the autograd engine's CPU backward included)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time_ns() - t0) / calls / 1e3)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    import crossent
    torch.set_num_threads(1)
    stub_launches()
    # The (R, C) split path of the benchmark shapes, at a size where CPU allocations cost
    # what CUDA's caching allocator does: tiles shrunk to 16 classes
    from crossent.backends.triton import ce
    ce.configure(_SINGLE_MAX=16, _SPLIT_BLOCK=16)
    R, C = 4, 40
    x = torch.randn(R, C, requires_grad=True)
    y = torch.randint(0, C, (R,))
    cases = {"mean": {}, "sum": dict(reduction="sum"), "none": dict(reduction="none"),
             "mean+w+smooth": dict(weight=torch.rand(C), label_smoothing=0.1)}
    print(f"launches stubbed, CPU tensors {R}x{C}: best of {args.rounds} rounds, us per call")
    print(f"{'case':16} {'fwd+bwd':>8} {'fwd (no grad)':>14}")
    for name, kw in cases.items():
        seed = torch.ones(R if kw.get("reduction") == "none" else ())

        def step():
            x.grad = None
            crossent.cross_entropy(x, y, **kw).backward(seed)

        def forward():
            with torch.no_grad():
                crossent.cross_entropy(x, y, **kw)
        print(f"{name:16} {_best_us(step, args.calls, args.rounds):8.1f} "
              f"{_best_us(forward, args.calls, args.rounds):14.1f}")
    # For scale: torch's own call path with its CPU kernels (tiny: mostly host work).

    def torch_step():
        x.grad = None
        torch.nn.functional.cross_entropy(x, y).backward(torch.ones(()))

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.cross_entropy(x, y)
    print(f"{'torch (CPU) mean':16} {_best_us(torch_step, args.calls, args.rounds):8.1f} "
          f"{_best_us(torch_forward, args.calls, args.rounds):14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
