"""float64 gradcheck, double backward, and the module forms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import crossent


@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 5, 2), (2, 5, 2, 2)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_cross_entropy(shape, reduction):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    C = shape[0 if len(shape) == 1 else 1]
    t = torch.randint(0, C, () if len(shape) == 1 else (shape[0], *shape[2:]))
    w = torch.rand(C, dtype=torch.float64) + 0.5
    assert gradcheck(lambda x: crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                                      z_loss=0.01, softcap=4.0), (x,))
    p = torch.softmax(torch.randn(shape, dtype=torch.float64), 0 if len(shape) == 1 else 1)
    assert gradcheck(lambda x: crossent.cross_entropy(x, p, w, reduction=reduction), (x,))


def test_gradcheck_prob_target_and_weight():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradcheck(lambda x, p, w: crossent.cross_entropy(x, p, w, label_smoothing=0.2), (x, p, w))


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_gradgradcheck(fn):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: getattr(crossent, fn)(x, 1)  # noqa: E731
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))


def test_nll_gradgradcheck():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 4, 2, -100])
    f = lambda x: crossent.nll_loss(x, t, reduction="none")  # noqa: E731
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_gradgradcheck(reduction, prob):
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(3, 5, 2, dtype=torch.float64), 1) if prob else torch.tensor([[0, 1], [4, -100], [2, 3]])
    w = torch.rand(5, dtype=torch.float64) + 0.5
    f = lambda x: crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, z_loss=0.01)  # noqa: E731
    assert gradgradcheck(f, (x,))


def test_double_backward_matches_torch():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    hv = []
    for fn in (crossent.cross_entropy, F.cross_entropy):
        (g,) = torch.autograd.grad(fn(x, t), x, create_graph=True)
        hv.append(torch.autograd.grad((g * g).sum(), x)[0])
    torch.testing.assert_close(hv[0], hv[1])


MODULES = [("Softmax", dict(dim=1)), ("LogSoftmax", dict(dim=1)), ("NLLLoss", dict(ignore_index=1)),
           ("CrossEntropyLoss", dict(weight=torch.rand(5), label_smoothing=0.1, reduction="sum"))]


@pytest.mark.parametrize("name,kw", MODULES)
def test_modules_match_and_load_torch_state_dict(name, kw):
    theirs = getattr(torch.nn, name)(**kw)
    ours = getattr(crossent.nn, name)(**{k: v for k, v in kw.items() if k != "weight"},
                                      **({"weight": torch.zeros(5)} if "weight" in kw else {}))
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, type(theirs))
    x = torch.randn(4, 5)
    args = (x,) if "Softmax" in name else (torch.log_softmax(x, 1) if name == "NLLLoss" else x, torch.tensor([0, 1, 4, 2]))
    torch.testing.assert_close(ours(*args), theirs(*args))


def test_module_extras():
    m = crossent.nn.CrossEntropyLoss(z_loss=1e-2, softcap=5.0)
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    torch.testing.assert_close(m(x, t), crossent.cross_entropy(x, t, z_loss=1e-2, softcap=5.0))
    assert m.state_dict().keys() == torch.nn.CrossEntropyLoss().state_dict().keys()
