"""Backend kernels as torch custom ops, for torch.compile.

Wrapping the kernels as opaque custom ops (with fake implementations for
shape propagation) lets torch.compile trace crossent with fullgraph=True:
Dynamo sees one node per kernel call instead of a Python loop over chunks or a
Triton launch.  Each op takes the backend's name and dispatches through the
registry; the autograd Functions in ``_autograd`` are the only callers.

The custom ops serve tracing only.  In eager mode a custom-op call costs
10-30 us of dispatcher work (schema binding, alias checks) and a fwd+bwd makes
two or three of them: more than a whole small cross_entropy takes in torch.
So each name here is a plain function that calls the backend directly, and
goes through its custom op (``<name>.op``) only while torch.compile traces.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op infers its schema from
# annotation objects, not strings.
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import backends
from .backends.base import acc_dtype, wide_dtype
from ._fast import is_compiling


def _op(name: str, mutates_args=()):
    """Register ``fn`` as crossent::<name>; return a caller that runs ``fn``
    itself in eager mode and the op while compiling (the op is ``.op``)."""
    def wrap(fn):
        op = custom_op(f"crossent::{name}", fn, mutates_args=mutates_args)

        def call(*args):
            return op(*args) if is_compiling() else fn(*args)
        call.op, call.__name__, call.__doc__ = op, name, fn.__doc__
        return call
    return wrap


def _rows(x: Tensor) -> list[int]:
    return [x.shape[0], *x.shape[2:]]


@_op("ce_forward")
def ce_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, scale: Tensor,
               need_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss rows (wide dtype), lse rows fp32, grad or empty); see backends/base.py."""
    return backends.load(backend).ce_forward(x, target, weight, ignore_index, label_smoothing,
                                             z_loss, softcap, scale, need_grad)


@ce_forward.op.register_fake
def _(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, need_grad, backend):
    rows = _rows(x)
    grad = x.new_empty(x.shape) if need_grad else x.new_empty(0)
    return x.new_empty(rows, dtype=wide_dtype(x.device)), x.new_empty(rows, dtype=acc_dtype(x.dtype)), grad


def _forward_fused(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype,
                   need_grad, backend, inplace):
    denom = x.new_empty((), dtype=acc_dtype(x.dtype))   # the kernel's scratch for the mean's denominator
    loss, lse, grad = backends.load(backend).ce_forward_fused(x, target, weight, denom, ignore_index, label_smoothing,
                                                              z_loss, softcap, reduction, out_dtype, need_grad, inplace)
    return loss, lse, x.new_empty(0) if grad is None else grad   # an op returns tensors


@_op("ce_forward_fused")
def ce_forward_fused(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                     label_smoothing: float, z_loss: float, softcap: float, reduction: str,
                     out_dtype: torch.dtype, need_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss in out_dtype: 0-d, or rows for 'none'; lse rows; the gradient of loss * 1
    or empty): the whole forward in one launch, mean's denominator included, for
    backends whose fuses_forward(x) holds."""
    return _forward_fused(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype,
                          need_grad, backend, False)


@ce_forward_fused.op.register_fake
def _(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype, need_grad,
      backend):
    loss = x.new_empty(_rows(x) if reduction == "none" else (), dtype=out_dtype)
    grad = x.new_empty(x.shape) if need_grad else x.new_empty(0)
    return loss, x.new_empty(_rows(x), dtype=acc_dtype(x.dtype)), grad


@_op("ce_forward_fused_inplace", mutates_args=("x",))
def ce_forward_fused_inplace(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                             label_smoothing: float, z_loss: float, softcap: float, reduction: str,
                             out_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    """Like ce_forward_fused for 'mean' / 'sum' with the gradient, which overwrites x (opt-in)."""
    loss, lse, _ = _forward_fused(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
                                  out_dtype, True, backend, True)
    return loss, lse


@ce_forward_fused_inplace.op.register_fake
def _(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype, backend):
    return x.new_empty((), dtype=out_dtype), x.new_empty(_rows(x), dtype=acc_dtype(x.dtype))


@_op("ce_forward_inplace", mutates_args=("x",))
def ce_forward_inplace(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float, scale: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    """Like ce_forward with need_grad, but the gradient overwrites x (opt-in)."""
    loss, lse, _ = backends.load(backend).ce_forward(
        x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, True, grad_into=x)
    return loss, lse


@ce_forward_inplace.op.register_fake
def _(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, backend):
    rows = _rows(x)
    return x.new_empty(rows, dtype=wide_dtype(x.device)), x.new_empty(rows, dtype=acc_dtype(x.dtype))


@_op("ce_backward")
def ce_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                scale: Tensor, backend: str) -> Tensor:
    return backends.load(backend).ce_backward(x, target, weight, lse, ignore_index,
                                              label_smoothing, z_loss, softcap, scale)


@ce_backward.op.register_fake
def _(x, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, scale, backend):
    return x.new_empty(x.shape)


def rescale_(grad: Tensor, g: Tensor, backend: str) -> None:
    """grad *= g in place, skipped on the device when g == 1: eager mode only, so no
    custom op.  A compiled backward cannot use it: the buffer is a saved tensor, an
    input of the backward graph, and AOT autograd turns its mutation into a copy of
    it first (see _autograd.ce._rescaled)."""
    backends.load(backend).rescale_(grad, g)


@_op("softmax_forward")
def softmax_forward(x: Tensor, dim: int, log: bool, backend: str) -> Tensor:
    return backends.load(backend).softmax_forward(x, dim, log)


@softmax_forward.op.register_fake
def _(x, dim, log, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_op("softmax_backward")
def softmax_backward(g: Tensor, y: Tensor, dim: int, log: bool, input_dtype: torch.dtype,
                     backend: str) -> Tensor:
    return backends.load(backend).softmax_backward(g, y, dim, log, input_dtype)


@softmax_backward.op.register_fake
def _(g, y, dim, log, input_dtype, backend):
    return torch.empty_like(y, dtype=input_dtype, memory_format=torch.contiguous_format)
