"""Cross-entropy, (log_)softmax and nll_loss's pick: their autograd Functions."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _ops, backends, reference
from ..backends.base import acc_dtype, wide_dtype
from .._fast import _eager, _transforms_active
from .._validate import _compiling, func_transforms, not_ignored


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


def _backend_fuses(backend: str, x: Tensor) -> bool:
    fuses = getattr(backends.load(backend), "fuses_forward", None)
    return fuses is not None and fuses(x)


def fuses_forward(backend: str, x: Tensor) -> bool:
    """Whether ``backend`` computes the forward of x in one launch (triton) and fills
    the caller's denom buffer: eager mode only, where a kernel may write into a
    buffer.  While compiling, see _fused."""
    return not _compiling() and _backend_fuses(backend, x)


def _fused(opts: CEOptions, x: Tensor) -> bool:
    """Whether the forward runs the backend's one-launch forward: as the caller decided
    in eager mode (opts.fused), and through crossent::ce_forward_fused(_inplace) while
    compiling.  There the caller's denom is formed by torch ops that the compiler
    drops unless something reads it: the loss and gradient take the kernel's own."""
    return opts.fused or (_compiling() and _backend_fuses(opts.backend, x))


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype), but t itself where that is a no-op.  An autograd.Function whose forward
    returns a no-op .to() gets zero gradients under torch.compile before torch 2.13 (2.11's
    Dynamo traces it as an alias of an intermediate); the guard is free and static."""
    return t if t.dtype == dtype else t.to(dtype)


def _reduce(rows: Tensor, denom: Tensor, reduction: str, out_dtype: torch.dtype) -> Tensor:
    """Per-row losses (wide dtype, backends/base.py) -> the reduction ('mean' divides
    by denom), in out_dtype.  The O(rows) sum runs in fp64: row losses near fp32's
    range would overflow an fp32 sum whose mean fits.  A reduced loss is rounded to
    fp32 first for fp16/bf16 (torch's fp64 sum -> fp32 -> loss dtype, as the fused kernels)."""
    if reduction != "none":
        total = rows.sum(dtype=wide_dtype(rows.device))
        rows = _to(total / denom if reduction == "mean" else total, acc_dtype(out_dtype))
    return _to(rows, out_dtype)


# What torch's Function.apply does first: unwrap tensors of functorch transforms that
# have exited (torch.func's unwrap_dead_wrappers, tensor by tensor).
_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)
_no_jvp = torch.autograd.Function.jvp


def _records_nothing(args: tuple) -> bool:
    """Whether Function.apply(*args) would record no graph: grad mode is off or no tensor
    argument requires grad.  Dynamo folds it to a constant (it guards on both)."""
    if not torch.is_grad_enabled():
        return True
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            return False
    return True


class CrossentFunction(torch.autograd.Function):
    """The base of crossent's Functions that are called with every argument positional:
    crossent calls them as ``F.call(*args)``, not ``F.apply``.  Dynamo intercepts every
    ``F.apply(...)`` it traces (an override of apply never runs there), while it inlines a
    classmethod of another name."""

    @classmethod
    def call(cls, *args):
        """cls.apply(*args), run one of three ways:
          * compiling, with a graph to record: F.apply, Dynamo's autograd.Function support;
          * compiling, nothing to record (inference, see _records_nothing): F.forward as plain
            code.  The result is apply's, and torch 2.4's Dynamo cannot take apply there: it
            calls a setup_context-style forward with a ctx (ArgsMismatchError; fatal under
            fullgraph=True);
          * eager mode outside functorch transforms: the C++ apply that torch's ends in.
            torch's Function.apply binds the arguments through inspect.signature on every
            call once setup_context is defined (~20 us of the eager call path, issue 10
            item 3); with nothing to bind it is not needed.  Under no_grad there is no graph
            to record either, so the forward runs alone, without the C++ apply and
            setup_context (~5 us), unless the Function has a jvp (no_grad leaves
            forward-mode AD on)."""
        if not _eager():
            return cls.forward(*args) if _records_nothing(args) else cls.apply(*args)
        if _transforms_active():
            return cls.apply(*args)
        args = cls.unwrap_dead(args)
        if torch.is_grad_enabled() or cls.jvp is not _no_jvp:
            return super(torch.autograd.Function, cls).apply(*args)
        return cls.forward(*args)

    @staticmethod
    def unwrap_dead(args: tuple) -> tuple:
        """What torch's apply does first: unwrap_dead_wrappers(args), tensor by tensor."""
        return tuple(a if not isinstance(a, Tensor) else _unwrap_if_dead(a) for a in args)


