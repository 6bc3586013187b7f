"""The linear head's test cases (tests/test_linear*.py): seeded inputs, the
eager composition F.cross_entropy(F.linear(...)) they are judged against,
value-and-gradient runs, and the CPU allocator's peak over a step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ["accurate", "balanced", "compact"]


def inputs(N, D, V, dtype=torch.float64, bias=True, prob=False, ignore=True, seed=0, batch=None):
    """Hidden states, weight, bias and target; every third class target ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    bshape = (N,) if batch is None else batch
    h = torch.randn(*bshape, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5 * 2).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    if prob:
        t = torch.softmax(torch.randn(*bshape, V, generator=g, dtype=torch.float64), -1).to(dtype)
    else:
        t = torch.randint(0, V, bshape, generator=g)
        if ignore and t.numel() > 2:
            t.view(-1)[1::3] = -100
    return h, W, b, t


def value_and_grads(fn, h, W, b, gseed=5):
    """Value and grads of (h, W, b); non-uniform upstream gradient for 'none'."""
    h, W = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    out = fn(h, W, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(gseed), dtype=torch.float64)
    out.backward(g.to(out.dtype) if out.dim() else torch.tensor(1.7, dtype=out.dtype))
    return [out.detach(), h.grad, W.grad] + ([] if b is None else [b.grad])


T = [None]  # the current target, for eager_ce's closure


def eager_ce(red="mean", weight=None, ls=0.0, ii=-100):
    """fn(h, W, b): F.cross_entropy of F.linear's logits against the target T[0]."""
    def f(h, W, b):
        logits = F.linear(h, W, b)
        if h.dim() > 2:
            logits = logits.movedim(-1, 1)
        return F.cross_entropy(logits, T[0], weight=weight, reduction=red, label_smoothing=ls, ignore_index=ii)
    return f


def assert_all_close(a, b, tol=1e-10, what=""):
    """Two lists of tensors: equal shapes and dtypes, values within tol (NaN where NaN)."""
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (what, i, x.shape, y.shape, x.dtype, y.dtype)
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what} [{i}] {m}")


def rel_err(x, r):
    """x's relative error (2-norm) against the float64 reference r."""
    return ((x.double() - r).norm() / r.norm()).item()


def profile_peak(fn) -> int:
    """Peak bytes allocated on the CPU while ``fn`` runs, from the memory
    events of torch's profiler (every allocation and free of the CPU
    allocator, signed sizes, in time order)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak
