"""Small-size benchmark behind ``crossent bench --small``: per-call cost.

At these sizes (a classifier's batch: 32 x 10 to 1024 x 1000 logits) a call
takes 5-1000 us, so per-call overhead is what is measured.  crossent and torch
run in ONE process, interleaved: each round times a batch of calls of one
provider, then of the other (the order alternates between rounds), and the
ratio is taken within the round.  A fresh process per provider, as for the big
cases, would compare two processes' scheduling luck instead.

Rows: one per (case, mode, provider) with median per-call time in
microseconds, and, on crossent's row, the median of the within-round ratios
and their range (a wide range means the machine was busy).
"""
from __future__ import annotations

import time

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


def _median(xs):
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def measure(ops=SMALL_OPS, sizes=SMALL_SIZES, rounds: int = 7, batch_s: float = 0.02) -> list[dict]:
    """Interleaved per-call timings (worker side: imports torch and crossent)."""
    import torch
    rows = []
    for op in ops:
        ours_fn, torch_fn = _fns(op)
        for N, C in sizes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(N, C, generator=g)
            if op in ("nll_loss", "NLLLoss"):
                x = x.log_softmax(1)
            x.requires_grad_(True)
            t = torch.randint(0, C, (N,), generator=g)
            for mode in MODES:
                def step(fn, fwd_only=mode == "fwd"):
                    if fwd_only:
                        with torch.no_grad():
                            fn(x, t)
                    else:
                        x.grad = None
                        fn(x, t).backward()
                steps = {"crossent": lambda: step(ours_fn), "torch": lambda: step(torch_fn)}
                for s in steps.values():  # warm-up
                    for _ in range(3):
                        s()
                t0 = time.perf_counter()
                steps["torch"]()
                n = max(5, int(batch_s / max(time.perf_counter() - t0, 1e-7)))
                per_call = {"crossent": [], "torch": []}
                for r in range(rounds):
                    order = ("crossent", "torch") if r % 2 == 0 else ("torch", "crossent")
                    for prov in order:
                        t0 = time.perf_counter()
                        for _ in range(n):
                            steps[prov]()
                        per_call[prov].append((time.perf_counter() - t0) / n)
                ratios = [a / b for a, b in zip(per_call["crossent"], per_call["torch"])]
                for prov in ("crossent", "torch"):
                    row = {"case": f"{op}-{N}x{C}", "op": op, "mode": mode, "provider": prov,
                           "shape": [N, C], "calls_per_round": n, "rounds": rounds,
                           "median_us": _median(per_call[prov]) * 1e6,
                           "min_us": min(per_call[prov]) * 1e6}
                    if prov == "crossent":
                        row.update(ratio_vs_torch=_median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
                    rows.append(row)
    return rows


def verdict(ratio: float, lo: float, hi: float, noisy: bool, bound: float = 1.1) -> str:
    """A verdict the printed median supports; withheld when the rounds disagree
    about which side of the bound the ratio lies on, on a noisy machine."""
    if noisy and lo <= bound < hi:
        return "undecided: rounds disagree (noisy machine)"
    return f"within {bound:.2f}x of torch" if ratio <= bound else f"SLOWER than {bound:.2f}x torch"


def format_small(rows: list[dict], noisy: bool) -> str:
    """Table in microseconds, 2 decimals; one line per (case, mode)."""
    head = ["case", "mode", "torch us", "crossent us", "crossent/torch", "round range", "verdict"]
    torch_us = {(r["case"], r["mode"]): r["median_us"] for r in rows if r["provider"] == "torch"}
    body = []
    for r in rows:
        if r["provider"] != "crossent":
            continue
        body.append([r["case"], r["mode"], f"{torch_us[(r['case'], r['mode'])]:.2f}", f"{r['median_us']:.2f}",
                     f"{r['ratio_vs_torch']:.2f}", f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
                     verdict(r["ratio_vs_torch"], r["ratio_min"], r["ratio_max"], noisy)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 6) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head)] + [fmt(b) for b in body])