class CrossEntropyFunction(CrossentFunction):
    """(x, target, weight, denom, opts, need_grad) -> (loss, lse, grad).

    x: (R, C) or (B, C, S) logits, class dim 1.  target: rows-shaped class
    indices, or x-shaped probabilities.  denom: 0-d acc-dtype tensor, the mean's
    denominator (ignored unless reduction == 'mean'), or None where a fused forward
    forms it and a plain call keeps it not (_kept_denom).  need_grad: the caller's
    ``grad enabled and x.requires_grad`` (forward has no ctx to ask: the
    setup_context form is what torch.func.grad and jvp need).  loss: 0-d for
    mean/sum, rows-shaped for 'none', in opts.out_dtype.  lse: rows, fp32
    (fp64 for fp64 input), not differentiable (None with denom None: not kept;
    the kernels' recompute needs none).  grad: the gradient baked into
    the forward (or an empty tensor; None from a fused eager forward that formed
    none), not differentiable; callers drop it.
    """

    @staticmethod
    def unwrap_dead(args: tuple) -> tuple:
        # the base's without its generator (~1 us): the four tensor arguments.
        x, target, weight, denom, opts, need_grad = args
        return (_unwrap_if_dead(x), _unwrap_if_dead(target), weight if weight is None else _unwrap_if_dead(weight),
                _unwrap_if_dead(denom), opts, need_grad)

    @staticmethod
    def forward(x: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor, opts: CEOptions,
                need_grad: bool):
        if opts.fused:   # eager mode, where the gradient of a 'mean' / 'sum' is formed here (_reruns_kernel)
            return backends.load(opts.backend).ce_forward_fused(
                x, target, weight, denom, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                opts.reduction, opts.out_dtype, need_grad and opts.reduction != "none", opts.inplace_backward)
        precompute = need_grad and opts.reduction != "none" and not _reruns_kernel(opts, x)
        if _fused(opts, x):
            args = (target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                    opts.reduction, opts.out_dtype)
            if precompute and opts.inplace_backward:
                return (*_ops.ce_forward_fused_inplace(x, *args, opts.backend), x.new_empty(0))
            return _ops.ce_forward_fused(x, *args, precompute, opts.backend)
        # The gradient baked into the forward is that of loss * 1 upstream.
        args = (target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                _scale(denom, opts))
        if precompute and opts.inplace_backward:
            rows, lse = _ops.ce_forward_inplace(x, *args, opts.backend)
            grad = x.new_empty(0)  # the gradient is x itself now (opt-in); setup_context takes it
        else:
            rows, lse, grad = _ops.ce_forward(x, *args, precompute, opts.backend)
        return _reduce(rows, denom, opts.reduction, opts.out_dtype), lse, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, denom, opts, need_grad = inputs
        _, lse, grad = output
        ctx.opts = opts
        ctx.fused = _fused(opts, x)
        # inplace: a fresh handle on x's storage, so autograd can adopt it as x.grad.
        ctx.grad = (x.detach() if opts.inplace_backward else grad) \
            if need_grad and opts.reduction != "none" and (opts.fused or not _reruns_kernel(opts, x)) else None
        # With inplace_backward the logits are gone, so nothing can be recomputed.
        ctx.save_for_backward(None if opts.inplace_backward else x, target, weight, lse, denom)
        # None where a fused forward formed no gradient or kept no lse
        ctx.mark_non_differentiable(*[t for t in (lse, grad) if t is not None])
        # No zero-filled stand-ins for the unused lse and grad outputs: that
        # would be an N x C zeros (a full write of the logits' size) per backward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g: Tensor | None, _g_lse: Tensor | None, _g_grad: Tensor | None):
        if g is None:  # only the non-differentiable outputs were used
            return None, None, None, None, None, None
        opts: CEOptions = ctx.opts
        # while compiling, g is neither batched nor read (_batched, _rescalable)
        if torch.is_grad_enabled() or (_eager() and (_batched(g) or not (opts.inplace_backward or _rescalable(g)))):
            # create_graph, a batched upstream (jacrev, is_grads_batched) or a
            # non-finite one (torch's inf/NaN pattern, term by term): torch ops.
            # inplace_backward has no logits left to recompute from: a non-finite
            # upstream rescales its gradient buffer (README, deliberate differences).
            return _differentiable_grad(ctx, g), None, None, None, None, None
        grad = ctx.grad
        if grad is not None:
            # Hand the forward's buffer over (autograd can then adopt it as
            # x.grad without a copy); rescale in place only if g != 1.  The
            # saved tensors are not unpacked, so editing x after the forward
            # is as harmless as it is for torch's own cross_entropy.
            ctx.grad = None
            if opts.fused:   # eager: the backend's rescale_ itself, whose kernel casts g
                backends.load(opts.backend).rescale_(grad, g)
                return grad, None, None, None, None, None
            # a fused kernel casts g (while compiling: _rescaled's multiply in grad's acc dtype)
            return _rescaled(grad, g if ctx.fused else g.to(acc_dtype(grad.dtype)), opts.backend), \
                None, None, None, None, None
        x, target, weight, lse, denom = ctx.saved_tensors
        if x is None:
            raise RuntimeError(
                "crossent.cross_entropy(inplace_backward=True) wrote its gradient into the logits; "
                "it cannot be backpropagated a second time")
        if opts.reduction == "mean":
            row_scale = g.to(acc_dtype(x.dtype)) * _scale(_kept_denom(denom, target, opts), opts)
        else:  # g itself; a fused kernel casts it (no launch)
            row_scale = g if ctx.fused else g.to(acc_dtype(x.dtype))
        args = (x, target, weight, lse, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, row_scale)
        # opts.fused (eager): the backend itself, as the forward
        grad = backends.load(opts.backend).ce_backward(*args) if opts.fused else _ops.ce_backward(*args, opts.backend)
        return grad, None, None, None, None, None


