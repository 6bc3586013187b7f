"""The lean call path (crossent/_fast.py): which calls take it, and that on it
crossent is torch exactly (values, gradients, errors, warnings)."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import _autograd, _fast, functional


@pytest.fixture
def auto(monkeypatch):
    """The backend left automatic (conftest pins 'torch' for the rest of the suite)."""
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)


def _spy_apply(monkeypatch, function) -> list:
    """The calls of ``function.call`` (crossent's apply) from now on (it still runs)."""
    calls = []
    real = function.call

    def spy(*a):
        calls.append(a)
        return real(*a)
    monkeypatch.setattr(function, "call", spy)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into crossent's own cross-entropy Function."""
    return _spy_apply(monkeypatch, _autograd.CrossEntropyFunction)


def _xt(N=8, C=5, dtype=torch.float32, tdtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g, dtype=dtype), torch.randint(0, C, (N,), generator=g).to(tdtype)


LEAN_CE_KWARGS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.3},
                  {"ignore_index": 1}, {"weight": torch.rand(5) + 0.1}]


@pytest.mark.parametrize("kw", LEAN_CE_KWARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_cross_entropy_is_torch_bitwise(auto, kernel_calls, kw, dtype):
    x, t = _xt(dtype=dtype)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = crossent.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
    ours.sum().backward()
    theirs.sum().backward()
    assert not kernel_calls
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs) and torch.equal(xa.grad, xb.grad)


def test_lean_probability_targets_and_modules(auto, kernel_calls):
    x, _ = _xt()
    p = torch.rand(8, 5).softmax(1)
    assert torch.equal(crossent.cross_entropy(x, p, label_smoothing=0.1), F.cross_entropy(x, p, label_smoothing=0.1))
    x3, t3 = torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3))
    w = torch.rand(5)
    assert torch.equal(crossent.nn.CrossEntropyLoss(weight=w)(x3, t3), torch.nn.CrossEntropyLoss(weight=w)(x3, t3))
    lp = x.log_softmax(1)
    _, t = _xt()
    assert torch.equal(crossent.nn.NLLLoss(reduction="sum")(lp, t), torch.nn.NLLLoss(reduction="sum")(lp, t))
    assert not kernel_calls


@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 1},
                                {"weight": torch.rand(5) + 0.1}])
@pytest.mark.parametrize("shape", [(8, 5), (5,), (2, 5, 3), (2, 5, 3, 2), (2, 5, 1, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_nll_loss_is_torch_bitwise(auto, monkeypatch, kw, shape, dtype):
    """Every input rank torch's nll_loss takes: its values and gradients, and crossent's own
    path (whose first check is V.class_target) never runs."""
    monkeypatch.setattr(functional.V, "class_target", lambda *a: pytest.fail("not lean"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=dtype).log_softmax(0 if len(shape) == 1 else 1)
    t = torch.randint(0, 5, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = crossent.nll_loss(xa, t, **kw), F.nll_loss(xb, t, **kw)
    ours.sum().backward()
    theirs.sum().backward()
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)   # ignored target: NaN mean
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0, equal_nan=True)


def test_nll_loss_front_keeps_the_signature():
    """The lean front (_fast.nll_loss_front) has the signature of the function it wraps."""
    ours = inspect.signature(crossent.nll_loss, follow_wrapped=False).parameters.values()
    theirs = inspect.signature(crossent.nll_loss.__wrapped__).parameters.values()
    assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]
    assert crossent.nll_loss.__doc__ == crossent.nll_loss.__wrapped__.__doc__


@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("case", ["int32", "uint8", "uint8_out_of_range"])
def test_lean_int32_and_uint8_targets_are_crossents(auto, name, case):
    """README "Deliberate differences" 1 and 8 on the lean path: int32 class targets are accepted
    (torch raises), uint8 ones give torch's int64 result, or the message torch gives for the same
    int64 target."""
    x, t = _xt(C=200)
    if case == "uint8_out_of_range":
        t[-1] = 250
    t8 = t.to(torch.int32 if case == "int32" else torch.uint8)
    ours, theirs = getattr(crossent, name), getattr(F, name)
    if case == "uint8_out_of_range":
        with pytest.raises(IndexError) as want:
            theirs(x, t)
        with pytest.raises(IndexError) as got:
            ours(x, t8)
        assert str(got.value) == str(want.value)
        return
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, t8), theirs(xb, t)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xa.grad, xb.grad)


