"""torch.func and forward-mode AD: every transform torch supports on its own
F.cross_entropy / nll_loss / (log_)softmax works on crossent's, with the same
results (torch's functions under the same transform are the oracle)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import crossent

G = torch.Generator().manual_seed(0)
X = torch.randn(4, 5, generator=G, dtype=torch.float64)
XB = torch.randn(3, 4, 5, generator=G, dtype=torch.float64)  # a batch of X-shaped inputs for vmap
T_CLASS = torch.tensor([0, 4, -100, 2])
T_PROB = torch.softmax(torch.randn(4, 5, generator=G, dtype=torch.float64), 1)
W = torch.rand(5, generator=G, dtype=torch.float64) + 0.5

CASES = {
    "ce": lambda lib, red: lambda x: lib.cross_entropy(x, T_CLASS, reduction=red),
    "ce weight smoothing": lambda lib, red: lambda x: lib.cross_entropy(x, T_CLASS, W, reduction=red,
                                                                       label_smoothing=0.1),
    # torch's own gather rejects uint8 indices under vmap: it gets them as int64
    "ce uint8 ignore 3": lambda lib, red: lambda x: lib.cross_entropy(
        x, T_CLASS.clamp(min=0).to(torch.uint8 if lib is crossent else torch.long), reduction=red, ignore_index=3),
    "ce prob": lambda lib, red: lambda x: lib.cross_entropy(x, T_PROB, W, reduction=red, label_smoothing=0.2),
    "nll": lambda lib, red: lambda x: lib.nll_loss(x, T_CLASS, W, reduction=red),
}


def _transforms(f):
    s = lambda x: f(x).sum()  # noqa: E731
    return {
        "grad": lambda: grad(s)(X),
        "jvp": lambda: jvp(f, (X,), (torch.ones_like(X),))[1],
        "vmap": lambda: vmap(f)(XB),
        "vmap(grad)": lambda: vmap(grad(s))(XB),
        "jacrev": lambda: jacrev(f)(X),
        "jacfwd": lambda: jacfwd(f)(X),
        "hessian": lambda: hessian(s)(X),
        "forward_ad": lambda: _forward_ad(f),
    }


def _forward_ad(f):
    with forward_ad.dual_level():
        out = f(forward_ad.make_dual(X, torch.ones_like(X)))
        return forward_ad.unpack_dual(out).tangent


@pytest.mark.parametrize("transform", list(_transforms(None)))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_func_matches_torch(case, reduction, transform):
    ours = _transforms(CASES[case](crossent, reduction))[transform]()
    theirs = _transforms(CASES[case](F, reduction))[transform]()
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("transform", list(_transforms(None)))
def test_softmax_family_under_torch_func(fn, transform):
    ours = _transforms(lambda x: getattr(crossent, fn)(x, 1))[transform]()
    theirs = _transforms(lambda x: getattr(F, fn)(x, 1))[transform]()
    torch.testing.assert_close(ours, theirs)


def test_vmap_over_targets_and_out_of_range_target():
    """vmap over the targets too; a bad target still raises torch's error."""
    targets = torch.tensor([[0, 1, 2, 3], [4, -100, 0, 1]])
    ours = vmap(lambda x, t: crossent.cross_entropy(x, t))(XB[:2], targets)
    theirs = vmap(lambda x, t: F.cross_entropy(x, t))(XB[:2], targets)
    torch.testing.assert_close(ours, theirs)
    bad = torch.tensor([[0, 1, 2, 3], [9, 0, 0, 0]])
    with pytest.raises(Exception) as e_theirs:
        vmap(lambda x, t: F.cross_entropy(x, t))(XB[:2], bad)
    with pytest.raises(e_theirs.type) as e_ours:
        vmap(lambda x, t: crossent.cross_entropy(x, t))(XB[:2], bad)
    assert str(e_ours.value) == str(e_theirs.value)


def test_plain_autograd_keeps_the_forward_gradient():
    """The fused path still bakes the gradient into the forward for plain
    autograd: the backward hands that buffer over without touching x again
    (so editing x in place after the forward is harmless, as with torch)."""
    x = X.clone().requires_grad_()
    loss = crossent.cross_entropy(x, T_CLASS)
    with torch.no_grad():
        x.add_(1e6)  # would corrupt a recomputed gradient (and bump x's version counter)
    loss.backward()
    xt = X.clone().requires_grad_()
    F.cross_entropy(xt, T_CLASS).backward()
    torch.testing.assert_close(x.grad, xt.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_batched_upstream_gradients(reduction):
    """autograd.grad(is_grads_batched=True) vmaps the backward."""
    out = []
    for f in (crossent.cross_entropy, F.cross_entropy):
        x = X.clone().requires_grad_()
        loss = f(x, T_CLASS, W, reduction=reduction, label_smoothing=0.1)
        g = torch.randn(3, *loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype)
        out.append(torch.autograd.grad(loss, x, g, is_grads_batched=True)[0])
    torch.testing.assert_close(out[0], out[1])


def test_vmap_corners_match_torch():
    """Under vmap torch's batching rule computes where its eager kernels
    raise: a class weight that requires grad, an empty uint8 K-dim target."""
    w = W.clone().requires_grad_()
    ours = vmap(lambda x: crossent.cross_entropy(x, T_CLASS, w))(XB)
    theirs = vmap(lambda x: F.cross_entropy(x, T_CLASS, w))(XB)
    torch.testing.assert_close(ours, theirs)
    xe, te = torch.randn(2, 6, 1, 2, 0), torch.zeros(6, 2, 0, dtype=torch.uint8)
    ours = vmap(lambda x: crossent.nll_loss(x, te, reduction="none"))(xe)
    theirs = vmap(lambda x: F.nll_loss(x, te, reduction="none"))(xe)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
