"""The torch backend's ``block_grad_`` (contract: backends/base.py): a block of
classes' cross-entropy gradient from the rows' saved lse, for
linear_cross_entropy's compact vocabulary pass (crossent/_linear_ops.py).

Eager torch ops on an fp32 copy of the block (none for fp32/fp64 input), with
the formulas of backends/base.py; the result is rounded once into the block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import acc_dtype


def block_grad_scratch(dtype: torch.dtype, softcap: bool, prob: bool) -> int:
    """Bytes per logit of the block that block_grad_ allocates: the fp32 copy
    of a low-precision block, softcap's derivative, probability targets' rows."""
    acc = 8 if dtype == torch.float64 else 4
    return (acc if dtype.itemsize != acc else 0) + (acc if softcap else 0) + (2 * acc if prob else 0)


def block_grad_(z: Tensor, v0: int, C: int, target: Tensor, lse: Tensor, scale: Tensor,
                weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                softcap: float, tw_sum: Optional[Tensor], lse_lo: Optional[Tensor] = None) -> Tensor:
    acc = acc_dtype(z.dtype)
    if target.is_floating_point():
        target = target[:, v0:v0 + z.shape[1]]
    g = _block_grad(z.to(acc), v0, C, target, lse, scale, weight, ignore_index, label_smoothing, z_loss,
                    softcap, tw_sum, lse_lo)
    return z if g is z else z.copy_(g)


def _block_grad(z: Tensor, v0: int, V: int, tc: Tensor, lse: Tensor, scale: Tensor,
                weight: Optional[Tensor], ignore_index: int, eps: float, z_loss: float,
                softcap: float, tw_sum: Optional[Tensor], lse_lo: Optional[Tensor]) -> Tensor:
    """d(sum scale*loss)/dlogits for classes [v0, v0 + z.shape[1]) of some rows,
    in place in z (acc dtype), from the rows' saved lse and its rounding error
    lse_lo (None: 0): p = exp((z - lse) - lse_lo), z - lse exact near the row max (an lse
    rounded at |lse| ~ 1e4 would cost every p that relative error).  Temporaries
    of z's size: one with softcap (its derivative), two with probability targets."""
    Vb = z.shape[1]
    acc = z.dtype
    zero = torch.zeros((), dtype=acc, device=z.device)
    if softcap:
        z.div_(softcap).tanh_()
        dcap = torch.mul(z, z).neg_().add_(1)  # d softcap(x)/dx = 1 - tanh^2
        z.mul_(softcap)
    lse_c = lse.to(acc).unsqueeze(1)
    sc = scale.to(acc).unsqueeze(1) if scale.dim() else scale.to(acc)
    zterm = 2 * z_loss * lse_c if z_loss else 0.0
    w = None if weight is None else weight.to(acc)[v0:v0 + Vb]
    p = z.sub_(lse_c)
    if lse_lo is not None:
        p.sub_(lse_lo.to(acc).unsqueeze(1))
    p.exp_()
    if tc.is_floating_point():
        t = tc.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / V
        tw = t if w is None else t * w
        p.mul_(sc * (tw_sum.to(acc).unsqueeze(1) + zterm)).sub_(tw.mul_(sc) if tw is not tc else sc * tw)
    else:
        valid = tc != ignore_index
        inb = (tc >= 0) & (tc < V)
        ysafe = torch.where(valid & inb, tc, torch.zeros((), dtype=tc.dtype, device=tc.device)).long()
        mrow = torch.where(valid, torch.ones((), dtype=acc, device=z.device), zero)
        mrow = torch.where(valid & ~inb, torch.full((), float("nan"), dtype=acc, device=z.device), mrow)
        # ignored rows: 0, not w[0] (a non-finite w[0] times their 0 would be NaN; as _Terms)
        wy = torch.where(valid, weight.to(acc)[ysafe], zero) if weight is not None else torch.ones_like(mrow)
        sum_w = float(V) if weight is None else weight.to(acc).sum()
        mcol = mrow.unsqueeze(1)
        sm = torch.where(mcol != 0, sc * mcol, zero)  # (n, 1); ignored rows exactly 0
        wy = wy.unsqueeze(1)
        hot = (1 - eps) * sm * wy  # B's [c == y] term
        coef = hot
        if eps > 0:
            b = sm * (eps / V)  # B_c = b * w_c off the target class
            coef = hot + b * sum_w
        if z_loss:
            coef = coef + sm * zterm
        local = ysafe - v0
        hit = ((local >= 0) & (local < Vb)).unsqueeze(1)
        col = local.clamp(0, Vb - 1).unsqueeze(1)
        if eps > 0:
            py = p.gather(1, col)
        p.mul_(coef)
        if eps > 0:
            p.sub_(b * (1.0 if w is None else w))
            # The target entry as p_y*A - (b*w_y + hot), B_y summed first as A is
            # (as _Terms.grad_ in torch_terms.py): exactly 0 for one class.
            p.scatter_(1, col, torch.where(hit, py * coef - (b * wy + hot), p.gather(1, col)))
        else:
            p.scatter_add_(1, col, torch.where(hit, -hot, zero))
    if softcap:
        p.mul_(dcap)
    return p
