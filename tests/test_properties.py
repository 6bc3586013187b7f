"""Property tests (hypothesis): random shapes, values and options, against
torch in float64 and against the mathematical identities of the ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import crossent
from crossent import reference


@st.composite
def ce_inputs(draw):
    kdim = draw(st.sampled_from([0, 0, 1, 2]))
    n = draw(st.integers(1, 9))
    c = draw(st.integers(1, 40))
    spatial = [draw(st.integers(1, 4)) for _ in range(kdim)]
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 300.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * scale
    t = torch.randint(0, c, (n, *spatial), generator=g)
    ignore = draw(st.sampled_from([-100, 0]))
    if draw(st.booleans()):
        t[torch.rand(t.shape, generator=g) < 0.3] = ignore
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.1 if draw(st.booleans()) else None
    kw = dict(reduction=draw(st.sampled_from(["none", "mean", "sum"])),
              label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.5])), ignore_index=ignore)
    return x, t, w, kw


@given(ce_inputs())
def test_cross_entropy_matches_torch_fp64(args):
    x, t, w, kw = args
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = crossent.cross_entropy(xa, t, w, **kw), F.cross_entropy(xb, t, w, **kw)
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-9)
    gout = torch.rand(a.shape, dtype=torch.float64)
    a.backward(gout)
    b.backward(gout)
    torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True, rtol=1e-9, atol=1e-12)


@given(ce_inputs())
def test_cross_entropy_fp32_close_to_fp64(args):
    x, t, w, kw = args
    a = crossent.cross_entropy(x.float(), t, None if w is None else w.float(), **kw)
    b = F.cross_entropy(x, t, w, **kw)
    torch.testing.assert_close(a.double(), b, equal_nan=True, rtol=2e-5, atol=2e-5 * float(x.abs().max() + 1))


@given(ce_inputs(), st.sampled_from([0.0, 1e-3, 0.1]), st.sampled_from([None, 5.0, 30.0]))
def test_extras_match_reference(args, z_loss, softcap):
    x, t, w, kw = args
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = crossent.cross_entropy(xa, t, w, z_loss=z_loss, softcap=softcap, **kw)
    b = reference.cross_entropy(xb, t, w, z_loss=z_loss, softcap=softcap, **kw)
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-9)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True, rtol=1e-8, atol=1e-10)


@given(ce_inputs())
def test_ce_equals_nll_of_log_softmax(args):
    x, t, w, kw = args
    kw.pop("label_smoothing")
    a = crossent.cross_entropy(x, t, w, **kw)
    b = crossent.nll_loss(crossent.log_softmax(x, 1), t, w, **kw)
    torch.testing.assert_close(a, b, equal_nan=True)


@given(st.integers(1, 6), st.integers(1, 50), st.sampled_from([1e-2, 1.0, 50.0]), st.integers(0, 2**31 - 1))
def test_softmax_rows_sum_to_one_and_log_agrees(n, c, scale, seed):
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale
    p, lp = crossent.softmax(x, 1), crossent.log_softmax(x, 1)
    torch.testing.assert_close(p.sum(1), torch.ones(n))
    torch.testing.assert_close(lp.exp(), p)
    assert (lp <= 0).all()


@given(ce_inputs())
def test_stats_lse_is_logsumexp(args):
    x, t, w, kw = args
    out = crossent.cross_entropy_with_stats(x, t, w, **kw)
    torch.testing.assert_close(out.lse, torch.logsumexp(x, 1))
    torch.testing.assert_close(out.loss, F.cross_entropy(x, t, w, **kw), equal_nan=True)
