"""Regression tests for the root-cause classes the fuzz tier (tests/test_fuzz.py)
found in crossent.linear_cross_entropy, one test per class, each judged against
torch 2.13's F.linear_cross_entropy (values, inf/NaN patterns, dtypes,
exceptions), never against constants."""
from __future__ import annotations

from math import inf

import pytest
import torch
import torch.nn.functional as F

import crossent
from _compare import REDUCTIONS, outcome
from _tol import assert_close_to_ref


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_inf_upstream_smoothing_mixed_sign_weights(reduction):
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(6, 8, generator=g), torch.randn(7, 8, generator=g)
    t = torch.tensor([0, 3, -100, 6, 2, 1])
    w = torch.tensor([1.0, -0.5, 2.0, 0.0, 1.0, -2.0, 0.5])
    grads = []
    for fn in (crossent.linear_cross_entropy, F.linear_cross_entropy):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = fn(hh, WW, t, weight=w, reduction=reduction, label_smoothing=0.1)
        grads.append(torch.autograd.grad(out, (hh, WW), torch.full_like(out, inf)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_linear_autocast_casts_low_precision_operands(dtype):
    """Under autocast(bf16) torch's linear casts fp16 operands to bf16 too."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(6, 4, generator=g).to(dtype)
    W = torch.randn(31, 4, generator=g).to(dtype)
    b = (torch.randn(31, generator=g) + 1e4).to(dtype)
    t = torch.randint(0, 31, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = crossent.linear_cross_entropy(h, W, t, linear_bias=b)
        theirs = F.linear_cross_entropy(h, W, t, linear_bias=b)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_fp64_prob_target_computes_in_fp64(reduction):
    """fp32 hidden states with fp64 probability targets: an fp64 loss, computed in it."""
    g = torch.Generator().manual_seed(8)
    h, W = torch.randn(5, 9, generator=g), torch.randn(3, 9, generator=g) * 3
    t = torch.rand(5, 3, generator=g, dtype=torch.float64)
    w = torch.rand(3, generator=g, dtype=torch.float64).expand(3)
    ours = crossent.linear_cross_entropy(h, W, t, weight=w, reduction=reduction)
    theirs = F.linear_cross_entropy(h, W, t, weight=w, reduction=reduction)
    ref = F.linear_cross_entropy(h.double(), W.double(), t, weight=w, reduction=reduction)
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close_to_ref(ours, theirs, ref, dtype=torch.float64)


def test_linear_batch_dims_target_fitting_neither_shape():
    """Hidden states (*B, D): a class target must be (*B) and probabilities
    (*B, C); anything else is crossent's own ValueError (README 7), where
    torch's flattened call fails too."""
    h, W = torch.randn(2, 3, 4), torch.randn(5, 4)
    t = torch.zeros(2, 3, 6, dtype=torch.long)
    with pytest.raises(RuntimeError):
        F.linear_cross_entropy(h.flatten(0, 1), W, t.flatten(0, 1))
    with pytest.raises(ValueError, match=r"Expected target of shape \[2, 3\]"):
        crossent.linear_cross_entropy(h, W, t)


def test_linear_1d_input_dtype_error_is_torch_vector_path_message():
    """F.linear's 1-D (vector) path has its own dtype message; crossent checks
    a 1-D input on that path too."""
    x, W, b = torch.zeros(1, dtype=torch.long).expand(13), torch.randn(7, 13), torch.randn(7)
    t = torch.tensor(2)
    with pytest.raises(RuntimeError) as theirs:
        F.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.5)
    with pytest.raises(RuntimeError) as ours:
        crossent.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.5)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("mutation, torch_first", [
    ("weight_numel", "weight tensor should be defined either for all"),
    ("prob_int", "Expected floating point type for target with class probabilities")])
