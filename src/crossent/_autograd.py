"""The autograd Functions: one for cross-entropy, one for (log_)softmax.

Every backend runs under these same Functions; a backend only supplies
kernels (see backends/base.py).  Options travel as a frozen dataclass on ctx.

Cross-entropy saves the per-row log-sum-exp, never probabilities.  For 'sum'
and 'mean' the gradient is computed in the forward pass (the logits are read
once, while they are hot) and only rescaled by the upstream gradient in the
backward; for 'none', or when that buffer was already handed out (a second
backward with retain_graph=True), the backward recomputes it in the same
sweep, bitwise equal.  backward(create_graph=True) recomputes it with torch's
differentiable ops instead, so double backward works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops, backends, reference


@dataclass(frozen=True)
class CEOptions:
    """Everything about a cross-entropy call that is not a tensor."""

    reduction: str = "mean"  # 'none' | 'mean' | 'sum'
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # 0 = off
    inplace_backward: bool = False
    backend: str = "torch"
    out_dtype: torch.dtype = torch.float32


def _reduce(rows: Tensor, denom: Tensor, reduction: str) -> Tensor:
    """Per-row fp32 losses -> the reduction ('mean' divides by denom)."""
    if reduction == "mean":
        return rows.sum() / denom
    return rows.sum() if reduction == "sum" else rows


class CrossEntropyFunction(torch.autograd.Function):
    """(x, target, weight, denom) -> (loss, lse).

    x: (R, C) or (B, C, S) logits, class dim 1.  target: rows-shaped class
    indices, or x-shaped probabilities.  denom: 0-d acc-dtype tensor, the mean's
    denominator (ignored unless reduction == 'mean').  loss: 0-d for mean/sum,
    rows-shaped for 'none', in opts.out_dtype.  lse: rows, fp32 (fp64 for
    fp64 input), not differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor,
                opts: CEOptions):
        need_grad = ctx.needs_input_grad[0]
        precompute = need_grad and opts.reduction != "none"
        # The gradient baked into the forward is that of loss * 1 upstream.
        scale = 1.0 / denom if opts.reduction == "mean" else torch.ones_like(denom)
        args = (target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, scale)
        if precompute and opts.inplace_backward:
            rows, lse = _ops.ce_forward_inplace(x, *args, opts.backend)
            grad = x.detach()  # x now holds the gradient (opt-in); a fresh handle lets autograd adopt it
        else:
            rows, lse, grad = _ops.ce_forward(x, *args, precompute, opts.backend)
        loss = _reduce(rows, denom, opts.reduction)
        ctx.opts = opts
        ctx.acc = lse.dtype
        ctx.grad = grad if precompute else None
        # With inplace_backward the logits are gone, so nothing can be recomputed.
        ctx.save_for_backward(None if opts.inplace_backward else x, target, weight, lse, scale)
        ctx.mark_non_differentiable(lse)
        return loss.to(opts.out_dtype), lse

    @staticmethod
    def backward(ctx, g: Tensor, _g_lse: Tensor):
        opts: CEOptions = ctx.opts
        if torch.is_grad_enabled():
            return _differentiable_grad(ctx, g), None, None, None, None
        if ctx.grad is not None:
            # Hand the forward's buffer over (autograd can then adopt it as
            # x.grad without a copy); rescale in place only if g != 1.  The
            # saved tensors are not unpacked, so editing x after the forward
            # is as harmless as it is for torch's own cross_entropy.
            grad, ctx.grad = ctx.grad, None
            _ops.rescale_(grad, g.to(ctx.acc), opts.backend)
            return grad, None, None, None, None
        x, target, weight, lse, scale = ctx.saved_tensors
        g = g.to(lse.dtype)
        if x is None:
            raise RuntimeError(
                "crossent.cross_entropy(inplace_backward=True) wrote its gradient into the logits; "
                "it cannot be backpropagated a second time")
        row_scale = g if opts.reduction == "none" else g * scale
        grad = _ops.ce_backward(x, target, weight, lse, opts.ignore_index, opts.label_smoothing,
                                opts.z_loss, opts.softcap, row_scale, opts.backend)
        return grad, None, None, None, None


def _differentiable_grad(ctx, g: Tensor) -> Tensor:
    """backward(create_graph=True): the same gradient, recomputed with torch's
    differentiable ops from the saved logits, so double backward works."""
    x, target, weight, _, _ = ctx.saved_tensors
    opts: CEOptions = ctx.opts
    if x is None:
        raise RuntimeError("crossent.cross_entropy(inplace_backward=True) does not support create_graph=True")
    with torch.enable_grad():
        xd = x if x.requires_grad else x.detach().requires_grad_()
        loss = reference.cross_entropy(xd, target, weight, opts.ignore_index, opts.reduction,
                                       opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap or None)
        (grad,) = torch.autograd.grad(loss, xd, g.to(loss.dtype), create_graph=True)
    return grad


