"""Cross-entropy kernels for the triton backend (formulas: ``crossent/backends/base.py``).

One generic kernel covers every layout.  The logits are addressed as
``x[b, c, s] = x_ptr + b*sx_b + c*sx_c + s*sx_s``: a last-dim (R, C) input is
B=1, S=R (sx_s = row stride, sx_c = 1); a K-dim (B, C, S) input uses its own
strides, so no transpose copy is ever made.  A program owns a tile of
``BLOCK_S`` positions and a range of classes, and walks the classes in
[BLOCK_S, BLOCK_C] tiles (Triton picks the coalesced axis from the strides).

Paths, and how often each reads the logits (the gradient is always written once):
  FUSED + SINGLE  the whole class range fits one tile (C <= _SINGLE_MAX): the tile
                  stays in registers; loss, lse and gradient from ONE read.
  FUSED, looped   one program per position block walks C twice: an online
                  (max, sumexp) pass, then the gradient pass re-reads its own rows,
                  usually from L2 since the same program just read them: TWO reads.
  PARTIALS +      few positions and a large C: the row is split over NSPLIT programs.
  FINISH          PARTIALS writes (max, sumexp, P1, P2, z[y]) per chunk to a tiny
                  buffer; FINISH combines them and re-reads its chunk for the
                  gradient: TWO reads (a grid-wide sync would be needed to keep the
                  slice on chip, which Triton cannot express safely).
  BWD             ce_backward with the saved lse (class-index targets): ONE read.
Forward without gradient reads the logits once on every path.

Per-row statistics (fp32), kept relative to the running max so that the loss does
not cancel catastrophically when |lse| is large:
  m   running max,  s = sum exp(z - m~)  with m~ = m, or 0 when m is +-inf
  P1  = sum w_c           (class index, smoothing)  |  sum w_c t'_c   (probabilities)
  P2  = sum w_c (z_c - m~)                          |  sum w_c t'_c (z_c - m~)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Launch knobs (module globals so tests can shrink them to reach every path on CPU).
_SINGLE_MAX = 16384     # widest class tile kept in registers (elements); tune on the GPU
_LOOP_BLOCK = 8192      # class tile of the looped / split paths
_TILE_ELEMS = 4096      # tile size when several positions share a program
_KDIM_BLOCK_S = 64      # positions per tile when positions are the contiguous axis

FUSED, PARTIALS, FINISH, BWD = 0, 1, 2, 3  # launch modes (host side)
# The same values for use inside kernels: a compiled (non-interpreted) kernel
# may only read module globals that are tl.constexpr.
K_FUSED, K_PARTIALS, K_FINISH, K_BWD = (tl.constexpr(m) for m in (FUSED, PARTIALS, FINISH, BWD))
_NPART = 5              # partial slots: max, sumexp, P1, P2, z[y]


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _safe(m):
    # A max of +-inf is replaced by 0 as the shift (like torch.logsumexp), so
    # exp(z - shift) never sees inf - inf.
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap) without tl.math.tanh (absent in some Triton versions);
    # a short odd series near 0 avoids the cancellation of 1 - e^{-2|u|}.
    u = x / cap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)                      # in (0, 1]: never overflows
    t = (1.0 - e) / (1.0 + e)
    u2 = u * u
    series = a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.1, series, t)
    return cap * tl.where(u < 0, -t, t)


@triton.jit
def _load_z(x_ptr, x_off, cmask, cap, HAS_CAP: tl.constexpr):
    # [BLOCK_S, BLOCK_C] fp32 logits; softcap BEFORE masking so padded lanes are
    # exactly -inf and never enter the lse.
    z = tl.load(x_ptr + x_off, mask=cmask, other=0.0).to(tl.float32)
    if HAS_CAP:
        z = _softcap(z, cap)
    return tl.where(cmask, z, float("-inf"))


@triton.jit
def _tile_wt(w_ptr, t_ptr, t_off, cols, cmask, C, one_m_eps, eps_over_c,
             HAS_W: tl.constexpr, PROB: tl.constexpr):
    # Per-lane weight of the smoothing / probability terms: w_c or w_c * t'_c, 0 on pads.
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)  # [1, BLOCK_C]
    else:
        w = 1.0
    if PROB:
        t = tl.load(t_ptr + t_off, mask=cmask, other=0.0).to(tl.float32)
        wt = w * (t * one_m_eps + eps_over_c)
    else:
        wt = w + tl.zeros(cmask.shape, tl.float32)
    return tl.where(cmask, wt, 0.0)


@triton.jit
def _grad_tile(z, wt, cols, C, lse, A, y_s, wy_term, sc, valid, inb, cap,
               w_ptr, eps_over_c, HAS_W: tl.constexpr, PROB: tl.constexpr,
               SMOOTH: tl.constexpr, HAS_CAP: tl.constexpr):
    # dz = scale*(p*A - B) in fp32 (so the true-class p - 1 is formed before rounding).
    p = tl.exp(z - lse[:, None])
    if PROB:
        dz = p * A[:, None] - wt
    else:
        dz = p * A[:, None] - tl.where(cols == y_s[:, None], wy_term[:, None], 0.0)
        if SMOOTH:
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
                dz = dz - eps_over_c * w
            else:
                dz = dz - eps_over_c
    dz = dz * sc[:, None]
    if not PROB:
        # Ignored rows: 0 whatever the scale (inf too), but NaN logits stay NaN (p * 0).
        dz = tl.where(inb[:, None], dz, float("nan"))
        dz = tl.where(valid[:, None], dz, p * 0.0)
    if HAS_CAP:
        r = z / cap
        dz = dz * (1.0 - r * r)
    return dz


@triton.jit
def _ce_kernel(
    x_ptr, sx_b, sx_s, sx_c,            # logits x[b, c, s]
    t_ptr, st_b, st_s, st_c,            # class targets y[b, s] or probabilities t[b, c, s]
    w_ptr, sumw_ptr,                    # weight (C,); sum(weight) 0-d (BWD mode only)
    scale_ptr, scale_stride,            # fp32, 0-d (stride 0) or one per position
    loss_ptr, lse_ptr,                  # fp32 (B*S,), position = b*S + s
    g_ptr, sg_b, sg_s, sg_c,            # gradient out (x.dtype)
    part_ptr,                           # fp32 (B*S, NSPLIT, 5) partials of the split path
    S, C, n_sblk, CHUNK,
    ignore_index, one_m_eps, eps_over_c, z_loss, cap,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, NSPLIT: tl.constexpr,
    NSPLIT_P2: tl.constexpr, MODE: tl.constexpr, SINGLE: tl.constexpr,
    HAS_W: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_ZL: tl.constexpr, HAS_CAP: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = pid % NSPLIT
    sblk = (pid // NSPLIT) % n_sblk
    b = pid // (NSPLIT * n_sblk)
    s = sblk * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)          # [BLOCK_S]
    smask = s < S
    pos = b * S + s
    c_lo = split * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, C)
    x_row = b * sx_b + s[:, None] * sx_s                              # [BLOCK_S, 1] int64
    t_row = b * st_b + s[:, None] * st_s
    g_row = b * sg_b + s[:, None] * sg_s
    NEED_P: tl.constexpr = PROB or SMOOTH

    # --- per-position target terms (class index): validity, w[y]
    if PROB:
        valid = smask
        inb = smask
        y_s = tl.zeros([BLOCK_S], tl.int64)
        wy = tl.zeros([BLOCK_S], tl.float32)
    else:
        y = tl.load(t_ptr + b * st_b + s * st_s, mask=smask, other=0).to(tl.int64)
        valid = y != ignore_index
        inb = (y >= 0) & (y < C)
        y_s = tl.where(valid & inb, y, 0)                             # never out of bounds
        if HAS_W:
            wy = tl.load(w_ptr + y_s, mask=smask, other=0.0).to(tl.float32)
        else:
            wy = tl.full([BLOCK_S], 1.0, tl.float32)

    # --- statistics: online (max, sumexp, P1, P2) over this program's classes
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    ssum = tl.zeros([BLOCK_S], tl.float32)
    p1 = tl.zeros([BLOCK_S], tl.float32)
    p2 = tl.zeros([BLOCK_S], tl.float32)
    if SINGLE:
        cols = tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
        cmask = smask[:, None] & (cols < C)
        z1 = _load_z(x_ptr, x_row + cols * sx_c, cmask, cap, HAS_CAP)
        m = tl.max(z1, 1)
        ms = _safe(m)
        ssum = tl.sum(tl.exp(z1 - ms[:, None]), 1)
        wt1 = z1
        if NEED_P:
            wt1 = _tile_wt(w_ptr, t_ptr, t_row + cols * st_c, cols, cmask, C,
                           one_m_eps, eps_over_c, HAS_W, PROB)
            p1 = tl.sum(wt1, 1)
            p2 = tl.sum(tl.where(cmask, wt1 * (z1 - ms[:, None]), 0.0), 1)
    elif MODE != K_BWD and MODE != K_FINISH:
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
            cmask = smask[:, None] & (cols < c_hi)
            z = _load_z(x_ptr, x_row + cols * sx_c, cmask, cap, HAS_CAP)
            m_new = tl.maximum(m, tl.max(z, 1))
            mns = _safe(m_new)
            ssum = ssum * tl.exp(m - mns) + tl.sum(tl.exp(z - mns[:, None]), 1)
            if NEED_P:
                wt = _tile_wt(w_ptr, t_ptr, t_row + cols * st_c, cols, cmask, C,
                              one_m_eps, eps_over_c, HAS_W, PROB)
                p2 = p2 + p1 * (_safe(m) - mns) \
                    + tl.sum(tl.where(cmask, wt * (z - mns[:, None]), 0.0), 1)
                p1 = p1 + tl.sum(wt, 1)
            m = m_new

    # z[y], gathered by the program that owns class y (before anything is written,
    # so grad_into=x is safe).
    zy = tl.zeros([BLOCK_S], tl.float32)
    if not PROB:
        own = smask & valid & inb & (y_s >= c_lo) & (y_s < c_hi)
        if MODE != K_BWD and MODE != K_FINISH:
            zy = tl.load(x_ptr + b * sx_b + s * sx_s + y_s * sx_c, mask=own, other=0.0).to(tl.float32)
            if HAS_CAP:
                zy = _softcap(zy, cap)

    if MODE == K_PARTIALS:
        base = (pos * NSPLIT + split) * 5
        tl.store(part_ptr + base + 0, m, mask=smask)
        tl.store(part_ptr + base + 1, ssum, mask=smask)
        tl.store(part_ptr + base + 2, p1, mask=smask)
        tl.store(part_ptr + base + 3, p2, mask=smask)
        if not PROB:
            tl.store(part_ptr + base + 4, zy, mask=own)
    else:
        if MODE == K_FINISH:
            # combine the NSPLIT partials of each position: [BLOCK_S, NSPLIT_P2]
            j = tl.arange(0, NSPLIT_P2)[None, :]
            jm = smask[:, None] & (j < NSPLIT)
            pb = (pos[:, None] * NSPLIT + j) * 5
            pm = tl.load(part_ptr + pb + 0, mask=jm, other=float("-inf"))
            m = tl.max(pm, 1)
            ms = _safe(m)
            ssum = tl.sum(tl.load(part_ptr + pb + 1, mask=jm, other=0.0) * tl.exp(pm - ms[:, None]), 1)
            if NEED_P:
                pp1 = tl.load(part_ptr + pb + 2, mask=jm, other=0.0)
                pp2 = tl.load(part_ptr + pb + 3, mask=jm, other=0.0)
                p1 = tl.sum(pp1, 1)
                p2 = tl.sum(pp2 + pp1 * (_safe(pm) - ms[:, None]), 1)
            if not PROB:
                zy = tl.load(part_ptr + (pos * NSPLIT + y_s // CHUNK) * 5 + 4,
                             mask=smask & valid & inb, other=0.0)
        ms = _safe(m)
        if MODE == K_BWD:
            lse = tl.load(lse_ptr + pos, mask=smask, other=0.0)
            if SMOOTH:
                if HAS_W:
                    p1 = tl.zeros([BLOCK_S], tl.float32) + tl.load(sumw_ptr).to(tl.float32)
                else:
                    p1 = tl.zeros([BLOCK_S], tl.float32) + C
        else:
            logs = tl.log(tl.where(smask, ssum, 1.0))  # padded positions: no log(0)
            # A +inf logit makes the softmax NaN in torch (inf - inf): keep that.
            lse = tl.where(m == float("inf"), float("nan"), ms + logs)
            if PROB:
                loss = logs * p1 - p2
            else:
                loss = one_m_eps * wy * (ms - zy + logs)
                if SMOOTH:
                    loss += eps_over_c * (logs * p1 - p2)
            if HAS_ZL:
                loss += z_loss * lse * lse
            loss = tl.where(m == float("inf"), float("nan"), loss)
            if not PROB:
                loss = tl.where(inb, loss, float("nan"))
                loss = tl.where(valid, loss, 0.0)
            wmask = smask & ((s * 0 + split) == 0)
            tl.store(loss_ptr + pos, loss, mask=wmask)
            tl.store(lse_ptr + pos, lse, mask=wmask)

        if NEED_GRAD:
            sc = tl.load(scale_ptr + pos * scale_stride, mask=smask, other=0.0).to(tl.float32)
            A = p1                                                    # PROB: sum w t'
            if not PROB:
                A = one_m_eps * wy
                if SMOOTH:
                    A += eps_over_c * p1                              # eps/C * sum(w)
            if HAS_ZL:
                A += 2.0 * z_loss * lse
            wy_term = one_m_eps * wy
            if SINGLE:
                dz = _grad_tile(z1, wt1, cols, C, lse, A, y_s, wy_term, sc,
                                valid, inb, cap, w_ptr, eps_over_c, HAS_W, PROB, SMOOTH, HAS_CAP)
                tl.store(g_ptr + g_row + cols * sg_c, dz.to(g_ptr.dtype.element_ty), mask=cmask)
            else:
                # Re-read of the logits (see module docstring); tile read before it is written.
                for c0 in range(c_lo, c_hi, BLOCK_C):
                    cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
                    cmask = smask[:, None] & (cols < c_hi)
                    z = _load_z(x_ptr, x_row + cols * sx_c, cmask, cap, HAS_CAP)
                    if PROB:
                        wt = _tile_wt(w_ptr, t_ptr, t_row + cols * st_c, cols, cmask, C,
                                      one_m_eps, eps_over_c, HAS_W, PROB)
                    else:
                        wt = z
                    dz = _grad_tile(z, wt, cols, C, lse, A, y_s, wy_term, sc, valid, inb, cap,
                                    w_ptr, eps_over_c, HAS_W, PROB, SMOOTH, HAS_CAP)
                    tl.store(g_ptr + g_row + cols * sg_c, dz.to(g_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _rescale_kernel(g_ptr, s_ptr, n, BLOCK: tl.constexpr):
    # grad *= s in place.  Every program reads s and masks all its memory traffic
    # off when s == 1, so the usual loss.backward() costs one launch, no host sync.
    sc = tl.load(s_ptr).to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < n) & ((tl.zeros([BLOCK], tl.float32) + sc) != 1.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs, (g * sc).to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tests reach the split path with tiny shapes


def tile_shape(C: int, S: int, classes_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) for a [positions x classes] tile (shared with softmax)."""
    np2c = triton.next_power_of_2(C)
    if classes_contiguous:
        # the (R, C) case: wide class tiles, rows packed when C is small
        block_c = np2c if np2c <= _SINGLE_MAX else min(_LOOP_BLOCK, np2c)
        return max(1, min(triton.next_power_of_2(S), _TILE_ELEMS // block_c)), block_c
    # positions contiguous (K-dim (B, C, S)): coalesce along S, loop over C
    block_s = min(triton.next_power_of_2(S), _KDIM_BLOCK_S)
    return block_s, min(np2c, max(1, _TILE_ELEMS // block_s))


def _plan(B: int, S: int, C: int, sx_s: int, sx_c: int, device: torch.device) -> dict:
    """Tile shape, split and warps, from shapes and strides only (no device reads)."""
    block_s, block_c = tile_shape(C, S, sx_c == 1 or sx_s != 1)
    n_sblk = triton.cdiv(S, block_s)
    progs = B * n_sblk
    ntiles = triton.cdiv(C, block_c)
    nsplit = 1
    if ntiles > 1 and progs < 2 * _num_sms(device):
        nsplit = min(ntiles, triton.cdiv(4 * _num_sms(device), progs))
    chunk = triton.cdiv(triton.cdiv(C, nsplit), block_c) * block_c
    nsplit = triton.cdiv(C, chunk)
    tile = block_s * block_c
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, n_sblk=n_sblk, NSPLIT=nsplit,
                NSPLIT_P2=triton.next_power_of_2(nsplit), CHUNK=chunk,
                SINGLE=(ntiles == 1), num_warps=max(4, min(16, tile // 512)))


def _layout(x: torch.Tensor, target: torch.Tensor, prob: bool):
    """(B, S, C) and strides of x / target as the kernel addresses them."""
    if x.dim() == 3 and x.shape[2] != 1:
        B, C, S = x.shape
        xs = (x.stride(0), x.stride(2), x.stride(1))
        ts = (target.stride(0), target.stride(2), target.stride(1)) if prob else \
             (target.stride(0), target.stride(1), 0)
    else:  # (R, C) or (B, C, 1): one batch of S = R positions
        B, C, S = 1, x.shape[1], x.shape[0]
        xs = (0, x.stride(0), x.stride(1))
        ts = (0, target.stride(0), target.stride(1)) if prob else (0, target.stride(0), 0)
    return B, S, C, xs, ts


def _grad_strides(g: torch.Tensor):
    if g.dim() == 3 and g.shape[2] != 1:
        return g.stride(0), g.stride(2), g.stride(1)
    return 0, g.stride(0), g.stride(1)


def _launch(mode, x, target, weight, lse, ignore_index, eps, z_loss, softcap, scale,
            need_grad, grad):
    prob = target.is_floating_point()
    B, S, C, xs, ts = _layout(x, target, prob)
    dev = x.device
    out_shape = (x.shape[0],) + tuple(x.shape[2:])
    plan = _plan(B, S, C, xs[1], xs[2], dev)
    nsplit = plan["NSPLIT"]
    if mode == FUSED and nsplit > 1:
        mode = PARTIALS
    loss = torch.empty(out_shape, device=dev, dtype=torch.float32)
    if lse is None:
        lse = torch.empty(out_shape, device=dev, dtype=torch.float32)
    part = torch.empty((B * S, nsplit, 5) if nsplit > 1 else (1,), device=dev, dtype=torch.float32)
    if scale.numel() == 1:
        scale_t, scale_stride = scale.reshape(()).to(torch.float32), 0
    else:
        scale_t, scale_stride = scale.to(torch.float32).contiguous(), 1
    has_w = weight is not None
    w = weight if has_w else x           # dummy pointer, never read
    sumw = weight.sum(dtype=torch.float32) if (has_w and mode == BWD) else loss
    g = grad if grad is not None else x  # dummy pointer when no gradient
    gs = _grad_strides(g)
    smooth = eps > 0.0
    common = dict(ignore_index=ignore_index, one_m_eps=1.0 - eps, eps_over_c=eps / C,
                  z_loss=z_loss, cap=softcap if softcap else 1.0,
                  BLOCK_S=plan["BLOCK_S"], BLOCK_C=plan["BLOCK_C"], NSPLIT=nsplit,
                  NSPLIT_P2=plan["NSPLIT_P2"], SINGLE=plan["SINGLE"],
                  HAS_W=has_w, PROB=prob, SMOOTH=smooth, HAS_ZL=z_loss != 0.0,
                  HAS_CAP=bool(softcap), num_warps=plan["num_warps"])
    args = (x, xs[0], xs[1], xs[2], target, ts[0], ts[1], ts[2], w, sumw,
            scale_t, scale_stride, loss, lse, g, gs[0], gs[1], gs[2], part,
            S, C, plan["n_sblk"], plan["CHUNK"])
    grid_full = (B * plan["n_sblk"] * nsplit,)
    if mode == PARTIALS:
        _ce_kernel[grid_full](*args, MODE=PARTIALS, NEED_GRAD=False, **common)
        if need_grad:
            _ce_kernel[grid_full](*args, MODE=FINISH, NEED_GRAD=True, **common)
        else:
            # loss only: one finishing program per position block (split index 0)
            _ce_kernel[grid_full](*args, MODE=FINISH, NEED_GRAD=False, **common)
    else:
        _ce_kernel[grid_full](*args, MODE=mode, NEED_GRAD=need_grad, **common)
    return loss, lse


def _torch_backend():
    from crossent.backends import load
    return load("torch")


# ----------------------------------------------------------------------------- backend methods

def ce_forward(x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
               scale, need_grad, grad_into=None):
    if x.dtype == torch.float64:  # fp64 math is left to the portable backend
        return _torch_backend().ce_forward(x, target, weight, ignore_index, label_smoothing,
                                           z_loss, softcap, scale, need_grad, grad_into)
    empty = x.new_empty(0)
    grad = None
    if need_grad:
        grad = grad_into if grad_into is not None else torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        out_shape = (x.shape[0],) + tuple(x.shape[2:])
        z = torch.zeros(out_shape, device=x.device, dtype=torch.float32)
        return z, z.clone(), (empty if grad is None or grad_into is not None else grad)
    loss, lse = _launch(FUSED, x, target, weight, None, int(ignore_index), float(label_smoothing),
                        float(z_loss), float(softcap or 0.0), scale, need_grad, grad)
    if grad is None or grad_into is not None:
        grad = empty
    return loss, lse, grad


def ce_backward(x, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, scale):
    if x.dtype == torch.float64:
        return _torch_backend().ce_backward(x, target, weight, lse, ignore_index, label_smoothing,
                                            z_loss, softcap, scale)
    if target.is_floating_point() or x.numel() == 0:
        # P1 = sum w t' needs a full row reduction of the targets: recompute everything.
        return ce_forward(x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                          scale, True)[2]
    grad = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch(BWD, x, target, weight, lse.to(torch.float32).contiguous(), int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap or 0.0), scale, True, grad)
    return grad


def rescale_(grad, g):
    if grad.numel() == 0:
        return
    if not grad.is_contiguous() or grad.dtype == torch.float64:
        grad.mul_(g)  # the kernel multiplies in fp32
        return
    block = 4096
    _rescale_kernel[(triton.cdiv(grad.numel(), block),)](grad, g, grad.numel(), BLOCK=block,
                                                         num_warps=8)
