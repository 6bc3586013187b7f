"""crossent.linear_cross_entropy against torch's F.linear_cross_entropy and
eager F.cross_entropy(F.linear(...)): values and gradients of input, weight
and bias over the argument space, every acc_policy, chunk boundaries,
shift, z_loss/softcap, torch.compile, errors and the nn module."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference
from crossent.linear import (LinearCrossEntropyOptions as Opts, linear_cross_entropy,
                             linear_cross_entropy_plan, linear_cross_entropy_with_stats)
from crossent import _linear_ops, linear as L
from crossent.nn import LinearCrossEntropyLoss
from _tol import assert_close_to_ref

POLICIES = ["accurate", "balanced", "compact"]


def _data(N, D, V, dtype=torch.float64, bias=True, prob=False, ignore=True, seed=0, batch=None):
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


def _grads(fn, h, W, b, gseed=5):
    """Value and grads of (h, W, b); non-uniform upstream gradient for 'none'."""
    h, W = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    out = fn(h, W, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(gseed), dtype=torch.float64)
    out.backward(g.to(out.dtype) if out.dim() else torch.tensor(1.7, dtype=out.dtype))
    return [out.detach(), h.grad, W.grad] + ([] if b is None else [b.grad])


def _eager(red="mean", weight=None, ls=0.0, ii=-100):
    def f(h, W, b):
        logits = F.linear(h, W, b)
        if h.dim() > 2:
            logits = logits.movedim(-1, 1)
        return F.cross_entropy(logits, T[0], weight=weight, reduction=red, label_smoothing=ls, ignore_index=ii)
    return f


T = [None]  # the current target, for _eager's closure


def _close(a, b, tol=1e-10, what=""):
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (what, i, x.shape, y.shape, x.dtype, y.dtype)
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what} [{i}] {m}")


# ----------------------------------------------------------------------------- parity, fp64
CASES = list(itertools.product(POLICIES, ["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True]))


@pytest.mark.parametrize("policy,red,weighted,ls,prob", CASES)
def test_parity_fp64(policy, red, weighted, ls, prob):
    N, D, V = 23, 12, 37
    h, W, b, t = _data(N, D, V, prob=prob)
    w = torch.rand(V, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.1 if weighted else None
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=5, chunk_bytes=2048)
    ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, weight=w, reduction=red,
                                                       label_smoothing=ls, options=opts), h, W, b)
    ref = _grads(_eager(red, w, ls), h, W, b)
    _close(ours, ref, what=f"{policy} {red}")
    tor = _grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, linear_bias=b, weight=w, reduction=red,
                                                        label_smoothing=ls), h, W, b)
    _close(ours, tor, what="vs torch F.linear_cross_entropy")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("N", [15, 16, 17, 1])
def test_chunk_boundaries(policy, N):
    # chunk_size 16 with N = 15/16/17; V = 101 is no multiple of any block (vocab blocks of 32)
    D, V = 8, 101
    h, W, b, t = _data(N, D, V, ignore=N > 2)
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=16, chunk_bytes=16 * 32 * 8)
    for red in ("mean", "none"):
        ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red, options=opts),
                      h, W, b)
        _close(ours, _grads(_eager(red), h, W, b), what=f"N={N} {red}")


@pytest.mark.parametrize("policy", POLICIES)
def test_fp32_and_leading_dims_and_no_bias(policy):
    h, W, _, t = _data(0, 16, 50, dtype=torch.float32, bias=False, batch=(3, 7))
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=4)
    for red in ("mean", "sum", "none"):
        ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, reduction=red, options=opts), h, W, None)
        ref = _grads(_eager(red), h, W, None)
        _close(ours, ref, tol=2e-5, what=red)
        assert ours[0].shape == ((3, 7) if red == "none" else ())


def test_unbatched_and_prob_leading_dims():
    h, W, b, t = _data(0, 6, 9, batch=())
    T[0] = t
    _close(_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction="none"), h, W, b),
           _grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, linear_bias=b, reduction="none"), h, W, b))
    h, W, b, t = _data(0, 6, 9, batch=(2, 3), prob=True)
    ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction="none"), h, W, b)
    ref = _grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b).reshape(-1, 9), t.reshape(-1, 9),
                                                 reduction="none").reshape(2, 3), h, W, b)
    _close(ours, ref)


def _err_vs64(x, r):
    return ((x.double() - r).norm() / r.norm()).item()


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("policy", POLICIES + ["auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch_eager(policy, dtype, chunks):
    """Values and gradients (dW included) against fp64: no worse than eager in
    the same dtype, whether dW is one GEMM or an fp32 sum over chunks."""
    N, D, V = 64, 32, 300
    h, W, b, t = _data(N, D, V, dtype=dtype)
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=16 if chunks == "several" else None,
                chunk_bytes=64 * 64 * 4 if chunks == "several" else 1 << 30)
    assert (linear_cross_entropy_plan(h, W, options=opts).num_chunks == 1) == (chunks == "one")
    ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=opts), h, W, b)
    eager = _grads(_eager(), h, W, b)
    ref = _grads(_eager(), h.double(), W.double(), b.double())
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        assert o.dtype == e.dtype
        assert _err_vs64(o, r) <= 1.05 * _err_vs64(e, r) + 1e-3, (policy, i, _err_vs64(o, r), _err_vs64(e, r))


def test_none_nonuniform_upstream_and_retain_graph():
    """Liger #968: per-token upstream gradients under 'none'; and a second
    backward (retain_graph) recomputes instead of reusing consumed buffers."""
    h, W, b, t = _data(19, 8, 21)
    T[0] = t
    for policy in POLICIES:
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, t, options=Opts(acc_policy=policy, chunk_size=4))
        loss.backward(retain_graph=True)
        g1 = hh.grad.clone()
        loss.backward(torch.tensor(2.0, dtype=loss.dtype))
        torch.testing.assert_close(hh.grad, 3 * g1)


def test_ignore_all_and_ignore_index_value():
    h, W, b, t = _data(6, 4, 5)
    t[:] = 3
    for red in ("mean", "sum", "none"):
        T[0] = t
        _close(_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red, ignore_index=3),
                      h, W, b), _grads(_eager(red, ii=3), h, W, b), what=red)


def test_torch_options_accepted_and_plan():
    h, W, b, t = _data(40, 8, 64)
    T[0] = t
    ref = _grads(_eager(), h, W, b)
    for o in (torch.nn.LinearCrossEntropyOptions(), torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7),
              torch.nn.LinearCrossEntropyOptions(acc_policy="compact", chunking_method="aspect_ratio:2")):
        _close(_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=o), h, W, b), ref)
    p = linear_cross_entropy_plan(h, W, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7))
    assert p.chunk_size == 7 and p.num_chunks == 6 and p.policy == "accurate"
    assert linear_cross_entropy_plan(h.float(), W.float()).policy == "accurate"
    assert linear_cross_entropy_plan(h.bfloat16(), W.bfloat16()).policy in ("accurate", "compact")
    assert linear_cross_entropy_plan(h, W, options=Opts(acc_policy="compact")).flops == 8 * 40 * 8 * 64
    with pytest.raises(ValueError, match="invalid acc_policy"):
        Opts(acc_policy="fast")


def test_shift_semantics():
    h, W, b, t = _data(0, 8, 30, batch=(3, 6))
    for policy in POLICIES:
        opts = Opts(acc_policy=policy, chunk_size=4)
        for red in ("mean", "none"):
            ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                               options=opts, shift=True), h, W, b)
            ref = _grads(lambda h, W, b: F.cross_entropy(F.linear(h[:, :-1], W, b).reshape(-1, 30),
                                                         t[:, 1:].reshape(-1), reduction=red)
                         .reshape(-1 if red == "none" else ()).reshape((3, 5) if red == "none" else ()), h, W, b)
            _close(ours, ref, what=f"shift {policy} {red}")
            assert ours[1][:, -1].abs().sum() == 0  # the last position predicts nothing
    # 2-D input: one sequence
    h2, t2 = h[0], t[0]
    ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t2, linear_bias=b, shift=True), h2, W, b)
    ref = _grads(lambda h, W, b: F.cross_entropy(F.linear(h[:-1], W, b), t2[1:]), h2, W, b)
    _close(ours, ref)


@pytest.mark.parametrize("policy", POLICIES)
def test_z_loss_softcap_and_stats(policy):
    N, D, V = 17, 8, 45
    h, W, b, t = _data(N, D, V)
    zl, cap = 1e-2, 3.0

    def ref(h, W, b, red="mean"):
        return reference.cross_entropy(F.linear(h, W, b), t, reduction=red, z_loss=zl, softcap=cap,
                                       label_smoothing=0.1)
    opts = Opts(acc_policy=policy, chunk_size=5, chunk_bytes=5 * 64 * 8)
    for red in ("mean", "none"):
        ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, z_loss=zl, softcap=cap,
                                                           label_smoothing=0.1, reduction=red, options=opts),
                      h, W, b)
        _close(ours, _grads(lambda h, W, b: ref(h, W, b, red), h, W, b), what=red)
    st = linear_cross_entropy_with_stats(h, W, t, linear_bias=b, z_loss=zl, softcap=cap, options=opts)
    assert isinstance(st, crossent.CrossEntropyOutput)
    lse = reference.logsumexp(F.linear(h, W, b), 1, cap)
    torch.testing.assert_close(st.lse, lse)
    valid = t != -100
    torch.testing.assert_close(st.z_loss, (zl * lse[valid] ** 2).sum() / valid.sum())


def test_inplace_permission():
    h, W, b, t = _data(20, 8, 33, bias=False)
    T[0] = t
    ref = _grads(_eager(), h, W, None)
    hh = h.clone().requires_grad_()
    x = hh * 1.0  # a non-leaf whose storage may be reused
    x.retain_grad()
    WW = W.clone().requires_grad_()
    loss = linear_cross_entropy(x, WW, t, options=Opts(allow_inplace=True, chunk_size=6))
    loss.backward(torch.tensor(1.7, dtype=loss.dtype))
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(hh.grad, ref[1])
    torch.testing.assert_close(WW.grad, ref[2])
    assert torch.equal(x.detach(), hh.grad)  # the hidden states' storage now holds the gradient


def test_compile_fullgraph():
    h, W, b, t = _data(30, 8, 40, dtype=torch.float32)
    T[0] = t

    def f(h, W, b):
        return linear_cross_entropy(h, W, t, linear_bias=b, options=Opts(chunk_size=8), z_loss=1e-3)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    _close(_grads(cf, h, W, b), _grads(f, h, W, b), tol=1e-5)


def test_determinism():
    h, W, b, t = _data(50, 8, 70, dtype=torch.float32)
    a = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=Opts(chunk_size=7)), h, W, b)
    c = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=Opts(chunk_size=7)), h, W, b)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def _exc(fn):
    try:
        fn()
    except Exception as e:
        return type(e), str(e)
    return None


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
    theirs = _exc(lambda: ERR_CASES[i](F.linear_cross_entropy))
    ours = _exc(lambda: ERR_CASES[i](linear_cross_entropy))
    assert theirs is not None
    assert ours == theirs


def test_kdim_weights_fall_back_exactly():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    W = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (3, 2), generator=g)
    ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, reduction="none"), h, W, None)
    ref = _grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, reduction="none"), h, W, None)
    _close(ours, ref)


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

# ----------------------------------------------------------------------------- chunking and memory
@pytest.mark.parametrize("policy", POLICIES)
def test_one_chunk_and_tile_multiple_chunks(policy):
    """One chunk when the budget allows it; else equal chunks of a multiple of
    the GEMM tile (128 rows on CPU).  Same results as eager and torch."""
    N, D, V = 300, 8, 64
    h, W, b, t = _data(N, D, V)
    T[0] = t
    ref = _grads(_eager("sum"), h, W, b)
    for budget, want in ((N * V * 8, 1), (200 * V * 8, 3)):
        opts = Opts(acc_policy=policy, chunk_bytes=budget * (4 if policy == "compact" else 1))
        plan = linear_cross_entropy_plan(h, W, options=opts)
        assert plan.num_chunks == want, plan
        assert want == 1 or plan.chunk_size % 128 == 0, plan
        ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction="sum",
                                                           options=opts), h, W, b)
        _close(ours, ref, what=f"{policy} {plan}")
        tor = _grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, linear_bias=b, reduction="sum"), h, W, b)
        _close(ours, tor, what="vs torch F.linear_cross_entropy")


@pytest.mark.parametrize("N,cap,tile", [(1000, 1000, 128), (1000, 900, 128), (1000, 300, 128),
                                        (4097, 2048, 256), (7, 3, 128), (513, 129, 128)])
def test_chunk_rows_rule(N, cap, tile):
    rows = L._chunk_rows(N, 1, cap, tile)
    k = -(-N // rows)
    assert rows <= max(cap, 1)
    if N <= cap:
        assert rows == N
    elif cap >= tile:
        assert rows % tile == 0
        # the fewest tile-multiple chunks that fit: one chunk fewer would not
        assert -(-(-(-N // (k - 1))) // tile) * tile > cap if k > 1 else True


def _profile_peak(fn) -> int:
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


@pytest.mark.parametrize("dtype,softcap,shift", [(torch.float32, None, False), (torch.bfloat16, 5.0, False),
                                                 (torch.float32, None, True)])
def test_compact_memory_bound(dtype, softcap, shift):
    """compact's promise: extra memory <= the gradients + chunk_bytes (default
    256 MiB), plus O(N + V) per-token / per-class vectors (loss, lse, target
    as int64), measured as the CPU allocator's peak over forward + backward."""
    N, D, V, budget = 1024, 64, 8192, 8 << 20  # eager's logits: 32 MiB in fp32
    h, W, _, t = _data(N, D, V, dtype=dtype, bias=False, batch=(4, N // 4) if shift else None)
    h.requires_grad_(True)
    W.requires_grad_(True)
    opts = Opts(acc_policy="compact", chunk_bytes=budget)

    def step():
        linear_cross_entropy(h, W, t, options=opts, softcap=softcap, shift=shift).backward()

    step()  # warm-up: lazy imports and one-time buffers
    h.grad = W.grad = None
    peak = _profile_peak(step)
    grads = (h.numel() + W.numel()) * h.element_size()
    assert peak <= grads + budget + 32 * (N + V), (peak, grads, budget)
    h.grad = W.grad = None
    eager = _profile_peak(lambda: F.cross_entropy(F.linear(h, W).reshape(-1, V), t.reshape(-1)).backward())
    assert eager > grads + N * V * h.element_size()  # the measurement sees the logits it must see


def test_accurate_first_chunk_writes_dw_with_beta_zero():
    """Several chunks: the first chunk's GEMM writes the dW accumulator
    (beta=0), so no V x D zero-fill and no V x D add happen."""
    from torch.profiler import ProfilerActivity, profile
    N, D, V = 96, 8, 40
    h, W, _, t = _data(N, D, V, dtype=torch.float32, bias=False)
    h.requires_grad_(True)
    W.requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        linear_cross_entropy(h, W, t, options=Opts(chunk_size=32)).backward()
    vd = [e for e in prof.events() if [V, D] in [list(s) for s in e.input_shapes]]
    names = {e.name for e in vd}
    assert "aten::mm" in names and "aten::addmm_" in names, names
    assert not names & {"aten::zero_", "aten::fill_", "aten::zeros", "aten::add_"}, names


def test_missing_fp32_output_gemm_warns_once(monkeypatch):
    """Simulated on CPU (whose torch has no float32-output bf16 GEMM): a
    device expected to have it warns once, naming the torch version, and the
    fallback (each chunk's bf16 product, rounded once, summed in fp32) stays
    within sqrt(chunks) of eager's dW error (4 chunks here: 2x)."""
    monkeypatch.setattr(_linear_ops, "_FP32_OUT_GEMM_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_linear_ops, "_fp32_out_gemm", {})
    N, D, V = 64, 32, 300
    h, W, b, t = _data(N, D, V, dtype=torch.bfloat16)
    T[0] = t
    opts = Opts(chunk_size=16)
    with pytest.warns(RuntimeWarning, match=re.escape(f"torch {torch.__version__} has no float32-output")):
        ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=opts), h, W, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=opts), h, W, b)
    eager = _grads(_eager(), h, W, b)
    ref = _grads(_eager(), h.double(), W.double(), b.double())
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        bound = (2.0 if i == 2 else 1.05) * _err_vs64(e, r) + 1e-3
        assert _err_vs64(o, r) <= bound, (i, _err_vs64(o, r), _err_vs64(e, r))


