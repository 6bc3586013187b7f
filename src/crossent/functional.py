"""Public API: drop-ins for torch.nn.functional's softmax family and losses.

Each function canonicalises its arguments (PyTorch's checks, in PyTorch's
order), calls one autograd Function, and shapes the result.  Keyword-only
extras (z_loss, softcap, inplace_backward) are off by default.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validate as V
from . import backends, reference
from ._autograd import CEOptions, CrossEntropyFunction
from ._autograd import softmax as _softmax_impl

__all__ = ["softmax", "log_softmax", "nll_loss", "cross_entropy", "cross_entropy_with_stats",
           "CrossEntropyOutput"]


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy_with_stats` returns, whatever the flags.

    loss:   as :func:`cross_entropy` returns it.
    lse:    per-position log-sum-exp of the (softcapped) logits, fp32 (fp64 for
            fp64 input), shape of the 'none' loss; not differentiable.
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
    if dtype is not None:
        input = input.to(dtype)  # cast first, as torch does (autograd records the copy)
    V.floating_input(input, V.softmax_kernel(log, dim, input.dim()))
    return _softmax_impl(input, dim, log)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """softmax(x)_i = exp(x_i - max) / sum_j exp(x_j - max) along ``dim``.

    input: any shape, fp32/fp64/fp16/bf16.  Returns the same shape, in ``dtype``
    if given (input is cast first) else input.dtype; fp32 accumulation.
    ``dim=None`` picks PyTorch's implicit dim and warns, as F.softmax does.
    """
    return _softmax("softmax", False, input, dim, _stacklevel, dtype)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> Tensor:
    """log_softmax(x)_i = (x_i - max) - log(sum_j exp(x_j - max)) along ``dim``.

    Same shapes, dtypes and implicit-dim rule as :func:`softmax`.
    """
    return _softmax("log_softmax", True, input, dim, _stacklevel, dtype)


# ---------------------------------------------------------------------------
# nll_loss
# ---------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _canonical(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, d1..dk) -> (N, C, S) and (N, d1..dk) -> (N, S); (C,) -> (1, C)."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0) if target.shape == input.shape else target.reshape(1)
    if input.dim() == 2:
        return input, target
    n, c, s = input.shape[0], input.shape[1], math.prod(input.shape[2:])  # explicit S: C may be 0
    t = target.reshape(n, c, s) if target.shape == input.shape else target.reshape(n, s)
    return input.reshape(n, c, s), t


def _class_denominator(t: Tensor, weight: Tensor | None, ignore_index: int, C: int, acc) -> Tensor:
    """W = sum of w[y] over non-ignored positions (the count without weights), on device."""
    valid = t != ignore_index
    if weight is None:
        return valid.sum(dtype=acc)
    safe = torch.where(valid & (t >= 0) & (t < C), t, 0).long()
    return torch.where(valid, weight.to(acc)[safe], 0.0).sum()


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood: -w[y] * input[y] per position, then reduced.

    input: (C), (N, C) or (N, C, d1..dk) log-probabilities (any float dtype).
    target: (), (N) or (N, d1..dk) class indices, int64/int32/uint8.
    weight: (C,) in input's dtype.  'mean' divides by the sum of w[y] over
    non-ignored positions.  Sums accumulate in fp32 for fp16/bf16 input.
    """
    V.tensor_arg(input, "nll_loss_nd", "input", 1)
    V.tensor_arg(target, "nll_loss_nd", "target", 2)
    red = V.reduction(size_average, reduce, reduction)
    ignore_index = V.int_arg(ignore_index, "nll_loss_nd", "ignore_index", 5)
    V.class_target(input, target, weight)
    V.floating_input(input, "nll_loss2d_forward_out_frame" if input.dim() > 2 else "nll_loss_out_frame")
    V.weight_no_grad(weight)
    C = input.shape[0 if input.dim() == 1 else 1]
    V.check_target_bounds(target, C, ignore_index)
    x, t = _canonical(input, target)
    acc = _acc(input.dtype)
    valid = t != ignore_index
    ok = valid & (t >= 0) & (t < C)
    safe = torch.where(ok, t, 0).long()
    # gather is autograd's own: its backward scatters into zeros, as nll_loss's does.
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1).to(acc)
    rows = -picked if weight is None else -picked * weight.to(acc)[safe]
    rows = torch.where(valid, rows, 0.0)
    rows = torch.where(valid ^ ok, float("nan"), rows)  # out-of-range target: NaN, never OOB memory
    if red == "none":
        out = rows.reshape(target.shape) if input.dim() > 1 else rows.reshape(())
    elif red == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / _class_denominator(t, weight, ignore_index, C, acc)
    return out.to(input.dtype)


