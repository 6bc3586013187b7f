"""Split-row kernels: one read of the logits for (R, C) rows with a large C.

Each row is cut into NSPLIT slices of at most _SPLIT_BLOCK classes; program
``split + NSPLIT * group`` owns slice ``split`` of rows ``group, group + n_groups, ...``
(a persistent grid).  Per row a program
  1. loads its slice into registers (with PREFETCH, the next row's slice is
     loaded first, so its loads are in flight while this row waits),
  2. reduces it to partials relative to the slice max and publishes them:
       m = max z,  s = sum exp(z - m~),  P1 = sum wt,  P2 = sum wt (z - m~) (scaled: _jit.py),
       z[y] (by the slice that owns class y)          (m~: m, or 0 when m is +-inf)
  3. waits for the row's other NSPLIT - 1 slices (a sense-reversing barrier per row,
     self-resetting, in the workspace of ``_grid.py``),
  4. combines the NSPLIT partials and writes loss, lse and the gradient (softmax:
     the output) from the registers of step 1.
STAGE selects what one launch does: 0 = all four steps (CUDA, cooperative launch:
every program is resident, so the wait cannot deadlock); 1 = steps 1-2 and
2 = steps 1, 4.  The interpreter runs programs one after another, so there a
waiting program would spin forever: it runs STAGE 1 then STAGE 2, which re-read
the row but compute the same math, and that is what the CPU tests check.  A
reduced cross-entropy also forms the mean's denominator (before the rows, behind a
grid barrier) and the reduced loss (the last program) in the same launch: see
``_grid.py``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _device, _grid, _launch
from ._grid import _barrier, _den_partial, _denominator, _finish, _inverse
from ._jit import (_as_logits, _class_terms, _grad, _inv_sum, _log_sum, _loss, _loss_as, _lse, _row_coefs,
                   _safe, _scaled_shift, _softcap)

# Defaults from the H100 sweep (BENCHMARKS.md "GPU: H100 runs"): softmax 8192 x 128256 bf16 ran
# fastest with slices of 8192 over 4 warps (0.92x the time of 4096 over 4 warps, the
# static check's pick: tests/_aot_compile.py --explore, 70 registers, 7 CTAs/SM).
_SPLIT_BLOCK = 8192     # widest slice (elements); a power of two
_SPLIT_WARPS = 4
_SPLIT_CTAS = 8         # resident programs per SM to aim for (capped by what fits)
_SPLIT_PREFETCH = False  # load row r + n_groups before waiting on row r (about 2x the registers)
_SPLIT_GROUPS = 3       # interpreter: row groups (exercises the persistent loop)


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _slice(x_ptr, stride, row, R, cols, cmask, LOAD: tl.constexpr):
    # A row's slice (zeros past the last row, or everywhere when not LOAD), read once: evict_first.
    if LOAD:
        return tl.load(x_ptr + tl.cast(row, tl.int64) * stride + cols,
                       mask=cmask & ((cols * 0 + row) < R), other=0.0, eviction_policy="evict_first")
    return tl.zeros(cols.shape, x_ptr.dtype.element_ty)


@triton.jit
def _advance(x_ptr, stride, r, n_groups, R, cols, cmask, nxt, PREFETCH: tl.constexpr):
    # (row r's slice, the slice loaded ahead).  With PREFETCH, row r + n_groups is loaded
    # now, so its loads are in flight while row r waits (about twice the registers).
    if PREFETCH:
        cur = nxt
        nxt = _slice(x_ptr, stride, r + n_groups, R, cols, cmask, True)
    else:
        cur = tl.load(x_ptr + tl.cast(r, tl.int64) * stride + cols, mask=cmask, other=0.0,
                      eviction_policy="evict_first")
    return cur, nxt


@triton.jit
def _combine(part_ptr, base, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr, NEED_P: tl.constexpr):
    # (shift, sumexp, P1, P2) of a whole row from its NSPLIT partials at part_ptr + base.
    # .cg: read at L2, where the other programs' partials are coherent.
    j = tl.arange(0, NSPLIT_P2)
    jm = j < NSPLIT
    off = base + j * 5
    pm = tl.load(part_ptr + off, mask=jm, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(pm, 0)
    ms = _safe(m)
    ssum = tl.sum(tl.load(part_ptr + off + 1, mask=jm, other=0.0, cache_modifier=".cg")
                  * tl.exp(pm - ms), 0)
    p1 = 0.0
    p2 = 0.0
    if NEED_P:
        pp1 = tl.load(part_ptr + off + 2, mask=jm, other=0.0, cache_modifier=".cg")
        pp2 = tl.load(part_ptr + off + 3, mask=jm, other=0.0, cache_modifier=".cg")
        p1 = tl.sum(pp1, 0)
        p2 = tl.sum(pp2 + pp1 * _scaled_shift(_safe(pm), ms), 0)
    return m, ms, ssum, p1, p2


# ----------------------------------------------------------------------------- cross-entropy

@triton.jit
def _ce_split_kernel(
    x_ptr, sx_r,                        # logits (R, C), classes contiguous
    t_ptr, st_r, st_c,                  # class targets (R,) or probabilities (R, C)
    w_ptr,                              # class weight (C,), contiguous
    scale_ptr, scale_stride,            # 0-d (stride 0) or one per row; REDUCE > 0: the denominator out
    loss_ptr, lse_ptr,                  # per-row losses (REDUCE 0, loss_ptr's dtype), lse fp32 (R,)
    g_ptr,                              # gradient (R, C), contiguous
    part_ptr,                           # fp32 (R, NSPLIT, 5) partials (m, s, P1, P2, z[y])
    ws_ptr, acc_ptr, out_ptr,           # counters, fp64 partials (_grid.py); the reduced loss
    R, C, n_groups,
    ignore_index, one_m_eps, eps_over_c, z_loss, cap,
    BLOCK: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr, STAGE: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_W: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_ZL: tl.constexpr, HAS_CAP: tl.constexpr, REDUCE: tl.constexpr,
):
    # REDUCE as in ce._ce_kernel: 0 per-row losses scaled by scale_ptr; 1 sum, 2 mean
    # over rows, 3 mean over W: the reduced loss and the gradient of loss * 1.
    den = tl.cast(1.0, tl.float32)
    if REDUCE == 2:
        den = tl.cast(R, tl.float32)
    if REDUCE == 3:
        if STAGE != 2:
            _den_partial(acc_ptr, t_ptr, 0, st_r, w_ptr, R, R, C, ignore_index, HAS_W)
        if STAGE == 0:
            _barrier(ws_ptr, tl.num_programs(0))
        if STAGE != 1:
            den = _denominator(acc_ptr, SMOOTH)
    inv_den = _inverse(den)
    partial = tl.zeros([1], tl.float64)
    pid = tl.program_id(0)
    split = pid % NSPLIT
    group = pid // NSPLIT
    cols = split * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    NEED_P: tl.constexpr = PROB or SMOOTH
    wt = tl.zeros([BLOCK], tl.float32)
    if SMOOTH and not PROB:
        wt = _class_terms(w_ptr, t_ptr, cols, cols, cmask, C, one_m_eps, eps_over_c, HAS_W, PROB)
    nxt = _slice(x_ptr, sx_r, group, R, cols, cmask, PREFETCH)
    for r in range(group, R, n_groups):
        r64 = tl.cast(r, tl.int64)   # r is a Python int under the interpreter
        cur, nxt = _advance(x_ptr, sx_r, r, n_groups, R, cols, cmask, nxt, PREFETCH)
        z = _as_logits(cur, cmask, cap, HAS_CAP)
        if PROB:
            wt = _class_terms(w_ptr, t_ptr, r64 * st_r + cols * st_c, cols, cmask, C,
                              one_m_eps, eps_over_c, HAS_W, PROB)
            valid = True
            inb = True
            y = -1                                           # matches no class
            wy = 0.0
            zy = 0.0
        else:
            y = tl.load(t_ptr + r64 * st_r).to(tl.int64)    # exact int64 compare (issue 9)
            valid = y != ignore_index
            inb = (y >= 0) & (y < C)
            y = tl.where(valid & inb, y, 0)                  # never out of bounds
            wy = 1.0
            if HAS_W:
                wy = tl.load(w_ptr + y, mask=valid & inb, other=0.0).to(tl.float32)   # as _jit._target_terms
        base = r64 * (NSPLIT * 5)
        # slice statistics; e = exp(z - slice shift) stays for the gradient: p = e * k
        m_sl = tl.max(z, 0)
        ms_sl = _safe(m_sl)
        e = tl.exp(z - ms_sl)
        if STAGE != 2:
            slot = part_ptr + base + split * 5
            tl.store(slot, m_sl)
            tl.store(slot + 1, tl.sum(e, 0))
            if NEED_P:
                tl.store(slot + 2, tl.sum(wt, 0))
                tl.store(slot + 3, tl.sum(tl.where(cmask, wt * _scaled_shift(z, ms_sl), 0.0), 0))   # _jit.py
            if not PROB:
                own = valid & inb & (y >= split * BLOCK) & (y < split * BLOCK + BLOCK)
                zy = tl.load(x_ptr + r64 * sx_r + y, mask=own, other=0.0).to(tl.float32)
                if HAS_CAP:
                    zy = _softcap(zy, cap)
                tl.store(slot + 4, zy, mask=own)
        if STAGE == 0:
            _barrier(ws_ptr + 4 + 2 * r64, NSPLIT)
        if STAGE != 1:
            m, ms, ssum, p1, p2 = _combine(part_ptr, base, NSPLIT, NSPLIT_P2, NEED_P)
            if not PROB:
                zy = tl.load(part_ptr + base + (y // BLOCK) * 5 + 4, mask=valid & inb, other=0.0,
                             cache_modifier=".cg")
            logs = _log_sum(ssum, m)
            loss = _loss(ms, logs, zy, wy, p1, p2, one_m_eps, eps_over_c, z_loss, valid, inb, PROB, SMOOTH,
                         HAS_ZL)
            if split == 0:
                if REDUCE == 0:
                    tl.store(loss_ptr + r64, _loss_as(loss, loss_ptr.dtype.element_ty))
                tl.store(lse_ptr + r64, _lse(ms, logs, m, ssum, lse_ptr))
            if REDUCE != 0:
                partial += tl.where(split == 0, loss, 0.0).to(tl.float64)
            if REDUCE == 0:
                sc = tl.load(scale_ptr + r64 * scale_stride).to(tl.float32)
            else:
                sc = inv_den
            a2, b2, c2 = _row_coefs(wy, p1, ms, logs, sc, valid, inb, one_m_eps, eps_over_c, z_loss,
                                    PROB, SMOOTH, HAS_ZL)
            # int32 lane compare (an int64 one doubles the registers of the tile)
            is_y = tl.arange(0, BLOCK) == (y - split * BLOCK).to(tl.int32)
            p = e * (tl.exp(ms_sl - ms) * _inv_sum(ssum, m))
            dz = _grad(p, wt, is_y, a2, b2, c2, z, cap, NEED_P, HAS_CAP)
            tl.store(g_ptr + r64 * C + cols, dz.to(g_ptr.dtype.element_ty), mask=cmask,
                     eviction_policy="evict_first")
    if STAGE != 1 and REDUCE != 0:
        _finish(ws_ptr, acc_ptr, out_ptr, scale_ptr, tl.sum(partial, 0), den, REDUCE >= 2)


# ----------------------------------------------------------------------------- softmax forward

@triton.jit
def _softmax_split_kernel(x_ptr, y_ptr, part_ptr, ws_ptr, R, C, n_groups,
                          BLOCK: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr,
                          STAGE: tl.constexpr, PREFETCH: tl.constexpr, LOG: tl.constexpr):
    # x, y: (R, C) contiguous.  Partials: (max, sumexp) per slice, 5 slots as for CE;
    # ws_ptr: the per-row barriers (_grid.py).
    pid = tl.program_id(0)
    split = pid % NSPLIT
    group = pid // NSPLIT
    cols = split * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    nxt = _slice(x_ptr, C, group, R, cols, cmask, PREFETCH)
    for r in range(group, R, n_groups):
        r64 = tl.cast(r, tl.int64)   # r is a Python int under the interpreter
        cur, nxt = _advance(x_ptr, C, r, n_groups, R, cols, cmask, nxt, PREFETCH)
        z = tl.where(cmask, cur.to(tl.float32), float("-inf"))
        base = r64 * (NSPLIT * 5)
        m_sl = tl.max(z, 0)
        ms_sl = _safe(m_sl)
        if not LOG:
            e = tl.exp(z - ms_sl)
        if STAGE != 2:
            tl.store(part_ptr + base + split * 5, m_sl)
            if LOG:
                tl.store(part_ptr + base + split * 5 + 1, tl.sum(tl.exp(z - ms_sl), 0))
            else:
                tl.store(part_ptr + base + split * 5 + 1, tl.sum(e, 0))
        if STAGE == 0:
            _barrier(ws_ptr + 4 + 2 * r64, NSPLIT)
        if STAGE != 1:
            m, ms, ssum, _p1, _p2 = _combine(part_ptr, base, NSPLIT, NSPLIT_P2, False)
            if LOG:
                out = (z - ms) - tl.log(ssum)      # relative to the row max: exact at 1e4
            else:
                out = e * (tl.exp(ms_sl - ms) / ssum)
            out = tl.where(tl.abs(m) == float("inf"), float("nan"), out)   # as torch: inf - inf
            tl.store(y_ptr + r64 * C + cols, out.to(y_ptr.dtype.element_ty), mask=cmask,
                     eviction_policy="evict_first")


# ----------------------------------------------------------------------------- launchers

@functools.lru_cache(maxsize=256)
def plan(R: int, C: int, device: torch.device) -> dict:
    """Slices and grid for R rows of C classes (STAGE 0 needs the kernel's
    registers to size its cooperative grid: see _grid.resident)."""
    nsplit = _device.cdiv(C, _SPLIT_BLOCK)
    block = _device.next_pow2(_device.cdiv(C, nsplit))
    nsplit = _device.cdiv(C, block)
    return dict(BLOCK=block, NSPLIT=nsplit, NSPLIT_P2=_device.next_pow2(nsplit),
                num_warps=min(_SPLIT_WARPS, max(1, block // 256)), PREFETCH=_SPLIT_PREFETCH,
                cooperative=device.type == "cuda")


_CONFIGS: dict = {}


def _config(kernel, R, C, device, consts: tuple, args) -> tuple[int, int, int, tuple]:
    """(programs, row groups, slice-partial floats, launchers: one per stage) of kernel
    over R rows of C classes, cached: ~10 us of Python per call otherwise (issue 10,
    item 3).  The cooperative grid is what fits on the device at once (_grid.resident)."""
    key = (kernel, R, C, device, consts)
    cfg = _CONFIGS.get(key)
    if cfg is not None:
        return cfg
    p = plan(R, C, device)
    kw = dict(BLOCK=p["BLOCK"], NSPLIT=p["NSPLIT"], NSPLIT_P2=p["NSPLIT_P2"], PREFETCH=p["PREFETCH"],
              num_warps=p["num_warps"], **dict(consts))
    groups = min(R, _SPLIT_GROUPS)
    if p["cooperative"]:
        ws, acc = _grid.workspace(device, R, 0)
        per_sm = _grid.resident(kernel, args(_grid.scratch(device, R * p["NSPLIT"] * 5), ws, acc, R),
                                dict(STAGE=0, **kw), device, _SPLIT_CTAS)
        groups = min(R, max(1, per_sm // p["NSPLIT"]))
        kw.update(STAGE=0, launch_cooperative_grid=True)
    if len(_CONFIGS) >= 1024:   # shapes vary (sequence lengths): keep the cache bounded
        _CONFIGS.clear()
    stages = [kw] if p["cooperative"] else [dict(kw, STAGE=s) for s in (1, 2)]
    cfg = _CONFIGS[key] = (groups * p["NSPLIT"], groups, R * p["NSPLIT"] * 5,
                           tuple(_launch.launcher(kernel, **s) for s in stages))
    return cfg


def _run(kernel, R, C, device, args, consts: tuple):
    """Launch kernel(*args(part, ws, acc, n_groups), ...): one cooperative launch on
    CUDA, two stages elsewhere.  ``args`` builds the argument list around the
    slice partials ``part``, the workspace (``_grid.workspace``) and the group count;
    ``consts``: the kernel's other constexprs as (name, value) pairs."""
    n, groups, floats, launchers = _config(kernel, R, C, device, consts, args)
    ws, acc, part = _grid.split_workspace(device, R, n, floats)
    a = args(part, ws, acc, groups)
    for launch in launchers:
        launch((n,), *a)


def ce(x, sx_r, target, st_r, st_c, w, scale, scale_stride, loss, lse, g, R, C, scalars, consts, reduce):
    """Cross-entropy over (R, C) rows; ``reduce`` and the buffers as in ce._launch, ``consts``
    the kernel's REDUCE and flags as (name, value) pairs."""
    rows_out = loss if reduce == 0 else lse

    def args(part, ws, acc, groups):
        return (x, sx_r, target, st_r, st_c, w, scale, scale_stride, rows_out, lse, g, part, ws, acc, loss,
                R, C, groups, *scalars)
    _run(_ce_split_kernel, R, C, x.device, args, consts)


def softmax(x, y, log: bool):
    R, C = x.shape
    _run(_softmax_split_kernel, R, C, x.device, lambda part, ws, acc, groups: (x, y, part, ws, R, C, groups),
         (("LOG", log),))