def test_auto_plan_from_free_memory(monkeypatch):
    """On an accelerator, auto picks from free memory: one chunk when it fits
    in half the room beyond the gradients; else tile-multiple chunks (256 rows)
    with the fp32 accumulator; compact when that accumulator would not fit."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    for (N, D, V), room, policy, chunks in (((8192, 4096, 128256), 80 << 30, "accurate", 1),
                                            ((65536, 1024, 32000), 4 << 30, "accurate", 2),
                                            ((8192, 4096, 128256), 3 << 30, "compact", None)):
        grads = (N + V) * D * 2
        monkeypatch.setattr(L, "_free_bytes", lambda device, free=grads + room: free)
        plan, _ = L._plan(N, D, V, bf16, dev, Opts(), "triton")
        assert plan.policy == policy, (room, plan)
        if chunks == 1:
            assert plan.num_chunks == 1 and plan.extra_bytes == N * V * 2
        elif chunks:
            assert plan.num_chunks >= 2 and plan.chunk_size % 256 == 0, plan
            assert plan.extra_bytes <= room, plan
        else:
            assert plan.extra_bytes == 256 << 20 and plan.flops == 8 * N * D * V
    N, D, V = 8192, 4096, 128256
    monkeypatch.setattr(L, "_free_bytes", lambda device: None)  # unknown (torch.compile): 1 GiB chunks
    plan, _ = L._plan(N, D, V, bf16, dev, Opts(), "triton")
    assert plan.policy == "accurate" and plan.chunk_size * V * 2 <= 1 << 30 and plan.chunk_size % 256 == 0
    assert L._plan(N, D, V, bf16, dev, Opts(acc_policy="balanced"), "triton")[0].policy == "accurate"


# ----------------------------------------------------------------------------- issue 9 regressions
@pytest.mark.parametrize("policy", POLICIES)
def test_small_integer_targets_compare_ignore_index_exactly(policy):
    """A uint8 target 156 is class 156 under ignore_index=-100 (uint8 would
    wrap -100 to 156), and 3 is class 3 under ignore_index=259."""
    N, D, V = 4, 8, 200
    h, W, b, _ = _data(N, D, V)
    opts = Opts(acc_policy=policy, chunk_size=3)
    t = torch.tensor([156, 3, 156, 199], dtype=torch.uint8)
    for ii in (None, 259):
        kw = {} if ii is None else {"ignore_index": ii}
        for red in ("none", "mean"):
            ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                               options=opts, **kw), h, W, b)
            ref = _grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, reduction=red, **kw), h, W, b)
            _close(ours, ref, what=f"{t.dtype} {red}")
            assert torch.isfinite(ours[0]).all()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_common_offset_costs_no_accuracy_beyond_torch(policy, offset):
    """A common offset in the logits (here through the bias, which softmax
    ignores) costs no accuracy beyond torch's own fp32 error (tests/_tol.py)."""
    N, D, V = 48, 16, 120
    h, W, b, t = _data(N, D, V)
    b = b + offset
    opts = Opts(acc_policy=policy, chunk_size=16)
    for red in ("sum", "none"):
        ref = _grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, reduction=red), h, W, b)
        f32 = [v.float() for v in (h, W, b)]
        tor = _grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, reduction=red), *f32)
        ours = _grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                           options=opts), *f32)
        for i, name in enumerate(("d input", "d weight", "d bias"), 1):
            assert_close_to_ref(ours[i], tor[i], ref[i], what=f"{policy} {red} {name}")
        # The loss is the CE backend's (crossent.cross_entropy's kernels, issue 9
        # item 4 there): the linear path must add nothing to that backend's
        # error on the same fp32 logits, and be within torch's bound once the
        # backend is.
        ce = crossent.cross_entropy(F.linear(*f32), t, reduction=red)
        e_ours, e_ce = (ours[0].double() - ref[0]).abs().max(), (ce.double() - ref[0]).abs().max()
        if e_ours > 1.5 * e_ce:
            assert_close_to_ref(ours[0], tor[0], ref[0], what=f"{policy} {red} loss")


