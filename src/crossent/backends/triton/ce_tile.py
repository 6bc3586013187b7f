"""The body of the cross-entropy tile kernel (``ce._ce_kernel``): one tile of BLOCK_S
positions x BLOCK_C classes, the loss, lse and gradient of each position.

The logits are addressed as ``x[b, c, s] = x_ptr + b*sx_b + c*sx_c + s*sx_s`` (see ce.py);
SINGLE holds a position's classes in one tile (ONE read), otherwise an online (max, sumexp)
pass over the class tiles precedes the gradient pass (TWO reads, the second mostly from L2).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (_as_logits, _class_terms, _grad, _inv_sum, _log_sum, _loss, _loss_as, _lse, _row_coefs,
                   _safe, _scaled_shift, _softcap, _target_terms)


@triton.jit
def _ce_tile(
    x_ptr, sx_b, sx_s, sx_c, t_ptr, st_b, st_s, st_c, w_ptr, scale_ptr, scale_stride,
    loss_ptr, lse_ptr, g_ptr, sg_b, sg_s, sg_c, inv_den, tile, S, C, n_sblk,
    ignore_index, one_m_eps, eps_over_c, z_loss, cap,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
    HAS_W: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_ZL: tl.constexpr, HAS_CAP: tl.constexpr, NEED_GRAD: tl.constexpr,
    KEEP_L2: tl.constexpr, REVERSE: tl.constexpr, REDUCE: tl.constexpr,
):
    sblk = tile % n_sblk
    b = tile // n_sblk
    s = sblk * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)          # [BLOCK_S]
    smask = s < S
    pos = b * S + s
    x_row = b * sx_b + s[:, None] * sx_s                              # [BLOCK_S, 1] int64
    t_row = b * st_b + s[:, None] * st_s
    NEED_P: tl.constexpr = PROB or SMOOTH

    # --- per-position target terms (class index): validity, w[y], z[y]
    valid, inb, y_s, wy = _target_terms(t_ptr + b * st_b, s * st_s, smask, w_ptr, ignore_index, C,
                                        0, HAS_W, PROB)   # y_s never out of bounds
    if PROB:
        zy = tl.zeros([BLOCK_S], tl.float32)
    else:
        # read before anything is written, so grad_into=x is safe
        zy = tl.load(x_ptr + b * sx_b + s * sx_s + y_s * sx_c, mask=smask & valid & inb,
                     other=0.0).to(tl.float32)
        if HAS_CAP:
            zy = _softcap(zy, cap)

    # --- statistics relative to the row max: (max, sumexp, P1, P2), see split.py
    p1 = tl.zeros([BLOCK_S], tl.float32)
    p2 = tl.zeros([BLOCK_S], tl.float32)
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)[None, :]                         # int32: fewer registers
        cmask = smask[:, None] & (cols < C)
        z1 = _as_logits(tl.load(x_ptr + x_row + cols.to(tl.int64) * sx_c, mask=cmask, other=0.0,
                                eviction_policy="evict_first"), cmask, cap, HAS_CAP)
        m = tl.max(z1, 1)
        ms = _safe(m)
        e1 = tl.exp(z1 - ms[:, None])                                 # kept for the gradient
        ssum = tl.sum(e1, 1)
        wt1 = z1
        if NEED_P:
            wt1 = _class_terms(w_ptr, t_ptr, t_row + cols.to(tl.int64) * st_c, cols, cmask, C,
                               one_m_eps, eps_over_c, HAS_W, PROB)
            p1 = tl.sum(wt1, 1)
            p2 = tl.sum(tl.where(cmask, wt1 * _scaled_shift(z1, ms[:, None]), 0.0), 1)   # _jit.py
    else:
        m = tl.full([BLOCK_S], float("-inf"), tl.float32)
        ssum = tl.zeros([BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
            cmask = smask[:, None] & (cols < C)
            # evict_last: the gradient pass re-reads this tile, from L2 if it stayed
            if KEEP_L2:
                raw = tl.load(x_ptr + x_row + cols * sx_c, mask=cmask, other=0.0,
                              eviction_policy="evict_last")
            else:
                raw = tl.load(x_ptr + x_row + cols * sx_c, mask=cmask, other=0.0)
            z = _as_logits(raw, cmask, cap, HAS_CAP)
            m_new = tl.maximum(m, tl.max(z, 1))
            mns = _safe(m_new)
            ssum = ssum * tl.exp(m - mns) + tl.sum(tl.exp(z - mns[:, None]), 1)
            if NEED_P:
                wt = _class_terms(w_ptr, t_ptr, t_row + cols * st_c, cols, cmask, C,
                                  one_m_eps, eps_over_c, HAS_W, PROB)
                p2 = p2 + p1 * _scaled_shift(_safe(m), mns) \
                    + tl.sum(tl.where(cmask, wt * _scaled_shift(z, mns[:, None]), 0.0), 1)
                p1 = p1 + tl.sum(wt, 1)
            m = m_new
        ms = _safe(m)

    logs = _log_sum(tl.where(smask, ssum, 1.0), m)   # padded positions: no log(0)
    loss = _loss(ms, logs, zy, wy, p1, p2, one_m_eps, eps_over_c, z_loss, valid, inb,
                 PROB, SMOOTH, HAS_ZL)
    if REDUCE == 0:
        tl.store(loss_ptr + pos, _loss_as(loss, loss_ptr.dtype.element_ty), mask=smask)
    tl.store(lse_ptr + pos, _lse(ms, logs, m, ssum, lse_ptr), mask=smask)

    if NEED_GRAD:
        g_row = b * sg_b + s[:, None] * sg_s
        if REDUCE == 0:
            sc = tl.load(scale_ptr + pos * scale_stride, mask=smask, other=0.0).to(tl.float32)
        else:
            sc = inv_den + tl.zeros([BLOCK_S], tl.float32)
        a2, b2, c2 = _row_coefs(wy, p1, ms, logs, sc, valid, inb, one_m_eps, eps_over_c, z_loss,
                                PROB, SMOOTH, HAS_ZL)
        a2 = a2 + tl.zeros([BLOCK_S], tl.float32)
        b2 = b2 + tl.zeros([BLOCK_S], tl.float32)
        c2 = c2 + tl.zeros([BLOCK_S], tl.float32)
        y_loc = y_s.to(tl.int32)[:, None]                             # y_s < C < 2**31
        if SINGLE:
            p = e1 * _inv_sum(ssum, m)[:, None]
            dz = _grad(p, wt1, cols == y_loc, a2[:, None], b2[:, None], c2[:, None], z1, cap,
                       NEED_P, HAS_CAP)
            tl.store(g_ptr + g_row + cols.to(tl.int64) * sg_c, dz.to(g_ptr.dtype.element_ty), mask=cmask,
                     eviction_policy="evict_first")
        else:
            # REVERSE: the gradient pass walks the class tiles last to first, so it starts
            # with the tiles the statistics pass read last, the likeliest still in L2 (a
            # row of 128k bf16 classes is 256 KB; ~264 of them in flight overflow L2).
            n_ct = tl.cdiv(C, BLOCK_C)
            for i in range(0, n_ct):
                if REVERSE:
                    c0 = (n_ct - 1 - i) * BLOCK_C
                else:
                    c0 = i * BLOCK_C
                cols = c0 + tl.arange(0, BLOCK_C)[None, :]
                cmask = smask[:, None] & (cols < C)
                z = _as_logits(tl.load(x_ptr + x_row + cols.to(tl.int64) * sx_c, mask=cmask, other=0.0,
                                       eviction_policy="evict_first"), cmask, cap, HAS_CAP)
                wt = z
                if NEED_P:
                    wt = _class_terms(w_ptr, t_ptr, t_row + cols.to(tl.int64) * st_c, cols, cmask, C,
                                      one_m_eps, eps_over_c, HAS_W, PROB)
                p = tl.exp((z - ms[:, None]) - logs[:, None])
                dz = _grad(p, wt, cols == y_loc, a2[:, None], b2[:, None], c2[:, None], z, cap,
                           NEED_P, HAS_CAP)
                tl.store(g_ptr + g_row + cols.to(tl.int64) * sg_c, dz.to(g_ptr.dtype.element_ty), mask=cmask,
                         eviction_policy="evict_first")
    return tl.where(smask, loss, 0.0).to(tl.float64)
