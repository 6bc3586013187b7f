"""Regression tests for the numerical classes of bugs an independent
differential fuzz found (issue 9): precision under a common logit offset or
huge logits, non-finite upstream gradients and logits, double backward and
forward-mode AD, each judged against torch itself (or its float64 value),
never hand-written constants.  The numbered sections are issue 9's items."""
from __future__ import annotations

from math import inf, nan

import pytest
import torch
import torch.nn.functional as F

import crossent
from _compare import REDUCTIONS, same_as_torch
from _tol import assert_close_to_ref


# ---------------------------------------------------------------------------
# 4. precision does not fall with the logits' magnitude (a common offset)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1e3, 1e4, -3e4])
@pytest.mark.parametrize("kind", ["plain", "smoothing", "weighted smoothing", "prob", "prob smoothing",
                                  "K-dim"])
def test_common_offset_costs_no_digits(offset, kind):
    g = torch.Generator().manual_seed(3)
    shape = (2, 300, 5) if kind.endswith("K-dim") else (48, 500)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).float()
    C = shape[1]
    prob = kind.startswith("prob")
    t = (torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1) if prob
         else torch.randint(0, C, (shape[0], *shape[2:]), generator=g))
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if "weighted" in kind else None
    kw = dict(label_smoothing=0.1 if "smoothing" in kind else 0.0)
    for reduction in ("none", "sum"):
        out = []
        t32, w32 = (t.float() if prob else t), (None if w is None else w.float())
        for fn, xx, tt, ww in ((crossent.cross_entropy, x, t32, w32), (F.cross_entropy, x, t32, w32),
                               (F.cross_entropy, x.double(), t, w)):
            xi = xx.clone().requires_grad_()
            loss = fn(xi, tt, ww, reduction=reduction, **kw)
            (gx,) = torch.autograd.grad(loss.sum(), xi)
            out.append((loss.detach(), gx))
        (o, go), (th, gt), (r, gr) = out
        assert_close_to_ref(o, th, r, dtype=torch.float32, what=f"{kind} {offset} {reduction} loss")
        assert_close_to_ref(go, gt, gr, dtype=torch.float32, what=f"{kind} {offset} {reduction} grad")


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_log_softmax_and_nll_with_offset(offset):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(16, 200, generator=g, dtype=torch.float64) + offset).float()
    t = torch.randint(0, 200, (16,), generator=g)
    for fn, args in ((crossent.log_softmax, (1,)), (lambda x: crossent.nll_loss(x, t, reduction="none"), ())):
        tfn = F.log_softmax if fn is crossent.log_softmax else (lambda x: F.nll_loss(x, t, reduction="none"))
        assert_close_to_ref(fn(x, *args), tfn(x, *args), tfn(x.double(), *args), dtype=torch.float32)


