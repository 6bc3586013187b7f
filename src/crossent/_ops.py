"""Backend kernels as torch custom ops.

Wrapping the kernels as opaque custom ops (with fake implementations for
shape propagation) lets torch.compile trace crossent with fullgraph=True:
Dynamo sees one node per kernel call instead of a Python loop over chunks or a
Triton launch.  Each op takes the backend's name and dispatches through the
registry; the autograd Functions in ``_autograd`` are the only callers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import backends


def _rows(x: Tensor) -> list[int]:
    return [x.shape[0], *x.shape[2:]]


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@custom_op("crossent::ce_forward", mutates_args=())
def ce_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, scale: Tensor,
               need_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss rows fp32, lse rows fp32, grad or empty); see backends/base.py."""
    return backends.load(backend).ce_forward(x, target, weight, ignore_index, label_smoothing,
                                             z_loss, softcap, scale, need_grad)


@ce_forward.register_fake
def _(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, need_grad, backend):
    rows = _rows(x)
    grad = x.new_empty(x.shape) if need_grad else x.new_empty(0)
    return x.new_empty(rows, dtype=_acc(x)), x.new_empty(rows, dtype=_acc(x)), grad


@custom_op("crossent::ce_forward_inplace", mutates_args=("x",))
def ce_forward_inplace(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float, scale: Tensor,
                       backend: str) -> tuple[Tensor, Tensor]:
    """Like ce_forward with need_grad, but the gradient overwrites x (opt-in)."""
    loss, lse, _ = backends.load(backend).ce_forward(
        x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, True, grad_into=x)
    return loss, lse


@ce_forward_inplace.register_fake
def _(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, backend):
    rows = _rows(x)
    return x.new_empty(rows, dtype=_acc(x)), x.new_empty(rows, dtype=_acc(x))


@custom_op("crossent::ce_backward", mutates_args=())
def ce_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                scale: Tensor, backend: str) -> Tensor:
    return backends.load(backend).ce_backward(x, target, weight, lse, ignore_index,
                                              label_smoothing, z_loss, softcap, scale)


@ce_backward.register_fake
def _(x, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, scale, backend):
    return x.new_empty(x.shape)


@custom_op("crossent::rescale_", mutates_args=("grad",))
def rescale_(grad: Tensor, g: Tensor, backend: str) -> None:
    backends.load(backend).rescale_(grad, g)


@rescale_.register_fake
def _(grad, g, backend):
    return None


@custom_op("crossent::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor, dim: int, log: bool, backend: str) -> Tensor:
    return backends.load(backend).softmax_forward(x, dim, log)


@softmax_forward.register_fake
def _(x, dim, log, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("crossent::softmax_backward", mutates_args=())
def softmax_backward(g: Tensor, y: Tensor, dim: int, log: bool, input_dtype: torch.dtype,
                     backend: str) -> Tensor:
    return backends.load(backend).softmax_backward(g, y, dim, log, input_dtype)


@softmax_backward.register_fake
def _(g, y, dim, log, input_dtype, backend):
    return torch.empty_like(y, dtype=input_dtype, memory_format=torch.contiguous_format)
