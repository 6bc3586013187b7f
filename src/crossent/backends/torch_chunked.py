"""Portable backend: fused cross-entropy from plain torch ops, in row chunks.

Works on any device torch supports.  The logits are visited one cache-sized
chunk at a time, so no fp32 N x C intermediate exists beyond the gradient
itself: per chunk we compute max, exp, sum (-> lse), the loss terms and, when
asked, the gradient, writing it straight into its final buffer.

softmax / log_softmax use torch's own fused kernels (nothing to gain by
re-expressing them in torch ops) and keep torch's autograd, double backward
included.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor

# One chunk is at most this many bytes of fp32 work, and at most 1/16 of the
# whole input so chunk temporaries stay small beside the gradient.  Big
# chunks matter more than cache fit: each op on a chunk is a parallel region
# whose barrier stalls whenever another process holds a core, so fewer, larger
# ops are several times faster on a busy machine (measured on 2 cores: 32 MiB
# chunks 0.7-0.9 s vs 2 MiB chunks 3.7-10 s for 2048 x 32000 under load).
_CHUNK_BYTES = int(os.environ.get("CROSSENT_CHUNK_BYTES", 32 << 20))
_MIN_CHUNK_BYTES = 1 << 20
_HUGE = 2 << 20  # x86-64 transparent huge page size


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------
_libc = None


def _madvise_huge(t: Tensor) -> None:
    """Ask Linux to back a large fresh CPU buffer with 2 MiB pages.

    A fresh N x C gradient is written exactly once; with 4 KiB pages the page
    faults cost as much as the arithmetic (~200 ms for 512 MiB on a 2-core
    machine), with huge pages about a quarter of that.  Only buffers we
    allocate ourselves are advised, never user tensors.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except OSError:
            _libc = False
    if not _libc:
        return
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = (start + _HUGE - 1) // _HUGE * _HUGE, (start + nbytes) // _HUGE * _HUGE
    if hi > lo:
        _libc.madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; failure is harmless


