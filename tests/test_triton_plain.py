"""The plain cross_entropy call (functional._plain_cross_entropy, issue 10 item 3): which calls
take it, and that on it crossent computes exactly what its general path does.

The plain call -- (N, C) logits, (N,) int64 class indices, no weight, smoothing or extras, eager
mode outside torch.func, on a backend that fuses the forward -- skips the general argument
handling and keeps neither the mean's denominator nor the lse.  The general path is reached with
the same arguments through cross_entropy_with_stats (it keeps both), so every comparison below
is bitwise: the loss, the gradient, the gradient of a second backward (which recomputes, and for
'mean' recounts the denominator), of backward(create_graph=True) and of a non-finite upstream.
Under the Triton interpreter on CPU tensors, with the two CPU-only checks left on.
"""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", minversion="3.6")  # backends.triton.MIN_TRITON
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernels under the Triton interpreter (CPU tensors)", allow_module_level=True)

import crossent  # noqa: E402
from crossent import _autograd  # noqa: E402
import test_triton_launches  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter
path = test_triton_launches.path   # the fixture: the single-tile kernel, or the split-row kernel


@pytest.fixture
def triton(monkeypatch):
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")


@pytest.fixture
def general_calls(monkeypatch):
    """The calls of CrossEntropyFunction.call, the general path's way in (the plain call's is
    its C++ apply, or its forward without grad)."""
    calls = []
    real = _autograd.CrossEntropyFunction.call

    def spy(*a):
        calls.append(a)
        return real(*a)
    monkeypatch.setattr(_autograd.CrossEntropyFunction, "call", spy)
    return calls


def _xy(dtype=torch.float32, N=6, C=40):
    torch.manual_seed(N * C)
    x = (torch.randn(N, C) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, C, (N,))
    y[1] = -100
    return x, y


def _grads(loss, x, seed, **kw):
    return torch.autograd.grad(loss, x, seed, **kw)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_is_the_general_path_bitwise(triton, path, general_calls, reduction, dtype):
    x, y = _xy(dtype)
    for upstream in (2.0, float("inf")):
        plain = crossent.cross_entropy(x, y, reduction=reduction)
        assert not general_calls
        general = crossent.cross_entropy_with_stats(x, y, reduction=reduction).loss
        assert len(general_calls) == 1
        general_calls.clear()
        assert plain.dtype == general.dtype and torch.equal(plain, general)
        seed = torch.full_like(plain, upstream)
        for kw in (dict(retain_graph=True), dict(retain_graph=True), dict(create_graph=True)):
            # the forward's gradient, then a recompute from the logits, then torch's ops
            a, b = _grads(plain, x, seed, **kw), _grads(general, x, seed, **kw)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), kw


def test_plain_all_ignored_mean(triton, path):
    """W = 0: a NaN mean, zero gradients, also from the recount of a second backward."""
    x, y = _xy()
    y.fill_(-100)
    loss = crossent.cross_entropy(x, y)
    assert torch.equal(loss.isnan(), F.cross_entropy(x, y).isnan())
    for _ in range(2):
        assert torch.equal(_grads(loss, x, torch.ones(()), retain_graph=True), torch.zeros_like(x))


def test_plain_matches_torch(triton, path):
    x, y = _xy()
    for reduction in ("mean", "sum", "none"):
        ours, theirs = crossent.cross_entropy(x, y, reduction=reduction), F.cross_entropy(x, y, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(_grads(ours.sum(), x, None), _grads(theirs.sum(), x, None))
    with torch.no_grad():
        ii = int(y[0])   # a class as ignore_index (-100 then counts as a class: out of bounds)
        yy = torch.where(y == -100, ii, y)
        torch.testing.assert_close(crossent.cross_entropy(x, yy, ignore_index=ii),
                                   F.cross_entropy(x, yy, ignore_index=ii))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.detach().bfloat16()
        ours, theirs = crossent.cross_entropy(xb, y), F.cross_entropy(xb, y)
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs)


NOT_PLAIN = {
    "weight": lambda x, y: dict(weight=torch.rand(x.shape[1])),
    "smoothing": lambda x, y: dict(label_smoothing=0.1),
    "int smoothing": lambda x, y: dict(label_smoothing=0),
    "z_loss": lambda x, y: dict(z_loss=1e-3),
    "softcap": lambda x, y: dict(softcap=20.0),
    "int32 target": lambda x, y: dict(target=y.int()),
    "k-dim": lambda x, y: dict(input=x.detach().unsqueeze(2), target=y.unsqueeze(1)),
    "1-d": lambda x, y: dict(input=x.detach()[0], target=y[0]),
    "probabilities": lambda x, y: dict(target=torch.softmax(x.detach(), 1)),
    "fp64": lambda x, y: dict(input=x.detach().double()),
    "no rows": lambda x, y: dict(input=x.detach()[:0], target=y[:0]),
}


@pytest.mark.parametrize("case", sorted(NOT_PLAIN))
def test_not_plain(triton, general_calls, case):
    x, y = _xy()
    kw = {"input": x, "target": y, **NOT_PLAIN[case](x, y)}
    crossent.cross_entropy(**kw)
    assert len(general_calls) == 1


def test_not_plain_under_transforms(triton, general_calls):
    x, y = _xy()
    ours = torch.func.grad(lambda x: crossent.cross_entropy(x, y))(x.detach())
    assert len(general_calls) == 1
    torch.testing.assert_close(ours, torch.func.grad(lambda x: F.cross_entropy(x, y))(x.detach()))


def test_not_plain_under_forward_ad(triton):
    """Forward-mode AD outside torch.func (dual_level): the Function with a jvp rule, whose
    tangent the plain call (CrossEntropyFunction, no jvp) could not give."""
    import torch.autograd.forward_ad as fwAD
    x, y = _xy()
    t = torch.randn_like(x)
    tangents = []
    for f in (crossent.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(f(fwAD.make_dual(x.detach(), t), y)).tangent)
    torch.testing.assert_close(*tangents)


@pytest.mark.parametrize("bad", [
    lambda f, x, y: f(x, y[:3]),                                    # batch mismatch
    lambda f, x, y: f(x, torch.full_like(y, 40)),                   # target out of bounds
    lambda f, x, y: f(x, y, reduction="avg"),
    lambda f, x, y: f(x, y, ignore_index=1 << 63),                  # not an int64
    lambda f, x, y: f(x, y, reduction="elementwise_mean"),          # torch's warning, then the loss
])
def test_plain_shaped_errors_are_torchs(triton, bad):
    """Calls shaped like the plain one that torch refuses (or warns about) take the general
    path, which raises (or warns) as torch does."""
    x, y = _xy()

    def run(f):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                out = bad(f, x, y).shape
            except Exception as e:
                out = type(e), str(e)
        return out, [str(w.message) for w in said if issubclass(w.category, UserWarning)]
    assert run(crossent.cross_entropy) == run(F.cross_entropy)


def test_unusable_backend_raises_after_the_checks(monkeypatch):
    """A named backend that cannot run on the device: its error comes after torch's checks."""
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y = _xy()
    with pytest.raises(IndexError, match="out of bounds"):
        crossent.cross_entropy(x, torch.full_like(y, 40))
    with pytest.raises(RuntimeError, match="CROSSENT_BACKEND=triton was requested"):
        crossent.cross_entropy(x, y)
