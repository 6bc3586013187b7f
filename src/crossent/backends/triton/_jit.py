"""Device-side helpers shared by the cross-entropy and softmax kernels.

Per-row statistics are kept relative to the row max ``m`` (shift ``ms`` = m, or 0
when m is +-inf, like torch.logsumexp): the loss is ``(ms - z[y]) + log(sumexp)``
and the softmax ``exp((z - ms) - log(sumexp))``, never ``z - lse`` with a rounded
lse, so a common offset of 1e4 costs no accuracy (issue 9, item 4).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _safe(m):
    # A max of +-inf is replaced by 0 as the shift, so exp(z - shift) never sees inf - inf.
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _class_block(c0, smask, C, BLOCK_C: tl.constexpr):
    # Classes [c0, c0 + BLOCK_C) of a [positions x classes] tile: int64 offsets [1, BLOCK_C],
    # and the mask of the (position, class) pairs that exist.
    cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
    return cols, smask[:, None] & (cols < C)


@triton.jit
def _log_sum(ssum, m):
    # log(sumexp); NaN for a row with a +inf logit (torch's softmax is NaN there: inf - inf).
    return tl.where(m == float("inf"), float("nan"), tl.log(ssum))


@triton.jit
def _lse(ms, logs, m, ssum, lse_ptr):
    # The stored lse, as torch.logsumexp: +inf for a row whose max is +inf (logs is
    # NaN there, for the loss and softmax), NaN if the row also holds a NaN (ssum).
    # Added in lse_ptr's dtype: an fp64 buffer keeps ms + logs unrounded (ce.ce_forward's lse_lo).
    return tl.where((m == float("inf")) & (ssum == ssum), m, ms.to(lse_ptr.dtype.element_ty) + logs)


# P2 = sum_c wt_c (z_c - shift), the probability / smoothing sum over classes, is summed
# scaled by 2**-32: with logits near fp32's range it overflows fp32 where the row's loss,
# formed in fp64 (_loss), fits.  A power of two scales exactly (only a term below 2**-94,
# far below an ulp of any loss it enters, rounds differently); the scaled difference is
# one FMA per element, on the probability and smoothing paths only.
_P2_SCALE = tl.constexpr(2.0 ** -32)


@triton.jit
def _scaled_shift(z, shift):
    # (z - shift) * _P2_SCALE (shift * _P2_SCALE: per row)
    return tl.fma(z, _P2_SCALE, -(shift * _P2_SCALE))


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap) without tl.math.tanh (absent in some Triton versions);
    # a short odd series near 0 avoids the cancellation of 1 - e^{-2|u|}.  Near 1
    # (e < 1/4) as 1 - 2e/(1 + e), rounded once: (1 - e)/(1 + e) rounded 1 - e and
    # 1 + e to 1 first, so tanh was exactly 1, and the gradient's 1 - (z/cap)^2
    # exactly 0, from |u| > 8.7, where torch's tanh is 1 - 2^-24 up to |u| = 9.
    u = x / cap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)                      # in (0, 1]: never overflows
    t = tl.where(e < 0.25, 1.0 - 2.0 * e / (1.0 + e), (1.0 - e) / (1.0 + e))
    u2 = u * u
    series = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.1, series, t)
    return cap * tl.where(u < 0, -t, t)


@triton.jit
def _as_logits(raw, cmask, cap, HAS_CAP: tl.constexpr):
    # loaded logits -> fp32; softcap BEFORE masking so padded lanes are exactly
    # -inf and never enter the lse (Unsloth #10616).
    z = raw.to(tl.float32)
    if HAS_CAP:
        z = _softcap(z, cap)
    return tl.where(cmask, z, float("-inf"))


@triton.jit
def _class_terms(w_ptr, t_ptr, t_off, cols, cmask, C, one_m_eps, eps_over_c,
                 HAS_W: tl.constexpr, PROB: tl.constexpr):
    # Per-lane weight of the smoothing / probability terms, 0 on pads:
    # class index: w_c (the eps/C * w_c part of the gradient); probabilities: w_c * t'_c.
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = 1.0
    if PROB:
        t = tl.load(t_ptr + t_off, mask=cmask, other=0.0).to(tl.float32)
        wt = w * (t * one_m_eps + eps_over_c)
    else:
        wt = w + tl.zeros(cmask.shape, tl.float32)
    return tl.where(cmask, wt, 0.0)


@triton.jit
def _target_terms(t_ptr, t_off, rmask, w_ptr, ignore_index, C, NO_CLASS: tl.constexpr,
                  HAS_W: tl.constexpr, PROB: tl.constexpr):
    # A block of rows' target terms: (valid, inb, y_s, wy) = counted (not ignore_index),
    # class in [0, C), that class as a safe index (NO_CLASS where either fails), w[y_s].
    # NO_CLASS 0 keeps y_s a readable offset (ce_tile.py reads z[y]); -1 matches no class
    # of a block of columns (block_grad.py).  Either way wy is 0 there.  Probability
    # targets: every row counted and in range, y_s -1, wy 0 (the terms go unused).
    if PROB:
        valid = rmask
        inb = rmask
        y_s = tl.full(rmask.shape, -1, tl.int64)
        wy = tl.zeros(rmask.shape, tl.float32)
    else:
        # int64 compare: a uint8 target 156 is class 156 whatever ignore_index is
        y = tl.load(t_ptr + t_off, mask=rmask, other=0).to(tl.int64)
        valid = y != ignore_index
        inb = (y >= 0) & (y < C)
        y_s = tl.where(valid & inb, y, NO_CLASS)
        wy = tl.full(rmask.shape, 1.0, tl.float32)
        if HAS_W:   # 0 where not counted or out of range: a non-finite w[0] times an ignored row's 0 is NaN
            wy = tl.load(w_ptr + y_s, mask=rmask & valid & inb, other=0.0).to(tl.float32)
    return valid, inb, y_s, wy


@triton.jit
def _loss(ms, logs, zy, wy, p1, p2, one_m_eps, eps_over_c, z_loss, valid, inb,
          PROB: tl.constexpr, SMOOTH: tl.constexpr, HAS_ZL: tl.constexpr):
    # Per-row loss from statistics relative to the shift ms (formulas: base.py), in
    # fp64 (O(rows) work): a row's loss can exceed fp32's range where the sum or mean
    # of the rows fits.  p2 comes scaled by _P2_SCALE.
    ms = ms.to(tl.float64)
    logs = logs.to(tl.float64)
    if PROB or SMOOTH:
        dot = logs * p1.to(tl.float64) - p2.to(tl.float64) * (1.0 / _P2_SCALE)
    if PROB:
        loss = dot
    else:
        loss = one_m_eps * wy * ((ms - zy.to(tl.float64)) + logs)
        if SMOOTH:
            loss += eps_over_c * dot
    if HAS_ZL:
        lse = ms + logs
        loss += z_loss * lse * lse
    if not PROB:
        loss = tl.where(inb, loss, float("nan"))   # target out of [0, C): NaN, never OOB
        loss = tl.where(valid, loss, 0.0)
    return loss


@triton.jit
def _loss_as(loss, ty: tl.constexpr):
    # _loss's fp64 row loss in a loss buffer's dtype: a narrower one through fp32, as torch
    # rounds its fp32 loss (and the interpreter's fp64 -> bf16 cast is wrong)
    if ty.is_fp64():
        return loss
    return loss.to(tl.float32).to(ty)


@triton.jit
def _row_coefs(wy, p1, ms, logs, sc, valid, inb, one_m_eps, eps_over_c, z_loss,
               PROB: tl.constexpr, SMOOTH: tl.constexpr, HAS_ZL: tl.constexpr):
    # dz = scale*(p*A - B) as dz = p*a2 - [c == y]*b2 - wt*c2, with every row-uniform
    # factor folded into the three scalars, so a tile costs two multiplies per element.
    # A: sum_c w_c t'_c (probabilities), or (1-eps) w[y] + eps/C sum(w) (class index;
    # p1 = sum(w) when smoothing); + 2 zl lse, scaled apart (below).
    if PROB:
        f = sc
        b2 = 0.0 * sc
        c2 = sc
        a2 = f * p1
    else:
        # Ignored rows: 0 whatever the scale (inf too); NaN logits stay NaN (p * 0).
        # A target outside [0, C) that is not ignored: NaN.
        f = tl.where(valid, tl.where(inb, sc, float("nan")), 0.0)
        b2 = f * (one_m_eps * wy)
        c2 = f * eps_over_c
        a2 = b2
        if SMOOTH:
            # summed as _grad sums the target's B (b2 + w_y*c2): the same bits for one class
            a2 += c2 * p1
    if HAS_ZL:
        # scaled apart, as torch's chain rule adds the two terms: an infinite scale
        # (1/W for W == 0) times a zero cross-entropy part is NaN, not the z part's inf
        a2 += f * (2.0 * z_loss * (ms + logs))
    return a2, b2, c2


@triton.jit
def _grad(p, wt, is_y, a2, b2, c2, z, cap, NEED_P: tl.constexpr, HAS_CAP: tl.constexpr):
    # p = softmax (fp32), so the true-class p - 1 is formed before rounding.
    if NEED_P:
        # the target's B = b2 + w_y*c2 summed before it is subtracted, as a2 was:
        # exactly 0 for one class (p == 1), as torch's g - p*sum(g)
        bc = wt * c2
        dz = p * a2 - tl.where(is_y, b2 + bc, bc)
    else:
        dz = p * a2 - tl.where(is_y, b2, 0.0)
    if HAS_CAP:
        r = z / cap
        dz = dz * (1.0 - r * r)
    return dz


@triton.jit
def _inv_sum(ssum, m):
    # 1 / sumexp, NaN for a row with a +inf logit (see _log_sum)
    return tl.where(m == float("inf"), float("nan"), 1.0 / ssum)