# ---------------------------------------------------------------------------
# 6. nll_loss double backward
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 5, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_create_graph_gradient_requires_grad_like_torch(shape, reduction):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, () if len(shape) == 1 else (shape[0], *shape[2:]))
    w = torch.rand(5, dtype=torch.float64)
    results = []
    for fn in (crossent.nll_loss, F.nll_loss):
        out = fn(x, t, w, reduction=reduction)
        (g1,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert g1.requires_grad
        (g2,) = torch.autograd.grad((g1 * g1).sum(), x, allow_unused=False)
        results.append((g1.detach(), g2))
    torch.testing.assert_close(results[0], results[1])


# ---------------------------------------------------------------------------
# 7. non-finite upstream gradients
# ---------------------------------------------------------------------------
UPSTREAM_CASES = [("nll_loss", {}), ("nll_loss", {"weight": True})] + [
    ("cross_entropy", e) for e in ({}, {"weight": True}, {"label_smoothing": 0.2}, {"prob": True})]


@pytest.mark.parametrize("fn,extra", UPSTREAM_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", [nan, inf, -inf])
def test_non_finite_upstream_gradient_matches_torch(fn, extra, reduction, upstream):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, generator=g)
    t = torch.softmax(torch.randn(4, 5, generator=g), 1) if "prob" in extra else torch.tensor([0, -100, 2, 4])
    kw = {k: v for k, v in extra.items() if k not in ("weight", "prob")}
    if "weight" in extra:
        kw["weight"] = torch.rand(5, generator=g) + 0.5
    same_as_torch(getattr(crossent, fn), getattr(F, fn), x, t, upstream=upstream, reduction=reduction, **kw)


# ---------------------------------------------------------------------------
# 5. torch.func: forward-mode AD with a class weight (its wrapped tensors have
#    no storage, so nothing may read their data pointers)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 11), (2, 4, 3, 2)])
@pytest.mark.parametrize("weight_kind", ["contig", "expanded"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jvp_with_class_weight_matches_torch(shape, weight_kind, reduction):
    g = torch.Generator().manual_seed(9)
    x, tx = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    w = torch.randn(shape[1], generator=g) if weight_kind == "contig" else torch.tensor([0.7]).expand(shape[1])
    res = [torch.func.jvp(lambda a, fn=fn: fn(a, t, weight=w, reduction=reduction), (x,), (tx,))
           for fn in (crossent.cross_entropy, F.cross_entropy)]
    torch.testing.assert_close(res[0], res[1])


# ---------------------------------------------------------------------------
# 7 (continued). the NaN pattern of torch's chain rule on the crossent
#    kernels (CROSSENT_BACKEND=torch) and under create_graph: an infinite
#    upstream gives inf (not inf * 0 = NaN) away from the target, and signed
#    probability targets sum to NaN after scaling
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("kind", ["index", "index_smooth", "prob_signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inf_upstream_nan_pattern_on_own_kernels(monkeypatch, create_graph, kind, dtype):
    monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, 6, generator=g).to(dtype)
    w = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 2.0], dtype=dtype)
    kw = {"label_smoothing": 0.2} if kind == "index_smooth" else {}
    t = torch.randn(4, 6, generator=g).to(dtype) if kind == "prob_signed" else torch.tensor([0, 1, 2, 5])
    u = torch.tensor([inf, inf, 0.0, -inf])
    res = []
    for fn in (crossent.cross_entropy, F.cross_entropy):
        xa = x.clone().requires_grad_()
        out = fn(xa, t, None if kind == "prob_signed" else w, reduction="none", **kw)
        (gx,) = torch.autograd.grad(out, xa, u.to(out.dtype), create_graph=create_graph)
        res.append(gx.detach())
    torch.testing.assert_close(res[0].isnan(), res[1].isnan())
    torch.testing.assert_close(res[0], res[1], equal_nan=True, atol=1e-6, rtol=0)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inf_upstream_second_order_in_ignored_rows(softcap, dtype):
    """Ignored rows have a zero first-order gradient whatever the upstream;
    their second-order gradient is 0 too (not inf * 0 = NaN), as torch's."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 3, generator=g).to(dtype)
    t = torch.tensor([[7, 7, 1], [7, 2, 7]])
    v = torch.randn(x.shape, generator=g).to(dtype)
    res = []
    for ours in (True, False):
        xa = x.clone().requires_grad_()
        xc = xa if ours or not softcap else softcap * torch.tanh(xa / softcap)
        out = crossent.cross_entropy(xa, t, ignore_index=7, reduction="sum", softcap=softcap) if ours else \
            F.cross_entropy(xc, t, ignore_index=7, reduction="sum")
        (g1,) = torch.autograd.grad(out, xa, torch.tensor(inf, dtype=out.dtype), create_graph=True)
        (g2,) = torch.autograd.grad(g1, xa, v)
        res.append((g1.detach(), g2))
    torch.testing.assert_close(res[0], res[1], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", [inf, -inf])
def test_inf_upstream_with_z_loss_matches_torch_composition(monkeypatch, dtype, upstream):
    """z_loss's gradient is added to the cross-entropy's, not folded into it:
    with an infinite upstream and a negative lse (opposite signs) that is
    NaN in torch's composition, not inf."""
    monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(5, 7, generator=g) - 10 * torch.arange(5.0).unsqueeze(1)).to(dtype)
    t = torch.tensor([0, 3, -100, 6, 2])

    def composed(a, t, z_loss):
        lse = torch.logsumexp(a.float(), 1)
        return F.cross_entropy(a, t, reduction="sum").float() + z_loss * (lse[t != -100] ** 2).sum()

    res = []
    for fn in (lambda a, t, z_loss: crossent.cross_entropy(a, t, reduction="sum", z_loss=z_loss), composed):
        xa = x.clone().requires_grad_()
        out = fn(xa, t, 0.1)
        (gx,) = torch.autograd.grad(out, xa, torch.tensor(upstream, dtype=out.dtype))
        res.append(gx)
    torch.testing.assert_close(res[0], res[1], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["func_grad", "create_graph"])
def test_ignored_rows_with_non_finite_logits_differentiable_grad(dtype, how):
    """An ignored row whose logits are not finite has a NaN gradient in
    torch (its log_softmax backward: 0 * exp(NaN)); the differentiable
    gradient (torch.func.grad, create_graph) gives the same."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(4, 5, generator=g)
    x[0, 1], x[1, 2] = nan, inf
    x = x.to(dtype)
    t = torch.tensor([-100, -100, 1, 3])
    w = torch.rand(5, generator=g).to(dtype) + 0.5
    res = []
    for fn in (crossent.cross_entropy, F.cross_entropy):
        f = lambda a, fn=fn: fn(a, t, w, reduction="sum")  # noqa: E731
        if how == "func_grad":
            res.append(torch.func.grad(f)(x))
        else:
            xa = x.clone().requires_grad_()
            res.append(torch.autograd.grad(f(xa), xa, create_graph=True)[0].detach())
    torch.testing.assert_close(res[0], res[1], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_huge_logits_with_smoothing_stay_finite(dtype, reduction):
    """Logits near fp32's range: the smoothing sum over classes and the sum over
    rows overflow fp32 although the result fits; crossent sums them in fp64
    (torch gives inf/NaN here). Judged against the float64 value."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 257, generator=g, dtype=torch.float64) * 2 - 1) * 3e37
    t = torch.randint(0, 257, (5,), generator=g)
    ref = F.cross_entropy(x, t, reduction=reduction, label_smoothing=1.0)
    if not (ref.abs() < torch.finfo(dtype).max):
        pytest.skip("float64 value outside the dtype's range")
    ours = crossent.cross_entropy(x.to(dtype), t, reduction=reduction, label_smoothing=1.0)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-2, atol=0)
