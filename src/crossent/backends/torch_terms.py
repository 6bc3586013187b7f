"""The cross-entropy terms of backends/base.py as torch ops on one chunk of
logits, for the torch backend's row-chunked sweep (backends/torch_chunked.py):
softcapped logits and their row max, per-chunk target terms, the loss relative
to the row max, and the gradient in place.

Per-call constants live on ``_Terms``; the target terms are built per chunk
(``row_terms``), so the sweep holds no O(rows) temporaries beyond loss and lse.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import not_ignored, target_masks
from .base import acc_dtype, wide_dtype


def _col(v: Tensor) -> Tensor:
    """A per-row value (r,) or (b, s), as a column that broadcasts over C."""
    return v.unsqueeze(1)


def _wcol(w: Tensor, ndim: int) -> Tensor:
    """Class weights (C,) broadcast along dim 1 of an ndim tensor."""
    return w.view(1, -1, *([1] * (ndim - 2)))


class _Terms:
    """The loss and gradient terms of backends/base.py for one call: per-call
    constants here, per-chunk row terms from ``row_terms``."""

    def __init__(self, x, target, weight, ignore_index, eps, z_loss, softcap):
        self.acc = acc_dtype(x.dtype)
        self.wide = wide_dtype(x.device)  # row losses (backends/base.py)
        self.C, self.ndim = x.shape[1], x.dim()
        self.eps, self.z_loss, self.softcap = float(eps), float(z_loss), float(softcap or 0.0)
        self.prob = target.is_floating_point()
        self.target, self.ignore_index = target, ignore_index
        self.w = None if weight is None else _wcol(weight.to(self.acc), x.dim())  # (1, C[, 1])
        self.sum_w = float(self.C) if weight is None else self.w.sum()

    def logits(self, xc: Tensor, out: Tensor | None, may_alias: bool = False):
        """z = softcap(x) in acc dtype, its row max m, and e = z - m (written
        into ``out`` if given)."""
        z = xc.to(self.acc)
        if self.softcap:
            z = torch.tanh(z / self.softcap).mul_(self.softcap)
        elif may_alias and out is not None and z.data_ptr() == out.data_ptr():
            z = z.clone()  # grad_into=x: keep this chunk's logits while the gradient overwrites them
        m = z.amax(1, keepdim=True)
        e = torch.sub(z, m) if out is None else torch.sub(z, m, out=out)
        return z, e, m

    def row_terms(self, ri):
        """Probability targets: t' * w for the chunk (``ri``: its x index).  Class indices: columns
        (safe index, w[y], m) with m = 1 counted, 0 ignored, NaN out of range."""
        t = self.target[ri]
        if self.prob:
            t = t.to(self.acc)
            if self.eps > 0:
                t = t * (1 - self.eps) + self.eps / self.C
            return t if self.w is None else t * self.w
        valid, ok = target_masks(t, self.ignore_index, self.C)
        y = _col(torch.where(ok, t, 0).long())
        # 0 in an ignored row: w[0] (its safe index) times the row's 0 would be NaN for a
        # non-finite w[0], where torch's nll_loss writes nothing
        wy = 1.0 if self.w is None else torch.where(_col(valid), self.w.view(-1)[y], 0.0)
        # Python scalars, not 0-d tensors: with many rows per chunk (small C)
        # these few ops per chunk are a visible share of the time.
        m = valid.to(self.acc).masked_fill_(valid ^ ok, float("nan"))  # valid ^ ok: out of range
        return y, wy, _col(m)

    def shifted_sum(self, e: Tensor, rt) -> Tensor | None:
        """sum_c v_c * (z_c - max) while e still holds z - max, for the loss's
        sums over classes (v = t'*w, or w under label smoothing): a common
        offset of the logits, which the softmax ignores, then costs no digits.
        Summed in fp64 for fp32 work: with logits near fp32's range the sum
        over C classes overflows while the loss itself (about the mean) fits."""
        dt = self.wide
        if self.prob:
            return (rt * e).sum(1, keepdim=True, dtype=dt)
        if self.eps > 0:
            return e.sum(1, keepdim=True, dtype=dt) if self.w is None else (e * self.w).sum(1, keepdim=True, dtype=dt)
        return None

    def loss(self, z: Tensor, m: Tensor, ls: Tensor, lse: Tensor, zs: Tensor | None, rt) -> Tensor:
        """Per-row loss of the chunk, as a column like lse, in the wide dtype
        (zs is: the sums are, and the class-index terms are cast per row).
        Formed relative to the row max m (ls = lse - m, zs from shifted_sum),
        never as lse - z, whose two large terms cancel."""
        if self.prob:
            out = ls * rt.sum(1, keepdim=True) - zs
        else:
            y, wy, valid = rt
            out = (ls - (z.gather(1, y).to(self.wide) - m)) * ((1 - self.eps) * wy)
            if self.eps > 0:
                out = out + (self.eps / self.C) * (self.sum_w * ls - zs)
        if self.z_loss:
            lw = lse.to(self.wide)
            out = out + self.z_loss * lw * lw
        if self.prob:
            return out
        # where(), not a multiply: an ignored row stays 0 even if its logits are inf/NaN.
        return torch.where(valid != 0, out * valid, 0.0)

    def degenerate_loss(self) -> Tensor:
        """Per-row loss when x has no elements (no classes, or no rows): 0,
        NaN for a counted class-index row (it is out of range), and NaN in
        every row under label smoothing with C == 0 (torch's eps/C is inf)."""
        rows = self.target.shape if not self.prob else self.target.shape[:1] + self.target.shape[2:]
        out = torch.zeros(rows, dtype=self.wide, device=self.target.device)
        if self.prob:
            return out
        nan = not_ignored(self.target, self.ignore_index)
        if self.eps > 0 and self.C == 0:
            nan = torch.ones_like(nan)
        return out.masked_fill_(nan, float("nan"))

    def grad_(self, e: Tensor, z: Tensor, lse: Tensor, rt, sc, inv_s: Tensor) -> None:
        """e holds exp(z - max) for this chunk; make it d(sum scale*loss)/dx in
        place (inv_s = 1/sum(e) turns e into p = softmax(z))."""
        zterm = 2 * self.z_loss * lse if self.z_loss else 0.0
        if self.prob:
            # sum(sc * t'), as torch's chain rule sums its upstream: with an
            # infinite sc and signed targets that sum is NaN, not +-inf.
            srt = sc * rt
            e.mul_((srt.sum(1, keepdim=True) + sc * zterm) * inv_s).sub_(srt)
        else:
            y, wy, m = rt
            # sm = s*m per row; where() keeps ignored rows exactly 0 even when s is inf.
            sm = torch.where(m != 0, sc * m, 0.0)
            hot = (1 - self.eps) * sm * wy  # B's [c == y] term
            coef = hot
            if self.eps > 0:
                b = sm * (self.eps / self.C)  # B_c = b * w_c off the target class
                coef = hot + b * self.sum_w
            if self.z_loss:
                # scaled apart, as torch's chain rule adds the two terms: an
                # infinite scale and terms of opposite signs give NaN, not inf
                coef = coef + sm * zterm
            if self.eps > 0:
                py = e.gather(1, y)  # exp(z_y - max), before e becomes the gradient
            e.mul_(coef * inv_s)
            if self.eps > 0:
                e.sub_(b * (1.0 if self.w is None else self.w))
                # The target entry as p_y*A - B_y with B_y = b*w_y + hot summed first,
                # as A is (torch's g - p*sum(g) likewise): with one class, where
                # p == 1 and A == B_y bitwise, the gradient is exactly 0.
                e.scatter_(1, y, (py * (coef * inv_s) - (b * wy + hot)).to(e.dtype))
            else:
                e.scatter_add_(1, y, (-hot).expand(y.shape).to(e.dtype))
        if self.softcap:
            # d softcap(x)/dx = 1 - tanh^2 = 1 - (z/cap)^2
            e.mul_(1 - (z / self.softcap).square_())
