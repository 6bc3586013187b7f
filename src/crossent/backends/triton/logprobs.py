"""Triton kernels for crossent.log_probs / linear_log_probs (math: ``crossent/_logprobs_ops.py``).

Logits are (R, V) rows (any row stride, classes contiguous or strided).  A
program owns BLOCK_R rows and walks their classes in [BLOCK_R, BLOCK_V] tiles.

  forward   ONE read of the logits: an online pass keeps, per row, the running
            max m, s = sum exp(z - m) and s1 = sum exp(z - m) * (z - m), both
            rescaled when m grows, so (m, log s), the entropy log s - s1 / s and
            (one gathered element) z[y] are formed while each tile is on chip.  When
            the row fits one tile it is loaded once and stays in registers.
  backward  ONE read: from the saved (m, log s) and entropy, each tile's gradient
            a * ([c == y] - p) - b * p * (L + H), L = (z - m) - log s (rounded
            like log_softmax, not to an ulp of |lse|), is written as soon as it
            is read (a, b: the upstream gradients divided by T, 0 at ignored
            rows), so the output may be the logits buffer itself.
z = x * (1/T), within an ulp of the reference's x / T.  fp64 is left to the
portable kernels.  A -inf logit contributes 0 log 0 = 0.  One program per
BLOCK_R rows: a handful of very long rows use few SMs (RL batches have
thousands of tokens; the cross-entropy kernels' split path is not needed here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device, _launch
from ._jit import _safe
from .ce import tile_shape

# As crossent._logprobs_ops: exp(-1024) == 0, and p * L stays finite.  A compiled
# kernel may only read module globals that are tl.constexpr.
_FLOOR = tl.constexpr(-1024.0)


@triton.jit
def _rows(pid, R, BLOCK_R: tl.constexpr):
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return r, r < R


@triton.jit
def _lp_fwd_kernel(x_ptr, sx_r, sx_c, ys_ptr, lp_ptr, ent_ptr, shift_ptr, R, V, inv_t,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    r, rmask = _rows(tl.program_id(0), R, BLOCK_R)
    xrow = x_ptr + r[:, None] * sx_r
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    s1 = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, V, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)[None, :]
        cmask = rmask[:, None] & (cols < V)
        z = tl.load(xrow + cols * sx_c, mask=cmask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 1))
        ms = _safe(m_new)
        alpha = tl.exp(m - ms)  # 0 while m is -inf (nothing accumulated yet)
        e = z - ms[:, None]
        p = tl.exp(e)
        if ENTROPY:
            # s1 relative to the new max: sum p*(z - m_old) + s*(m_old - m_new), times alpha
            shift = tl.where(s > 0, s * (m - ms), 0.0)
            s1 = alpha * (s1 + shift) + tl.sum(tl.where(p > 0, p * e, 0.0), 1)
        s = alpha * s + tl.sum(p, 1)
        m = m_new
    ys = tl.load(ys_ptr + r, mask=rmask, other=0)
    zy = tl.load(x_ptr + r * sx_r + ys * sx_c, mask=rmask, other=0.0).to(tl.float32) * inv_t
    logs = tl.log(tl.where(rmask, s, 1.0))
    logs = tl.where(m == float("inf"), float("nan"), logs)  # +inf logit: NaN, as torch
    ms = _safe(m)
    tl.store(shift_ptr + 2 * r, ms, mask=rmask)
    tl.store(shift_ptr + 2 * r + 1, logs, mask=rmask)
    tl.store(lp_ptr + r, (zy - ms) - logs, mask=rmask)
    if ENTROPY:
        tl.store(ent_ptr + r, logs - s1 / s, mask=rmask)


@triton.jit
def _lp_bwd_kernel(x_ptr, sx_r, sx_c, ys_ptr, shift_ptr, ent_ptr, a_ptr, b_ptr, g_ptr, sg_r, sg_c,
                   R, V, inv_t, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_B: tl.constexpr):
    r, rmask = _rows(tl.program_id(0), R, BLOCK_R)
    ys = tl.load(ys_ptr + r, mask=rmask, other=0)
    ms = tl.load(shift_ptr + 2 * r, mask=rmask, other=0.0)
    logs = tl.load(shift_ptr + 2 * r + 1, mask=rmask, other=0.0)
    a = tl.load(a_ptr + r, mask=rmask, other=0.0)
    if HAS_B:
        b = tl.load(b_ptr + r, mask=rmask, other=0.0)
        ab = a + b * tl.load(ent_ptr + r, mask=rmask, other=0.0)  # a + b*H
    for c0 in range(0, V, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)[None, :]
        cmask = rmask[:, None] & (cols < V)
        z = tl.load(x_ptr + r[:, None] * sx_r + cols * sx_c, mask=cmask, other=0.0).to(tl.float32) * inv_t
        L = (z - ms[:, None]) - logs[:, None]
        if HAS_B:
            L = tl.where(L < _FLOOR, _FLOOR, L)  # NaN stays NaN (the comparison is false)
            dz = -tl.exp(L) * (b[:, None] * L + ab[:, None])
        else:
            dz = -tl.exp(L) * a[:, None]
        dz = dz + tl.where(cols == ys[:, None], a[:, None], 0.0)
        tl.store(g_ptr + r[:, None] * sg_r + cols * sg_c, dz.to(g_ptr.dtype.element_ty), mask=cmask)


def _plan(R: int, V: int) -> dict:
    block_r, block_v = tile_shape(V, R, True)
    return dict(grid=(_device.cdiv(R, block_r),), BLOCK_R=block_r, BLOCK_V=block_v,
                num_warps=max(4, min(16, block_r * block_v // 512)))


def _torch():
    from crossent._logprobs_ops import _TorchKernels
    return _TorchKernels


def forward(x, ys, temperature, entropy):
    """(log_probs, entropy or empty, shift (R, 2) = (max, log-sum)) of the rows of x (R, V), unmasked, fp32."""
    if x.dtype == torch.float64:
        return _torch().forward(x, ys, temperature, entropy)
    R, V = x.shape
    lp = torch.empty(R, dtype=torch.float32, device=x.device)
    shift = torch.empty((R, 2), dtype=torch.float32, device=x.device)
    ent = torch.empty(R if entropy else 0, dtype=torch.float32, device=x.device)
    if R:
        pl = _plan(R, V)
        _launch.launcher(_lp_fwd_kernel, BLOCK_R=pl["BLOCK_R"], BLOCK_V=pl["BLOCK_V"], ENTROPY=entropy,
                         num_warps=pl["num_warps"])(pl["grid"], x, x.stride(0), x.stride(1), ys, lp,
                                                    ent if entropy else lp, shift, R, V, 1.0 / temperature)
    return lp, ent, shift


def rows_forward(x, ys, temperature, entropy, own):
    return forward(x, ys, temperature, entropy)


def rows_backward(x, out, ys, shift, ent, a, b, temperature):
    """out (R, V) <- gradient of sum(a*log_prob + b*H); out may be x itself."""
    if x.dtype == torch.float64:
        return _torch().rows_backward(x, out, ys, shift, ent, a, b, temperature)
    R, V = x.shape
    if R:
        pl = _plan(R, V)
        f32 = (lambda t: t.to(torch.float32).contiguous())
        a32 = f32(a)
        _launch.launcher(_lp_bwd_kernel, BLOCK_R=pl["BLOCK_R"], BLOCK_V=pl["BLOCK_V"], HAS_B=b is not None,
                         num_warps=pl["num_warps"])(pl["grid"], x, x.stride(0), x.stride(1), ys, f32(shift),
                                                    a32 if b is None else f32(ent), a32,
                                                    a32 if b is None else f32(b), out, out.stride(0),
                                                    out.stride(1), R, V, 1.0 / temperature)
    return out


def backward(x, ys, shift, ent, a, b, temperature):
    return rows_backward(x, torch.empty(x.shape, dtype=x.dtype, device=x.device), ys, shift, ent, a, b,
                         temperature)
