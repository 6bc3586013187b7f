"""Differential tests: crossent against torch.nn.functional over the argument
space, values and gradients, judged against a float64 reference."""
from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent
from _tol import assert_close_to_ref

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(7,), (6, 7), (3, 7, 5), (2, 7, 3, 4), (2, 7, 2, 3, 2)]  # class dim has 7 classes
REDUCTIONS = ["none", "mean", "sum"]
# CROSSENT_TEST_DEVICE=cuda runs the differential suite on a GPU, with the backend
# CROSSENT_BACKEND names (tests/conftest.py defaults it to torch; benchmarks/gpu_check.sh
# sets auto, the triton backend there); torch's own results on that device and a
# float64 reference on it are the yardsticks there.
DEVICE = os.environ.get("CROSSENT_TEST_DEVICE", "cpu")


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def _class_target(shape, C, ignore_index, dtype=torch.int64, seed=1):
    g = torch.Generator().manual_seed(seed)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, tshape, generator=g)
    if ignore_index is not None and t.numel() > 1:
        t.view(-1)[::3] = ignore_index  # some positions ignored
    return t.to(dtype)


def _prob_target(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    cdim = 0 if len(shape) == 1 else 1
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), cdim)


def _run(fn, x, *args, grad_seed=3, **kw):
    """Value and input gradient on DEVICE, returned on the CPU; the upstream
    gradient is random for 'none'."""
    x = x.detach().to(DEVICE).clone().requires_grad_(True)
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(x, *args, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(device=DEVICE, dtype=out.dtype))
    return out.detach().cpu(), x.grad.cpu()


def _compare(ours_fn, torch_fn, x, args, kw, ref_args=None, what=""):
    o, go = _run(ours_fn, x, *args, **kw)
    t, gt = _run(torch_fn, x, *args, **kw)
    r, gr = _run(torch_fn, x.double(), *(ref_args or args), **kw)
    assert o.dtype == t.dtype, f"{what}: dtype {o.dtype} != {t.dtype}"
    assert go.dtype == gt.dtype
    assert_close_to_ref(o, t, r, dtype=x.dtype, what=what + " value")
    assert_close_to_ref(go, gt, gr, dtype=x.dtype, what=what + " grad")


CE_CASES = list(itertools.product(DTYPES, SHAPES, REDUCTIONS, [False, True], [None, 2], [0.0, 0.15, 1.0]))


@pytest.mark.parametrize("dtype,shape,reduction,weighted,ignore_index,ls", CE_CASES)
def test_cross_entropy_class_targets(dtype, shape, reduction, weighted, ignore_index, ls):
    C = shape[0 if len(shape) == 1 else 1]
    x = _logits(shape, dtype)
    t = _class_target(shape, C, ignore_index)
    w = torch.rand(C, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=ls, ignore_index=ignore_index if ignore_index is not None else -100)
    wd = None if w is None else w.to(dtype)
    _compare(crossent.cross_entropy, F.cross_entropy, x, (t, wd), kw, ref_args=(t, w),
             what=f"ce {dtype} {shape} {reduction} w={weighted} ii={ignore_index} ls={ls}")


PROB_CASES = list(itertools.product(DTYPES, SHAPES, REDUCTIONS, [False, True], [0.0, 0.2]))


@pytest.mark.parametrize("dtype,shape,reduction,weighted,ls", PROB_CASES)
def test_cross_entropy_prob_targets(dtype, shape, reduction, weighted, ls):
    C = shape[0 if len(shape) == 1 else 1]
    x = _logits(shape, dtype)
    t = _prob_target(shape)
    w = torch.rand(C, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=ls)
    args = (t.to(dtype), None if w is None else w.to(dtype))
    _compare(crossent.cross_entropy, F.cross_entropy, x, args, kw, ref_args=(t, w),
             what=f"ce-prob {dtype} {shape} {reduction} w={weighted} ls={ls}")


@pytest.mark.parametrize("tdtype", [torch.float64, torch.float16])
def test_prob_target_dtype_promotion(tdtype):
    x = _logits((4, 5), torch.float32)
    t = _prob_target((4, 5)).to(tdtype)
    ours, theirs = crossent.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_prob_target_and_weight_gradients(reduction):
    """Targets and weights are differentiable on the probability path."""
    x = _logits((5, 6), torch.float64)
    grads = []
    for fn in (crossent.cross_entropy, F.cross_entropy):
        xi = x.clone().requires_grad_()
        t = _prob_target((5, 6)).requires_grad_()
        w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_() if not grads else grads[0][3]
        w = w.detach().clone().requires_grad_()
        out = fn(xi, t, w, reduction=reduction, label_smoothing=0.1)
        out.sum().backward()
        grads.append((xi.grad, t.grad, w.grad, w))
    for a, b in zip(grads[0][:3], grads[1][:3]):
        torch.testing.assert_close(a, b)


