"""Public API: drop-ins for torch.nn.functional's softmax family and losses.

Each function canonicalises its arguments (PyTorch's checks, in PyTorch's
order), calls one autograd Function, and shapes the result.  Keyword-only
extras (z_loss, softcap, inplace_backward) are off by default.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _fast
from . import _validate as V
from . import backends, reference
from .backends.base import acc_dtype, wide_dtype
from ._autograd import CEOptions, CrossEntropyFunction, CrossEntropyJvpFunction, PickFunction, fuses_forward
from ._autograd.ce import _unwrap_if_dead, eager_apply
from ._autograd import softmax as _softmax_impl

__all__ = ["softmax", "log_softmax", "nll_loss", "cross_entropy", "cross_entropy_with_stats",
           "CrossEntropyOutput"]


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy_with_stats` returns, whatever the flags.

    loss:   as :func:`cross_entropy` returns it.
    lse:    per-position log-sum-exp of the (softcapped) logits, fp32 (fp64 for
            fp64 input, or when probability targets or weights make the loss
            fp64), shape of the 'none' loss; not differentiable.
    z_loss: the z-loss part of ``loss`` (z_loss * lse**2, reduced the same
            way), detached, for logging; zeros when z_loss == 0.
    """

    loss: Tensor
    lse: Tensor
    z_loss: Tensor


# ---------------------------------------------------------------------------
# softmax / log_softmax
# ---------------------------------------------------------------------------
def _softmax(name: str, log: bool, input: Tensor, dim, stacklevel: int, dtype) -> Tensor:
    V.tensor_arg(input, name, "input", 0)
    if dim is None:
        dim = V.softmax_dim(name, input.dim(), stacklevel + 1)
    dim = V.wrap_dim(dim, input.dim(), name)
    dtype = _fast.autocast_softmax_dtype(input, dtype)
    if dtype is not None:
        input = input.to(dtype)  # cast first, as torch does (autograd records the copy)
    if input.numel() == 0 and not input.is_floating_point():  # torch returns before its dtype dispatch
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    V.softmax_input(input, log, dim)
    return _softmax_impl(input, dim, log)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """softmax(x)_i = exp(x_i - max) / sum_j exp(x_j - max) along ``dim``.

    input: any shape, fp32/fp64/fp16/bf16.  Returns the same shape, in ``dtype``
    if given (input is cast first) else input.dtype; fp32 accumulation.
    ``dim=None`` picks PyTorch's implicit dim and warns, as F.softmax does.
    """
    out = _fast.softmax(False, input, dim, dtype)
    if out is not None:
        return out
    return _softmax("softmax", False, input, dim, _stacklevel, dtype)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> Tensor:
    """log_softmax(x)_i = (x_i - max) - log(sum_j exp(x_j - max)) along ``dim``.

    Same shapes, dtypes and implicit-dim rule as :func:`softmax`.
    """
    out = _fast.softmax(True, input, dim, dtype)
    if out is not None:
        return out
    return _softmax("log_softmax", True, input, dim, _stacklevel, dtype)


# ---------------------------------------------------------------------------
# nll_loss
# ---------------------------------------------------------------------------
def _canonical(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, d1..dk) -> (N, C, S) and (N, d1..dk) -> (N, S); (C,) -> (1, C)."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0) if target.shape == input.shape else target.reshape(1)
    if input.dim() == 2:
        return input, target
    n, c, s = input.shape[0], input.shape[1], math.prod(input.shape[2:])  # explicit S: C may be 0
    t = target.reshape(n, c, s) if target.shape == input.shape else target.reshape(n, s)
    return input.reshape(n, c, s), t


def _weight_at(w: Tensor, safe: Tensor) -> Tensor:
    """w[safe] for in-range indices; with no classes (C == 0) every target is
    ignored or out of range, and there is nothing to index: zeros."""
    return w[safe] if w.numel() else torch.zeros(safe.shape, dtype=w.dtype, device=w.device)