class SoftmaxFunction(torch.autograd.Function):
    """softmax / log_softmax through a backend's kernels (x -> y, same dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, log: bool, backend: str):
        y = _ops.softmax_forward(x, dim, log, backend)
        ctx.save_for_backward(y)
        ctx.meta = (dim, log, backend, x.dtype)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        (y,) = ctx.saved_tensors
        dim, log, backend, dtype = ctx.meta
        if torch.is_grad_enabled():
            # create_graph=True: the same formulas in differentiable torch ops.
            if log:
                dx = g - torch.exp(y) * g.sum(dim, keepdim=True)
            else:
                dx = y * (g - (g * y).sum(dim, keepdim=True))
            return dx.to(dtype), None, None, None
        return _ops.softmax_backward(g.contiguous(), y, dim, log, dtype, backend), None, None, None


def softmax(x: Tensor, dim: int, log: bool) -> Tensor:
    name = backends.name_for(x.device.type)
    backend = backends.load(name)
    if backend.softmax_native_autograd:
        # torch's own fused kernels, with torch's autograd: double backward, jvp, vmap.
        return backend.softmax_forward(x, dim, log)
    return SoftmaxFunction.apply(x, dim, log, name)


# ===========================================================================
# Fused linear + cross-entropy (crossent.linear_cross_entropy)
# ===========================================================================
from torch.autograd.function import once_differentiable  # noqa: E402


@dataclass(frozen=True)
class LinearCEOptions:
    """Everything about a linear_cross_entropy call that is not a tensor
    (resolved: policy is never 'auto', sizes are concrete)."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0
    policy: str = "accurate"  # 'accurate' | 'balanced' | 'compact'
    chunk_rows: int = 1024    # tokens per chunk of the token pass
    budget: int = 64 << 20    # bytes for the vocab pass's block (compact)
    drop_ignored: bool = True  # CPU only: skip ignored tokens' matmuls
    inplace: bool = False     # dx overwrites the hidden states (permission granted and usable)
    backend: str = "torch"
    out_dtype: torch.dtype = torch.float32


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(x, rows, w, b, target, weight, denom, opts) -> (loss, lse).

    x (M, D) hidden-state rows; rows None (token i is x[i], i < N) or (N,)
    int64 row map; w (V, D); b (V,) or None; target (N,) class indices or
    (N, V) probabilities; denom 0-d, the mean's denominator.  The loss is
    cross_entropy(x[rows] @ w.T + b, target) as in CrossEntropyFunction: for
    'mean'/'sum' every requested gradient is produced by the forward pass (one
    matmul pass fewer than recomputing) and only rescaled by the upstream
    gradient in backward; for 'none' (per-token upstream gradients, Liger
    #968), or a second backward, the backward recomputes with per-token scales.
    """

    @staticmethod
    def forward(ctx, x, rows, w, b, target, weight, denom, opts: LinearCEOptions):
        from . import _linear_ops
        nx, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        nb = b is not None and ctx.needs_input_grad[3]
        precompute = (nx or nw or nb) and opts.reduction != "none"
        scale = 1.0 / denom if opts.reduction == "mean" else torch.ones_like(denom)
        args = (target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, scale)
        inplace = precompute and nx and opts.inplace
        if inplace:
            rows_loss, lse, dw, db = _linear_ops.linear_ce_inplace(
                x, w, b, *args, precompute and nw, precompute and nb, opts.policy, opts.chunk_rows,
                opts.backend)
            dx = x.detach()  # a fresh handle, so autograd can adopt the storage as the gradient
        else:
            rows_loss, lse, dx, dw, db = _linear_ops.linear_ce(
                x, rows, w, b, *args, precompute and nx, precompute and nw, precompute and nb,
                opts.policy, opts.chunk_rows, opts.budget, opts.drop_ignored, opts.backend)
        loss = _reduce(rows_loss, denom, opts.reduction)
        ctx.opts = opts
        ctx.needs = (nx, nw, nb)
        ctx.grads = (dx, dw, db) if precompute else None
        ctx.save_for_backward(None if inplace else x, rows, w, b, target, weight, lse, scale)
        ctx.mark_non_differentiable(lse)
        return loss.to(opts.out_dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _g_lse: Tensor):
        from . import _linear_ops
        opts: LinearCEOptions = ctx.opts
        nx, nw, nb = ctx.needs
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            gf = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
            for need, t in zip(ctx.needs, grads):
                if need:
                    _ops.rescale_(t, gf, opts.backend)
            dx, dw, db = grads
        else:
            x, rows, w, b, target, weight, lse, scale = ctx.saved_tensors
            if x is None:
                raise RuntimeError(
                    "crossent.linear_cross_entropy(allow_inplace=True) wrote its gradient into the "
                    "hidden states; it cannot be backpropagated a second time")
            g = g.to(lse.dtype)
            row_scale = g if opts.reduction == "none" else g * scale
            _, _, dx, dw, db = _linear_ops.linear_ce(
                x, rows, w, b, target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                opts.softcap, row_scale, nx, nw, nb, opts.policy, opts.chunk_rows, opts.budget,
                opts.drop_ignored, opts.backend)
        return (dx if nx else None, None, dw if nw else None, db if nb else None,
                None, None, None, None)