def empty_like_fast(x: Tensor) -> Tensor:
    """A contiguous empty tensor like ``x``; huge-page backed on Linux CPU."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.device.type == "cpu" and out.numel() * out.element_size() >= 8 * _HUGE:
        _madvise_huge(out)
    return out


def _chunks(x: Tensor):
    """Yield (x index, row index) pairs that tile x into ~_CHUNK_BYTES pieces.

    x is (R, C) or (B, C, S); rows are (R,) or (B, S).  A K-dim slice that is
    itself too big is split along S as well.
    """
    C = max(x.shape[1], 1)
    limit = min(_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, x.numel() * 4 // 16))
    budget = max(1, limit // 4 // C)  # rows per chunk
    if x.dim() == 2:
        for r in range(0, x.shape[0], budget):
            sl = slice(r, r + budget)
            yield (sl,), (sl,)
        return
    B, S = x.shape[0], x.shape[2]
    if S <= budget:
        step = max(1, budget // max(S, 1))
        for b in range(0, B, step):
            sl = slice(b, b + step)
            yield (sl,), (sl,)
    else:
        for b in range(B):
            for s in range(0, S, budget):
                bs, ss = slice(b, b + 1), slice(s, s + budget)
                yield (bs, slice(None), ss), (bs, ss)


def _col(v: Tensor) -> Tensor:
    """A per-row value (r,) or (b, s), as a column that broadcasts over C."""
    return v.unsqueeze(1)


def _wcol(w: Tensor, ndim: int) -> Tensor:
    """Class weights (C,) broadcast along dim 1 of an ndim tensor."""
    return w.view(1, -1, *([1] * (ndim - 2)))


class TorchChunkedBackend:
    name = "torch"
    softmax_native_autograd = True

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    # -- cross-entropy -------------------------------------------------------
    def ce_forward(self, x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                   scale, need_grad, grad_into=None):
        k = _Terms(x, target, weight, ignore_index, label_smoothing, z_loss, softcap)
        grad = x.new_empty(0)
        if need_grad:
            grad = grad_into if grad_into is not None else empty_like_fast(x)
        loss, lse = self._sweep(k, x, grad if need_grad else None, scale, with_loss=True)
        return loss, lse, grad

    def ce_backward(self, x, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                    scale):
        # The same sweep as the forward (max and sum recomputed, not taken from
        # the saved lse), so a recomputed gradient is bitwise the forward's one.
        k = _Terms(x, target, weight, ignore_index, label_smoothing, z_loss, softcap)
        grad = empty_like_fast(x)
        self._sweep(k, x, grad, scale, with_loss=False)
        return grad

    @staticmethod
    def _sweep(k: "_Terms", x: Tensor, grad: Tensor | None, scale: Tensor, with_loss: bool):
        """One pass over x in chunks: per-row lse (and loss terms), and the
        gradient into ``grad`` when given."""
        rows = x.shape[:1] + x.shape[2:]
        lse = torch.empty(rows, dtype=k.acc, device=x.device)
        zdot = torch.empty(rows, dtype=k.acc, device=x.device) if with_loss and k.needs_zdot else None
        zy = torch.empty(rows, dtype=k.acc, device=x.device) if with_loss and not k.prob else None
        if x.shape[1] == 0:  # no classes: lse = log(0); any counted row is out of range
            lse.fill_(float("-inf"))
            if k.prob:
                return torch.zeros(rows, dtype=k.acc, device=x.device), lse
            return torch.where(k.valid, float("nan"), 0.0).to(k.acc), lse
        for xi, ri in _chunks(x):
            # Write e = z - max straight into the gradient buffer when dtypes
            # agree: the chunk then lives in one place from here on.
            out = grad[xi] if grad is not None and x.dtype == k.acc else None
            z, e, m = k.logits(x[xi], out)
            e.exp_()
            s = e.sum(1, keepdim=True)
            lse_c = torch.log(s).add_(m)  # (r, 1[, s])
            lse[ri] = lse_c.squeeze(1)
            if zdot is not None:
                zdot[ri] = k.zdot(z, ri)
            if zy is not None:  # the target logit, read before any gradient overwrites it
                zy[ri] = z.gather(1, _col(k.ysafe[ri])).squeeze(1)
            if grad is not None:
                k.grad_(e, z, lse_c, ri, scale, 1.0 / s)
                if out is None:
                    grad[xi].copy_(e)
        return (k.loss(zy, lse, zdot) if with_loss else None), lse

    def rescale_(self, grad: Tensor, g: Tensor) -> None:
        if grad.device.type == "cpu":
            # Reading a CPU scalar is free (no device to sync with); skipping the
            # pass when g == 1 saves a full read+write of the N x C gradient.
            gv = float(g)
            if gv != 1.0:
                grad.mul_(gv)
        else:
            grad.mul_(g.to(grad.dtype))

    # -- softmax -------------------------------------------------------------
    def softmax_forward(self, x: Tensor, dim: int, log: bool) -> Tensor:
        return torch._log_softmax(x, dim, False) if log else torch._softmax(x, dim, False)

    def softmax_backward(self, g, y, dim, log, input_dtype):
        if log:
            return torch._log_softmax_backward_data(g, y, dim, input_dtype)
        return torch._softmax_backward_data(g, y, dim, input_dtype)


class _Terms:
    """The loss and gradient terms of backends/base.py for one call.

    Everything that depends only on targets and weights is computed once for
    all rows (O(N) work); the per-chunk work touches each logit a fixed small
    number of times while the chunk is in cache.
    """

    def __init__(self, x, target, weight, ignore_index, eps, z_loss, softcap):
        dev = x.device
        self.acc = acc = _acc_dtype(x.dtype)
        self.C, self.ndim = x.shape[1], x.dim()
        self.eps, self.z_loss, self.softcap = float(eps), float(z_loss), float(softcap or 0.0)
        self.prob = target.is_floating_point()
        self.w = None if weight is None else weight.to(acc)
        self.sum_w = float(self.C) if weight is None else self.w.sum()
        self.target = target
        # Sum over classes of w_c * z_c is needed for smoothing and probability targets.
        self.needs_zdot = self.prob or self.eps > 0
        self.valid = None
        if self.prob:
            return
        zero = torch.zeros((), dtype=acc, device=dev)
        valid = target != ignore_index
        inb = (target >= 0) & (target < self.C)
        self.ysafe = torch.where(valid & inb, target, torch.zeros((), dtype=target.dtype, device=dev)).long()
        wy = self.w[self.ysafe] if self.w is not None else torch.ones((), dtype=acc, device=dev)
        self.wy = wy
        # m: 1 for counted rows, 0 for ignored ones, NaN for out-of-range targets.
        m = torch.where(valid, torch.ones((), dtype=acc, device=dev), zero)
        self.m = torch.where(valid & ~inb, torch.full((), float("nan"), dtype=acc, device=dev), m)
        self.valid = valid

    def logits(self, xc: Tensor, out: Tensor | None):
        """z = softcap(x) in acc dtype, its row max m, and e = z - m (written
        into ``out`` if given)."""
        z = xc.to(self.acc)
        if self.softcap:
            z = torch.tanh(z / self.softcap).mul_(self.softcap)
        elif out is not None and z.data_ptr() == out.data_ptr():
            z = z.clone()  # grad_into=x: keep this chunk's logits while the gradient overwrites them
        m = z.amax(1, keepdim=True)
        e = torch.sub(z, m) if out is None else torch.sub(z, m, out=out)
        return z, e, m

    def _tw(self, ri) -> Tensor:
        """Probability targets t' * w for this chunk, in acc dtype."""
        t = self.target[ri].to(self.acc)
        if self.eps > 0:
            t = t * (1 - self.eps) + self.eps / self.C
        return t if self.w is None else t * _wcol(self.w, self.ndim)

    def zdot(self, z: Tensor, ri) -> Tensor:
        """Per row: sum_c w_c t'_c z_c (probability) or sum_c w_c z_c (smoothing)."""
        if self.prob:
            return (self._tw(ri) * z).sum(1)
        return z.sum(1) if self.w is None else (z * _wcol(self.w, self.ndim)).sum(1)

    def loss(self, zy: Tensor | None, lse: Tensor, zdot: Tensor | None) -> Tensor:
        """Per-row loss from the per-row lse, target logit zy and zdot."""
        if self.prob:
            tw_sum = self._tw((slice(None),)).sum(1)
            out = lse * tw_sum - zdot
        else:
            out = (lse - zy) * self.wy * (1 - self.eps)
            if self.eps > 0:
                out = out + (self.eps / self.C) * (self.sum_w * lse - zdot)
        if self.z_loss:
            out = out + self.z_loss * lse * lse
        if self.prob:
            return out
        # where(), not a multiply: an ignored row stays 0 even if its logits are inf/NaN.
        return torch.where(self.valid, out * self.m, torch.zeros((), dtype=out.dtype, device=out.device))

    def grad_(self, e: Tensor, z: Tensor, lse_c: Tensor, ri, scale: Tensor, inv_s: Tensor):
        """e holds exp(z - max) for this chunk; make it d(sum scale*loss)/dx in
        place (inv_s = 1/sum(e) turns e into p = softmax(z))."""
        sc = scale if scale.dim() == 0 else _col(scale[ri])
        zterm = 2 * self.z_loss * lse_c if self.z_loss else 0.0
        if self.prob:
            tw = self._tw(ri)
            coef = sc * (tw.sum(1, keepdim=True) + zterm)
            e.mul_(coef * inv_s).sub_(sc * tw)
        else:
            # sm = s*m per row; where() keeps ignored rows exactly 0 even when s is inf.
            m = _col(self.m[ri])
            sm = torch.where(m != 0, sc * m, torch.zeros((), dtype=e.dtype, device=e.device))
            wy = _col(self.wy[ri]) if self.wy.dim() else self.wy
            coef = sm * ((1 - self.eps) * wy + (self.eps / self.C) * self.sum_w + zterm)
            e.mul_(coef * inv_s)
            if self.eps > 0:
                e.sub_(sm * (self.eps / self.C) * (1.0 if self.w is None else _wcol(self.w, self.ndim)))
            hot = (-(1 - self.eps) * sm * wy).expand(_col(self.ysafe[ri]).shape)
            e.scatter_add_(1, _col(self.ysafe[ri]), hot.to(e.dtype))
        if self.softcap:
            # d softcap(x)/dx = 1 - tanh^2 = 1 - (z/cap)^2
            e.mul_(1 - (z / self.softcap).square_())