def _readme8_cases():
    """README "Deliberate differences" 8, where torch fails and crossent computes: (name, input,
    target, kwargs) and the equivalent call torch accepts."""
    g = torch.Generator().manual_seed(3)
    x4 = torch.randn(2, 3, 4, 5, generator=g).log_softmax(1)
    t4 = torch.randint(0, 3, (2, 4, 5), generator=g)
    x1, t1 = torch.randn(5, generator=g), torch.tensor([2])
    x3, t3, w = torch.randn(2, 3, 4, generator=g), torch.randint(0, 3, (2, 4), generator=g), torch.rand(3) + 0.1
    return {
        "nll_channels_last": ("nll_loss", x4.contiguous(memory_format=torch.channels_last), t4, {}, (x4, t4, {})),
        "nll_1d_input_(1,)_target": ("nll_loss", x1, t1, {}, (x1, t1[0], {})),
        "ce_1d_input_(1,)_target": ("cross_entropy", x1, t1, {}, (x1, t1[0], {})),
        "ce_1d_input_(1,)_target_smoothing": ("cross_entropy", x1, t1, {"label_smoothing": 0.1},
                                              (x1, t1[0], {"label_smoothing": 0.1})),
        "ce_kdim_(1,C)_weight_smoothing": ("cross_entropy", x3, t3, {"weight": w[None], "label_smoothing": 0.2},
                                           (x3, t3, {"weight": w, "label_smoothing": 0.2})),
    }


@pytest.mark.parametrize("case", list(_readme8_cases()))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_keeps_readme_differences(auto, case, reduction):
    """Where torch fails (README 8) the lean path is not taken: crossent gives the value and
    gradient torch gives for the equivalent input it accepts."""
    name, x, t, kw, (xe, te, kwe) = _readme8_cases()[case]
    xa, xb = x.clone().requires_grad_(), xe.clone().requires_grad_()
    a = getattr(crossent, name)(xa, t, reduction=reduction, **kw)
    b = getattr(F, name)(xb, te, reduction=reduction, **kwe)
    (ga,) = torch.autograd.grad(a.sum(), xa)
    (gb,) = torch.autograd.grad(b.sum(), xb)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", ["NLLLoss", "CrossEntropyLoss"])
@pytest.mark.parametrize("weight", ["none", "buffer", "reassigned_buffer", "parameter", "deleted"])
def test_modules_read_the_weight_torch_reads(auto, name, weight):
    """nn._class_weight reads the buffer dict directly: the same weight as torch's module
    reads through Module.__getattr__, however it was set."""
    w = torch.rand(5) + 0.1
    mods = [getattr(crossent.nn, name)(weight=None if weight == "none" else w),
            getattr(torch.nn, name)(weight=None if weight == "none" else w)]
    for m in mods:
        if weight == "reassigned_buffer":
            m.weight = w.flip(0)
        elif weight == "parameter":
            m.weight = torch.nn.Parameter(w.flip(0), requires_grad=False)
        elif weight == "deleted":
            del m.weight
    x, t = _xt()
    if weight == "deleted":
        for m in mods:
            with pytest.raises(AttributeError, match="has no attribute 'weight'"):
                m(x, t)
        return
    assert torch.equal(mods[0](x, t), mods[1](x, t))


@pytest.mark.parametrize("case", ["int32", "uint8", "bf16", "z_loss", "softcap", "legacy", "large",
                                  "named_backend", "subclass"])
