"""A block of classes' cross-entropy gradient from saved lse, in place (triton backend).

linear_cross_entropy's compact policy recomputes the logits of all tokens one block of
classes [v0, v0 + vb) at a time (crossent/_linear_ops.py, vocab pass): this kernel turns
that (rows, vb) block, in the input's dtype, into its gradient where it lies, from the
rows' lse saved by the token pass.  One read and one write per logit, fp32 math, rounded
once (the torch backend's recompute makes an fp32 copy and ~6 passes over it).

Formulas: ``crossent/backends/base.py``, with the device helpers the cross-entropy kernels
use (``_jit.py``), p = exp((z - lse) - lse_lo) from the saved lse and its rounding error
(the block never holds the row max; z - lse is exact near it, so a common offset of 1e4
costs no accuracy).  Row terms (target, its weight, scale, lse) are read once per tile row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch_block
from . import _device, _launch
from ._jit import _as_logits, _class_terms, _grad, _row_coefs, _target_terms
from .ce import _scale_arg

_TILE_ELEMS = 4096   # logits per program: 32 per thread at 4 warps (46-93 registers, no spills)
_MAX_BLOCK_V = 1024  # classes per tile; rows fill the rest


@triton.jit
def _block_grad_kernel(
    z_ptr, sz_r,                        # (R, VB) logits of classes [v0, v0 + VB), unit column stride
    t_ptr, st_r, st_c,                  # class targets (R,) or probabilities (R, C) over ALL classes
    w_ptr,                              # class weight (C,), contiguous
    lse_ptr, lo_ptr,                    # saved lse (R,) fp32 and its rounding error
    scale_ptr, scale_stride,            # scale 0-d (stride 0) or per row
    p1_ptr,                             # probabilities: sum_c w_c t'_c per row; class index: sum(w), 0-d
    R, VB, v0, C, n_vblk,
    ignore_index, one_m_eps, eps_over_c, z_loss, cap,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_W: tl.constexpr, PROB: tl.constexpr,
    SMOOTH: tl.constexpr, HAS_ZL: tl.constexpr, HAS_CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    rb = pid // n_vblk
    r = rb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)      # [BLOCK_R]
    rmask = r < R
    loc = (pid % n_vblk) * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]          # [1, BLOCK_V] in the block
    cmask = rmask[:, None] & (loc < VB)
    cols = (v0 + loc).to(tl.int64)                                          # global class index
    NEED_P: tl.constexpr = PROB or SMOOTH

    # --- per-row terms (as ce_tile.py's): validity, w[y], scale, lse
    valid, inb, y_s, wy = _target_terms(t_ptr, r * st_r, rmask, w_ptr, ignore_index, C,
                                        -1, HAS_W, PROB)   # y_s -1: matches no class
    if PROB:
        p1 = tl.load(p1_ptr + r, mask=rmask, other=0.0).to(tl.float32)
    elif HAS_W and SMOOTH:
        p1 = tl.load(p1_ptr).to(tl.float32) + tl.zeros([BLOCK_R], tl.float32)
    else:
        p1 = tl.zeros([BLOCK_R], tl.float32) + C   # read only when smoothing
    sc = tl.load(scale_ptr + r * scale_stride, mask=rmask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + r, mask=rmask, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + r, mask=rmask, other=0.0).to(tl.float32)
    # lse in place of (shift, log sumexp): _row_coefs only uses their sum (the z-loss term)
    a2, b2, c2 = _row_coefs(wy, p1, lse, 0.0, sc, valid, inb, one_m_eps, eps_over_c, z_loss,
                            PROB, SMOOTH, HAS_ZL)
    a2 = a2 + tl.zeros([BLOCK_R], tl.float32)
    b2 = b2 + tl.zeros([BLOCK_R], tl.float32)
    c2 = c2 + tl.zeros([BLOCK_R], tl.float32)

    # --- the tile: one read, one write
    ptr = z_ptr + r[:, None] * sz_r + loc
    z = _as_logits(tl.load(ptr, mask=cmask, other=0.0, eviction_policy="evict_first"), cmask, cap, HAS_CAP)
    p = tl.exp((z - lse[:, None]) - lo[:, None])
    wt = z
    if NEED_P:
        wt = _class_terms(w_ptr, t_ptr, r[:, None] * st_r + cols * st_c, cols, cmask, C,
                          one_m_eps, eps_over_c, HAS_W, PROB)
    dz = _grad(p, wt, cols == y_s[:, None], a2[:, None], b2[:, None], c2[:, None], z, cap, NEED_P, HAS_CAP)
    tl.store(ptr, dz.to(z_ptr.dtype.element_ty), mask=cmask)


def tile(R: int, VB: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_V) of a program: up to _MAX_BLOCK_V classes, rows filling _TILE_ELEMS."""
    block_v = min(_MAX_BLOCK_V, max(16, _device.next_pow2(VB)))
    return max(1, min(_device.next_pow2(R), _TILE_ELEMS // block_v)), block_v


def block_grad_scratch(dtype: torch.dtype, softcap: bool, prob: bool) -> int:
    """Backend method: none (in place), but fp64 blocks take the torch backend's math."""
    return torch_block.block_grad_scratch(dtype, softcap, prob) if dtype == torch.float64 else 0


def block_grad_(z, v0, C, target, lse, scale, weight, ignore_index, label_smoothing, z_loss, softcap,
                tw_sum, lse_lo=None):
    """Backend method (contract: backends/base.py): z <- its gradient, in place."""
    R, VB = z.shape
    if z.dtype == torch.float64 or z.stride(1) != 1:   # the portable backend's math (fp64 as ce_forward)
        return torch_block.block_grad_(z, v0, C, target, lse, scale, weight, ignore_index, label_smoothing,
                                       z_loss, softcap, tw_sum, lse_lo)
    if z.numel() == 0:
        return z
    prob = target.is_floating_point()
    eps = float(label_smoothing)
    if prob:
        p1 = tw_sum
    elif weight is not None and eps > 0.0:
        p1 = weight.sum(dtype=torch.float32)   # smoothing's sum(w) over all C classes, on the device
    else:
        p1 = lse   # not read
    w = z if weight is None else weight.contiguous()   # z: a dummy pointer, never read
    lo = torch.zeros_like(lse) if lse_lo is None else lse_lo   # None: an exact lse
    sc, sc_stride = _scale_arg(scale)
    block_r, block_v = tile(R, VB)
    n_vblk = _device.cdiv(VB, block_v)
    launch = _launch.launcher(_block_grad_kernel, BLOCK_R=block_r, BLOCK_V=block_v, HAS_W=weight is not None,
                              PROB=prob, SMOOTH=eps > 0.0, HAS_ZL=z_loss != 0.0, HAS_CAP=bool(softcap),
                              num_warps=4)
    launch((_device.cdiv(R, block_r) * n_vblk,), z, z.stride(0), target, target.stride(0),
           target.stride(1) if prob else 0, w, lse, lo, sc, sc_stride, p1, R, VB, v0, C, n_vblk,
           int(ignore_index), 1.0 - eps, eps / C, float(z_loss), float(softcap) if softcap else 1.0)
    return z
