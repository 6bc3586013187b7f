"""Small-size benchmark behind ``crossent bench --small``: per-call cost.

At these sizes (a classifier's batch: 32 x 10 to 1024 x 1000 logits) a call
takes 3-1000 us, so per-call overhead is what is measured.  crossent and torch
run in ONE process, interleaved: each round times a short batch (~5 ms) of one
provider's calls, then of the other's (the order alternates between rounds),
and the ratio is taken within the round, so a burst of load hits both sides of
a ratio alike.  A round's time is that of the fastest tenth of its batch, so
a preempted stretch of calls does not count.  Both sides run the same step (same inputs, same warm-up, same
number of calls, garbage collection paused); forward-only batches run under
one torch.no_grad() for the whole batch, so only the calls are timed.
A fresh process per provider, as for the big cases, would compare two
processes' scheduling luck instead.

Rows: one per (case, mode, provider) with median per-call time in
microseconds, and, on crossent's row, the median of the within-round ratios,
their quartiles (the middle half of the rounds) and range, and the ratio of the
two medians.
"""
from __future__ import annotations

import contextlib
import gc
import time

from ._bench_worker import median, quantile

SMALL_SIZES = [(32, 10), (256, 100), (64, 1000), (1024, 1000), (4096, 10)]
SMALL_OPS = ("cross_entropy", "nll_loss", "CrossEntropyLoss", "NLLLoss")
MODES = ("fwd+bwd", "fwd")


def _fns(op: str):
    import torch
    import torch.nn.functional as F

    import crossent
    if op in ("cross_entropy", "nll_loss"):
        return getattr(crossent, op), getattr(F, op)
    return getattr(crossent.nn, op)(), getattr(torch.nn, op)()


def _batch(fn, x, t, n: int, fwd_only: bool, parts: int = 1) -> float:
    """Seconds per call of n calls of one provider's step, cut into ``parts``
    timed pieces: the fastest piece's per-call time, so a piece during which
    the process was descheduled (a busy machine) does not count."""
    import torch
    m = max(1, n // parts)
    best = float("inf")
    with torch.no_grad() if fwd_only else contextlib.nullcontext():
        for _ in range(parts):
            t0 = time.perf_counter()
            if fwd_only:
                for _ in range(m):
                    fn(x, t)
            else:
                for _ in range(m):
                    x.grad = None
                    fn(x, t).backward()
            best = min(best, (time.perf_counter() - t0) / m)
    return best


def measure(ops=SMALL_OPS, sizes=SMALL_SIZES, rounds: int = 21, batch_s: float = 0.005) -> list[dict]:
    """Interleaved per-call timings (worker side: imports torch and crossent)."""
    import torch
    rows = []
    for op in ops:
        fns = dict(zip(("crossent", "torch"), _fns(op)))
        for N, C in sizes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(N, C, generator=g)
            if op in ("nll_loss", "NLLLoss"):
                x = x.log_softmax(1)
            x.requires_grad_(True)
            t = torch.randint(0, C, (N,), generator=g)
            for mode in MODES:
                fwd = mode == "fwd"
                for fn in fns.values():  # warm-up, both
                    _batch(fn, x, t, 3, fwd)
                # the same number of calls for both: enough for ~batch_s of the slower
                n = max(5, int(batch_s / max(_batch(fn, x, t, 3, fwd) for fn in fns.values())))
                per_call = {"crossent": [], "torch": []}
                gc_was = gc.isenabled()
                gc.disable()
                try:
                    for r in range(rounds):
                        for prov in (("crossent", "torch") if r % 2 == 0 else ("torch", "crossent")):
                            per_call[prov].append(_batch(fns[prov], x, t, n, fwd, parts=10))
                finally:
                    if gc_was:
                        gc.enable()
                ratios = [a / b for a, b in zip(per_call["crossent"], per_call["torch"])]
                med = {p: median(v) for p, v in per_call.items()}
                for prov in ("crossent", "torch"):
                    row = {"case": f"{op}-{N}x{C}", "op": op, "mode": mode, "provider": prov,
                           "shape": [N, C], "calls_per_round": n, "rounds": rounds,
                           "median_us": med[prov] * 1e6, "min_us": min(per_call[prov]) * 1e6}
                    if prov == "crossent":
                        row.update(ratio_vs_torch=median(ratios), ratio_q1=quantile(ratios, 0.25),
                                   ratio_q3=quantile(ratios, 0.75), ratio_min=min(ratios),
                                   ratio_max=max(ratios), ratio_of_medians=med["crossent"] / med["torch"])
                    rows.append(row)
    return rows


def verdict(ratio: float, lo: float, hi: float, noisy: bool, bound: float = 1.1,
            of_medians: float | None = None) -> str:
    """A verdict the printed numbers support: ``ratio`` (the median of the
    within-round ratios) and, if given, the ratio of the two medians must fall
    on the same side of the bound, and on a noisy machine so must the middle
    half of the rounds (``lo``-``hi``, their quartiles); otherwise none."""
    if of_medians is not None and (ratio <= bound) != (of_medians <= bound):
        return "undecided: median ratio and ratio of medians disagree"
    if noisy and lo <= bound < hi:
        return "undecided: rounds disagree (noisy machine)"
    return f"within {bound:.2f}x of torch" if ratio <= bound else f"SLOWER than {bound:.2f}x torch"


def format_small(rows: list[dict], noisy: bool) -> str:
    """Table in microseconds, 2 decimals; one line per (case, mode)."""
    head = ["case", "mode", "torch us", "crossent us", "crossent/torch", "middle half", "verdict"]
    torch_us = {(r["case"], r["mode"]): r["median_us"] for r in rows if r["provider"] == "torch"}
    body = []
    for r in rows:
        if r["provider"] != "crossent":
            continue
        lo, hi = r.get("ratio_q1", r["ratio_min"]), r.get("ratio_q3", r["ratio_max"])
        body.append([r["case"], r["mode"], f"{torch_us[(r['case'], r['mode'])]:.2f}", f"{r['median_us']:.2f}",
                     f"{r['ratio_vs_torch']:.2f}", f"{lo:.2f}-{hi:.2f}",
                     verdict(r["ratio_vs_torch"], lo, hi, noisy, of_medians=r.get("ratio_of_medians"))])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 6) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head)] + [fmt(b) for b in body])
