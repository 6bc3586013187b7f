"""crossent.distributed on gloo/CPU with 2 and 3 local processes.

Each world size is spawned once (tests/_dist.py) and every rank runs a long
list of cases, comparing with single-process crossent.cross_entropy / torch's
F.cross_entropy on the full logits: every argument combination on uneven
splits, the three ways to name the group, the linear head, and issue 9's
regressions (ignore_index in narrow target dtypes; precision relative to the
row max; the fuzz tier's vocab-parallel findings: double backward, (1, C)
weights, zero-size dims, cross_entropy's errors, autocast).
tests/gpu/test_gpu_distributed.py runs the same cases on CUDA.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest

from _dist import Checker, ce_case, check, groups, launch, splits, worker_main

HERE = os.path.abspath(__file__)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world):
    check(HERE, world, "cases", min_cases=100)


def test_rank_failure_fails_fast():
    """Rank 1 raises while rank 0 waits in a collective: no hang."""
    rcs, results, logs, elapsed = launch(HERE, 2, "raise", deadline_s=60)
    assert rcs[1] not in (0, None) and rcs[0] != 0, (rcs, logs)
    assert "deliberate failure" in logs[1]
    assert elapsed < 45, elapsed


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------
def _ce_cases(ck: Checker, rank: int, world: int):
    import torch
    import torch.nn.functional as F

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy as vpce

    dev, gs = ck.dev, groups(world, ck.dev)
    for si, sizes in enumerate(splits(world)):
        C = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        combos = itertools.product(["2d", "kd", "1d"], ["class", "prob"], ["mean", "sum", "none"],
                                   [False, True], [0.0, 0.15], ["plain", "z", "cap", "zcap"])
        for ci, (shape, tk, red, weighted, eps, extra) in enumerate(combos):
            if ci % 3 != si % 3:  # every combination runs on at least one split
                continue
            seed = 1000 * si + ci
            g = torch.Generator().manual_seed(seed)
            ii = -100 if tk == "prob" else [-100, 1][ci % 2]
            x, t, w, cdim = ce_case(g, C, shape, tk, weighted, 6, dev, ii)
            kw = dict(reduction=red, label_smoothing=eps, ignore_index=ii,
                      z_loss=0.01 if "z" in extra else 0.0, softcap=4.0 if "cap" in extra else None)
            name = f"split={sizes} {shape} {tk} {red} w={weighted} eps={eps} {extra} ii={ii}"
            xs = x.narrow(cdim, lo, hi - lo).detach().clone().requires_grad_(True)
            ts = t.narrow(cdim, lo, hi - lo) if tk == "prob" else t
            vsi = lo if ci % 3 == 0 else None
            out = vpce(xs, ts, group=gs[ci % len(gs)], weight=w, vocab_start_index=vsi, **kw)
            xf = x.clone().requires_grad_(True)
            ref = crossent.cross_entropy(xf, t, w, **kw)
            ck.close(name + " value", out, ref)
            if extra == "plain":  # and torch itself where there are no extras
                ck.close(name + " value vs torch", out, F.cross_entropy(
                    x, t, w, ignore_index=ii, reduction=red, label_smoothing=eps))
            gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dev)
            (gs_,) = torch.autograd.grad(out, xs, gout)
            (gf,) = torch.autograd.grad(ref, xf, gout)
            ck.close(name + " grad", gs_, gf.narrow(cdim, lo, hi - lo))
            ck.cases += 1


def _special_cases(ck: Checker, rank: int, world: int):
    import torch

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy as vpce

    dev = ck.dev
    sizes = splits(world)[1]
    C = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, C, generator=g, dtype=torch.float64).to(dev)
    # Every position ignored: mean NaN, sum 0, zero gradient.
    t = torch.full((5,), -100, device=dev)
    for red in ["mean", "sum"]:
        xs = x[:, lo:hi].clone().requires_grad_(True)
        out = vpce(xs, t, reduction=red, label_smoothing=0.1)
        ck.close(f"all ignored {red}", out, crossent.cross_entropy(x, t, reduction=red, label_smoothing=0.1))
        (gs,) = torch.autograd.grad(out, xs)
        ck.close(f"all ignored {red} grad", gs, torch.zeros_like(gs))
        ck.cases += 1
    # Out-of-range target: IndexError on every rank (after the same collectives)
    # on CPU; NaN on an accelerator (checking would sync with the host).
    bad = torch.tensor([0, C, 1, 2, 3], device=dev)
    if dev == "cpu":
        try:
            vpce(x[:, lo:hi], bad)
            ck.fail("out-of-range target did not raise")
        except IndexError as e:
            ck.true("out-of-range message", f"Target {C} is out of bounds" in str(e), str(e))
    else:
        ck.true("out-of-range target gives NaN", bool(vpce(x[:, lo:hi], bad).isnan()))
    ck.cases += 1
    # -inf padding columns (a padded vocab): finite loss, zero gradient there.
    xp = x.clone()
    xp[:, -1] = float("-inf")
    t = torch.tensor([0, 1, 2, 3, -100], device=dev)
    xs = xp[:, lo:hi].clone().requires_grad_(True)
    xf = xp.clone().requires_grad_(True)
    out, ref = vpce(xs, t, z_loss=1e-3), crossent.cross_entropy(xf, t, z_loss=1e-3)
    ck.close("-inf column", out, ref)
    ck.close("-inf column grad", torch.autograd.grad(out, xs)[0], torch.autograd.grad(ref, xf)[0][:, lo:hi])
    ck.cases += 1
    # bf16 and fp32 logits: crossent's fp32 accumulation, same dtype out.
    for dt, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        xl = x.to(dt)
        t = torch.tensor([0, 1, C - 1, 3, -100], device=dev)
        xs = xl[:, lo:hi].clone().requires_grad_(True)
        xf = xl.clone().requires_grad_(True)
        out = vpce(xs, t, label_smoothing=0.1, group=groups(world, dev)[-1])
        ref = crossent.cross_entropy(xf, t, label_smoothing=0.1)
        ck.close(f"{dt} value", out, ref, rtol=tol, atol=tol)
        ck.close(f"{dt} grad", torch.autograd.grad(out, xs)[0], torch.autograd.grad(ref, xf)[0][:, lo:hi],
                 rtol=tol, atol=tol)
        ck.cases += 1


def _issue9_cases(ck: Checker, rank: int, world: int):
    """Issue 9 items 1 and 4 on the vocab-parallel path, against torch."""
    import torch
    import torch.nn.functional as F

    from _tol import _err, floor
    from crossent.distributed import vocab_parallel_cross_entropy as vpce
    from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

    dev = ck.dev
    # 1. ignore_index compared as an integer, never in the target's dtype:
    # -100 must not match class 156 of a uint8 target, nor 2**32 class 0 of an int32 one.
    C = 200
    sizes = [C // world + (r < C % world) for r in range(world)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, C, generator=g, dtype=torch.float64).to(dev)
    h, W = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dev), torch.randn(C, 6, generator=g,
                                                                                   dtype=torch.float64).to(dev)
    for dt, ii, vals in [(torch.uint8, -100, [156, 3, 0, 199]), (torch.int32, 2 ** 32, [0, 5, 156, 7]),
                         (torch.uint8, 3, [156, 3, 0, 199])]:
        t = torch.tensor(vals, dtype=dt, device=dev)
        for red in ["none", "sum"]:
            ref = F.cross_entropy(x, t.long(), ignore_index=ii, reduction=red, label_smoothing=0.1)
            name = f"{dt} target ignore_index={ii} {red}"
            ck.close(name, vpce(x[:, lo:hi], t, ignore_index=ii, reduction=red, label_smoothing=0.1), ref)
            lin = vplce(h, W[lo:hi], t, ignore_index=ii, reduction=red, label_smoothing=0.1)
            ck.close(name + " linear", lin, F.cross_entropy(h @ W.T, t.long(), ignore_index=ii, reduction=red,
                                                            label_smoothing=0.1))
            ck.cases += 1
    # 4. Precision relative to the row max: a common offset (which the softmax
    # ignores) must cost no more accuracy than it costs torch, fp32 logits.
    C = 1000
    sizes = [C // world + (r < C % world) for r in range(world)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    base = torch.randn(64, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (64,), generator=g)
    t[0] = -100
    for off, eps, extra in itertools.product([1e3, 1e4, -1e4], [0.0, 0.1], [{}, {"z_loss": 1e-4}]):
        x32 = (base + off).float().to(dev)
        x64 = x32.double()
        tt = t.to(dev)
        xs = x32[:, lo:hi].clone().requires_grad_(True)
        out = vpce(xs, tt, label_smoothing=eps, reduction="none", **extra)
        xt = x32.clone().requires_grad_(True)
        xr = x64.clone().requires_grad_(True)
        theirs = F.cross_entropy(xt, tt, label_smoothing=eps, reduction="none")
        ref = F.cross_entropy(xr, tt, label_smoothing=eps, reduction="none")
        if extra:  # torch has no z-loss: add it in the same dtype, as a user would
            theirs = theirs + 1e-4 * torch.where(tt != -100, torch.logsumexp(xt, 1) ** 2, 0)
            ref = ref + 1e-4 * torch.where(tt != -100, torch.logsumexp(xr, 1) ** 2, 0)
        gout = torch.rand(64, generator=g, dtype=torch.float64).to(dev)
        name = f"offset {off} eps={eps} {extra}"
        bound = 4 * _err(theirs, ref) + floor(ref, torch.float32)
        ck.true(name + " value", _err(out, ref) <= bound, f"{_err(out, ref):.3g} > {bound:.3g}")
        (g_ours,) = torch.autograd.grad(out, xs, gout.float())
        (g_theirs,) = torch.autograd.grad(theirs, xt, gout.float())
        (g_ref,) = torch.autograd.grad(ref, xr, gout)
        g_ref, g_theirs = g_ref[:, lo:hi], g_theirs[:, lo:hi]
        bound = 4 * _err(g_theirs, g_ref) + floor(g_ref, torch.float32)
        ck.true(name + " grad", _err(g_ours, g_ref) <= bound, f"{_err(g_ours, g_ref):.3g} > {bound:.3g}")
        ck.cases += 1
    # fp32 logits near fp32's range with label smoothing: the sums over classes
    # of w_c (z_c - max) pass fp32's range (torch's fp32 class-target loss is
    # inf) while the loss fits; ours is the float64 one, rounded, as the
    # single-process loss, and the gradient is torch's.
    x32 = ((torch.rand(6, C, generator=g, dtype=torch.float64) * 2 - 1) * 1e38).float().to(dev)
    wt = (torch.rand(C, generator=g) + 0.5).to(dev)
    for tk, w, red in itertools.product(["class", "prob"], [None, wt], ["none", "mean"]):
        t = (torch.softmax(torch.randn(6, C, generator=g), 1) if tk == "prob"
             else torch.randint(0, C, (6,), generator=g)).to(dev)
        if tk == "class":
            t[1] = -100
        xs = x32[:, lo:hi].clone().requires_grad_(True)
        out = vpce(xs, t[:, lo:hi] if tk == "prob" else t, weight=w, label_smoothing=0.3, reduction=red)
        xt = x32.clone().requires_grad_(True)
        theirs = F.cross_entropy(xt, t, weight=w, label_smoothing=0.3, reduction=red)
        ref = F.cross_entropy(x32.double(), t.double() if tk == "prob" else t,
                              weight=None if w is None else w.double(), label_smoothing=0.3, reduction=red)
        name = f"huge logits {tk} weight={w is not None} {red}"
        ck.close(name + " value", out, ref.float(), rtol=1e-5, atol=0)
        (g_ours,) = torch.autograd.grad(out.sum(), xs)
        (g_theirs,) = torch.autograd.grad(theirs.sum(), xt)
        ck.close(name + " grad", g_ours, g_theirs[:, lo:hi], rtol=1e-5, atol=1e-6)
        ck.cases += 1


def _linear_cases(ck: Checker, rank: int, world: int):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import crossent
    from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

    try:  # the single-process fused version, where it exists
        from crossent.linear import linear_cross_entropy as lce
    except ImportError:
        lce = None
    dev, grps = ck.dev, groups(world, ck.dev)
    D = 5
    for si, sizes in enumerate(splits(world)[:3]):
        V = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        combos = itertools.product(["class", "prob"], ["mean", "sum", "none"], [False, True],
                                   [0.0, 0.1], [False, True], [True, False])
        for ci, (tk, red, weighted, eps, extras, reduce_dx) in enumerate(combos):
            if ci % 3 != si % 3:  # every combination on exactly one split
                continue
            g = torch.Generator().manual_seed(50_000 + 1000 * si + ci)
            x = torch.randn(3, 4, D, generator=g, dtype=torch.float64).to(dev)
            W = torch.randn(V, D, generator=g, dtype=torch.float64).to(dev)
            b = torch.randn(V, generator=g, dtype=torch.float64).to(dev) if ci % 2 else None
            if tk == "prob":
                t = torch.softmax(torch.randn(3, 4, V, generator=g, dtype=torch.float64), -1).to(dev)
                ts = t[..., lo:hi]
            else:
                t = torch.randint(0, V, (3, 4), generator=g)
                t[0, 0] = -100
                t = ts = t.to(dev)
            w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.1).to(dev) if weighted else None
            kw = dict(reduction=red, label_smoothing=eps, weight=w,
                      z_loss=0.01 if extras else 0.0, softcap=5.0 if extras else None)
            name = f"linear split={sizes} {tk} {red} w={weighted} eps={eps} extras={extras} reduce={reduce_dx}"
            xs = x.clone().requires_grad_(True)
            Ws = W[lo:hi].clone().requires_grad_(True)
            bs = b[lo:hi].clone().requires_grad_(True) if b is not None else None
            out = vplce(xs, Ws, ts, group=grps[ci % len(grps)], linear_bias_shard=bs,
                        reduce_input_grad=reduce_dx, chunk_size=5, **kw)
            xf, Wf = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
            bf = b.clone().requires_grad_(True) if b is not None else None
            lg = F.linear(xf, Wf, bf)
            ref = None
            if lce is not None:
                try:
                    ii = {} if tk == "prob" else {"ignore_index": -100}
                    ref = lce(xf, Wf, t, linear_bias=bf, **ii, **kw)
                except TypeError:  # a signature we do not know: fall back to eager
                    ref = None
            if ref is None:
                ce = crossent.cross_entropy(lg.reshape(12, V), t.reshape(12, V) if tk == "prob" else t.reshape(12),
                                            w, reduction=red, label_smoothing=eps, z_loss=kw["z_loss"],
                                            softcap=kw["softcap"])
                ref = ce.reshape(3, 4) if red == "none" else ce
            ck.close(name + " value", out, ref)
            gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dev)
            params = (xs, Ws) + ((bs,) if b is not None else ())
            fparams = (xf, Wf) + ((bf,) if b is not None else ())
            gs = torch.autograd.grad(out, params, gout)
            gf = torch.autograd.grad(ref, fparams, gout)
            dx = gs[0]
            if not reduce_dx:  # partial sums: their sum over ranks is the full gradient
                dx = dx.clone()
                dist.all_reduce(dx)
            ck.close(name + " dx", dx, gf[0])
            ck.close(name + " dW", gs[1], gf[1][lo:hi])
            if b is not None:
                ck.close(name + " db", gs[2], gf[2][lo:hi])
            ck.cases += 1


def _raises(fn):
    """(type name, message) of what fn() raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared with what cross_entropy raises
        return type(e).__name__, str(e)
    return None


