"""Under torch.autocast crossent returns what torch returns there.

torch lists cross_entropy and nll_loss among autocast's fp32 ops (fp16/bf16
inputs are cast to fp32, so the loss is fp32 and the gradient comes back in the
input's dtype) and linear among its low-precision ops.  crossent must match
values, dtypes and gradients (and their dtypes), without making the fp32 copy
of the logits that torch makes.  CPU autocast (bf16) always; CUDA (fp16, bf16)
when a GPU is present.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent
from _tol import assert_close_to_ref

CASES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]


def _run(fn, device, dtype, leaves, *args, **kw):
    """fn under autocast; (loss, grads of the leaves); backward outside autocast, as torch advises."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast(device, dtype=dtype):
        loss = fn(*leaves, *args, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), [t.grad for t in leaves]


def _check(ours_fn, torch_fn, device, dtype, leaves, *args, **kw):
    """Values, dtypes, gradients and gradient dtypes equal torch's under
    autocast; values judged against a float64 run of torch on the same
    (low-precision-rounded) inputs."""
    ours, g_ours = _run(ours_fn, device, dtype, leaves, *args, **kw)
    theirs, g_theirs = _run(torch_fn, device, dtype, leaves, *args, **kw)
    assert ours.dtype == theirs.dtype == torch.float32
    dbl = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    ref, g_ref = _run(torch_fn, device, dtype, [t.double() for t in leaves], *map(dbl, args),
                      **{k: dbl(v) for k, v in kw.items()})
    assert_close_to_ref(ours, theirs, ref.double(), torch.float32, "loss")
    for go, gt, gr in zip(g_ours, g_theirs, g_ref):
        assert go.dtype == gt.dtype
        assert_close_to_ref(go, gt, gr.to(go.dtype).double(), go.dtype, "grad")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"ignore_index": 2}, {"weight": "same"},
                                {"weight": "fp32"}])
def test_cross_entropy_autocast(device, dtype, reduction, kw):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 37, generator=g) * 3).to(device, dtype)
    t = torch.randint(0, 37, (16,), generator=g).to(device)
    kw = dict(kw)
    if "weight" in kw:
        w = torch.rand(37, generator=g).to(device) + 0.5
        kw["weight"] = w.to(dtype) if kw["weight"] == "same" else w
    _check(crossent.cross_entropy, F.cross_entropy, device, dtype, [x], t, reduction=reduction, **kw)


@pytest.mark.parametrize("device,dtype", CASES)
def test_cross_entropy_autocast_kdim_and_probabilities(device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, generator=g).to(device, dtype)
    t = torch.randint(0, 5, (2, 3, 4), generator=g).to(device)
    _check(crossent.cross_entropy, F.cross_entropy, device, dtype, [x], t)
    p = torch.randn(6, 9, generator=g).softmax(1).to(device, dtype)
    x2 = torch.randn(6, 9, generator=g).to(device, dtype)
    _check(crossent.cross_entropy, F.cross_entropy, device, dtype, [x2], p, label_smoothing=0.2)


@pytest.mark.parametrize("device,dtype", CASES)
def test_cross_entropy_autocast_fp32_logits(device, dtype):
    """fp32 logits under autocast stay fp32 (the fp32 list casts nothing)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 11, generator=g).to(device)
    t = torch.randint(0, 11, (8,), generator=g).to(device)
    _check(crossent.cross_entropy, F.cross_entropy, device, dtype, [x], t, weight=torch.rand(11).to(device, dtype))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nll_loss_autocast(device, dtype, reduction):
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(12, 7, generator=g).log_softmax(1).to(device, dtype)
    t = torch.randint(0, 7, (12,), generator=g).to(device)
    _check(crossent.nll_loss, F.nll_loss, device, dtype, [lp], t, reduction=reduction)
    _check(crossent.nll_loss, F.nll_loss, device, dtype, [lp], t, reduction=reduction,
           weight=torch.rand(7, generator=g).to(device))


def _torch_linear_ce(h, W, t, **kw):
    return F.cross_entropy(F.linear(h, W), t, **kw)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_autocast(device, dtype, reduction):
    """fp32 parameters under autocast: the matmul runs in autocast's dtype,
    the loss is fp32, the gradients fp32, as with cross_entropy(linear(...))."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(24, 16, generator=g).to(device)
    W = (torch.randn(50, 16, generator=g) * 0.3).to(device)
    t = torch.randint(0, 50, (24,), generator=g).to(device)
    t[::5] = -100
    ours, (gh, gw) = _run(crossent.linear_cross_entropy, device, dtype, [h, W], t, reduction=reduction)
    theirs, (th, tw) = _run(_torch_linear_ce, device, dtype, [h, W], t, reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float32
    assert gh.dtype == th.dtype == torch.float32 and gw.dtype == tw.dtype == torch.float32
    # Both multiply the same autocast-dtype operands; torch rounds the logits to
    # that dtype before its fp32 loss, crossent keeps them in fp32: a few ulps
    # of the low-precision dtype apart.
    tol = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(gh, th, rtol=tol, atol=tol * float(th.abs().max()))
    torch.testing.assert_close(gw, tw, rtol=tol, atol=tol * float(tw.abs().max()))
    if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13 has its own
        with torch.autocast(device, dtype=dtype):
            assert F.linear_cross_entropy(h, W, t, reduction=reduction).dtype == ours.dtype


@pytest.mark.parametrize("device,dtype", CASES)
def test_no_fp32_copy_of_the_logits(device, dtype):
    """torch's autocast saves an fp32 (N, C) tensor for the backward; crossent
    saves nothing of the logits' size beyond the low-precision logits."""
    x = torch.randn(64, 300, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 300, (64,), device=device)

    def saved(fn):
        seen = []

        def pack(s):
            seen.append((tuple(s.shape), s.dtype))
            return s
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
            with torch.autocast(device, dtype=dtype):
                fn(x, t)
        return seen
    fp32_logits = ((64, 300), torch.float32)
    assert fp32_logits in saved(F.cross_entropy)  # the test can tell the difference
    assert fp32_logits not in saved(crossent.cross_entropy)
