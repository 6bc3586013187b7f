"""crossent's autograd Functions, all of them, one per op (never one per backend):
cross-entropy, (log_)softmax, linear cross-entropy, and the two vocab-parallel
ones behind crossent.distributed.

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

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops, backends, reference
from .backends.base import acc_dtype, wide_dtype
from ._validate import _compiling, func_transforms, not_ignored


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
    # The backend forms the whole forward in its kernel (fuses_forward): the mean's
    # denominator (written into the denom buffer), the reduction, the loss dtype.
    fused: bool = False


def fuses_forward(backend: str, x: Tensor) -> bool:
    """Whether ``backend`` computes the forward of x in one launch (triton; eager only)."""
    fuses = getattr(backends.load(backend), "fuses_forward", None)
    return fuses is not None and not _compiling() and fuses(x)


def _reduce(rows: Tensor, denom: Tensor, reduction: str) -> Tensor:
    """Per-row fp32 losses -> the reduction ('mean' divides by denom).  The
    O(rows) sum runs in fp64: row losses near fp32's range would overflow an
    fp32 sum whose mean fits."""
    if reduction == "none":
        return rows
    total = rows.sum(dtype=wide_dtype(rows.device))
    return (total / denom if reduction == "mean" else total).to(rows.dtype)


# What torch's Function.apply does first: unwrap tensors of functorch transforms that have exited.
_unwrap_dead = getattr(getattr(torch._functorch, "utils", None), "unwrap_dead_wrappers", lambda args: args)


class CrossEntropyFunction(torch.autograd.Function):
    """(x, target, weight, denom, opts, need_grad) -> (loss, lse, grad).

    x: (R, C) or (B, C, S) logits, class dim 1.  target: rows-shaped class
    indices, or x-shaped probabilities.  denom: 0-d acc-dtype tensor, the mean's
    denominator (ignored unless reduction == 'mean').  need_grad: the caller's
    ``grad enabled and x.requires_grad`` (forward has no ctx to ask: the
    setup_context form is what torch.func.grad and jvp need).  loss: 0-d for
    mean/sum, rows-shaped for 'none', in opts.out_dtype.  lse: rows, fp32
    (fp64 for fp64 input), not differentiable.  grad: the gradient baked into
    the forward (or an empty tensor), not differentiable; callers drop it.
    """

    @classmethod
    def apply(cls, *args):
        # torch's Function.apply binds the arguments through inspect.signature on every
        # call once setup_context is defined (~20 us of the eager call path, issue 10
        # item 3).  Callers pass every argument positionally, so there is nothing to
        # bind: outside tracing and functorch transforms, the C++ apply it ends in.
        if _compiling() or torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead(args))

    @staticmethod
    def forward(x: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor, opts: CEOptions,
                need_grad: bool):
        precompute = need_grad and opts.reduction != "none"
        if opts.fused:
            return backends.load(opts.backend).ce_forward_fused(
                x, target, weight, denom, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                opts.reduction, opts.out_dtype, precompute, opts.inplace_backward)
        # The gradient baked into the forward is that of loss * 1 upstream.
        args = (target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                _scale(denom, opts))
        if precompute and opts.inplace_backward:
            rows, lse = _ops.ce_forward_inplace(x, *args, opts.backend)
            grad = x.new_empty(0)  # the gradient is x itself now (opt-in); setup_context takes it
        else:
            rows, lse, grad = _ops.ce_forward(x, *args, precompute, opts.backend)
        return _reduce(rows, denom, opts.reduction).to(opts.out_dtype), lse, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, denom, opts, need_grad = inputs
        _, lse, grad = output
        ctx.opts = opts
        ctx.acc = lse.dtype
        ctx.grad = None
        if need_grad and opts.reduction != "none":
            # inplace: a fresh handle on x's storage, so autograd can adopt it as x.grad.
            ctx.grad = x.detach() if opts.inplace_backward else grad
        # With inplace_backward the logits are gone, so nothing can be recomputed.
        saved = (None if opts.inplace_backward else x, target, weight, lse, denom)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(lse, grad)
        # No zero-filled stand-ins for the unused lse and grad outputs: that
        # would be an N x C zeros (a full write of the logits' size) per backward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g: Tensor | None, _g_lse: Tensor | None, _g_grad: Tensor | None):
        opts: CEOptions = ctx.opts
        if g is None:  # only the non-differentiable outputs were used
            return None, None, None, None, None, None
        if torch.is_grad_enabled() or _batched(g) or not _rescalable(g):
            # create_graph, a batched upstream (jacrev, is_grads_batched) or a
            # non-finite one (torch's inf/NaN pattern, term by term): torch ops.
            return _differentiable_grad(ctx, g), None, None, None, None, None
        if ctx.grad is not None:
            # Hand the forward's buffer over (autograd can then adopt it as
            # x.grad without a copy); rescale in place only if g != 1.  The
            # saved tensors are not unpacked, so editing x after the forward
            # is as harmless as it is for torch's own cross_entropy.
            grad, ctx.grad = ctx.grad, None
            _ops.rescale_(grad, g if opts.fused else g.to(ctx.acc), opts.backend)  # fused: cast in-kernel
            return grad, None, None, None, None, None
        x, target, weight, lse, denom = ctx.saved_tensors
        if not (opts.fused and opts.reduction == "none"):
            g = g.to(lse.dtype)
        if x is None:
            raise RuntimeError(
                "crossent.cross_entropy(inplace_backward=True) wrote its gradient into the logits; "
                "it cannot be backpropagated a second time")
        row_scale = g if opts.reduction == "none" else g * _scale(denom, opts)
        grad = _ops.ce_backward(x, target, weight, lse, opts.ignore_index, opts.label_smoothing,
                                opts.z_loss, opts.softcap, row_scale, opts.backend)
        return grad, None, None, None, None, None


class CrossEntropyJvpFunction(CrossEntropyFunction):
    """CrossEntropyFunction plus forward-mode AD, used only while forward-mode
    AD is active (torch.compile cannot trace a Function that defines jvp)."""

    @staticmethod
    def jvp(ctx, tx: Tensor, _t_target, _t_weight, _t_denom, _t_opts, _t_need):
        """Forward mode: the loss's tangent is sum_c dloss/dx_c * tx_c per row,
        with dloss/dx the backend's gradient for unit row scales.  Class
        indices and weights have no derivative here (torch's nll_loss has none
        for weights); probability targets take the reference path in forward mode."""
        opts: CEOptions = ctx.opts
        x, target, weight, lse, denom = ctx.saved_tensors
        if x is None:
            raise RuntimeError("crossent.cross_entropy(inplace_backward=True) does not support forward-mode AD")
        ones = torch.ones_like(lse)
        dx = _ops.ce_backward(x, target, weight, lse, opts.ignore_index, opts.label_smoothing,
                              opts.z_loss, opts.softcap, ones, opts.backend)
        rows = (dx.to(lse.dtype) * tx.to(lse.dtype)).sum(1)
        if not target.is_floating_point():  # ignored rows: 0, as torch's masked nll tangent, even for NaN logits
            rows = torch.where(not_ignored(target, opts.ignore_index), rows, 0.0)
        loss_t = rows.sum() * _scale(denom, opts) if opts.reduction != "none" else rows
        return loss_t.to(opts.out_dtype), None, None


def _batched(g: Tensor) -> bool:
    """Whether the backward runs under vmap: torch.func's, or the legacy one
    behind autograd.grad(is_grads_batched=True)."""
    if _compiling():
        return False
    legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return func_transforms()[0] or (legacy is not None and legacy(g))


def _scale(denom: Tensor, opts: CEOptions) -> Tensor:
    """The scale of the gradient of loss * 1 upstream: 1/denom for 'mean', else 1."""
    return 1.0 / denom if opts.reduction == "mean" else torch.ones_like(denom)


def _rescalable(g: Tensor) -> bool:
    """Whether g * (forward's gradient) is the gradient torch gives.  Not for a
    non-finite upstream (also one row's, under 'none'): torch scales each
    class's term before they meet, which is NaN where infinite terms of
    opposite signs (or inf * 0) meet and 0 in ignored rows, so the backward
    recomputes term by term (reference.cross_entropy_grad).  Checked only
    where reading g is free (a CPU tensor in eager mode); elsewhere that would
    be a host sync."""
    if g.device.type != "cpu" or _compiling():
        return True
    return math.isfinite(float(g)) if g.dim() == 0 else bool(torch.isfinite(g).all())


def _differentiable_grad(ctx, g: Tensor) -> Tensor:
    """backward(create_graph=True), as torch.func.grad always asks: the same
    gradient in torch's differentiable ops, so double backward works."""
    x, target, weight, lse, denom = ctx.saved_tensors
    opts: CEOptions = ctx.opts
    if x is None:
        raise RuntimeError("crossent.cross_entropy(inplace_backward=True) does not support create_graph=True")
    g = g.to(lse.dtype)
    row_scale = g if opts.reduction == "none" else g * _scale(denom, opts)
    return reference.cross_entropy_grad(x, target, weight, opts.ignore_index, opts.label_smoothing,
                                        opts.z_loss, opts.softcap or None, row_scale)


class SoftmaxFunction(torch.autograd.Function):
    """softmax / log_softmax through a backend's kernels (x -> y, same dtype)."""

    @staticmethod
    def forward(x: Tensor, dim: int, log: bool, backend: str):
        return _ops.softmax_forward(x, dim, log, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim, log, backend = inputs
        ctx.save_for_backward(output)
        ctx.meta = (dim, log, backend, x.dtype)

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
    if any(func_transforms()):
        # vmap and forward mode: torch's own ops, which have batching and jvp rules.
        return (reference.log_softmax if log else reference.softmax)(x, dim)
    return SoftmaxFunction.apply(x, dim, log, name)


class PickFunction(torch.autograd.Function):
    """nll_loss's pick: (x (R, C[, S]), idx (R, 1[, S]) int64) -> x.gather(1, idx).

    Its gradient, like aten's nll_loss_backward, is a function of x too (with
    zero derivative): after backward(create_graph=True) the gradient requires
    grad, so a second autograd.grad w.r.t. x gives zeros as torch's does.
    Plain torch ops, so vmap batches them (jacrev vmaps the backward).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, idx: Tensor) -> Tensor:
        return x.gather(1, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, idx = ctx.saved_tensors
        if torch.is_grad_enabled():
            return PickBackwardFunction.apply(g, x, idx), None
        return torch.zeros_like(x).scatter(1, idx, g), None  # out of place: vmap batches it


class PickBackwardFunction(torch.autograd.Function):
    """(g, x, idx) -> zeros like x with g scattered at idx; d/dg = gather, d/dx = 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, idx: Tensor) -> Tensor:
        return torch.zeros_like(x).scatter(1, idx, g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, idx = inputs
        ctx.save_for_backward(idx)
        ctx.x_like = (x.shape, x.dtype, x.device)

    @staticmethod
    def backward(ctx, gg: Tensor):
        (idx,) = ctx.saved_tensors
        shape, dtype, device = ctx.x_like
        return gg.gather(1, idx), torch.zeros(shape, dtype=dtype, device=device), None


# ===========================================================================
# Fused linear + cross-entropy (crossent.linear_cross_entropy)
# ===========================================================================


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


class LinearCrossEntropyFunction(torch.autograd.Function):
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
        from . import _linear_ops
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
        return _reduce(rows_loss, denom, opts.reduction).to(opts.out_dtype), lse, dx, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, rows, w, b, target, weight, denom, opts, needs = inputs
        _, lse, dx, dw, db = output
        inplace = any(needs) and opts.reduction != "none" and needs[0] and opts.inplace
        ctx.opts = opts
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
        from . import _linear_ops
        opts: LinearCEOptions = ctx.opts
        nx, _, nw, nb = ctx.needs_input_grad[:4]
        none = (None,) * 5
        if torch.is_grad_enabled() or _batched(g) or not _rescalable(g):
            dx, dw, db = _linear_differentiable_grads(ctx, g, nx, nw, nb)
            return (dx, None, dw, db) + none
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            gf = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
            for need, t in zip((nx, nw, nb), grads):
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


# ===========================================================================
# Vocab-parallel (tensor-parallel) cross-entropy: crossent.distributed
# ===========================================================================
def _vp_reduce(sm, rows: Tensor, denom: Tensor, reduction: str) -> Tensor:
    """The vocab-parallel loss: the rows plus the z-loss rows, reduced with one
    denominator (crossent's z-loss definition); with label smoothing and no
    classes at all NaN, as torch's eps / C."""
    from .distributed._core import _nan_if_infinite
    loss = _reduce(rows if sm.zrows is None else rows + sm.zrows, denom, reduction)
    return loss + _nan_if_infinite(sm.eps_c) if sm.eps > 0 and not sm.o.prob else loss



class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """(x_shard, target, weight, opts, group, vocab_start_index) -> loss.

    x_shard: (R, C_l) or (B, C_l, S), class dim 1.  target: rows-shaped global
    class indices, or x_shard-shaped probabilities (this rank's columns).
    weight: the full (C,) class weights.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Tensor | None, opts, group,
                vocab_start_index):
        from .backends.torch_chunked import _chunks
        from .distributed import _core as K
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
        return loss.to(opts.out_dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        from .backends.torch_chunked import _chunks, empty_like_fast
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
        from .distributed import _core as K
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
        return loss.to(opts.out_dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        from ._linear_ops import _addmm_acc
        from .distributed import _core as K
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


# ===========================================================================
# Token log-probabilities and entropy: crossent.log_probs / linear_log_probs
# and their vocab-parallel variants (kernels: crossent/logprobs.py)
# ===========================================================================
@dataclass(frozen=True)
class LogProbsOptions:
    ignore_index: int = -100
    temperature: float = 1.0
    entropy: bool = False
    backend: str = "torch"
    chunk_rows: int = 1024        # fused / vocab-parallel linear: tokens per chunk (0: default)
    reduce_input_grad: bool = True  # vocab-parallel linear only


def lp_coeffs(target: Tensor, opts: LogProbsOptions, V: int, g_lp, g_ent, acc):
    """Per-row coefficients (a, b) of the backward kernels: the upstream
    gradients divided by T, 0 at ignored rows (NaN where a target is out of range)."""
    t = target.long()
    keep = t != opts.ignore_index
    a = torch.zeros(t.shape, dtype=acc, device=t.device) if g_lp is None else g_lp.to(acc) / opts.temperature
    a = torch.where(keep, torch.where((t >= 0) & (t < V), a, float("nan")), 0.0)
    b = None if g_ent is None or not opts.entropy else torch.where(keep, g_ent.to(acc) / opts.temperature, 0.0)
    return a, b


class LogProbsFunction(torch.autograd.Function):
    """(x (R, V), target (R,), opts) -> (log_probs (R,), entropy (R,) or empty); acc dtype.
    Saves the per-row lse and entropy; the backward reads the logits once more."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, opts: LogProbsOptions):
        from . import logprobs as L
        lp, ent, lse = L.log_probs_fwd(x, target, opts.ignore_index, opts.temperature, opts.entropy,
                                       opts.backend)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # an unused output costs nothing in the backward
        ctx.save_for_backward(x, target, lse, ent)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        from . import logprobs as L
        x, target, lse, ent = ctx.saved_tensors
        o: LogProbsOptions = ctx.opts
        a, b = lp_coeffs(target, o, x.shape[1], g_lp, g_ent, lse.dtype)
        return L.log_probs_bwd(x, target, lse, ent, a, b, o.ignore_index, o.temperature, o.backend), None, None


class LinearLogProbsFunction(torch.autograd.Function):
    """(x (N, D), w (V, D), b (V,) or None, target (N,), opts) -> (log_probs, entropy or empty).
    The backward recomputes each chunk's logits (per-token upstream gradients
    cannot be folded into the forward)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: LogProbsOptions):
        from . import logprobs as L
        lp, ent, lse = L.linear_log_probs_fwd(x, w, b, target, opts.ignore_index, opts.temperature,
                                              opts.entropy, opts.chunk_rows, opts.backend)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, b, target, lse, ent)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        from . import logprobs as L
        x, w, b, target, lse, ent = ctx.saved_tensors
        o: LogProbsOptions = ctx.opts
        nx, nw = ctx.needs_input_grad[:2]
        nb = b is not None and ctx.needs_input_grad[2]
        a, cb = lp_coeffs(target, o, w.shape[0], g_lp, g_ent, lse.dtype)
        dx, dw, db = L.linear_log_probs_bwd(x, w, b, target, lse, ent, a, cb, o.ignore_index, o.temperature,
                                            nx, nw, nb, o.chunk_rows, o.backend)
        return dx if nx else None, dw if nw else None, db if nb else None, None, None


class VocabParallelLogProbsFunction(torch.autograd.Function):
    """(x_shard (R, V_l), target (R,) global ids, opts, group, vocab_start_index)
    -> (log_probs, entropy or empty), the same on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, opts: LogProbsOptions, group, vocab_start_index):
        from .backends.torch_chunked import _chunks
        from .distributed.logprobs import ShardLogProbs
        st = ShardLogProbs(opts, target, x.shape[1], group, vocab_start_index, x.dtype, x.device)
        lp, ent = st.forward(((ri, x[ri], False) for (ri,), _ in _chunks(x)),
                             lambda idx: x.gather(1, idx.unsqueeze(1)).squeeze(1))
        ctx.st = st  # O(N) state: lse, entropy, owner mask; never logits
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        from .backends.torch_chunked import _chunks, empty_like_fast
        (x,) = ctx.saved_tensors
        st = ctx.st
        a, b = st.coeffs(g_lp, g_ent)
        dx = empty_like_fast(x)
        for (ri,), _ in _chunks(x):
            st.grad_rows(x[ri], dx[ri], ri, a, b)
        return dx, None, None, None, None


class VocabParallelLinearLogProbsFunction(torch.autograd.Function):
    """(x (N, D), w_shard (V_l, D), b_shard | None, target (N,), opts, group,
    vocab_start_index) -> (log_probs, entropy or empty); logits one chunk at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: LogProbsOptions, group,
                vocab_start_index):
        from .distributed.logprobs import ShardLogProbs, linear_zy
        st = ShardLogProbs(opts, target, w.shape[0], group, vocab_start_index, x.dtype, x.device)
        chunks = _row_chunks(x.shape[0], w.shape[0], x.device, opts.chunk_rows or None)
        lp, ent = st.forward(((ri, torch.nn.functional.linear(x[ri], w, b), True) for ri in chunks),
                             lambda idx: linear_zy(x, w, b, idx))
        ctx.st = st
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, b)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        from ._linear_ops import _addmm_acc
        from .distributed import _core as K
        x, w, b = ctx.saved_tensors
        st = ctx.st
        nx, nw = ctx.needs_input_grad[:2]
        nb = b is not None and ctx.needs_input_grad[2]
        a, cb = st.coeffs(g_lp, g_ent)
        acc = a.dtype
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if nx else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if nw else None  # fp32, rounded once
        db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if nb else None
        for ri in _row_chunks(x.shape[0], w.shape[0], x.device, st.opts.chunk_rows or None):
            xc = x[ri]
            z = torch.nn.functional.linear(xc, w, b)
            dz = st.grad_rows(z, None, ri, a, cb)
            if db is not None:
                db += dz.sum(0)
            if dw is not None:
                _addmm_acc(dw, dz.t(), xc)
            if dx is not None:
                torch.mm(dz.to(x.dtype), w, out=dx[ri])
        if dx is not None and st.opts.reduce_input_grad:
            K.all_reduce_(dx, torch.distributed.ReduceOp.SUM, st.group, st.world)
        return (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype),
                None, None, None, None)