def test_linear_prob_target_checks_before_smoothing_range(mutation, torch_first):
    """torch's cross_entropy checks a probability target (its dtype, the class
    weight's size) before label_smoothing's range; linear_cross_entropy
    checked the range first (class indices: the range first, as torch)."""
    g = torch.Generator().manual_seed(9)
    h, W = torch.randn(4, 5, generator=g), torch.randn(13, 5, generator=g)
    t = torch.rand(4, 13, generator=g)
    w = torch.rand(14 if mutation == "weight_numel" else 13, generator=g)
    t = t.round().long() if mutation == "prob_int" else t
    outcomes = [outcome(lambda: fn(h, W, t, weight=w, label_smoothing=1.5))
                for fn in (crossent.linear_cross_entropy, F.linear_cross_entropy)]
    assert outcomes[0] == outcomes[1] and torch_first in outcomes[1][1]
    ti = torch.tensor([0, 3, 12, 1])
    outcomes = [outcome(lambda: fn(h, W, ti, weight=w, label_smoothing=1.5))
                for fn in (crossent.linear_cross_entropy, F.linear_cross_entropy)]
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_class_smoothing_gradient_is_exactly_torchs_zero(monkeypatch, backend, dtype, weighted):
    """With one class log_softmax is 0 whatever the logits, so the gradient is
    exactly 0; torch's g - p*sum(g) gets exact zeros.  The closed form
    p*A - B rounded A and B's two terms apart (~1 ulp left over), which the
    linear head then multiplied by the hidden states and weights (fuzz
    seed 448418107: fp64, values offset by 1e4).  The vocab-parallel head (one
    rank) shares the formula."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("CROSSENT_BACKEND", backend)
    import _fuzz
    from crossent.distributed import vocab_parallel_linear_cross_entropy
    from crossent.linear import LinearCrossEntropyOptions
    _fuzz.init_single_process()
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(6, 9, generator=g, dtype=dtype) + 1e4).requires_grad_()
    W = torch.randn(1, 9, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(1, generator=g, dtype=dtype).requires_grad_()
    t = torch.tensor([0, 0, -100, 0, 0, 0])
    w = torch.rand(1, generator=g, dtype=dtype) * 3 if weighted else None
    up = torch.randn(6, generator=g, dtype=dtype)
    for eps in (0.1, 0.3, 0.7):
        theirs = torch.autograd.grad(F.linear_cross_entropy(h, W, t, linear_bias=bias, weight=w, reduction="none",
                                                            label_smoothing=eps), (h, W, bias), up)
        for policy in ("accurate", "compact"):
            ours = torch.autograd.grad(crossent.linear_cross_entropy(
                h, W, t, linear_bias=bias, weight=w, reduction="none", label_smoothing=eps,
                options=LinearCrossEntropyOptions(acc_policy=policy)), (h, W, bias), up)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        ours = torch.autograd.grad(vocab_parallel_linear_cross_entropy(
            h, W, t, linear_bias_shard=bias, weight=w, reduction="none", label_smoothing=eps), (h, W, bias), up)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = h[:, :1].detach().requires_grad_()
        ours = torch.autograd.grad(crossent.cross_entropy(x, t, w, reduction="none", label_smoothing=eps), x, up)
        theirs = torch.autograd.grad(F.cross_entropy(x, t, w, reduction="none", label_smoothing=eps), x, up)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_compact_weight_gradient_far_from_zero(monkeypatch, backend, target_kind, label_smoothing):
    """acc_policy='compact' forms dW's p as exp(z - lse) from the token pass's saved
    lse, rounded at |lse|: logits near 1e4 (a bias) cost every p an ulp of 1e4 in fp32
    (5e-4 relative; dW 3.5e-4 off, torch 5.9e-6: fuzz seed 5, offset1e4; seed
    722644155, fp64 at |z| ~ 130: 60x torch's error).  The token pass now keeps lse's
    rounding error (ce_forward's lse_lo) and p = exp((z - lse) - lse_lo)."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("CROSSENT_BACKEND", backend)
    g = torch.Generator().manual_seed(5)
    h, W = torch.randn(6, 8, generator=g), torch.randn(31, 8, generator=g)
    bias = torch.randn(31, generator=g) * 3 - 1e4
    t = torch.randint(0, 31, (6,), generator=g) if target_kind == "index" else \
        torch.softmax(torch.randn(6, 31, generator=g), 1)
    up = torch.randn((), generator=g)

    def grads(fn, *args, **kw):
        leaves = [a.clone().requires_grad_() for a in args]
        tt = t.to(leaves[0].dtype) if t.is_floating_point() else t
        out = fn(*leaves[:2], tt, linear_bias=leaves[2], label_smoothing=label_smoothing, **kw)
        return torch.autograd.grad(out, leaves, up.to(out.dtype))

    opts = crossent.LinearCrossEntropyOptions(acc_policy="compact")
    ours = grads(crossent.linear_cross_entropy, h, W, bias, options=opts)
    theirs = grads(F.linear_cross_entropy, h, W, bias)
    ref = grads(F.linear_cross_entropy, h.double(), W.double(), bias.double())
    for what, o, th, r in zip(("input", "linear_weight", "linear_bias"), ours, theirs, ref):
        assert_close_to_ref(o, th, r, what=what)


def test_compact_weight_gradient_strides_match_the_fake():
    """acc_policy='compact' allocated dW with empty_like(linear_weight): a transposed weight
    gave a transposed dW where the custom op's fake says contiguous, and inductor's stride
    assert failed (fuzz seed 737487229, bf16 under torch.compile).  The fake and the op agree."""
    from crossent import _linear_ops
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 31, generator=g), torch.randn(31, 33, generator=g).t()   # w: (33, 31), transposed
    t = torch.randint(0, 33, (6,), generator=g)
    args = (x, None, w, None, t, None, -100, 0.0, 0.0, 0.0, torch.tensor(1.0), True, True, False, "compact",
            6, 1 << 20, False, "torch")
    torch.library.opcheck(_linear_ops.linear_ce, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_compact_one_class_gradient_is_torchs_exact_zero(monkeypatch, backend, dtype, target_kind):
    """With one class the softmax is exactly 1 and torch's gradient exactly 0.  Under a
    budget that tiles the tokens otherwise than the token pass, acc_policy='compact'
    recomputed the logit by another GEMM shape and divided by the token pass's lse:
    1 - p ~ 1e-7, dW 3.9e-6 where torch's is 0 (fuzz F9c, seed 1985645907: 64 bytes).
    Every budget, chunk size and bias gives torch's gradients bit for bit."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("CROSSENT_BACKEND", backend)
    g = torch.Generator().manual_seed(11)
    h = (torch.randn(37, 13, generator=g) * 3).to(dtype)
    W, bias = torch.randn(1, 13, generator=g).to(dtype), torch.randn(1, generator=g).to(dtype)
    t = torch.zeros(37, dtype=torch.long) if target_kind == "index" else torch.rand(37, 1, generator=g).to(dtype)
    up = torch.randn(37, generator=g).to(dtype)

    def grads(fn, b, **kw):
        leaves = [a.clone().requires_grad_() for a in (h, W) + ((b,) if b is not None else ())]
        out = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, reduction="none", **kw)
        return (out, *torch.autograd.grad(out, leaves, up))

    for b in (None, bias):
        theirs = grads(F.linear_cross_entropy, b)
        for budget, rows in ((64, None), (100, None), (300, 2), (1000, 5), (None, 3), (None, None)):
            opts = crossent.LinearCrossEntropyOptions(acc_policy="compact", chunk_bytes=budget, chunk_size=rows)
            plan = crossent.linear_cross_entropy_plan(h, W, options=opts)
            assert plan.policy == "compact" and plan.flops == 6 * 37 * 13, plan   # no vocabulary pass
            for o, th in zip(grads(crossent.linear_cross_entropy, b, options=opts), theirs):
                torch.testing.assert_close(o, th, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0, 4), (2, 1, 4)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shift_over_empty_sequences_is_the_sliced_call(shape, reduction):
    """shift=True is the call on input[..., :-1, :] and target[..., 1:]; a sequence of
    no positions made T - 1 = -1 rows ("Trying to create tensor with negative
    dimension", or a target shape [3, -1]) and linear_cross_entropy_plan divided by T = 0
    (fuzz seed 590024072)."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(shape, generator=g, requires_grad=True)
    W = torch.randn(5, shape[-1], generator=g, requires_grad=True)
    t = torch.randint(0, 5, shape[:-1], generator=g)
    hs, ts = h[..., :-1, :], t[..., 1:]
    theirs = F.linear_cross_entropy(hs.flatten(0, -2), W, ts.reshape(-1), reduction=reduction)
    theirs = theirs.reshape(ts.shape) if reduction == "none" else theirs
    ours = crossent.linear_cross_entropy(h, W, t, shift=True, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)
    up = torch.randn(ours.shape, generator=g)
    for o, th in zip(torch.autograd.grad(ours, (h, W), up), torch.autograd.grad(theirs, (h, W), up)):
        torch.testing.assert_close(o, th, rtol=0, atol=0)
    assert crossent.linear_cross_entropy_plan(h, W, shift=True) == crossent.linear_cross_entropy_plan(hs, W)


@pytest.mark.parametrize("upstream", [float("inf"), float("nan"), 2.0])
def test_allow_inplace_non_finite_upstream_rescales_the_gradient(upstream):
    """allow_inplace writes dx over the hidden states in the forward; a non-finite
    upstream on CPU asked the backward to recompute term by term from them and raised
    "does not support create_graph=True" (fuzz seed 600879676).  Now dx, dW and db are
    the unit upstream's, times the upstream, as cross_entropy(inplace_backward=True)'s
    (README deliberate difference 9); a finite upstream gives torch's gradients."""
    g = torch.Generator().manual_seed(4)
    h, W, b = torch.randn(6, 5, generator=g), torch.randn(7, 5, generator=g), torch.randn(7, generator=g)
    t = torch.tensor([0, 3, -100, 6, 1, 2])
    opts = crossent.LinearCrossEntropyOptions(acc_policy="accurate", chunk_size=2, allow_inplace=True)

    def grads(fn, u, **kw):
        leaves = [a.clone().requires_grad_() for a in (h, W, b)]
        return torch.autograd.grad(fn(leaves[0], leaves[1], t, linear_bias=leaves[2], **kw), leaves,
                                   torch.tensor(u))
    ours = grads(crossent.linear_cross_entropy, upstream, options=opts)
    theirs = grads(F.linear_cross_entropy, upstream) if upstream == 2.0 else \
        [gr * upstream for gr in grads(F.linear_cross_entropy, 1.0)]
    for o, th in zip(ours, theirs):
        torch.testing.assert_close(o, th, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_with_stats_batch_dims_on_materialised_logits(reduction, z_loss):
    """linear_cross_entropy_with_stats' lse (and a 'none' z term) has the 'none' loss's
    shape (*B).  Where the logits are materialised (probability targets that require
    grad) a reduced loss left lse flat, (B*T,) (fuzz seed 1495500416), and a 'none' z
    term too; compared with torch's ops on the flattened call, as the fused path."""
    from _fuzz_torch import torch_linear
    g = torch.Generator().manual_seed(6)
    h, W = torch.randn(3, 4, 5, generator=g), torch.randn(7, 5, generator=g)
    t = torch.softmax(torch.randn(3, 4, 7, generator=g), -1)
    theirs = torch_linear(h, W, t, reduction=reduction, z_loss=z_loss, stats=True)
    for tt in (t, t.clone().requires_grad_()):
        ours = crossent.linear_cross_entropy_with_stats(h, W, tt, reduction=reduction, z_loss=z_loss)
        for o, th in zip(ours, theirs):
            torch.testing.assert_close(o, th)