def test_not_lean(monkeypatch, kernel_calls, case):
    """Calls where crossent promises more than torch (or a backend was named)
    run crossent's own kernels."""
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    x, t = _xt(tdtype={"int32": torch.int32, "uint8": torch.uint8}.get(case, torch.int64),
               dtype=torch.bfloat16 if case == "bf16" else torch.float32)
    kw = {"z_loss": {"z_loss": 1e-3}, "softcap": {"softcap": 5.0},
          "legacy": {"size_average": False}}.get(case, {})
    if case == "large":
        x, t = _xt(N=_fast.CE_MAX_NUMEL // 64 + 1, C=64)
    if case == "named_backend":
        monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    if case == "subclass":
        x = torch.nn.Parameter(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy argument's deprecation warning
        crossent.cross_entropy(x, t, **kw)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto ", ""])
def test_auto_spellings(monkeypatch, kernel_calls, value):
    monkeypatch.setenv("CROSSENT_BACKEND", value)
    crossent.cross_entropy(*_xt())
    assert not kernel_calls


@pytest.mark.parametrize("bad", [
    lambda f: f(torch.randn(3, 5), torch.tensor([0, 7, 1])),                # target out of bounds
    lambda f: f(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg"),
    lambda f: f(torch.randn(3, 5), torch.tensor([0, 1])),                   # batch mismatch
    lambda f: f(torch.randn(3, 5), torch.tensor([0, 1, 2]), weight=torch.rand(4)),
    lambda f: f(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=1.5),
    lambda f: f(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=1.5),
    lambda f: f(torch.randn(3, 5), [0, 1, 2]),
    lambda f: f([[0.0]], torch.tensor([0])),
])
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_lean_errors_are_torch_errors(auto, bad, name):
    def run(f):
        try:
            bad(f)
        except Exception as e:
            return type(e), str(e)
        return None
    assert run(getattr(crossent, name)) == run(getattr(F, name))


def test_lean_elementwise_mean_warning_is_torchs(auto):
    x, t = _xt()
    said = []
    for f in (F.cross_entropy, crossent.cross_entropy):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            f(x, t, reduction="elementwise_mean")
        said.append([str(m.message) for m in w])
    expected = ["reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead."]
    if said[0] != expected:
        pytest.skip(f"this torch words it differently (torch 2.4: {said[0]}); crossent as torch 2.13")
    assert said[1] == expected


@pytest.mark.parametrize("log", [False, True])
def test_lean_softmax(auto, monkeypatch, log):
    """An explicit dim goes straight to torch's kernel; dim=None keeps the
    implicit-dim warning attributed to the caller's line."""
    monkeypatch.setattr(functional, "_softmax_impl", lambda *a: pytest.fail("not lean"))
    ours, theirs = (crossent.log_softmax, F.log_softmax) if log else (crossent.softmax, F.softmax)
    x = torch.randn(4, 6, requires_grad=True)
    assert torch.equal(ours(x, 1), theirs(x, 1))
    assert torch.equal(ours(x, 0, dtype=torch.float64), theirs(x, 0, dtype=torch.float64))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="Implicit dimension") as rec:
        ours(x)
    assert rec[0].filename == __file__


def test_lean_under_vmap_and_grad(auto):
    """torch.func composes with the lean path (it is torch's own op)."""
    x, t = torch.randn(3, 8, 5), torch.randint(0, 5, (3, 8))
    ours = torch.func.vmap(crossent.cross_entropy)(x, t)
    assert torch.equal(ours, torch.func.vmap(F.cross_entropy)(x, t))
    assert torch.equal(torch.func.grad(crossent.cross_entropy)(x[0], t[0]),
                       torch.func.grad(F.cross_entropy)(x[0], t[0]))


def test_not_lean_under_compile(auto):
    """torch.compile traces crossent's own ops (NaN for a bad target, not
    torch's assert), once: _eager() is folded at trace time, never guarded on."""
    frames, targets = [], set()

    def backend(gm, example_inputs):
        frames.append(gm)
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: crossent.cross_entropy(x, t) + crossent.nll_loss(x, t), backend=backend)
    x, t = _xt()
    for _ in range(3):
        torch.testing.assert_close(f(x, t), F.cross_entropy(x, t) + F.nll_loss(x, t))
    assert len(frames) == 1
    assert any("crossent" in s for s in targets), targets
    assert not any("cross_entropy_loss" in s or "nll_loss_nd" in s for s in targets), targets
    assert _fast._eager()  # and eager calls after tracing are lean again


# ----------------------------------------------------------------------------- linear_cross_entropy
@pytest.fixture
def linear_calls(monkeypatch):
    """Counts calls into crossent's own linear cross-entropy Function."""
    from crossent import linear
    return _spy_apply(monkeypatch, linear.LinearCrossEntropyFunction)


def _hwt(N=6, D=4, C=9, dtype=torch.float64, prob=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, W, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((N, D), (C, D), (C,)))
    t = torch.softmax(torch.randn(N, C, generator=g, dtype=dtype), 1) if prob else \
        torch.randint(0, C, (N,), generator=g)
    return h, W, b, t


needs_torch_lce = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch >= 2.13")


@needs_torch_lce
@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.2},
                                {"weight": torch.rand(9, dtype=torch.float64) + 0.1}, {"ignore_index": 3},
                                {"prob": True}, {"prob": True, "label_smoothing": 0.1}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_linear_cross_entropy_is_torch_bitwise(auto, linear_calls, kw, dtype):
    """Small CPU calls with nothing torch lacks: torch's own F.linear_cross_entropy, values and
    the gradients of input, weight and bias bitwise."""
    kw = dict(kw)
    h, W, b, t = _hwt(dtype=dtype, prob=kw.pop("prob", False))
    if kw.get("ignore_index") == 3:
        t[t == 3] = 4   # an ignore_index that no position has
    if "weight" in kw:
        kw["weight"] = kw["weight"].to(dtype)
    out = []
    for fn in (crossent.linear_cross_entropy, F.linear_cross_entropy):
        hh, WW, bb = (a.clone().requires_grad_() for a in (h, W, b))
        loss = fn(hh, WW, t, linear_bias=bb, **kw)
        loss.sum().backward()
        out.append((loss, hh.grad, WW.grad, bb.grad))
    for a, e in zip(*out):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert not linear_calls
    m = crossent.nn.LinearCrossEntropyLoss(4, 9, bias=True, dtype=dtype)
    m(h, t if t.dtype == torch.int64 else t.to(dtype))
    assert not linear_calls


