"""The kernel contract every backend implements.

The public API (``crossent.functional``) canonicalises arguments, then calls the
autograd Functions in ``crossent._autograd``; those call a backend through the
custom ops in ``crossent._ops``.  A backend is a plain object with the methods
below; it never sees reductions, legacy arguments or error checks.

Layouts (class dim is always dim 1):
  x        (R, C)       class index in the last dim, any row stride, or
           (B, C, S)    K-dim input flattened to one spatial dim S = d1*..*dk
  target   int64/int32/uint8 of shape x.shape without dim 1: (R,) or (B, S)
           (class indices; ``ignore_index`` marks skipped positions), or
           floating, the same shape as x (probability targets; no ignore).
  ignore_index  any Python int in int64's range.  A target equals it only as
           an exact integer: backends never compare in a narrower dtype (a
           uint8 target 156 is not -100; an int32 target 0 is not 2**32), and
           the class bound ``t < C`` is exact too (C may exceed uint8's range).
           Torch code builds its masks with crossent._validate.target_masks;
           a kernel widens the loaded target to int64 before comparing.
  weight   (C,) fp32/fp64 or None.  All math is fp32 (fp64 for fp64 input).
  rows     "a row" below is one position: (r,) or (b, s).

Per-row loss, with z = softcap*tanh(x/softcap) if softcap else x,
lse = logsumexp(z over C), m = [target != ignore_index], eps = label_smoothing,
w = weight or ones, zl = z_loss:
  class index: loss = m * ((1-eps)*w[y]*(lse - z[y]) + eps/C * sum_c w_c*(lse - z_c)
                           + zl*lse**2)
  probability: t' = t*(1-eps) + eps/C  (t' = t when eps == 0)
               loss = sum_c w_c*t'_c*(lse - z_c) + zl*lse**2
Every term is formed relative to the row max M, never as lse - z (two large
numbers that cancel: a common offset of 1e4 would cost four digits in fp32):
  lse - z_c = log(sum_j exp(z_j - M)) - (z_c - M), and the sums over classes
  as sum_c v_c*(z_c - M) accumulated in fp32 (fp64 for fp64 input).
The gradient uses p = exp(z - M) / sum_j exp(z_j - M).
Gradient of sum(scale * loss) w.r.t. x, with p = softmax(z):
  class index: dz = scale*m*(p*A - B),  A = (1-eps)*w[y] + eps/C*sum(w) + 2*zl*lse,
               B_c = (1-eps)*w[y]*[c == y] + eps/C*w_c
  probability: dz = scale*(p*(sum_c w_c*t'_c + 2*zl*lse) - w*t')
  dx = dz * (1 - (z/softcap)**2) with softcap, else dz.
``scale`` is a 0-d fp32 tensor or one value per row (fp32, shape of loss).
Ignored rows get exactly 0 in loss and gradient, whatever ``scale`` is (even
inf or NaN), unless their own logits are non-finite (then the gradient row is
NaN, as in PyTorch).  ``scale`` multiplies each of the two terms before they
are subtracted (scale*m*p*A - scale*m*B), as torch's chain rule does, so an
infinite upstream gradient gives torch's pattern: NaN where B != 0, inf elsewhere.
A class-index target outside [0, C) that is not ignore_index never reads or
writes out of bounds: its loss is NaN and its gradient row is NaN.
A row with a +inf logit (or NaN, or all -inf) has NaN loss and gradient, as
torch's log_softmax gives (inf - inf); its lse is what torch.logsumexp gives
(inf for a +inf logit without NaN).
Inputs without elements (C == 0, or no rows) are valid: lse -inf, loss 0 per
row, NaN for a counted class-index row (out of range), and NaN in every row
under label smoothing when C == 0 (torch's eps/C is inf).

Row losses are formed and returned in ``wide_dtype`` (fp64 on CPU and CUDA), an
O(rows) cost: one row's loss (a sum over classes, or lse - z[y] times w[y]) can
exceed fp32's range where the mean or sum of all rows fits (logits near 1e38),
and fp32 rows would overflow to +-inf, whose sum is then inf or NaN (found by
the fuzz tier).  Terms over classes stay in the accumulation dtype (per element
work), with their sums kept from overflowing: see each backend.

Methods (all return new tensors; none mutates its inputs except ``rescale_``):
  ce_forward(x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
             scale, need_grad, grad_into=None, lse_lo=None) -> (loss rows, lse fp32 rows, grad)
      loss in wide_dtype(x.device); lse fp32 (fp64 for fp64 input).
      grad: x.shape, contiguous, x.dtype, = gradient of sum(scale*loss) when
      need_grad, else an empty tensor.  Reads x once where the device allows.
      grad_into: a tensor of x's shape and dtype (in practice x itself, for the
      opt-in ``inplace_backward``) that receives the gradient instead; the
      returned grad is then an empty tensor.  softcap: 0.0 means off.
      lse_lo: None, or an (R,) tensor in lse's dtype for (R, C) x that receives
      lse's rounding error (shift + log(sumexp) - lse; 0 where lse is +-inf).
  ce_backward(x, target, weight, lse, ignore_index, label_smoothing, z_loss,
              softcap, scale) -> grad   (recomputes p from the saved lse)
  rescale_(grad, g) -> None: grad *= g in place (g a 0-d tensor); may skip the
      pass when g == 1 if that needs no host sync on this device.
  ce_in_place(dtype) -> bool: whether ce_forward(x, ..., grad_into=x) allocates
      nothing of x's size for x of this dtype (per-row vectors only).
  block_grad_(z, v0, C, target, lse, scale, weight, ignore_index, label_smoothing,
              z_loss, softcap, tw_sum, lse_lo=None) -> z
      z: (rows, vb) logits of classes [v0, v0 + vb) of C (unit column stride),
      overwritten in place by the gradient of sum(scale*loss) w.r.t. them
      (computed in the accumulation dtype, rounded once to z's dtype), from the
      rows' saved lse (fp32 rows; fp64 for fp64) and ce_forward's lse_lo (None: 0):
      p = exp((z - lse) - lse_lo), exact near the row max.  target: (rows,) class
      indices or (rows, C) probabilities over all classes; tw_sum: probability
      rows' sum_c w_c*t'_c (else None).  linear_cross_entropy's vocabulary pass.
  block_grad_scratch(dtype, softcap, prob) -> int: bytes per logit of z that
      block_grad_ allocates (0: it works in place).
  softmax_forward(x, dim, log) -> y     (x.dtype output, fp32 accumulation)
  softmax_backward(g, y, dim, log, input_dtype) -> dx
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the contract above: fp64 for fp64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums over many terms near fp32's range (row losses, sums of
    z - max over classes), whose mean fits where the fp32 sum overflows: fp64,
    except on MPS, which has none."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class Backend(Protocol):
    name: str
    # True when softmax_forward is a differentiable torch op: crossent then
    # calls it directly and keeps torch's autograd (double backward, jvp, vmap).
    softmax_native_autograd: bool

    def available(self, device: torch.device) -> tuple[bool, str]: ...

    def ce_forward(self, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float,
                   scale: Tensor, need_grad: bool,
                   grad_into: Tensor | None = None,
                   lse_lo: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]: ...

    def ce_backward(self, x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor,
                    ignore_index: int, label_smoothing: float, z_loss: float,
                    softcap: float, scale: Tensor) -> Tensor: ...

    def rescale_(self, grad: Tensor, g: Tensor) -> None: ...

    def ce_in_place(self, dtype: torch.dtype) -> bool: ...

    def block_grad_(self, z: Tensor, v0: int, C: int, target: Tensor, lse: Tensor, scale: Tensor,
                    weight: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                    softcap: float, tw_sum: Tensor | None,
                    lse_lo: Tensor | None = None) -> Tensor: ...

    def block_grad_scratch(self, dtype: torch.dtype, softcap: bool, prob: bool) -> int: ...

    def softmax_forward(self, x: Tensor, dim: int, log: bool) -> Tensor: ...

    def softmax_backward(self, g: Tensor, y: Tensor, dim: int, log: bool,
                         input_dtype: torch.dtype) -> Tensor: ...
