"""Vocab-parallel (tensor-parallel) cross-entropy, plain and fused with the linear head:
their autograd Functions (crossent.distributed)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends.base import acc_dtype
from .ce import _reduce, _rescalable, _to


def _vp_reduce(sm, rows: Tensor, denom: Tensor, reduction: str) -> Tensor:
    """The vocab-parallel loss: the rows plus the z-loss rows, reduced with one
    denominator (crossent's z-loss definition); with label smoothing and no
    classes at all NaN, as torch's eps / C."""
    from ..distributed._core import _nan_if_infinite
    rows = rows if sm.zrows is None else rows + sm.zrows
    loss = _reduce(rows, denom, reduction, sm.acc)   # rows: wide dtype; the loss: acc
    return loss + _nan_if_infinite(sm.eps_c) if sm.eps > 0 and not sm.o.prob else loss


class GlobalSoftmaxFunction(torch.autograd.Function):
    """(z, shift, s, group, world) -> exp(z - shift) / s: the softmax over dim 1
    of every rank's classes, s the all-reduced sum of exp(z - shift) (its path
    is in this backward, so s gets no gradient), for ShardMath.grad_graph.

    The backward is torch.softmax's, p * (g - sum(g * p)) with the sum over
    every rank's classes: one subtraction, then the product.  Autograd's graph
    of exp(z - shift - log s) adds two separately rounded branches instead,
    p * g and -exp(z - shift) * sum(g * p) / s, which cancel in a saturated row
    (fp32 second derivatives at 10x torch's error for logits ~300)."""

    @staticmethod
    def forward(z: Tensor, shift: Tensor, s: Tensor, group, world: int) -> Tensor:
        return torch.exp(z - shift) / s

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.group, ctx.world = inputs[3], inputs[4]

    @staticmethod
    def backward(ctx, g: Tensor):
        (p,) = ctx.saved_tensors
        dot = (g * p).sum(1, keepdim=True)
        if ctx.world > 1:
            from torch.distributed.nn.functional import all_reduce
            dot = all_reduce(dot, group=ctx.group)
        return p * (g - dot), None, None, None, None


class DTensorLocalFunction(torch.autograd.Function):
    """DTensor -> its local tensor, as ``DTensor.to_local()``, with a gradient
    that is a DTensor of the input's placements AND global strides.

    to_local's backward derives the global strides from the local gradient's,
    which is wrong for uneven shards: (N, 7) split 4 + 3 gives strides (8, 1)
    and (6, 1) for the true (7, 1).  AccumulateGrad then re-lays a leaf's
    gradient out, and torch 2.11 does that through a Replicate copy: an
    all_gather (under gloo with CUDA tensors the ranks died with SIGSEGV) and
    a full-size Replicate gradient instead of the shard."""

    @staticmethod
    def forward(ctx, input):
        ctx.layout = (input.device_mesh, tuple(input.placements), input.shape, input.stride())
        return input.to_local()

    @staticmethod
    def backward(ctx, g: Tensor):
        from torch.distributed.tensor import DTensor
        mesh, placements, shape, stride = ctx.layout
        return DTensor.from_local(g, mesh, placements, run_check=False, shape=shape, stride=stride)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """(x_shard, target, weight, opts, group, vocab_start_index) -> loss.

    x_shard: (R, C_l) or (B, C_l, S), class dim 1.  target: rows-shaped global
    class indices, or x_shard-shaped probabilities (this rank's columns).
    weight: the full (C,) class weights.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Tensor | None, opts, group,
                vocab_start_index):
        from ..backends.torch_chunked import _chunks
        from ..distributed import _core as K
        group, rank, world = K.resolve_group(group)
        acc = acc_dtype(x.dtype)
        rows_shape = x.shape[:1] + x.shape[2:]
        n_rows = math.prod(rows_shape)
        c_local = x.shape[1]
        sm = K.ShardMath(opts, target, weight, acc, rows_shape, x.dim(), x.device)
        K.early_layout(sm, vocab_start_index, rank, world, group, c_local, weight)
        for xi, ri in _chunks(x) if n_rows else ():
            sm.stats(sm.z(x[xi]), xi, ri)
        lse, rows = K.forward_reductions(sm, opts, lambda: sm.target_logit(x), vocab_start_index,
                                         rank, world, group, c_local, weight)
        denom = sm.denominator(n_rows)
        loss = _vp_reduce(sm, rows, denom, opts.reduction)
        ctx.opts, ctx.sm, ctx.group, ctx.world = opts, sm, group, world
        scale = 1.0 / denom if opts.reduction == "mean" else torch.ones_like(denom)
        ctx.save_for_backward(x, lse, scale)  # sm holds O(N) state: masks, weights, the layout
        return _to(loss, opts.out_dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        from ..backends.torch_chunked import _chunks, empty_like_fast
        x, lse, scale = ctx.saved_tensors
        opts, sm = ctx.opts, ctx.sm
        g = g.to(lse.dtype)
        row_scale = g if opts.reduction == "none" else g * scale
        if torch.is_grad_enabled() or not _rescalable(g):  # create_graph=True, or torch's inf/NaN pattern
            grad = sm.grad_graph(x, row_scale, ctx.group, ctx.world).to(x.dtype)
            return grad, None, None, None, None, None
        grad = empty_like_fast(x)
        for xi, ri in _chunks(x) if grad.numel() else ():
            z = sm.z(x[xi])
            grad[xi] = sm.grad(z, xi, ri, lse, row_scale)
        return grad, None, None, None, None, None


# Budget for one chunk of fp32 logits (vocab-parallel linear head).
_CPU_CHUNK_BYTES = 8 << 20
_DEV_CHUNK_BYTES = 256 << 20


def _row_chunks(n: int, v_local: int, device: torch.device, chunk_size: int | None):
    if chunk_size is None:
        budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _DEV_CHUNK_BYTES
        chunk_size = max(1, budget // (4 * max(v_local, 1)))
    for r in range(0, n, chunk_size):
        yield slice(r, min(n, r + chunk_size))


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """(x (N, D), w_shard (V_l, D), b_shard | None, target, weight, opts, group,
    vocab_start_index, chunk_size) -> loss."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None,
                opts, group, vocab_start_index, chunk_size):
        from ..distributed import _core as K
        group, rank, world = K.resolve_group(group)
        acc = acc_dtype(x.dtype)
        n, v_local = x.shape[0], w.shape[0]
        sm = K.ShardMath(opts, target, weight, acc, (n,), 2, x.device)
        # Pass 1 reads each target logit out of its chunk, so the layout must be
        # known first (free when vocab_start_index and weight are given).
        K.early_layout(sm, vocab_start_index, rank, world, group, v_local, weight, force=not opts.prob)
        zy = None if opts.prob else torch.zeros((n,), dtype=acc, device=x.device)
        for ri in _row_chunks(n, v_local, x.device, chunk_size):
            z = sm.z(torch.nn.functional.linear(x[ri], w, b))
            sm.stats(z, (ri,), (ri,))
            if zy is not None and v_local > 0:
                zc = z.gather(1, sm.idx[ri].unsqueeze(1)).squeeze(1)
                zy[ri] = torch.where(sm.owner[ri], zc, torch.zeros((), dtype=acc, device=x.device))
            del z
        lse, rows = K.forward_reductions(sm, opts, lambda: zy, vocab_start_index, rank, world, group,
                                         v_local, weight)
        denom = sm.denominator(n)
        loss = _vp_reduce(sm, rows, denom, opts.reduction)
        ctx.opts, ctx.sm, ctx.group, ctx.world, ctx.chunk_size = opts, sm, group, world, chunk_size
        scale = 1.0 / denom if opts.reduction == "mean" else torch.ones_like(denom)
        ctx.save_for_backward(x, w, b, lse, scale)
        return _to(loss, opts.out_dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        from .._linear_ops import _addmm_acc
        from ..distributed import _core as K
        x, w, b, lse, scale = ctx.saved_tensors
        opts, sm = ctx.opts, ctx.sm
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.to(lse.dtype)
        row_scale = g if opts.reduction == "none" else g * scale
        if torch.is_grad_enabled() or not _rescalable(g):
            return _vp_linear_grad_graph(ctx, x, w, b, row_scale) + (None,) * 6
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        # dW accumulates across token chunks in fp32 and is rounded once (a
        # low-precision running sum is what makes fused heads drift, Liger #512).
        dw = torch.zeros(w.shape, dtype=lse.dtype, device=w.device) if need_w else None
        db = torch.zeros(w.shape[0], dtype=lse.dtype, device=w.device) if need_b and b is not None else None
        for ri in _row_chunks(x.shape[0], w.shape[0], x.device, ctx.chunk_size):
            xc = x[ri]
            z = sm.z(torch.nn.functional.linear(xc, w, b))
            dz = sm.grad(z, (ri,), (ri,), lse, row_scale)
            del z
            if db is not None:
                db += dz.sum(0)
            dz = dz.to(x.dtype)
            if dx is not None:
                torch.mm(dz, w, out=dx[ri])
            if dw is not None:
                _addmm_acc(dw, dz.t(), xc)
        if dx is not None and opts.reduce_input_grad:
            K.all_reduce_(dx, torch.distributed.ReduceOp.SUM, ctx.group, ctx.world)
        if db is not None:
            db = db.to(b.dtype)
        if dw is not None:
            dw = dw.to(w.dtype)
        return dx, dw, db, None, None, None, None, None, None


def _vp_linear_grad_graph(ctx, x: Tensor, w: Tensor, b: Tensor | None, row_scale: Tensor):
    """(dx, dw, db) for backward(create_graph=True), in differentiable ops on
    the whole (N, V_l) logits (a graph keeps them anyway); dx is summed over
    the ranks by a differentiable all_reduce."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dz = ctx.sm.grad_graph(torch.nn.functional.linear(x, w, b), row_scale, ctx.group, ctx.world)
    dx = dw = db = None
    if need_x:
        dx = dz.to(x.dtype).mm(w)
        if ctx.opts.reduce_input_grad and ctx.world > 1:
            from torch.distributed.nn.functional import all_reduce
            dx = all_reduce(dx, group=ctx.group)
    if need_w:
        dw = dz.t().mm(x.to(dz.dtype)).to(w.dtype)
    if need_b and b is not None:
        db = dz.sum(0).to(b.dtype)
    return dx, dw, db
