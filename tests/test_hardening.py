"""Regression tests for the classes of bugs an independent differential fuzz
found (issue 9) in targets, shapes, dtypes, messages and warnings, each judged
against torch itself, never hand-written constants; the numerics (precision,
non-finite values, higher-order gradients) are in tests/test_hardening_numerics.py.
The numbered sections are issue 9's items."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent
from _compare import REDUCTIONS, same_as_torch
from _tol import assert_close_to_ref


# ---------------------------------------------------------------------------
# 1. ignore_index is compared as an exact integer, never in the target's dtype
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C,values", [(200, [156, 3, 0]), (300, [200, 255, 7])])
def test_uint8_target_never_matches_a_wrapped_ignore_index(fn, reduction, C, values):
    """-100 wraps to 156 in uint8; a class count above 255 wraps too."""
    x = torch.randn(3, C, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(values, dtype=torch.uint8)
    same_as_torch(getattr(crossent, fn), getattr(F, fn), x, t, reduction=reduction)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3)])
@pytest.mark.parametrize("ignore_index", [2**32, 2**32 + 1, -2**31 - 1, 2**63 - 1, -2**63])
def test_int32_target_with_out_of_range_ignore_index(fn, shape, ignore_index):
    """int32 targets are crossent's extension: judged against torch on int64."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 6, (shape[0], *shape[2:]), generator=torch.Generator().manual_seed(2))
    wrapped = (ignore_index + 2**31) % 2**32 - 2**31  # what a comparison in int32 would see
    t.view(-1)[:2] = torch.tensor([0, wrapped if 0 <= wrapped < 6 else 1])
    ours = lambda x, t, **kw: getattr(crossent, fn)(x, t.int(), **kw)  # noqa: E731
    same_as_torch(ours, getattr(F, fn), x, t, ignore_index=ignore_index, reduction="none")
    same_as_torch(ours, getattr(F, fn), x, t, ignore_index=ignore_index)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_ignore_index_beyond_int64_raises_like_torch(fn):
    x, t = torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    for v in (2**63, -2**63 - 1):
        with pytest.raises(Exception) as theirs:
            getattr(F, fn)(x, t, ignore_index=v)
        if theirs.type is not ValueError:
            pytest.skip(f"this torch raises {theirs.type.__name__} (torch 2.13 and crossent: ValueError)")
        with pytest.raises(ValueError) as ours:
            getattr(crossent, fn)(x, t, ignore_index=v)
        assert str(ours.value) == str(theirs.value)


# ---------------------------------------------------------------------------
# 3 and 9. zero sizes and degenerate shapes
# ---------------------------------------------------------------------------
L, U8 = torch.long, torch.uint8
DEGENERATE = {
    "zero spatial dim": ("cross_entropy", torch.randn(2, 3, 0, 4), torch.zeros(2, 0, 4, dtype=L), {}),
    "zero spatial dim prob": ("cross_entropy", torch.randn(2, 3, 0), torch.rand(2, 3, 0), {}),
    "zero spatial dim nll": ("nll_loss", torch.randn(2, 3, 0, 4), torch.zeros(2, 0, 4, dtype=L), {}),
    "C=0 weight": ("cross_entropy", torch.randn(2, 0), torch.tensor([-100, -100]), {"weight": torch.rand(0)}),
    "C=0 nll weight": ("nll_loss", torch.randn(2, 0), torch.tensor([-100, -100]), {"weight": torch.rand(0)}),
    "C=0 nll": ("nll_loss", torch.randn(2, 0), torch.tensor([-100, -100]), {}),
    "C=0 3d": ("cross_entropy", torch.randn(2, 0, 3), torch.full((2, 3), -100), {}),  # torch: size mismatch
    "C=0 5d empty target": ("cross_entropy", torch.randn(0, 0, 2, 1, 2), torch.zeros(0, 2, 1, 2, dtype=L), {}),
    "C=0 prob": ("cross_entropy", torch.randn(2, 0), torch.rand(2, 0), {}),
    "C=0 smoothing": ("cross_entropy", torch.randn(2, 0), torch.tensor([-100, -100]), {"label_smoothing": 0.1}),
    "C=0 N=0 smoothing": ("cross_entropy", torch.randn(0, 0), torch.zeros(0, dtype=L), {"label_smoothing": 0.1}),
    "C=0 prob smoothing": ("cross_entropy", torch.randn(2, 0), torch.rand(2, 0), {"label_smoothing": 0.1}),
    "weight 0 at targets, smoothing": ("cross_entropy", torch.randn(2, 3), torch.tensor([0, 1]),
                                       {"weight": torch.tensor([0.0, 0.0, 1.0]), "label_smoothing": 0.1}),
    "weight 0, smoothing, ignored row": ("cross_entropy", torch.randn(3, 3), torch.tensor([0, -100, 1]),
                                         {"weight": torch.tensor([0.0, 0.0, 1.0]), "label_smoothing": 0.2}),
    "N=0 uint8 spatial": ("cross_entropy", torch.randn(0, 3, 4), torch.zeros(0, 4, dtype=U8), {}),
    "N=0 uint8 spatial nll": ("nll_loss", torch.randn(0, 3, 4), torch.zeros(0, 4, dtype=U8), {}),
    "S=0 uint8 spatial": ("cross_entropy", torch.randn(2, 3, 0), torch.zeros(2, 0, dtype=U8), {}),
    "1-D input, (1,) target": ("cross_entropy", torch.randn(5), torch.tensor([2]), {}),
    "1-D input, (1,) target, C=0": ("cross_entropy", torch.randn(0), torch.tensor([-100]), {}),
    "1-D input, (1,) target, C=1 nll": ("nll_loss", torch.randn(1), torch.tensor([0]), {}),
    "(1, C) weight 3d": ("cross_entropy", torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4)),
                         {"weight": torch.rand(1, 3)}),
    "(C, 1) weight 4d nll": ("nll_loss", torch.randn(2, 3, 4, 2), torch.randint(0, 3, (2, 4, 2)),
                             {"weight": torch.rand(3, 1)}),
}