def _hardening_cases(ck: Checker, rank: int, world: int):
    """The fuzz tier's vocab-parallel findings (tests/_fuzz.py runs them on one
    rank) across ranks, against single-process crossent / torch: double
    backward, (1, C) class weights, zero-size dims, cross_entropy's errors for
    the full logits, autocast."""
    import torch
    import torch.distributed as dist

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy as vpce
    from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

    dev = ck.dev
    sizes = splits(world)[3]  # one rank may hold no class
    C = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(13)
    # Double backward: the shard's gradient has a gradient.  Summed over the
    # ranks, sum_r <grad_r, v_r> is <grad, v> of the full logits, so its
    # gradient on each rank is that rank's slice of the Hessian-vector product.
    for tk, extra in itertools.product(["class", "prob"], [{}, {"label_smoothing": 0.1, "z_loss": 0.01,
                                                                "softcap": 4.0}]):
        x = torch.randn(4, C, 3, generator=g, dtype=torch.float64).to(dev)
        t = (torch.softmax(torch.randn(4, C, 3, generator=g, dtype=torch.float64), 1) if tk == "prob"
             else torch.randint(0, C, (4, 3), generator=g)).to(dev)
        w = (torch.rand(1, C, generator=g, dtype=torch.float64) + 0.1).to(dev)  # (1, C): any C elements
        v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dev)
        xs = x[:, lo:hi].clone().requires_grad_(True)
        xf = x.clone().requires_grad_(True)
        ts = t[:, lo:hi] if tk == "prob" else t
        wt = w if tk == "class" else None  # probability targets take a (C,) weight only
        (gs,) = torch.autograd.grad(vpce(xs, ts, weight=wt, **extra), xs, create_graph=True)
        (gf,) = torch.autograd.grad(crossent.cross_entropy(xf, t, wt, **extra), xf, create_graph=True)
        name = f"double backward {tk} {extra}"
        ck.true(name + " requires grad", gs.requires_grad)
        ck.close(name + " grad", gs, gf[:, lo:hi])
        (hs,) = torch.autograd.grad((gs * v[:, lo:hi]).sum(), xs)
        (hf,) = torch.autograd.grad((gf * v).sum(), xf)
        ck.close(name + " second order", hs, hf[:, lo:hi])
        ck.cases += 1
    # The linear head: the weight shard's and (partial, reduced here) input's second order.
    D = 4
    h = torch.randn(5, D, generator=g, dtype=torch.float64).to(dev)
    W = torch.randn(C, D, generator=g, dtype=torch.float64).to(dev)
    t = torch.randint(0, C, (5,), generator=g).to(dev)
    vx, vW = (torch.randn(a.shape, generator=g, dtype=torch.float64).to(dev) for a in (h, W))
    hs, Ws = h.clone().requires_grad_(True), W[lo:hi].clone().requires_grad_(True)
    hf, Wf = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    gx, gW = torch.autograd.grad(vplce(hs, Ws, t, label_smoothing=0.1, reduce_input_grad=False), (hs, Ws),
                                 create_graph=True)
    fx, fW = torch.autograd.grad(crossent.cross_entropy(hf @ Wf.T, t, label_smoothing=0.1), (hf, Wf),
                                 create_graph=True)
    sx, sW = torch.autograd.grad((gx * vx).sum() + (gW * vW[lo:hi]).sum(), (hs, Ws))
    rx, rW = torch.autograd.grad((fx * vx).sum() + (fW * vW).sum(), (hf, Wf))
    dist.all_reduce(sx)  # x is replicated: its partial second-order gradients sum up
    ck.close("linear double backward dW", sW, rW[lo:hi])
    ck.close("linear double backward dx", sx, rx)
    ck.cases += 1
    # Zero-size spatial dims: what cross_entropy returns (NaN mean, empty 'none').
    for red in ["mean", "sum", "none"]:
        x = torch.randn(2, C, 0, 1, dtype=torch.float64, device=dev)
        t = torch.zeros(2, 0, 1, dtype=torch.long, device=dev)
        ck.close(f"zero-size dim {red}", vpce(x[:, lo:hi], t, reduction=red),
                 crossent.cross_entropy(x, t, reduction=red))
        ck.cases += 1
    # Errors: cross_entropy's, for the full logits, on every rank.
    x = torch.randn(4, C, generator=g, dtype=torch.float64).to(dev)
    xk = torch.randn(2, C, 3, generator=g, dtype=torch.float64).to(dev)
    t, tk = torch.randint(0, C, (4,), generator=g).to(dev), torch.randint(0, C, (2, 3), generator=g).to(dev)
    bad = [("target batch", x, torch.zeros(5, dtype=torch.long, device=dev), {}),
           ("weight numel", x, t, {"weight": torch.ones(C + 1, dtype=torch.float64, device=dev)}),
           ("weight numel K-dim", xk, tk, {"weight": torch.ones(C + 2, dtype=torch.float64, device=dev)}),
           ("weight (1, C) 2-D", x, t, {"weight": torch.ones(1, C, dtype=torch.float64, device=dev)}),
           ("weight requires grad", x, t, {"weight": torch.ones(C, dtype=torch.float64, device=dev,
                                                                requires_grad=True)}),
           ("weight dtype", x, t, {"weight": torch.ones(C, device=dev)}),
           ("prob weight numel", x, torch.softmax(x, 1), {"weight": torch.ones(C - 1, dtype=torch.float64,
                                                                                device=dev)}),
           ("integer input", x.long(), t, {}),
           ("smoothing > 1", x, t, {"label_smoothing": 1.5})]
    for name, xb, tb, kw in bad:
        if "numel" in name and dev != "cpu":  # the global C is a device tensor there: no host sync to check it
            continue
        ts = tb[:, lo:hi] if tb.shape == xb.shape else tb
        ours = _raises(lambda: vpce(xb[:, lo:hi], ts, **kw))
        theirs = _raises(lambda: crossent.cross_entropy(xb, tb, **kw))
        ck.true(f"error {name}", ours == theirs and theirs is not None, f"{ours} vs {theirs}")
        ck.cases += 1
    # Autocast: a float32 loss, the one of the bf16 logits' values (crossent
    # accumulates in fp32), as single-process crossent and torch's CPU autocast
    # (cross_entropy is one of its fp32 ops) give.  CUDA autocast has no rule for
    # cross_entropy: its log_softmax runs in the input's dtype there (cross_entropy
    # asks for it, and autocast honours an explicit dtype), only nll_loss in
    # fp32, so torch's loss is a
    # mean of bf16-rounded log-probabilities: within bf16's unit roundoff 2**-8 of
    # itself from ours (the test allows twice that).
    x = torch.randn(4, C, generator=g).to(dev, torch.bfloat16)
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = vpce(x[:, lo:hi], t)
        single = crossent.cross_entropy(x, t)
        theirs = torch.nn.functional.cross_entropy(x, t)
    ck.close("autocast", out, torch.nn.functional.cross_entropy(x.float(), t), rtol=1e-6, atol=1e-6)
    ck.close("autocast vs single process", out, single, rtol=1e-6, atol=1e-6)
    ck.close("autocast vs torch", out, theirs, rtol=2 ** -7, atol=0)
    ck.cases += 1


def _raise(ck: Checker, rank: int, world: int):
    import torch

    from crossent.distributed import vocab_parallel_cross_entropy
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    x = torch.randn(4, 3)
    vocab_parallel_cross_entropy(x, torch.zeros(4, dtype=torch.long))  # blocks: rank 1 is gone
    sys.exit(3)


MODES = {"cases": [_ce_cases, _special_cases, _issue9_cases, _linear_cases, _hardening_cases],
         "raise": [_raise]}

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main(MODES)
