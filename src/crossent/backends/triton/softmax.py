"""softmax / log_softmax forward and backward kernels for the triton backend.

Any ``dim``: the (contiguous) input is viewed as (B, C, S) with C the softmax dim,
and addressed as ``x[b, c, s] = base + b*sb + c*sc + s*ss`` (for dim=-1: B=1,
S=rows, sc=1), so no transpose copy is made.  A program owns BLOCK_S positions
and walks C in [BLOCK_S, BLOCK_C] tiles; the coalesced axis follows the strides.

Reads of the input per path (the paths and their choice are those of ``ce.py``):
  SINGLE  C fits one tile (<= ce._SINGLE_MAX): the tile stays in registers, ONE read
          and one write (forward: x -> y; backward: g, y -> dx).  With num_ctas > 1
          (the cluster path) one tile spans the CTAs of a cluster.
  split   forward, last dim, larger C: ``split.py``, ONE read on CUDA.
  looped  otherwise: an online (max, sumexp) pass (backward: a sum pass), then a
          second pass that re-reads the row, from L2 where it stayed: TWO reads.
Accumulation is fp32; the output has the input's dtype.  A row whose max is +-inf
(all -inf, or any +inf) gives NaN everywhere, as torch does.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _device, _launch, ce, split
from ._jit import _class_block


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, S, C, sb, ss, sc, n_sblk,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                        SINGLE: tl.constexpr, LOG: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_sblk
    s = (pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)   # [BLOCK_S]
    smask = s < S
    row = b * sb + s[:, None] * ss                                     # [BLOCK_S, 1] int64
    if SINGLE:
        cols = tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
        cmask = smask[:, None] & (cols < C)
        z = tl.load(x_ptr + row + cols * sc, mask=cmask, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        m = tl.max(z, 1)
        ms = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        e = tl.exp(z - ms[:, None])
        ssum = tl.where(smask, tl.sum(e, 1), 1.0)   # padded positions: no log(0)
        if LOG:
            y = (z - ms[:, None]) - tl.log(ssum)[:, None]   # relative to the max: exact at 1e4
        else:
            y = e * (1.0 / ssum)[:, None]
        y = tl.where(tl.abs(m)[:, None] == float("inf"), float("nan"), y)
        tl.store(y_ptr + row + cols * sc, y.to(y_ptr.dtype.element_ty), mask=cmask)
    else:
        m = tl.full([BLOCK_S], float("-inf"), tl.float32)
        ssum = tl.zeros([BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask = _class_block(c0, smask, C, BLOCK_C)
            z = tl.load(x_ptr + row + cols * sc, mask=cmask, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 1))
            mns = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
            ssum = ssum * tl.exp(m - mns) + tl.sum(tl.exp(z - mns[:, None]), 1)
            m = m_new
        ms = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        ssum = tl.where(smask, ssum, 1.0)
        logs = tl.log(ssum)
        inv = 1.0 / ssum
        bad = tl.abs(m)[:, None] == float("inf")
        # second pass: re-read the row (see module docstring)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask = _class_block(c0, smask, C, BLOCK_C)
            z = tl.load(x_ptr + row + cols * sc, mask=cmask, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            if LOG:
                y = (z - ms[:, None]) - logs[:, None]
            else:
                y = tl.exp(z - ms[:, None]) * inv[:, None]
            y = tl.where(bad, float("nan"), y)
            tl.store(y_ptr + row + cols * sc, y.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _softmax_bwd_kernel(g_ptr, y_ptr, dx_ptr, S, C, sb, ss, sc, n_sblk,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                        SINGLE: tl.constexpr, LOG: tl.constexpr):
    # softmax:     dx = y * (g - sum(g * y))
    # log_softmax: dx = g - exp(y) * sum(g)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_sblk
    s = (pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    smask = s < S
    row = b * sb + s[:, None] * ss
    if SINGLE:
        cols = tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
        cmask = smask[:, None] & (cols < C)
        g = tl.load(g_ptr + row + cols * sc, mask=cmask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row + cols * sc, mask=cmask, other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * tl.sum(g, 1)[:, None]
        else:
            dx = y * (g - tl.sum(g * y, 1)[:, None])
        tl.store(dx_ptr + row + cols * sc, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
    else:
        acc = tl.zeros([BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask = _class_block(c0, smask, C, BLOCK_C)
            g = tl.load(g_ptr + row + cols * sc, mask=cmask, other=0.0).to(tl.float32)
            if LOG:
                acc += tl.sum(g, 1)
            else:
                y = tl.load(y_ptr + row + cols * sc, mask=cmask, other=0.0).to(tl.float32)
                acc += tl.sum(g * y, 1)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask = _class_block(c0, smask, C, BLOCK_C)
            g = tl.load(g_ptr + row + cols * sc, mask=cmask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row + cols * sc, mask=cmask, other=0.0).to(tl.float32)
            if LOG:
                dx = g - tl.exp(y) * acc[:, None]
            else:
                dx = y * (g - acc[:, None])
            tl.store(dx_ptr + row + cols * sc, dx.to(dx_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- launchers

def _view(shape, dim):
    """(B, C, S) of a contiguous tensor of ``shape`` reduced over ``dim``, and strides."""
    C = shape[dim]
    B = math.prod(shape[:dim])
    S = math.prod(shape[dim + 1:])
    if S == 1:  # last dim: one batch of B rows
        return 1, C, B, (0, C, 1)
    return B, C, S, (C * S, 1, S)  # (sb, ss, sc)


def _plan(B, C, S, ss, sc):
    block_s, block_c = ce.tile_shape(C, S, sc == 1)
    n_sblk = _device.cdiv(S, block_s)
    tile = block_s * block_c
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, SINGLE=block_c >= C,
                num_warps=max(4, min(16, tile // 512))), n_sblk


def _canon(x, dim):
    if x.dim() == 0:
        return x.reshape(1), 0
    return x.contiguous(), dim % x.dim()


# ----------------------------------------------------------------------------- backend methods

def softmax_forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    if x.dtype == torch.float64:  # fp64 math is left to torch
        return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    xc, d = _canon(x, dim)
    y = torch.empty_like(xc)
    if xc.numel() == 0:
        return y.reshape(x.shape)
    B, C, S, (sb, ss, sc) = _view(xc.shape, d)
    path = ce.row_path(sc == 1, C, True, xc.device, "softmax")   # sc == 1: the last dim, B == 1
    if path == "split":
        try:
            split.softmax(xc.view(S, C), y.view(S, C), log)
            return y.reshape(x.shape)
        except Exception as e:  # noqa: BLE001 - see ce._launch
            if xc.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
                raise
            _device.cooperative_failed(xc.device, e)
            path = "twopass"
    cfg, n_sblk = _plan(B, C, S, ss, sc)
    if path == "cluster":   # one row per cluster, held in registers across its CTAs
        cfg = {k: v for k, v in ce.cluster_config(C).items() if k not in ("KEEP_L2", "REVERSE")}
        n_sblk = S
    _launch.launcher(_softmax_fwd_kernel, LOG=log, **cfg)((B * n_sblk,), xc, y, S, C, sb, ss, sc, n_sblk)
    return y.reshape(x.shape)


def softmax_backward(g: torch.Tensor, y: torch.Tensor, dim: int, log: bool,
                     input_dtype: torch.dtype) -> torch.Tensor:
    if input_dtype == torch.float64 or y.dtype == torch.float64:
        g64, y64 = g.to(torch.float64), y.to(torch.float64)
        dx = g64 - torch.exp(y64) * g64.sum(dim, keepdim=True) if log else \
            y64 * (g64 - (g64 * y64).sum(dim, keepdim=True))
        return dx.to(input_dtype)
    gc, d = _canon(g, dim)
    yc, _ = _canon(y, dim)
    dx = torch.empty(gc.shape, device=gc.device, dtype=input_dtype)
    if gc.numel() == 0:
        return dx.reshape(y.shape)
    B, C, S, (sb, ss, sc) = _view(gc.shape, d)
    cfg, n_sblk = _plan(B, C, S, ss, sc)
    _launch.launcher(_softmax_bwd_kernel, LOG=log, **cfg)((B * n_sblk,), gc, yc, dx, S, C, sb, ss, sc, n_sblk)
    return dx.reshape(y.shape)