def test_triton_interpreter_tier():
    """CROSSENT_BACKEND=triton under TRITON_INTERPRET=1, in a subprocess (env
    read at import): the CE kernel writes each chunk's gradient over its own
    logits; several, one and tile-multiple chunks; uint8 targets (156 is a
    class, not -100 wrapped)."""
    pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(crossent.__file__), "backends", "triton", "__init__.py")):
        pytest.skip("no triton backend")
    code = (
        "import torch, torch.nn.functional as F\n"
        "from crossent.linear import linear_cross_entropy, linear_cross_entropy_plan, LinearCrossEntropyOptions as O\n"
        "from crossent import backends\n"
        "assert backends.name_for('cpu') == 'triton'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "N, D, V = 300, 8, 160\n"
        "h = torch.randn(N, D, generator=g, requires_grad=True)\n"
        "W = torch.randn(V, D, generator=g, requires_grad=True)\n"
        "b = torch.randn(V, generator=g, requires_grad=True)\n"
        "t = torch.randint(0, V, (N,), generator=g, dtype=torch.uint8); t[::7] = 156; t[2] = 3\n"
        "def grads(f):\n"
        "  h.grad = W.grad = b.grad = None; f().backward()\n"
        "  return h.grad.clone(), W.grad.clone(), b.grad.clone()\n"
        "ref = grads(lambda: F.cross_entropy(F.linear(h, W, b), t, ignore_index=3, label_smoothing=0.1))\n"
        "for pol, mult in (('accurate', 1), ('compact', 4)):\n"
        "  for o, chunks in ((O(acc_policy=pol, chunk_size=64), 5), (O(acc_policy=pol, chunk_bytes=mult * N * V * 4), 1),\n"
        "                    (O(acc_policy=pol, chunk_bytes=mult * 150 * V * 4), 3)):\n"
        "    assert linear_cross_entropy_plan(h, W, options=o).num_chunks == chunks, (pol, o)\n"
        "    a = grads(lambda: linear_cross_entropy(h, W, t, linear_bias=b, ignore_index=3, options=o,\n"
        "                                           label_smoothing=0.1))\n"
        "    for x, y in zip(a, ref): torch.testing.assert_close(x, y)\n"
        "print('OK')\n")
    env = dict(os.environ, CROSSENT_BACKEND="triton", TRITON_INTERPRET="1")
    src = os.path.dirname(os.path.dirname(crossent.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "cannot run on cpu" in (r.stderr + r.stdout):
        pytest.skip("triton backend unavailable on CPU here")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


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
    h, W, b, t = _data(2 * 5, 6, 9, batch=(2, 5))
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
    h, W, b, t = _data(6, 5, 7)
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
    h, W, b, t = _data(7, 5, 9)
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
    h, W, b, t = _data(6, 5, 4)
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
    h, W, b, t = _data(4, 3, 6, prob=prob)
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
