"""crossent.linear_cross_entropy against torch 2.13's own F.linear_cross_entropy
and nn.LinearCrossEntropyLoss: values and gradients over the argument space,
torch's options, errors, the nn module, double backward, torch.func and the
edge cases (non-finite upstreams, empty dims).  Left out of CI's older-torch
tiers, which lack that reference; tests/test_linear_eager.py and
tests/test_linear_chunking.py judge against the eager composition instead."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from crossent.linear import LinearCrossEntropyOptions as Opts, linear_cross_entropy, linear_cross_entropy_plan
from crossent.nn import LinearCrossEntropyLoss
from _compare import outcome
from _linear_cases import POLICIES, T, assert_all_close, eager_ce, inputs, value_and_grads


CASES = list(itertools.product(POLICIES, ["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True]))


@pytest.mark.parametrize("policy,red,weighted,ls,prob", CASES)
def test_parity_fp64(policy, red, weighted, ls, prob):
    N, D, V = 23, 12, 37
    h, W, b, t = inputs(N, D, V, prob=prob)
    w = torch.rand(V, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.1 if weighted else None
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=5, chunk_bytes=2048)
    ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, weight=w, reduction=red,
                                                                label_smoothing=ls, options=opts), h, W, b)
    ref = value_and_grads(eager_ce(red, w, ls), h, W, b)
    assert_all_close(ours, ref, what=f"{policy} {red}")
    tor = value_and_grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, linear_bias=b, weight=w, reduction=red,
                                                                 label_smoothing=ls), h, W, b)
    assert_all_close(ours, tor, what="vs torch F.linear_cross_entropy")


def test_unbatched_and_prob_leading_dims():
    h, W, b, t = inputs(0, 6, 9, batch=())
    T[0] = t
    ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction="none"), h, W, b)
    tor = value_and_grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, linear_bias=b, reduction="none"), h, W, b)
    assert_all_close(ours, tor)
    h, W, b, t = inputs(0, 6, 9, batch=(2, 3), prob=True)
    ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction="none"), h, W, b)
    ref = value_and_grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b).reshape(-1, 9), t.reshape(-1, 9),
                                                          reduction="none").reshape(2, 3), h, W, b)
    assert_all_close(ours, ref)


def test_torch_options_accepted_and_plan():
    h, W, b, t = inputs(40, 8, 64)
    T[0] = t
    ref = value_and_grads(eager_ce(), h, W, b)
    for o in (torch.nn.LinearCrossEntropyOptions(), torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7),
              torch.nn.LinearCrossEntropyOptions(acc_policy="compact", chunking_method="aspect_ratio:2")):
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=o), h, W, b)
        assert_all_close(ours, ref)
    p = linear_cross_entropy_plan(h, W, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7))
    assert p.chunk_size == 7 and p.num_chunks == 6 and p.policy == "accurate"
    assert linear_cross_entropy_plan(h.float(), W.float()).policy == "accurate"
    assert linear_cross_entropy_plan(h.bfloat16(), W.bfloat16()).policy in ("accurate", "compact")
    assert linear_cross_entropy_plan(h, W, options=Opts(acc_policy="compact")).flops == 8 * 40 * 8 * 64
    with pytest.raises(ValueError, match="invalid acc_policy"):
        Opts(acc_policy="fast")


ERR_CASES = [
    lambda m: m(torch.randn(()), torch.randn(5, 4), torch.tensor(1)),
    lambda m: m(torch.randn(3, 4), torch.randn(4), torch.tensor([1, 2, 3])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 3), torch.tensor([1, 2, 3])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]), linear_bias=torch.randn(4)),
    lambda m: m(torch.randn(4), torch.randn(5, 2, 4), torch.tensor([1, 2])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5).softmax(1), ignore_index=-100),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64), torch.tensor([1, 2, 3])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 7])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]), reduction="avg"),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]), label_smoothing=1.5),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]), weight=torch.ones(4)),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]),
                weight=torch.ones(5, dtype=torch.float64)),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([[1, 2, 3]])),
    lambda m: m(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1., 2, 3])),
    lambda m: m(torch.randn(3, 4).long(), torch.randn(5, 4).long(), torch.tensor([1, 2, 3])),
]


@pytest.mark.parametrize("i", range(len(ERR_CASES)))
def test_error_parity(i):
    theirs = outcome(lambda: ERR_CASES[i](F.linear_cross_entropy))
    ours = outcome(lambda: ERR_CASES[i](linear_cross_entropy))
    assert isinstance(theirs, tuple), "torch accepted the case"
    assert ours == theirs


def test_kdim_weights_fall_back_exactly():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    W = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (3, 2), generator=g)
    ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, reduction="none"), h, W, None)
    ref = value_and_grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, reduction="none"), h, W, None)
    assert_all_close(ours, ref)


def test_nn_module_state_dict_round_trip():
    torch.manual_seed(0)
    m_t = torch.nn.LinearCrossEntropyLoss(8, 20, bias=True, weight=torch.rand(20), label_smoothing=0.1,
                                          ignore_index=-1)
    m_c = LinearCrossEntropyLoss(8, 20, bias=True, weight=torch.rand(20), label_smoothing=0.1, ignore_index=-1)
    assert isinstance(m_c, torch.nn.LinearCrossEntropyLoss)
    m_c.load_state_dict(m_t.state_dict())
    h = torch.randn(11, 8)
    t = torch.randint(0, 20, (11,))
    t[3] = -1
    lt, lc = m_t(h, t), m_c(h, t)
    torch.testing.assert_close(lc, lt)
    lt.backward()
    lc.backward()
    torch.testing.assert_close(m_c.linear.weight.grad, m_t.linear.weight.grad)
    torch.testing.assert_close(m_c.linear.bias.grad, m_t.linear.bias.grad)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="compares with torch 2.13's module")
def test_nn_module_on_older_torch_is_a_copy_of_213s():
    """On torch < 2.13 crossent.nn.LinearCrossEntropyLoss subclasses crossent's copy of 2.13's
    module: same constructor checks, state (initialised from the same random stream), repr."""
    from crossent.nn import _LinearCrossEntropyLoss213 as Copy
    for kw in (dict(), dict(bias=True, out_features=(2, 3), weight=torch.rand(7), label_smoothing=0.2,
                            ignore_index=-1, reduction="sum", dtype=torch.float64)):
        torch.manual_seed(1)
        m_t = torch.nn.LinearCrossEntropyLoss(4, 7, **kw)
        torch.manual_seed(1)
        m_c = Copy(4, 7, **kw)
        assert repr(m_c).replace(Copy.__name__, "LinearCrossEntropyLoss", 1) == repr(m_t)
        assert m_c.__constants__ == m_t.__constants__
        st, sc = m_t.state_dict(), m_c.state_dict()
        assert list(sc) == list(st)
        for k in st:
            torch.testing.assert_close(sc[k], st[k], rtol=0, atol=0)
    for bad in (dict(weight=torch.rand(6)), dict(label_smoothing=1.5), dict(label_smoothing=-0.1)):
        with pytest.raises(RuntimeError) as want:
            torch.nn.LinearCrossEntropyLoss(4, 7, **bad)
        with pytest.raises(RuntimeError, match=re.escape(str(want.value))):
            Copy(4, 7, **bad)


def _torch_lce(h, W, t, b=None, **kw):
    """torch's own F.linear_cross_entropy (batch dims flattened, as crossent's extension reads them)."""
    return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), W, t.reshape(-1), linear_bias=b, **kw)


def _same(a, r, tol=1e-10):
    torch.testing.assert_close(a, r, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("policy,red,shift", [("accurate", "mean", False), ("compact", "sum", False),
                                              ("accurate", "none", False), ("accurate", "mean", True)])
def test_double_backward_matches_torch(policy, red, shift):
    """backward(create_graph=True): the first-order gradients require grad and
    their own gradients equal those of torch's F.linear_cross_entropy."""
    h, W, b, t = inputs(2 * 5, 6, 9, batch=(2, 5))
    ts = t[:, 1:] if shift else t

    def run(fn):
        leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
        loss = fn(*leaves)
        up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        g = torch.autograd.grad(loss, leaves, up, create_graph=True)
        assert all(x.requires_grad for x in g)
        second = torch.autograd.grad(sum((x * x.detach().sin()).sum() for x in g), leaves)
        return [loss.detach(), *g, *second]

    ours = run(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red, shift=shift,
                                                    options=Opts(acc_policy=policy)))
    ref = run(lambda h, W, b: _torch_lce(h[:, :-1] if shift else h, W, ts, b,
                                         reduction=red).reshape(ts.shape if red == "none" else ()))
    for a, r in zip(ours, ref):
        _same(a, r, 1e-9)


