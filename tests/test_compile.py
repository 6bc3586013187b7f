"""torch.compile tier: crossent traces with fullgraph=True (no graph breaks,
no host syncs) and gives eager's values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent


def _both(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    return fn, compiled


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_compiles_fullgraph(reduction, prob):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 33, generator=g)
    t = torch.softmax(torch.randn(16, 33, generator=g), 1) if prob else torch.randint(0, 33, (16,), generator=g)

    def fn(x, t):
        return crossent.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)

    eager, compiled = _both(fn)
    out = []
    for f in (eager, compiled):
        xi = x.clone().requires_grad_()
        loss = f(xi, t)
        loss.sum().backward()
        out.append((loss.detach(), xi.grad))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_nll_softmax_compile_fullgraph():
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))

    def fn(x, t):
        return crossent.nll_loss(crossent.log_softmax(x, 1), t) + crossent.softmax(x, 0).sum()

    eager, compiled = _both(fn)
    torch.testing.assert_close(compiled(x, t), eager(x, t))
    torch.testing.assert_close(torch.autograd.grad(compiled(x, t), x)[0], torch.autograd.grad(eager(x, t), x)[0])


def test_compile_with_inductor():
    """The default backend too (Inductor generates C++ here)."""
    x = torch.randn(8, 40, requires_grad=True)
    t = torch.randint(0, 40, (8,))
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: crossent.cross_entropy(x, t), fullgraph=True)
    loss = f(x, t)
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    torch.testing.assert_close(g, torch.autograd.grad(F.cross_entropy(x, t), x)[0])


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_compile_emits_no_warning(fn):
    """Tracing crossent is silent: Dynamo warns at every call of an lru_cache-wrapped
    function (crossent caches its options in eager mode only) and at other constructs
    it cannot trace cleanly; a user compiling a model should see none of that from us."""
    import warnings
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (8,), generator=g)
    w = torch.randn(5, 5, generator=g)
    call = ((lambda x, y: crossent.cross_entropy(x, y, z_loss=1e-4, label_smoothing=0.1)) if fn == "cross_entropy"
            else (lambda x, y: crossent.linear_cross_entropy(x, w, y, z_loss=1e-4)))
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x, y).backward()
    ours = [str(c.message) for c in caught if c.category is UserWarning]
    assert not ours, ours


_INFERENCE = {
    "cross_entropy": lambda x, h, w, t: crossent.cross_entropy(x, t, label_smoothing=0.1),
    "cross_entropy_none": lambda x, h, w, t: crossent.cross_entropy(x, t, reduction="none", z_loss=1e-3),
    "cross_entropy_probs": lambda x, h, w, t: crossent.cross_entropy(x, torch.softmax(2 * x, 1)),
    "cross_entropy_with_stats": lambda x, h, w, t: crossent.cross_entropy_with_stats(x, t, z_loss=1e-3).lse,
    "linear_cross_entropy": lambda x, h, w, t: crossent.linear_cross_entropy(h, w, t),
    "nll_loss": lambda x, h, w, t: crossent.nll_loss(crossent.log_softmax(x, 1), t),
    "softmax": lambda x, h, w, t: crossent.softmax(x, 1),
}


@pytest.mark.parametrize("no_grad", [False, True], ids=["no-requires-grad", "no_grad"])
@pytest.mark.parametrize("name", list(_INFERENCE))
def test_compiled_inference_fullgraph(name, no_grad):
    """Compiled inference (no input requires grad, or grad mode off) traces whole and
    gives eager's values.  Regression: torch 2.4's Dynamo calls a setup_context-style
    Function's forward with a ctx when nothing needs grad (ArgsMismatchError)."""
    g = torch.Generator().manual_seed(0)
    x, h, w = torch.randn(8, 5, generator=g), torch.randn(8, 4, generator=g), torch.randn(5, 4, generator=g)
    t = torch.randint(0, 5, (8,), generator=g)
    eager, compiled = _both(_INFERENCE[name])
    with torch.set_grad_enabled(not no_grad):
        torch.testing.assert_close(compiled(x, h, w, t), eager(x, h, w, t))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_legacy_elementwise_mean_compiles_fullgraph(fn):
    """reduction='elementwise_mean' warns with torch's message; under fullgraph=True
    Dynamo cannot trace warnings.warn, so the warning is issued while tracing (as
    torch's own compiled loss does) and the compiled graph equals torch's 'mean'."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 5, generator=g).log_softmax(1).requires_grad_(), torch.randint(0, 5, (6,), generator=g)
    ours, theirs = getattr(crossent, fn), getattr(F, fn)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ours(x, t, reduction="elementwise_mean"), fullgraph=True, backend="aot_eager")
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        loss = compiled(x)
    (gx,) = torch.autograd.grad(loss, x)
    ref = theirs(x, t, reduction="mean")
    (gref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, gref)