def _forward_ok(fn, *args) -> bool:
    try:
        fn(*args)
    except RuntimeError:
        return False
    return True


# torch 2.13 takes a 1-D input with a (1,) target (as a 0-d one); torch 2.4-2.8 raise "size mismatch"
_TORCH_1D_INPUT_1_TARGET = _forward_ok(F.cross_entropy, torch.randn(5), torch.tensor([2]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_shapes_match_torch(name, reduction):
    fn, x, t, kw = DEGENERATE[name]
    # torch's backward of an empty uint8 K-dim target raises (its forward does
    # not, for mean/sum), as does its backward of a 1-D input with a (1,)
    # target ("size mismatch"); crossent returns the gradient.
    backward = "uint8" not in name and "(1,) target" not in name
    if fn == "cross_entropy" and "(1,) target" in name and not _TORCH_1D_INPUT_1_TARGET:
        pytest.skip("this torch's forward raises 'size mismatch' (torch 2.13 and crossent compute the loss)")
    same_as_torch(getattr(crossent, fn), getattr(F, fn), x, t, reduction=reduction, backward=backward, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_shape", [(1, 3, 1), (3, 1), ()])
def test_k_dim_weight_of_any_shape_with_smoothing(weight_shape, reduction):
    """Deliberate difference: torch's smoothing term fails internally on most
    weights that are not 1-D (it accepts them without smoothing); crossent
    computes what torch gives for the same weight flattened."""
    C = 3 if weight_shape else 1
    x = torch.randn(2, C, 2, 2, 2)
    t = torch.randint(0, C, (2, 2, 2, 2))
    w = torch.rand(weight_shape if weight_shape else ()) + 0.5
    flat = lambda x, t, **kw: F.cross_entropy(x, t, w.reshape(-1), **kw)  # noqa: E731
    ours = lambda x, t, **kw: crossent.cross_entropy(x, t, w, **kw)  # noqa: E731
    same_as_torch(ours, flat, x, t, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.long, torch.int32, torch.bool])
def test_empty_non_floating_softmax_returns_empty(fn, dtype):
    for shape, dim in (((0, 3), 1), ((3, 0), 0), ((2, 0, 4), -1)):
        x = torch.zeros(shape, dtype=dtype, requires_grad=dtype.is_floating_point)
        a, b = getattr(crossent, fn)(x, dim), getattr(F, fn)(x, dim)
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad)


# ---------------------------------------------------------------------------
# 10. mixed dtypes compute in the result dtype
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_fp32_input_fp64_prob_target_is_fp64_accurate(reduction, with_weight):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 33, generator=g) * 4
    t = torch.softmax(torch.randn(64, 33, generator=g, dtype=torch.float64), 1)
    w = torch.rand(33, generator=g, dtype=torch.float64) + 0.5 if with_weight else None
    ours = crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
    theirs = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(x.double(), t, w, reduction=reduction, label_smoothing=0.1)
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close_to_ref(ours, theirs, ref, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(crossent.cross_entropy(xa, t, w, reduction=reduction).sum(), xa)
    (gb,) = torch.autograd.grad(F.cross_entropy(xb, t, w, reduction=reduction).sum(), xb)
    assert ga.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------------------
# 12. deprecation warnings are attributed to the library's frame, as torch's
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("kw", [{"reduction": "elementwise_mean"}, {"size_average": False}])
def test_deprecation_warning_location_matches_torch(fn, kw):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    where = []
    for lib in (F, crossent):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            getattr(lib, fn)(x, t, **kw)
        (w,) = rec
        where.append((str(w.message), w.filename))
    (msg_t, file_t), (msg_o, file_o) = where
    if os.path.basename(file_t) != "functional.py":
        pytest.skip("this torch warns from torch/nn/_reduction.py (torch 2.13 and crossent: functional.py)")
    assert msg_o == msg_t
    assert os.path.basename(file_t) == os.path.basename(file_o) == "functional.py"
    assert os.path.dirname(file_o) == os.path.dirname(crossent.functional.__file__)


# ---------------------------------------------------------------------------
# README "deliberate differences" 8: where torch fails internally
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_backward_of_channels_last_input(reduction):
    """torch's nll_loss2d backward raises 'grad_input must be contiguous';
    crossent gives the gradient torch gives for the contiguous input."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    t = torch.randint(0, 3, (2, 4, 5))
    xa = x.clone(memory_format=torch.channels_last).requires_grad_()
    with pytest.raises(RuntimeError, match="contiguous"):
        F.nll_loss(xa, t, reduction=reduction).sum().backward()
    contiguous = lambda x, t, **kw: F.nll_loss(x.contiguous(), t, **kw)  # noqa: E731
    same_as_torch(crossent.nll_loss, contiguous, x, t, reduction=reduction)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_out_of_range_uint8_target_message(fn):
    """torch formats an out-of-range uint8 target as a character; crossent
    raises the message torch gives for the same int64 target."""
    x, t = torch.randn(2, 200), torch.tensor([3, 250], dtype=torch.uint8)
    with pytest.raises(IndexError) as theirs:
        getattr(F, fn)(x, t.long(), reduction="none")
    with pytest.raises(IndexError) as ours:
        getattr(crossent, fn)(x, t, reduction="none")
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_vmap_int32_target_does_not_wrap_ignore_index(fn):
    """Under vmap torch accepts int32 targets and compares ignore_index in
    int32 (2**32 then ignores class 0); crossent compares exactly, as torch
    does for the same int64 target."""
    x = torch.randn(2, 3, 7)
    t = torch.tensor([0, 1, 2], dtype=torch.int32)
    res = [torch.func.vmap(lambda a, f=f, tt=tt: f(a, tt, ignore_index=2**32, reduction="none"))(x)
           for f, tt in ((getattr(crossent, fn), t), (getattr(F, fn), t.long()))]
    torch.testing.assert_close(res[0], res[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_lse_in_the_loss_dtype_with_fp64_prob_target(dtype):
    """An fp64 probability target makes the loss fp64 (torch's promotion);
    the lse is then fp64 too, as CrossEntropyOutput's docstring says."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 17, generator=g).to(dtype)
    t = torch.softmax(torch.randn(6, 17, generator=g, dtype=torch.float64), 1)
    out = crossent.cross_entropy_with_stats(x, t, reduction="sum")
    assert out.loss.dtype == F.cross_entropy(x.to(torch.float32), t, reduction="sum").dtype == torch.float64
    torch.testing.assert_close(out.lse, torch.logsumexp(x.double(), 1))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("shapes", [((1, 0, 2, 4), (1, 2, 4)), ((2, 0, 3), (2, 3)), ((2, 0, 3, 1, 1), (2, 3, 1, 1)),
                                    ((1, 0, 0, 4), (1, 0, 4)), ((0, 3, 2, 4), (0, 2, 4))])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_uint8_k_dim_target_with_no_classes_errors_like_torch(fn, shapes, reduction):
    """C == 0 with a non-empty uint8 K-dim target: torch's dtype error (4-D)
    or its reshape's size mismatch (3-D, 5-D) comes before any bounds check."""
    x, t = torch.randn(shapes[0]), torch.zeros(shapes[1], dtype=torch.uint8)
    same_as_torch(getattr(crossent, fn), getattr(F, fn), x, t, reduction=reduction, backward=False)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("dtypes", [(torch.long, torch.half), (torch.bfloat16, torch.float64),
                                    (torch.float64, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_autocast_casts_only_low_precision_arguments(fn, dtypes):
    """Under autocast torch casts fp16/bf16 arguments of cross_entropy /
    nll_loss to fp32 and leaves integer and fp64 ones as they are (and then
    raises its dtype errors)."""
    x = torch.randn(3, 4).to(dtypes[0]) if dtypes[0] != torch.long else torch.zeros(3, 4, dtype=torch.long)
    t, w = torch.tensor([0, 1, 2]), torch.rand(4).to(dtypes[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_as_torch(getattr(crossent, fn), getattr(F, fn), x, t, w, backward=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_loss_is_fp32_on_the_reference_path(dtype):
    """A probability target that requires grad takes the differentiable
    reference; under autocast its loss is fp32 too, as torch's."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(5, 7, generator=g).to(dtype)
    t = torch.softmax(torch.randn(5, 7, generator=g), 1).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = crossent.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, t)[0], torch.autograd.grad(theirs, t)[0])


def test_fp64_prob_target_requiring_grad_with_z_loss_is_fp64_accurate():
    """The reference path (a target that requires grad) computes in the
    fp64 result dtype too, z-loss term included."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(6, 2, 3, 3, generator=g)
    t = torch.softmax(torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64), 1).requires_grad_()
    out = crossent.cross_entropy(x, t, reduction="sum", z_loss=0.1)
    xd = x.double()
    ref = F.cross_entropy(xd, t, reduction="sum") + 0.1 * (torch.logsumexp(xd, 1) ** 2).sum()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