def test_torch_func_transforms_match_torch():
    """torch.func.grad, jacrev, vmap (also of grad) and jvp of
    linear_cross_entropy, against the same transforms of F.linear_cross_entropy."""
    from torch.func import grad, jacrev, jvp, vmap
    h, W, b, t = inputs(6, 5, 7)
    fns = [lambda h, W, b, fn=fn: fn(h, W, t, linear_bias=b) for fn in (linear_cross_entropy,
                                                                     F.linear_cross_entropy)]
    rows = [lambda h, fn=fn: fn(h, W, t, linear_bias=b, reduction="none") for fn in (linear_cross_entropy,
                                                                                  F.linear_cross_entropy)]
    hb = torch.stack([h, 2 * h])
    tangents = tuple(torch.ones_like(x) for x in (h, W, b))
    ours, ref = ([*grad(f, argnums=(0, 1, 2))(h, W, b), jacrev(r)(h),
                  vmap(f, in_dims=(0, None, None))(hb, W, b), *jvp(f, (h, W, b), tangents),
                  vmap(grad(f), in_dims=(0, None, None))(hb, W, b)] for f, r in zip(fns, rows))
    for a, r in zip(ours, ref):
        _same(a, r)


@pytest.mark.parametrize("up", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_non_finite_upstream_matches_torch(up, red):
    """A NaN/inf upstream gradient: the NaN/inf patterns of every gradient are
    torch's (ignored rows of the input gradient stay 0)."""
    h, W, b, t = inputs(7, 5, 9)
    res = []
    for fn in (linear_cross_entropy, F.linear_cross_entropy):
        leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
        fn(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=red).backward(
            torch.tensor(up, dtype=torch.float64))
        res.append([x.grad for x in leaves])
    for a, r in zip(*res):
        _same(a, r)  # NaN where torch has NaN, the same infinities, the rest close


def test_smoothed_mean_with_zero_weight_sum_is_nan_like_torch():
    """Every counted target has class weight 0 and label smoothing is on:
    torch's mean divides its nll part 0/0, so the loss is NaN (not inf)."""
    h, W, b, t = inputs(6, 5, 4)
    t = torch.tensor([0, -100, 2, 0, -100, 2])
    w = torch.tensor([0.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    for red in ("mean", "sum"):
        _same(linear_cross_entropy(h, W, t, linear_bias=b, weight=w, label_smoothing=0.3, reduction=red),
              F.linear_cross_entropy(h, W, t, linear_bias=b, weight=w, label_smoothing=0.3, reduction=red))


@pytest.mark.parametrize("policy", POLICIES)
def test_in_features_zero_matches_torch(policy):
    """in_features = 0: the logits are the bias (or zeros): log(C) per row without
    a bias; gradients of the empty input and weight are empty, the bias's is not."""
    t = torch.tensor([1, -100, 3, 4])
    for bias in (None, torch.randn(31, dtype=torch.float64)):
        res = []
        for fn in (lambda *a, **k: linear_cross_entropy(*a, options=Opts(acc_policy=policy), **k),
                   F.linear_cross_entropy):
            leaves = [torch.randn(4, 0, dtype=torch.float64, requires_grad=True),
                      torch.randn(31, 0, dtype=torch.float64, requires_grad=True)]
            leaves += [] if bias is None else [bias.clone().requires_grad_(True)]
            rows = fn(leaves[0], leaves[1], t, linear_bias=None if bias is None else leaves[2], reduction="none")
            rows.backward(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
            res.append([rows.detach()] + [x.grad for x in leaves])
        for a, r in zip(*res):
            _same(a, r)


@pytest.mark.parametrize("shape", [(0, 6, 4), (2, 0, 4)])
@pytest.mark.parametrize("red", ["none", "mean", "sum"])
@pytest.mark.parametrize("prob", [False, True])
def test_zero_size_batch_dims_match_torch(shape, red, prob):
    """Leading batch dims with a zero size: torch's result on the flattened call
    (an empty 'none' loss in the batch shape, NaN mean, 0 sum), gradients too."""
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(*shape[:-1], 5, generator=g, dtype=torch.float64) if prob
         else torch.zeros(shape[:-1], dtype=torch.long))
    res = []
    theirs = lambda h, W, t, **kw: F.linear_cross_entropy(  # noqa: E731
        h.reshape(-1, 4), W, t.reshape(-1, 5) if prob else t.reshape(-1), **kw)
    for fn in (linear_cross_entropy, theirs):
        h = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        W = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                        requires_grad=True)
        out = fn(h, W, t, reduction=red)
        out.sum().backward()
        res.append([out.reshape(-1), h.grad, W.grad])
    for a, r in zip(*res):
        _same(a, r)


@pytest.mark.parametrize("prob,red", [(True, "mean"), (True, "none")])
def test_double_backward_non_finite_upstream_matches_torch(prob, red):
    """backward(create_graph=True) with an infinite upstream: the first-order
    gradients have torch's inf/NaN pattern (signed probabilities: the upstream
    is scaled before the class sum, so NaN rows as torch's chain rule gives)."""
    h, W, b, t = inputs(4, 3, 6, prob=prob)
    if prob:
        t = t - 0.1
    res = []
    for fn in (linear_cross_entropy, F.linear_cross_entropy):
        leaves = [x.clone().requires_grad_(True) for x in (h, W, b)]
        out = fn(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=red)
        up = torch.full_like(out, float("inf"))
        if out.dim():
            up[1:] = 1.0
        res.append(torch.autograd.grad(out, leaves, up, create_graph=True))
    for a, r in zip(*res):
        _same(a, r)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(11,), (4, 11)])
def test_autocast_accepts_fp32_class_weight_like_torch(shape, wdtype):
    """Under CPU autocast torch's cross_entropy runs on fp32 logits, so its class
    weight is fp32 too (an fp16 one is cast); values and dtype as torch's."""
    g = torch.Generator().manual_seed(0)
    h, W, b = (torch.randn(*s, generator=g) for s in (shape, (31, 11), (31,)))
    t, w = torch.randint(0, 31, shape[:-1], generator=g), torch.rand(31, generator=g).to(wdtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for red in ("none", "mean"):
            kw = dict(linear_bias=b, weight=w, reduction=red, label_smoothing=0.1)
            ours, ref = linear_cross_entropy(h, W, t, **kw), F.linear_cross_entropy(h, W, t, **kw)
            assert ours.dtype == ref.dtype
            _same(ours, ref, 1e-5)