@needs_torch_lce
@pytest.mark.parametrize("case", ["ignored_position", "z_loss", "softcap", "shift", "options", "named_backend",
                                  "bf16", "batch_dims", "too_many_logits", "int32_target"])
def test_linear_not_lean(monkeypatch, linear_calls, case):
    """Where crossent promises what torch does not (or torch lacks the call), its own path runs."""
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    h, W, b, t = _hwt(dtype=torch.float32)
    kw = {}
    if case == "ignored_position":
        t[1] = -100   # non-finite hidden states there get a 0 gradient from crossent, NaN from torch
    elif case == "z_loss":
        kw["z_loss"] = 1e-4
    elif case == "softcap":
        kw["softcap"] = 30.0
    elif case == "shift":
        h, t, kw["shift"] = h[None], t[None], True
    elif case == "options":
        kw["options"] = crossent.LinearCrossEntropyOptions()
    elif case == "named_backend":
        monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    elif case == "bf16":
        h, W, b = h.bfloat16(), W.bfloat16(), b.bfloat16()
    elif case == "batch_dims":
        h, t = h.reshape(2, 3, 4), t.reshape(2, 3)
    elif case == "too_many_logits":
        h, t = torch.randn((_fast.CE_MAX_NUMEL // 9) + 1, 4), torch.randint(0, 9, ((_fast.CE_MAX_NUMEL // 9) + 1,))
    elif case == "int32_target":
        t = t.int()
    crossent.linear_cross_entropy(h, W, t, linear_bias=b, **kw)
    assert len(linear_calls) == 1


@needs_torch_lce
@pytest.mark.parametrize("bad", ["in_features", "target_shape", "smoothing", "reduction", "prob_ignore_index"])
def test_lean_linear_errors_are_torch_errors(auto, bad):
    h, W, b, t = _hwt(dtype=torch.float32)
    kw = {}
    if bad == "in_features":
        W = W[:, :3]
    elif bad == "target_shape":
        t = t[:4]
    elif bad == "smoothing":
        kw["label_smoothing"] = 1.5
    elif bad == "reduction":
        kw["reduction"] = "avg"
    elif bad == "prob_ignore_index":
        t, kw["ignore_index"] = torch.softmax(torch.randn(6, 9), 1), 2
    with pytest.raises(Exception) as want:
        F.linear_cross_entropy(h, W, t, linear_bias=b, **kw)
    with pytest.raises(type(want.value)) as got:
        crossent.linear_cross_entropy(h, W, t, linear_bias=b, **kw)
    assert str(got.value) == str(want.value)


@needs_torch_lce
def test_linear_under_vmap_and_grad(auto):
    """Under torch.func the target is not read (vmap forbids it): crossent's own path."""
    h, W, b, t = _hwt(N=6, dtype=torch.float64)
    hs, ts = torch.stack([h, h.flip(0)]), torch.stack([t, t.flip(0)])
    out = torch.func.vmap(lambda h, t: crossent.linear_cross_entropy(h, W, t, linear_bias=b))(hs, ts)
    ref = torch.stack([F.linear_cross_entropy(hs[i], W, ts[i], linear_bias=b) for i in range(2)])
    torch.testing.assert_close(out, ref)
    g = torch.func.grad(lambda h: crossent.linear_cross_entropy(h, W, t, linear_bias=b))(h)
    torch.testing.assert_close(g, torch.func.grad(lambda h: F.linear_cross_entropy(h, W, t, linear_bias=b))(h))
