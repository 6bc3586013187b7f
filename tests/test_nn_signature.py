"""The crossent.nn constructors: torch's parameters, spelt out (names, kinds, defaults), then
crossent's keyword-only extras; a misspelt keyword raises torch's TypeError.  Runs on every
torch tier: on torch < 2.13 LinearCrossEntropyLoss's base is crossent's copy of 2.13's module."""
from __future__ import annotations

import inspect

import pytest
import torch

import crossent
from crossent import nn
from crossent.nn import _LinearCrossEntropyLoss213

# crossent's keyword-only extras and their defaults, after torch's parameters
EXTRAS = {"z_loss": 0.0, "softcap": None}
HAS_TORCH_LCE = hasattr(torch.nn, "LinearCrossEntropyLoss")


def _params(cls) -> list[tuple]:
    """(name, kind, default) of cls.__init__'s parameters after self; annotations are left out
    (crossent's are strings under `from __future__ import annotations`, torch's objects)."""
    ps = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [(p.name, p.kind, p.default) for p in ps]


def _torch_params_then_extras(ours, theirs) -> None:
    mine = _params(ours)
    n = len(mine) - len(EXTRAS)
    assert mine[:n] == _params(theirs)
    assert mine[n:] == [(k, inspect.Parameter.KEYWORD_ONLY, d) for k, d in EXTRAS.items()]


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_constructor_is_torchs_plus_extras(name):
    """Against torch's module where torch has it, else against the base it subclasses."""
    ours = getattr(nn, name)
    _torch_params_then_extras(ours, getattr(torch.nn, name, ours.__mro__[1]))


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="compares with torch 2.13's module")
def test_copy_of_213s_module_has_its_signature():
    """What older torch subclasses (crossent's copy) takes exactly torch 2.13's arguments."""
    assert _params(_LinearCrossEntropyLoss213) == _params(torch.nn.LinearCrossEntropyLoss)


@pytest.mark.parametrize("name,args", [("CrossEntropyLoss", ()), ("LinearCrossEntropyLoss", (4, 7))])
def test_misspelt_keyword_raises_type_error(name, args):
    with pytest.raises(TypeError, match="unexpected keyword argument 'reducton'") as ours:
        getattr(nn, name)(*args, reducton="sum")
    if hasattr(torch.nn, name):  # the same message, word for word (the class names agree)
        with pytest.raises(TypeError) as theirs:
            getattr(torch.nn, name)(*args, reducton="sum")
        assert str(ours.value) == str(theirs.value)


def test_linear_module_passes_every_argument_on():
    """Each constructor argument reaches the loss: the module equals crossent.linear_cross_entropy
    called with the module's weights and the same arguments (out_features: K-dim targets)."""
    kw = dict(reduction="sum", ignore_index=1, label_smoothing=0.1)
    extras = dict(z_loss=1e-3, softcap=5.0)
    w = torch.rand(7, dtype=torch.float64) + 0.5
    torch.manual_seed(0)
    m = nn.LinearCrossEntropyLoss(4, 7, out_features=(2,), bias=True, dtype=torch.float64, weight=w,
                                  **kw, **extras)
    assert m.linear.weight.dtype == torch.float64 and m.linear.bias is not None
    h = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randint(0, 7, (5, 2))
    want = crossent.linear_cross_entropy(h, m.linear.weight.reshape(7, 2, 4), t,
                                         linear_bias=m.linear.bias.reshape(7, 2), weight=w, **kw, **extras)
    torch.testing.assert_close(m(h, t), want, rtol=0, atol=0)
    # and the extras change the loss (they are not dropped on the way)
    plain = nn.LinearCrossEntropyLoss(4, 7, out_features=(2,), bias=True, dtype=torch.float64, weight=w, **kw)
    plain.load_state_dict(m.state_dict())
    assert not torch.equal(plain(h, t), m(h, t))
