"""Triton backend: fused cross-entropy and softmax kernels (contract: ``backends/base.py``).

Imported lazily by the registry only when selected, so triton is imported here at
top level.  On CPU it runs only under the Triton interpreter (TRITON_INTERPRET=1),
which is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import os
import re

import torch
from torch import Tensor

import triton

from . import ce, softmax

# The oldest Triton the kernels are tested with (CI: 3.9; the GPU machines: 3.6).  Older ones
# fail on them (3.4's interpreter rejects the row tiles' broadcasting; 3.0, torch 2.4's, non-constexpr
# arange bounds), so "auto" takes the torch backend there instead.
MIN_TRITON = (3, 6)


def _version(v: str) -> tuple[int, int]:
    """'3.6.0+git1234' -> (3, 6); (0, 0) where it does not parse."""
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m[1]), int(m[2])) if m else (0, 0)


class TritonBackend:
    name = "triton"
    # softmax goes through crossent's autograd Function (softmax_backward below),
    # not through torch's own autograd.
    softmax_native_autograd = False

    def available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if _version(triton.__version__) < MIN_TRITON:
            return False, (f"crossent's Triton kernels need Triton >= {'.'.join(map(str, MIN_TRITON))} "
                           f"(this is {triton.__version__})")
        if device.type == "cuda":
            if torch.cuda.is_available():
                return True, ""
            return False, "CUDA is not available"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, ""
            return False, "triton runs on CPU only under TRITON_INTERPRET=1"
        return False, f"triton backend does not support device type {device.type!r}"

    def ce_forward(self, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float,
                   scale: Tensor, need_grad: bool,
                   grad_into: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return ce.ce_forward(x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                             scale, need_grad, grad_into)

    def fuses_forward(self, x: Tensor) -> bool:
        return ce.fuses_forward(x)

    def ce_forward_fused(self, x: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor,
                         ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                         reduction: str, out_dtype: torch.dtype, need_grad: bool,
                         inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
        return ce.ce_forward_fused(x, target, weight, denom, ignore_index, label_smoothing, z_loss,
                                   softcap, reduction, out_dtype, need_grad, inplace)

    def ce_backward(self, x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor,
                    ignore_index: int, label_smoothing: float, z_loss: float,
                    softcap: float, scale: Tensor) -> Tensor:
        return ce.ce_backward(x, target, weight, lse, ignore_index, label_smoothing, z_loss,
                              softcap, scale)

    def rescale_(self, grad: Tensor, g: Tensor) -> None:
        ce.rescale_(grad, g)

    def softmax_forward(self, x: Tensor, dim: int, log: bool) -> Tensor:
        return softmax.softmax_forward(x, dim, log)

    def softmax_backward(self, g: Tensor, y: Tensor, dim: int, log: bool,
                         input_dtype: torch.dtype) -> Tensor:
        return softmax.softmax_backward(g, y, dim, log, input_dtype)


__all__ = ["TritonBackend"]
