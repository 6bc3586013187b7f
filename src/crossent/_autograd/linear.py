"""Fused linear + cross-entropy (crossent.linear_cross_entropy): its autograd Function."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference
from .ce import CrossentFunction, _batched, _reduce, _rescalable, _rescaled, _scale


@dataclass(frozen=True)
class LinearCEOptions:
    """Everything about a linear_cross_entropy call that is not a tensor
    (resolved: policy is never 'auto', sizes are concrete)."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0
    policy: str = "accurate"  # 'accurate' | 'compact'
    chunk_rows: int = 1024    # tokens per chunk of the token pass
    budget: int = 64 << 20    # bytes for the vocab pass's buffers (compact)
    drop_ignored: bool = True  # CPU only: skip ignored tokens' matmuls
    inplace: bool = False     # dx overwrites the hidden states (permission granted and usable)
    backend: str = "torch"
    out_dtype: torch.dtype = torch.float32


class LinearCrossEntropyFunction(CrossentFunction):
    """(x, rows, w, b, target, weight, denom, opts, needs) -> (loss, lse, dx, dw, db).

    x (M, D) hidden-state rows; rows None (token i is x[i], i < N) or (N,)
    int64 row map; w (V, D); b (V,) or None; target (N,) class indices or
    (N, V) probabilities; denom 0-d, the mean's denominator; needs: the
    caller's (dx, dw, db) wanted, i.e. grad enabled and requires_grad (forward
    has no ctx to ask: the setup_context form is what torch.func.grad needs).
    The loss is cross_entropy(x[rows] @ w.T + b, target) as in
    CrossEntropyFunction: for 'mean'/'sum' every requested gradient is produced
    by the forward pass (one matmul pass fewer than recomputing), returned as
    non-differentiable outputs (empty when not computed; callers drop them) and
    only rescaled by the upstream gradient in backward; for 'none' (per-token
    upstream gradients, Liger #968) or a second backward, the backward
    recomputes with per-token scales.  backward(create_graph=True), batched
    upstreams (jacrev) and non-finite ones (on CPU: torch's inf/NaN pattern)
    recompute in torch's differentiable ops on materialised logits, so double
    backward works.
    """

    @staticmethod
    def forward(x, rows, w, b, target, weight, denom, opts: LinearCEOptions, needs):
        from .. import _linear_ops
        nx, nw, nb = needs
        precompute = any(needs) and opts.reduction != "none"
        args = (target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                _scale(denom, opts))
        if precompute and nx and opts.inplace:
            rows_loss, lse, dw, db = _linear_ops.linear_ce_inplace(
                x, w, b, *args, nw, nb, opts.chunk_rows, opts.backend)
            dx = x.new_empty(0)  # dx is x itself now (opt-in); setup_context takes it
        else:
            rows_loss, lse, dx, dw, db = _linear_ops.linear_ce(
                x, rows, w, b, *args, precompute and nx, precompute and nw, precompute and nb,
                opts.policy, opts.chunk_rows, opts.budget, opts.drop_ignored, opts.backend)
        return _reduce(rows_loss, denom, opts.reduction, opts.out_dtype), lse, dx, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, rows, w, b, target, weight, denom, opts, needs = inputs
        _, lse, dx, dw, db = output
        inplace = any(needs) and opts.reduction != "none" and needs[0] and opts.inplace
        ctx.opts = opts
        ctx.inplace = inplace
        ctx.grads = None
        if any(needs) and opts.reduction != "none":
            # inplace: a fresh handle on x's storage, so autograd can adopt it as the gradient.
            ctx.grads = (x.detach() if inplace else dx, dw, db)
        ctx.save_for_backward(None if inplace else x, rows, w, b, target, weight, lse,
                              _scale(denom, opts))
        ctx.mark_non_differentiable(lse, dx, dw, db)
        ctx.set_materialize_grads(False)  # no zero-filled V x D "gradient" for the dw output

    @staticmethod
    def backward(ctx, g: Tensor, _g_lse, _g_dx, _g_dw, _g_db):
        from .. import _linear_ops
        opts: LinearCEOptions = ctx.opts
        nx, _, nw, nb = ctx.needs_input_grad[:4]
        none = (None,) * 5
        # allow_inplace: the hidden states hold dx now, so a non-finite upstream rescales it
        # too (as cross_entropy's inplace_backward; README deliberate difference 9)
        if torch.is_grad_enabled() or _batched(g) or (not ctx.inplace and not _rescalable(g)):
            dx, dw, db = _linear_differentiable_grads(ctx, g, nx, nw, nb)
            return (dx, None, dw, db) + none
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            gf = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
            dx, dw, db = (_rescaled(t, gf, opts.backend) if need else t for need, t in zip((nx, nw, nb), grads))
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
        return (dx if nx else None, None, dw if nw else None, db if nb else None) + none


def _linear_differentiable_grads(ctx, g: Tensor, nx: bool, nw: bool, nb: bool):
    """backward(create_graph=True), torch.func.grad and jacrev: the gradients
    of the linear head in torch's differentiable (and batchable) ops, on
    materialised logits, so that they have gradients themselves."""
    x, rows, w, b, target, weight, lse, scale = ctx.saved_tensors
    opts: LinearCEOptions = ctx.opts
    if x is None:
        raise RuntimeError("crossent.linear_cross_entropy(allow_inplace=True) does not support "
                           "create_graph=True")
    n = target.shape[0]
    xr = x[rows] if rows is not None else x[:n]
    g = g.to(lse.dtype)
    row_scale = g if opts.reduction == "none" else g * scale
    dz = reference.cross_entropy_grad(torch.nn.functional.linear(xr, w, b), target, weight,
                                      opts.ignore_index, opts.label_smoothing, opts.z_loss,
                                      opts.softcap or None, row_scale)
    dx = dw = db = None
    if nx:
        dx = dz @ w
        if rows is not None or n != x.shape[0]:
            idx = rows if rows is not None else torch.arange(n, device=x.device)
            dx = torch.zeros_like(x).index_add(0, idx, dx)
    if nw:
        dw = dz.t() @ xr
    if nb:
        db = dz.sum(0)
    return dx, dw, db