def _class_denominator(t: Tensor, weight: Tensor | None, ignore_index: int, C: int, acc,
                       label_smoothing: float = 0.0) -> Tensor:
    """W = sum of w[y] over non-ignored positions (the count without weights), on device.

    With label smoothing torch divides its two parts by W separately, so
    W == 0 makes the mean NaN even where the smoothing sum alone would give
    inf; a NaN denominator reproduces that (loss and counted gradient rows)."""
    valid, ok = V.target_masks(t, ignore_index, C)
    if weight is None:
        W = valid.sum(dtype=acc)
    else:
        W = torch.where(valid, _weight_at(weight.to(acc), torch.where(ok, t, 0).long()), 0.0).sum()
    return torch.where(W == 0, float("nan"), W) if label_smoothing > 0 else W


@_fast.nll_loss_front   # torch's kernel where it is the exact answer (crossent/_fast.py)
def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood: -w[y] * input[y] per position, then reduced.

    input: (C), (N, C) or (N, C, d1..dk) log-probabilities (any float dtype).
    target: (), (N) or (N, d1..dk) class indices, int64/int32/uint8.
    weight: (C,) in input's dtype.  'mean' divides by the sum of w[y] over
    non-ignored positions.  Sums accumulate in fp32 for fp16/bf16 input.
    """
    if isinstance(input, Tensor) and not input.is_floating_point() and V.func_transforms()[0]:
        # Under vmap torch's nll_loss is a decomposition (gather, mul, sum)
        # that checks no dtype and so computes for integer input (in its
        # dtype, or the weight's), where eager torch raises.  crossent has
        # nothing of its own to compute there: torch's function decides, on
        # int64 targets (int32 and uint8 ones are exact class indices here,
        # README 1 and 4; vmap would wrap ignore_index to int32 or fail in gather).
        if isinstance(target, Tensor) and target.dtype in (torch.int32, torch.uint8):
            target = target.long()
        return torch.nn.functional.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction)
    red = V.reduction(size_average, reduce, reduction)  # torch.nn.functional's, before the binding's
    V.tensor_arg(input, "nll_loss_nd", "input", 1)
    V.tensor_arg(target, "nll_loss_nd", "target", 2)
    V.optional_tensor_arg(weight, "nll_loss_nd", "weight", 3)
    input, weight = _fast.autocast_inputs(input, weight)
    ignore_index = V.int_arg(ignore_index, "nll_loss_nd", "ignore_index", 5)
    V.class_target(input, target, weight, red)
    C = input.shape[0 if input.dim() == 1 else 1]
    if any(V.func_transforms()):  # vmap, forward mode: torch's own ops (and its bounds check)
        return reference.nll_loss(input, target, weight, ignore_index, red)
    V.check_target_bounds(target, C, ignore_index)
    weight = None if weight is None else weight.reshape(-1)  # any shape with C elements, as torch
    # 1-D input: the target is one class index (a (1,) target of a C = 1
    # input has input's shape but is not a probability target here).
    x, t = _canonical(input, target.reshape(()) if input.dim() == 1 else target)
    acc = acc_dtype(input.dtype)
    valid, ok = V.target_masks(t, ignore_index, C)
    safe = torch.where(ok, t, 0).long()
    # C == 0: nothing to pick (every counted target is out of range: NaN below);
    # an empty index, so the gradient still comes from PickFunction, a function of x as torch's
    idx = safe.unsqueeze(1).narrow(1, 0, min(C, 1))
    if torch.is_grad_enabled() and x.requires_grad:
        picked = PickFunction.call(x, idx)
    else:
        picked = x.gather(1, idx)
    # rows to be reduced in the wide dtype (O(rows)): w[y] * x[y] can pass fp32's range where the sum fits
    picked = (picked.squeeze(1) if C else picked.sum(1)).to(acc if red == "none" else wide_dtype(x.device))
    rows = -picked if weight is None else -picked * _weight_at(weight.to(acc), safe)
    rows = torch.where(valid, rows, 0.0)
    rows = torch.where(valid ^ ok, float("nan"), rows)  # out-of-range target: NaN, never OOB memory
    if red == "none":
        out = rows.reshape(target.shape) if input.dim() > 1 else rows.reshape(())
    else:  # the O(rows) sums in fp64, as cross_entropy's (_autograd/ce.py _reduce)
        wide = wide_dtype(rows.device)
        out = rows.sum(dtype=wide)
        if red == "mean":
            out = out / _class_denominator(t, weight, ignore_index, C, wide)
    return out.to(_fast.autocast_out_dtype(input, input.dtype))


# ---------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------
def _denominator(t: Tensor, weight: Tensor | None, ignore_index: int, C: int, eps: float, prob: bool,
                 acc) -> Tensor:
    """The mean's denominator for canonical targets: the number of positions
    for probability targets (torch's numel / C: NaN when C == 0), else W."""
    if prob:
        return torch.full((), t.numel() // C if C else float("nan"), dtype=acc, device=t.device)
    return _class_denominator(t, weight, ignore_index, C, acc, eps)


def _smoothing_range(ls: float) -> None:
    if ls > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {ls:g}")


def _ce_options(label_smoothing, z_loss, softcap, check_range: bool = True) -> tuple[float, float, float]:
    """(label smoothing as torch treats it, z_loss, softcap or 0), validated
    (the smoothing's range only if check_range: torch checks it late)."""
    ls = V.float_arg(label_smoothing, "cross_entropy_loss", "label_smoothing", 6)
    ls = ls if ls > 0.0 else 0.0  # negative and NaN act as 0, as in torch
    if check_range:
        _smoothing_range(ls)
    z_loss = float(z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    cap = 0.0 if softcap is None else float(softcap)
    if softcap is not None and not 0.0 < cap < math.inf:   # inf: softcap * tanh(x / softcap) is inf * 0
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    return ls, z_loss, cap


def _ce_checks(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
               label_smoothing, z_loss, softcap, reduction: str = "none"):
    """torch's cross_entropy checks after the reduction string, in its order.

    ``weight`` is checked against input's class count (None skips that, as
    the vocab-parallel path does for its full-vocabulary weight); torch's
    checks of uint8 K-dim targets depend on ``reduction``.  Returns
    (eps, z_loss, softcap or 0, prob, class_dim, out_dtype).
    """
    eps, z_loss, cap = _ce_options(label_smoothing, z_loss, softcap, check_range=False)
    V.int64(ignore_index)  # the binding unpacks values after checking every argument's type
    prob = input.shape == target.shape
    class_dim = 0 if input.dim() == 1 else 1
    # aten's cross_entropy_loss: each path's checks, then its log_softmax (which
    # returns before its dtype dispatch on an empty input), in its order.
    if prob:
        V.prob_target(input, target, weight, ignore_index)
        if input.numel():
            V.softmax_input(input, True, class_dim)
        _smoothing_range(eps)
        out_dtype = torch.promote_types(input.dtype, target.dtype)  # same shapes: plain promotion
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
        return eps, z_loss, cap, prob, class_dim, out_dtype
    _smoothing_range(eps)
    if input.dim() == 0:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    if input.numel():
        V.softmax_input(input, True, class_dim)
    V.class_target(input, target, weight, reduction)
    return eps, z_loss, cap, prob, class_dim, input.dtype


def _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                   label_smoothing, z_loss, softcap, inplace_backward, stats=True,
                   result_dtype=None) -> CrossEntropyOutput:
    """The shared body; with stats=False only ``.loss`` is meant to be used: the
    z-loss term is not formed (``.z_loss`` is the loss itself) and a reduced
    loss's ``.lse`` keeps the kernel's rows shape.
    result_dtype (class indices only): the loss's dtype instead of input.dtype
    (crossent.transformers returns fp32 losses for fp16/bf16 logits)."""
    red = V.reduction(size_average, reduce, reduction)  # torch.nn.functional's, before the binding's
    V.tensor_arg(input, "cross_entropy_loss", "input", 1)
    V.tensor_arg(target, "cross_entropy_loss", "target", 2)
    V.optional_tensor_arg(weight, "cross_entropy_loss", "weight", 3)
    input, weight = _fast.autocast_inputs(input, weight)
    ignore_index = V.int_arg(ignore_index, "cross_entropy_loss", "ignore_index", 5, unpack=False)
    eps, z_loss, cap, prob, class_dim, out_dtype = _ce_checks(input, target, weight, ignore_index,
                                                              label_smoothing, z_loss, softcap, red)
    out_dtype = _fast.autocast_out_dtype(input, out_dtype)
    out_dtype = result_dtype if result_dtype is not None and not prob else out_dtype
    if out_dtype == torch.float64 and input.dtype != torch.float64:
        # Probability targets or weights in fp64 promote the loss: compute in
        # it (autograd records the copy and returns input's dtype).
        input = input.to(torch.float64)
    vmap, fwd = V.func_transforms()
    if not prob and not vmap:  # under vmap torch's own kernels check (the reference below)
        V.check_target_bounds(target, input.shape[class_dim], ignore_index)
    if vmap or (prob and (fwd or (torch.is_grad_enabled() and
                                  (target.requires_grad or (weight is not None and weight.requires_grad))))):
        # Derivatives w.r.t. probability targets or weights, or vmap (the fused
        # kernels have no batching rule): the differentiable reference.
        if _fast.autocast_out_dtype(input, input.dtype) != input.dtype:
            # autocast: torch's fp32 op on fp32 copies of the fp16/bf16 tensors
            input, target, weight = (t if t is None or t.dtype not in (torch.float16, torch.bfloat16) else t.float()
                                     for t in (input, target, weight))
        loss = reference.cross_entropy(input, target, weight, ignore_index, red, eps, z_loss=z_loss,
                                       softcap=cap or None).to(out_dtype)
        if not stats:
            return CrossEntropyOutput(loss, loss, loss)
        lse = reference.logsumexp(input, class_dim, cap or None).detach()
        _, t = _canonical(input, target)
        w = None if weight is None else weight.reshape(-1)
        denom = _denominator(t, w, ignore_index, input.shape[class_dim], eps, prob, lse.dtype)
        return CrossEntropyOutput(loss, lse, _z_term(lse, t, prob, ignore_index, z_loss, red, denom).to(loss.dtype))
    # Any shape with C elements, as torch; a (C,) weight as it is (a reshape is a view op, ~1 us).
    weight = weight if weight is None or weight.dim() == 1 else weight.reshape(-1)
    x, t = _canonical(input, target)
    backend = backends.name_for(x.device.type)
    # fused: the kernel fills the denom buffer (size=: ~0.5 us less than a positional ())
    fused = not fwd and fuses_forward(backend, x)
    denom = x.new_empty(size=(), dtype=acc_dtype(x.dtype)) if fused else \
        _denominator(t, weight, ignore_index, x.shape[1], eps, prob, acc_dtype(x.dtype))
    if inplace_backward and not (red != "none" and input.requires_grad and input.is_contiguous()):
        raise ValueError("inplace_backward=True needs reduction 'mean' or 'sum' and a contiguous "
                         "input that requires grad")
    # One frozen CEOptions per distinct call in eager mode (its __init__ costs ~1.5 us); built
    # afresh while Dynamo traces, which warns at every call of an lru_cache-wrapped function.
    # Positional, in CEOptions' field order: an lru_cache key built from keywords costs ~0.3 us more.
    opts = (_cached_options if _fast._eager() else CEOptions)(
        red, ignore_index, eps, z_loss, cap, bool(inplace_backward), backend, out_dtype, fused)
    need_grad = torch.is_grad_enabled() and x.requires_grad
    fn = CrossEntropyJvpFunction if fwd else CrossEntropyFunction
    loss, lse, _ = fn.call(x, t, weight, denom, opts, need_grad)
    if red == "sum" and eps > 0 and not prob and x.shape[1] == 0:
        # torch's smoothing term: eps / C = inf times an empty sum.  A 0-d tensor, not a
        # Python float: torch 2.13's forward AD gives 0-d + float an fp64 tangent
        loss = loss + loss.new_tensor(float("nan"))
    if red != "none" and not stats:   # cross_entropy: only the loss is used (no reshape to pay for)
        return CrossEntropyOutput(loss, lse, loss)
    # 1-D input: a 0-d loss, also for a (1,) target (as torch)
    none_shape = (() if input.dim() == 1 else
                  target.shape if not prob else target.shape[:class_dim] + target.shape[class_dim + 1:])
    # Only where the shape changes: a reshape to the same shape is a view, one more
    # autograd node to build and to run backward through (~5 us per step).
    if red == "none" and loss.shape != none_shape:
        loss = loss.reshape(none_shape)
    if not stats:
        return CrossEntropyOutput(loss, lse, loss)
    lse = lse.reshape(none_shape)
    zt = _z_term(lse, t, prob, ignore_index, z_loss, red, denom).to(out_dtype)
    return CrossEntropyOutput(loss, lse, zt)


_cached_options = functools.lru_cache(maxsize=256)(CEOptions)

_PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN_OPTIONS: dict = {}   # (backend, reduction, ignore_index, dtype, loss dtype) -> CEOptions or None
_INT64_RANGE = range(-(1 << 63), 1 << 63)   # torch's binding unpacks ignore_index as an int64
_forward_ad = torch.autograd.forward_ad
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain_cross_entropy(input, target, ignore_index, reduction) -> Tensor | None:
    """cross_entropy for the call nearly every training step makes, else None: (N, C) logits
    in fp32 / bf16 / fp16 with N, C > 0, (N,) int64 class indices, no weight, smoothing,
    legacy arguments or extras (the caller checks those), eager mode outside torch.func and
    forward-mode AD, on a backend that forms the forward in one launch (triton on CUDA).

    What _cross_entropy checks and decides for such a call is a few O(1) tests here (the
    batch sizes, the target bounds where they cost no sync) and one dict lookup: its
    argument checks all pass, its result is the same (issue 10, item 3; BENCHMARKS.md, host
    overhead, fifth pass).  Anything else returns None before a side effect, and
    _cross_entropy then raises or computes as always."""
    if not (type(input) is Tensor and type(target) is Tensor and type(ignore_index) is int
            and type(reduction) is str and target.dtype is torch.int64 and input.dim() == 2
            and target.dim() == 1 and input.dtype in _PLAIN_DTYPES and _fast._eager()
            and not _fast._transforms_active() and _forward_ad._current_level < 0
            and not _is_wrapped(input)):
        return None
    n, c = input.shape
    if not (n and c and target.shape[0] == n and ignore_index in _INT64_RANGE):
        return None
    try:
        backend = backends.name_for(input.device.type)
    except RuntimeError:   # a named backend that cannot run here: raised after the checks
        return None
    dt = input.dtype
    key = (backend, reduction, ignore_index, dt, _fast.autocast_out_dtype(input, dt))
    opts = _PLAIN_OPTIONS.get(key, False)
    if opts is False:
        opts = _PLAIN_OPTIONS[key] = _plain_options(*key, input)
    if opts is None:
        return None
    V.check_target_bounds(target, c, ignore_index)
    # denom None: neither the mean's denominator nor the lse is kept (two allocations less;
    # a backward that recomputes recounts the targets: _autograd.ce._kept_denom)
    if torch.is_grad_enabled() and input.requires_grad:
        return eager_apply(input, _unwrap_if_dead(target), None, None, opts, True)[0]
    return CrossEntropyFunction.forward(input, _unwrap_if_dead(target), None, None, opts, False)[0]


def _plain_options(backend: str, reduction: str, ignore_index: int, dtype, out_dtype, x: Tensor) -> CEOptions | None:
    """The options of a plain call, or None where the reduction is not one of the three
    (_cross_entropy warns or raises) or the backend does not fuse x's forward: kept per key,
    so a backend's fuses_forward may depend on x only through its dtype and what every plain
    call shares (elements, no functorch wrapper, eager mode)."""
    if reduction not in ("mean", "sum", "none") or not fuses_forward(backend, x):
        return None
    if len(_PLAIN_OPTIONS) >= 256:
        _PLAIN_OPTIONS.clear()
    return CEOptions(reduction=reduction, ignore_index=ignore_index, backend=backend, out_dtype=out_dtype,
                     fused=True)


def _z_term(lse: Tensor, t: Tensor, prob: bool, ignore_index: int, z_loss: float, red: str,
            denom: Tensor) -> Tensor:
    """z_loss * lse**2 reduced like the loss: O(N) work on the saved lse."""
    if not z_loss:  # zeros (documented), even where lse is inf or the mean's denominator 0 or NaN
        return torch.zeros_like(lse) if red == "none" else lse.new_zeros(())
    zt = z_loss * lse * lse
    if not prob:
        zt = torch.where(V.not_ignored(t, ignore_index).reshape(lse.shape), zt, torch.zeros_like(zt))
    if red == "sum":
        zt = zt.sum()
    elif red == "mean":
        zt = zt.sum() / denom
    return zt.detach()


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
                  inplace_backward: bool = False) -> Tensor:
    """Cross-entropy between logits and class indices or class probabilities.

    input:  (C), (N, C) or (N, C, d1..dk) logits, fp32/fp64/fp16/bf16.
    target: class indices (), (N) or (N, d1..dk) (int64/int32/uint8), or
            probabilities with input's shape (floating).
    weight: (C,) class weights.  Semantics, defaults and errors are those of
    torch.nn.functional.cross_entropy (weighted mean, ignore_index, label
    smoothing on both target kinds).  Returns input.dtype (probability
    targets: the promoted dtype), 0-d unless reduction='none'.

    Keyword-only extras:
      z_loss: adds z_loss * logsumexp(logits)**2 per non-ignored position.
      softcap: logits -> softcap * tanh(logits / softcap) before the softmax.
      inplace_backward: write the gradient into ``input``'s storage (opt-in;
        the logits are overwritten by the forward; needs 'mean' or 'sum').
    A DTensor ``input`` goes to crossent.distributed.dtensor (vocab-parallel).
    """
    if type(input).__name__ == "DTensor":  # a name check: plain tensors pay no import
        from .distributed.dtensor import cross_entropy as dtensor_cross_entropy
        return dtensor_cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                     label_smoothing, z_loss=z_loss, softcap=softcap,
                                     inplace_backward=inplace_backward)
    if not (z_loss or softcap is not None or inplace_backward):
        out = _fast.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                  label_smoothing)
        if out is None and weight is None and size_average is None and reduce is None \
                and type(label_smoothing) is float and label_smoothing == 0.0:
            out = _plain_cross_entropy(input, target, ignore_index, reduction)
        if out is not None:
            return out
    return _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                          label_smoothing, z_loss, softcap, inplace_backward, stats=False).loss


def cross_entropy_with_stats(input: Tensor, target: Tensor, weight: Tensor | None = None,
                             ignore_index: int = -100, reduction: str = "mean",
                             label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                             softcap: float | None = None,
                             inplace_backward: bool = False) -> CrossEntropyOutput:
    """:func:`cross_entropy` plus the per-position lse and the z-loss term,
    from the same single pass over the logits.  Always a CrossEntropyOutput."""
    return _cross_entropy(input, target, weight, None, ignore_index, None, reduction,
                          label_smoothing, z_loss, softcap, inplace_backward)