# CrossEntropyFunction's C++ apply, bound once: what CrossentFunction.call runs in eager mode
# outside functorch transforms, for a caller that has checked that and unwrapped dead wrappers.
eager_apply = super(torch.autograd.Function, CrossEntropyFunction).apply


class CrossEntropyJvpFunction(CrossEntropyFunction):
    """CrossEntropyFunction plus forward-mode AD, used only while forward-mode
    AD is active (torch.compile cannot trace a Function that defines jvp)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        CrossEntropyFunction.setup_context(ctx, inputs, output)
        x, target, weight, denom, opts, _ = inputs
        ctx.save_for_forward(None if opts.inplace_backward else x, target, weight, output[1], denom)

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
            if opts.label_smoothing > 0 and x.shape[1] == 0:
                # no classes: torch's eps / C = inf times the smoothing sum's tangent 0, in every row
                rows = torch.full_like(rows, float("nan"))
        loss_t = rows.sum() * _scale(denom, opts) if opts.reduction != "none" else rows
        return loss_t.to(opts.out_dtype), None, None


_functorch_level = torch._C._functorch.maybe_current_level
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _batched(g: Tensor) -> bool:
    """Whether the backward runs under vmap: torch.func's, or the legacy one
    behind autograd.grad(is_grads_batched=True)."""
    if not _eager():
        return False
    # func_transforms() only once some functorch transform is active
    return (_functorch_level() is not None and func_transforms()[0]) or _legacy_batched(g)


def _scale(denom: Tensor, opts: CEOptions) -> Tensor:
    """The scale of the gradient of loss * 1 upstream: 1/denom for 'mean', else 1.
    reciprocal: what 1.0 / denom computes (reciprocal() * 1.0), without the ~3 us of
    Tensor.__rtruediv__'s Python wrapper."""
    return denom.reciprocal() if opts.reduction == "mean" else torch.ones_like(denom)


def _kept_denom(denom: Tensor | None, target: Tensor, opts: CEOptions) -> Tensor:
    """The mean's denominator as the forward kept it, or recounted where it kept none: the
    plain call (functional._plain_cross_entropy: class indices, no weight, no smoothing),
    whose W is the number of counted targets, an exact integer as the kernel's."""
    if denom is None:
        denom = not_ignored(target, opts.ignore_index).sum().to(torch.float32)
    return denom