NLL_CASES = list(itertools.product(DTYPES, SHAPES, REDUCTIONS, [False, True], [None, 2]))


@pytest.mark.parametrize("dtype,shape,reduction,weighted,ignore_index", NLL_CASES)
def test_nll_loss(dtype, shape, reduction, weighted, ignore_index):
    C = shape[0 if len(shape) == 1 else 1]
    x = torch.log_softmax(_logits(shape, torch.float64), 0 if len(shape) == 1 else 1).to(dtype)
    t = _class_target(shape, C, ignore_index)
    w = torch.rand(C, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, ignore_index=ignore_index if ignore_index is not None else -100)
    _compare(crossent.nll_loss, F.nll_loss, x, (t, None if w is None else w.to(dtype)), kw,
             ref_args=(t, w), what=f"nll {dtype} {shape} {reduction} w={weighted} ii={ignore_index}")


SM_CASES = [c for c in itertools.product(DTYPES, [(7,), (5, 7), (3, 4, 5), (2, 3, 4, 5)], [0, 1, -1], [False, True])
            if c[2] < len(c[1])]


@pytest.mark.parametrize("dtype,shape,dim,log", SM_CASES)
def test_softmax_family(dtype, shape, dim, log):
    ours, theirs = (crossent.log_softmax, F.log_softmax) if log else (crossent.softmax, F.softmax)
    _compare(ours, theirs, _logits(shape, dtype), (dim,), {}, what=f"{'log_' if log else ''}softmax {dtype} {shape} {dim}")


@pytest.mark.parametrize("log", [False, True])
def test_softmax_dtype_argument(log):
    ours, theirs = (crossent.log_softmax, F.log_softmax) if log else (crossent.softmax, F.softmax)
    x = _logits((4, 6), torch.float32).requires_grad_()
    a = ours(x, 1, dtype=torch.float64)
    b = theirs(x, 1, dtype=torch.float64)
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert ga.dtype == torch.float32
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("fname", ["softmax", "log_softmax"])
@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_implicit_dim_warns_like_torch(fname, ndim):
    x = _logits((3, 4, 5, 6)[:ndim], torch.float32)
    with warnings.catch_warnings(record=True) as wo:
        warnings.simplefilter("always")
        a = getattr(crossent, fname)(x)
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        b = getattr(F, fname)(x)
    torch.testing.assert_close(a, b)
    assert [str(w.message) for w in wo] == [str(w.message) for w in wt]
    assert wo[0].filename == __file__  # _stacklevel=3 points at the caller, as torch's does


def test_legacy_reduction_args_warn_and_map():
    x, t = _logits((4, 5), torch.float32), torch.tensor([0, 1, 2, 3])
    for sa, rd in itertools.product([None, True, False], [None, True, False]):
        if sa is None and rd is None:
            continue
        with warnings.catch_warnings(record=True) as wo:
            warnings.simplefilter("always")
            a = crossent.cross_entropy(x, t, size_average=sa, reduce=rd)
            an = crossent.nll_loss(x, t, size_average=sa, reduce=rd)
        with warnings.catch_warnings(record=True) as wt:
            warnings.simplefilter("always")
            b = F.cross_entropy(x, t, size_average=sa, reduce=rd)
            bn = F.nll_loss(x, t, size_average=sa, reduce=rd)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(an, bn)
        assert [str(w.message) for w in wo] == [str(w.message) for w in wt]


def test_elementwise_mean_warns():
    x, t = _logits((4, 5), torch.float32), torch.tensor([0, 1, 2, 3])
    with pytest.warns(UserWarning, match="elementwise_mean"):
        a = crossent.cross_entropy(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(a, F.cross_entropy(x, t))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_uint8_targets(fn):
    x = _logits((6, 5), torch.float32)
    t = torch.tensor([0, 4, 2, 3, 1, 0], dtype=torch.uint8)
    torch.testing.assert_close(getattr(crossent, fn)(x, t), getattr(F, fn)(x, t))


@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)])
def test_int32_targets_accepted(shape):
    """Deliberate difference: int32 class targets work (torch raises)."""
    x = _logits(shape, torch.float32)
    t = _class_target(shape, 5, None)
    torch.testing.assert_close(crossent.cross_entropy(x, t.int()), F.cross_entropy(x, t))
    torch.testing.assert_close(crossent.nll_loss(x, t.int()), F.nll_loss(x, t))


