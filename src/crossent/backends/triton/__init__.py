"""Triton backend: fused cross-entropy and softmax kernels (contract: ``backends/base.py``).

Imported lazily by the registry only when selected, so triton is imported here at
top level.  On CPU it runs only under the Triton interpreter (TRITON_INTERPRET=1),
which is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import os
import re

import torch
import triton

from . import block_grad, ce, softmax

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

    # The kernels' host functions themselves, not methods that forward to them: each
    # Python frame costs ~0.3 us on every call (issue 10, item 3).  Contract: backends/base.py.
    ce_forward = staticmethod(ce.ce_forward)
    fuses_forward = staticmethod(ce.fuses_forward)
    ce_forward_fused = staticmethod(ce.ce_forward_fused)
    ce_backward = staticmethod(ce.ce_backward)
    rescale_ = staticmethod(ce.rescale_)
    softmax_forward = staticmethod(softmax.softmax_forward)
    softmax_backward = staticmethod(softmax.softmax_backward)
    block_grad_ = staticmethod(block_grad.block_grad_)
    block_grad_scratch = staticmethod(block_grad.block_grad_scratch)

    @staticmethod
    def ce_in_place(dtype: torch.dtype) -> bool:
        return dtype != torch.float64   # ce_forward leaves fp64 to the torch backend


__all__ = ["TritonBackend"]