def _rescalable(g: Tensor) -> bool:
    """Whether g * (forward's gradient) is the gradient torch gives.  Not for a
    non-finite upstream (also one row's, under 'none'): torch scales each
    class's term before they meet, which is NaN where infinite terms of
    opposite signs (or inf * 0) meet and 0 in ignored rows, so the backward
    recomputes term by term (reference.cross_entropy_grad).  Checked only
    where reading g is free (a CPU tensor in eager mode); elsewhere that would
    be a host sync."""
    if not _eager() or not g.is_cpu:   # eager first: Dynamo before torch 2.13 cannot trace is_cpu
        return True
    return math.isfinite(float(g)) if g.dim() == 0 else bool(torch.isfinite(g).all())


def _reruns_kernel(opts: CEOptions, x: Tensor) -> bool:
    """Whether a 'mean' / 'sum' backward reruns the kernel with the upstream gradient
    (as 'none' does) instead of scaling a gradient that the forward formed: while
    compiling, for backends that form the forward in one kernel (triton).

    A compiled backward cannot skip the pass at g == 1 (see _rescaled), so forming
    the gradient in the forward would cost a read of the logits there, a write of
    the gradient, and a read and write of it in the backward: four passes over
    N x C.  The rerun costs three: the forward reads the logits once and writes
    nothing, the backward reads them once more and writes the gradient (on the
    looped two-pass path, each kernel reads them twice: still no more than before).
    The price, for 'mean', is one O(N) kernel in the backward forming g / W.  Not for the
    chunked torch backend, whose rerun recomputes exp on the CPU, nor with
    inplace_backward, whose point is the memory of the logits."""
    return not opts.inplace_backward and not _eager() and _backend_fuses(opts.backend, x)


def _rescaled(grad: Tensor, g: Tensor, backend: str) -> Tensor:
    """grad * g (g 0-d): a gradient the forward formed for loss * 1, scaled by the
    upstream gradient, in grad's buffer.

    Eager: the backend's rescale_ in place, which reads g on the device and skips
    the pass when g == 1.  Compiled: one multiply in the accumulation dtype (as the
    kernel's), which inductor fuses into one kernel writing into grad's buffer (a
    saved tensor nothing else holds: a donated buffer), so one read and one write of
    grad at any g.  The skip cannot be compiled: grad is an input of the backward
    graph, AOT autograd functionalizes its mutation (no copy back into a saved
    tensor), inductor reinplaces only graph inputs that are copied back and clones
    the others, and a custom op may not return its input; so rescale_ there would
    be a full copy of grad, plus the multiply when g != 1."""
    if _eager():
        _ops.rescale_(grad, g, backend)
        return grad
    acc = acc_dtype(grad.dtype)
    return (grad.to(acc) * g.to(acc)).to(grad.dtype)


def _differentiable_grad(ctx, g: Tensor) -> Tensor:
    """backward(create_graph=True), as torch.func.grad always asks: the same
    gradient in torch's differentiable ops, so double backward works."""
    x, target, weight, lse, denom = ctx.saved_tensors
    opts: CEOptions = ctx.opts
    if x is None:
        raise RuntimeError("crossent.cross_entropy(inplace_backward=True) does not support create_graph=True")
    g = g.to(acc_dtype(x.dtype))
    row_scale = g * _scale(_kept_denom(denom, target, opts), opts) if opts.reduction == "mean" else g
    return reference.cross_entropy_grad(x, target, weight, opts.ignore_index, opts.label_smoothing,
                                        opts.z_loss, opts.softcap or None, row_scale)


class SoftmaxFunction(CrossentFunction):
    """softmax / log_softmax through a backend's kernels (x -> y, same dtype)."""

    @staticmethod
    def unwrap_dead(args: tuple) -> tuple:
        x, dim, log, backend = args
        return _unwrap_if_dead(x), dim, log, backend

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
            # create_graph=True: the same formulas in differentiable torch ops, in
            # fp32 for fp16/bf16 as torch's kernels (exp(y) underflows in fp16: 0 * inf)
            g, y = g.to(acc_dtype(dtype)), y.to(acc_dtype(dtype))
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
    return SoftmaxFunction.call(x, dim, log, name)


class PickFunction(CrossentFunction):
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