# ---------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------
def _ce_options(label_smoothing, z_loss, softcap) -> tuple[float, float, float]:
    """(label smoothing as torch treats it, z_loss, softcap or 0), validated."""
    ls = V.float_arg(label_smoothing, "cross_entropy_loss", "label_smoothing", 6)
    if ls > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {ls:g}")
    ls = ls if ls > 0.0 else 0.0  # negative and NaN act as 0, as in torch
    z_loss = float(z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    cap = 0.0 if softcap is None else float(softcap)
    if softcap is not None and not cap > 0.0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    return ls, z_loss, cap


def _ce_checks(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
               label_smoothing, z_loss, softcap):
    """torch's cross_entropy checks after the reduction string, in its order.

    ``weight`` is checked against input's class count (None skips that, as
    the vocab-parallel path does for its full-vocabulary weight).  Returns
    (eps, z_loss, softcap or 0, prob, class_dim, out_dtype).
    """
    eps, z_loss, cap = _ce_options(label_smoothing, z_loss, softcap)
    prob = input.shape == target.shape
    class_dim = 0 if input.dim() == 1 else 1
    if prob:
        V.prob_target(input, target, weight, ignore_index)
    elif input.dim() == 0:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    V.floating_input(input, V.softmax_kernel(True, class_dim, input.dim()))
    if not prob:
        V.class_target(input, target, weight)
        return eps, z_loss, cap, prob, class_dim, input.dtype
    out_dtype = torch.promote_types(input.dtype, target.dtype)  # same shapes: plain promotion
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    return eps, z_loss, cap, prob, class_dim, out_dtype


def _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                   label_smoothing, z_loss, softcap, inplace_backward, stats=True) -> CrossEntropyOutput:
    """The shared body; with stats=False the z-loss term is not formed
    (CrossEntropyOutput.z_loss is then the loss itself, unused by callers)."""
    V.tensor_arg(input, "cross_entropy_loss", "input", 1)
    V.tensor_arg(target, "cross_entropy_loss", "target", 2)
    red = V.reduction(size_average, reduce, reduction)
    ignore_index = V.int_arg(ignore_index, "cross_entropy_loss", "ignore_index", 5)
    eps, z_loss, cap, prob, class_dim, out_dtype = _ce_checks(input, target, weight, ignore_index,
                                                              label_smoothing, z_loss, softcap)
    if prob:
        needs_ref = torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad))
        if needs_ref:
            # Gradients w.r.t. the targets or weights: the differentiable reference.
            loss = reference.cross_entropy(input, target, weight, reduction=red, label_smoothing=eps,
                                           z_loss=z_loss, softcap=cap or None)
            lse = reference.logsumexp(input, class_dim, cap or None).detach()
            zt = (z_loss * lse * lse)
            zt = zt if red == "none" else (zt.sum() if red == "sum" else zt.mean())
            return CrossEntropyOutput(loss, lse, zt.detach().to(loss.dtype))
    else:
        V.weight_no_grad(weight)
        V.check_target_bounds(target, input.shape[class_dim], ignore_index)
    x, t = _canonical(input, target)
    acc = _acc(input.dtype)
    if prob:
        rows = x.shape[0] * (x.shape[2] if x.dim() == 3 else 1)
        denom = torch.full((), float(rows), dtype=acc, device=x.device)
    else:
        denom = _class_denominator(t, weight, ignore_index, x.shape[1], acc)
    if inplace_backward and not (red != "none" and input.requires_grad and input.is_contiguous()):
        raise ValueError("inplace_backward=True needs reduction 'mean' or 'sum' and a contiguous "
                         "input that requires grad")
    opts = CEOptions(reduction=red, ignore_index=ignore_index, label_smoothing=eps, z_loss=z_loss,
                     softcap=cap, inplace_backward=bool(inplace_backward),
                     backend=backends.name_for(x.device.type), out_dtype=out_dtype)
    loss, lse = CrossEntropyFunction.apply(x, t, weight, denom, opts)
    none_shape = target.shape if not prob else target.shape[:class_dim] + target.shape[class_dim + 1:]
    lse = lse.reshape(none_shape)
    if red == "none":
        loss = loss.reshape(none_shape)
    zt = _z_term(lse, t, prob, ignore_index, z_loss, red, denom).to(out_dtype) if stats else loss
    return CrossEntropyOutput(loss, lse, zt)


def _z_term(lse: Tensor, t: Tensor, prob: bool, ignore_index: int, z_loss: float, red: str,
            denom: Tensor) -> Tensor:
    """z_loss * lse**2 reduced like the loss: O(N) work on the saved lse."""
    zt = z_loss * lse * lse
    if not prob:
        zt = torch.where((t != ignore_index).reshape(lse.shape), zt, torch.zeros_like(zt))
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