def test_fp16_mean_does_not_overflow():
    """Deliberate difference: torch's fp16 mean overflows to inf/NaN here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70_000, 10, generator=g).half()
    t = torch.randint(0, 10, (70_000,), generator=g)
    ours = crossent.cross_entropy(x, t)
    ref = F.cross_entropy(x.double(), t)
    assert torch.isfinite(ours)
    assert abs(float(ours) - float(ref)) < 1e-2
    assert not torch.isfinite(F.cross_entropy(x, t))  # the torch behaviour we improve on


EDGE_CASES = {
    "all ignored mean": (torch.randn(3, 4), torch.full((3,), -100), {}),
    "all ignored sum": (torch.randn(3, 4), torch.full((3,), -100), {"reduction": "sum"}),
    "all ignored ls": (torch.randn(3, 4), torch.full((3,), -100), {"label_smoothing": 0.1}),
    "zero weights": (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"weight": torch.zeros(4)}),
    "empty batch mean": (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), {}),
    "empty batch sum": (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), {"reduction": "sum"}),
    "empty batch none": (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), {"reduction": "none"}),
    "C=1": (torch.randn(3, 1), torch.zeros(3, dtype=torch.long), {"label_smoothing": 0.3}),
    "-inf logit": (torch.tensor([[-float("inf"), 0.0]]), torch.tensor([1]), {}),
    "-inf logit ls": (torch.tensor([[-float("inf"), 0.0]]), torch.tensor([1]), {"label_smoothing": 0.1}),
    "-inf prob": (torch.tensor([[-float("inf"), 0.0]]), torch.tensor([[0.0, 1.0]]), {}),
    "ignored class in softmax": (torch.tensor([[0.0, 0.0, 50.0]]), torch.tensor([0]), {"ignore_index": 2}),
    "nan in ignored row": (torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), torch.tensor([-100, 1]), {"reduction": "none"}),
    "huge logits": (torch.tensor([[1000.0, 0.0], [-1000.0, 1000.0]]), torch.tensor([1, 0]), {"reduction": "none"}),
    "1-D input": (torch.randn(5), torch.tensor(3), {}),
    "1-D weighted mean": (torch.tensor([-1.0, -2.0]), torch.tensor(1), {"weight": torch.tensor([1.0, 5.0])}),
    "1-D prob": (torch.randn(5), torch.softmax(torch.randn(5), 0), {"reduction": "none"}),
    "ls negative": (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"label_smoothing": -0.1}),
    "ls nan": (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"label_smoothing": float("nan")}),
    "C=0 all ignored": (torch.randn(2, 0), torch.tensor([-100, -100]), {}),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_torch(name):
    x, t, kw = EDGE_CASES[name]
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    a, b = crossent.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
    torch.testing.assert_close(a, b, equal_nan=True)
    if a.numel() and xa.numel():
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True)


def test_ignored_row_of_minus_inf_gives_nan_grad_like_torch():
    x = torch.tensor([[-float("inf"), -float("inf")], [0.0, 1.0]])
    t = torch.tensor([-100, 1])
    for fn in (crossent.cross_entropy, F.cross_entropy):
        xi = x.clone().requires_grad_()
        loss = fn(xi, t)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isnan(xi.grad[0]).all() and torch.isfinite(xi.grad[1]).all()


def test_weight_on_nll_path_not_differentiable():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    w = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        crossent.cross_entropy(x, t, w)
    with torch.no_grad():
        torch.testing.assert_close(crossent.cross_entropy(x, t, w), F.cross_entropy(x, t, w))


def test_uint8_target_with_weight_and_smoothing_works():
    """Deliberate difference: torch 2.13 raises an internal gather() error here."""
    x = _logits((4, 5), torch.float32)
    t = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    w = torch.rand(5) + 0.5
    with pytest.raises(RuntimeError, match="gather"):
        F.cross_entropy(x, t, w, label_smoothing=0.1)
    torch.testing.assert_close(crossent.cross_entropy(x, t, w, label_smoothing=0.1),
                               F.cross_entropy(x, t.long(), w, label_smoothing=0.1))


def test_plus_inf_logit_row_is_nan_like_torch():
    x = torch.tensor([[float("inf"), 0.0, 1.0], [0.0, 1.0, 2.0]])
    t = torch.tensor([1, 2])
    for red in ("none", "sum"):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = crossent.cross_entropy(xa, t, reduction=red), F.cross_entropy(xb, t, reduction=red)
        torch.testing.assert_close(a, b, equal_nan=True)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True)
