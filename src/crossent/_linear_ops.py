"""Fused linear + cross-entropy kernels, as torch custom ops.

Each op runs a whole chunked pass in eager code (so torch.compile with
fullgraph=True sees one opaque node, not a data-dependent Python loop) and
reaches the cross-entropy math only through a backend's ``ce_forward``
(backends/base.py), so the Triton backend serves CUDA with no extra code.

Layout: ``x`` is (M, D), the hidden states as rows (any strides allowed by
mm); ``rows`` is None (token i is x[i]) or an int64 (N,) map token -> row of x
(used by shift=True on batched input, so the shifted view is never copied);
``target`` is (N,) class indices or (N, V) probabilities; ``w`` is (V, D).

Passes (N tokens, V classes, D features):
  token pass   per chunk of tokens: logits = x_c @ w.T (+ b) -> ce_forward with
               need_grad (dlogits into a buffer we own, reused by every chunk)
               -> dx_c = dlogits @ w (a full contraction over V: rounded once)
               -> dW += dlogits.T @ x_c into an fp32 accumulator (the gradient
               itself for fp32/fp64) and db += column sums.  6*N*D*V FLOPs.
  vocab pass   (acc_policy="compact" only) per block of classes: logits of all
               tokens for that block, their gradient from the saved lse
               (``_block_grad``), dW[block] = dlogits.T @ x in one contraction
               over the tokens (or an fp32 block accumulator when the tokens
               have to be tiled).  No V x D fp32 buffer; 2 extra N*D*V matmuls.
Nothing is accumulated with atomics; each output element is produced by a
fixed sequence of matmuls, so results are deterministic run to run.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import backends

_LOWP = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc's precision for the products' sum (never a
    low-precision partial result)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:  # cuBLAS low-precision operands, fp32 output and accumulation
            lp = b.dtype if b.dtype in _LOWP else a.dtype
            torch.addmm(acc, a.to(lp), b.to(lp), out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Rows:
    """Token -> row mapping, with ignored tokens dropped where that is free."""

    def __init__(self, x: Tensor, rows: Optional[Tensor], target: Tensor, ignore_index: int,
                 drop: bool):
        self.x, self.rows = x, rows
        self.N = target.shape[0]
        self.sel = None  # token indices actually processed (None = all, in order)
        if drop and x.device.type == "cpu" and not target.is_floating_point() and self.N:
            # Reading a CPU tensor is no host sync; on accelerators all rows are
            # kept (the kernel zeroes ignored rows) so no count ever syncs.
            valid = target != ignore_index
            if not bool(valid.all()):
                self.sel = valid.nonzero().squeeze(1)
        self.n = self.N if self.sel is None else self.sel.numel()

    def chunks(self, step: int):
        for c0 in range(0, self.n, step):
            c1 = min(c0 + step, self.n)
            tok = slice(c0, c1) if self.sel is None else self.sel[c0:c1]
            yield tok, self.hidden(tok)

    def hidden(self, tok) -> Tensor:
        if self.rows is None:
            return self.x[tok] if isinstance(tok, slice) else self.x.index_select(0, tok)
        r = self.rows[tok]
        return self.x.index_select(0, r)

    def put(self, dx: Tensor, tok, val: Tensor) -> None:
        """dx (rows of x) <- val at the rows of tokens ``tok``."""
        if self.rows is None and isinstance(tok, slice):
            dx[tok].copy_(val)
        else:
            r = self.rows[tok] if self.rows is not None else tok
            dx.index_copy_(0, r, val.to(dx.dtype))

    def take(self, t: Tensor, tok) -> Tensor:
        return t[tok] if isinstance(tok, slice) else t.index_select(0, tok)


def _logits(xc: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor, tmp: Optional[Tensor]) -> Tensor:
    """out (n, V) <- xc @ w.T + b; through ``tmp`` (x's dtype) when out is wider."""
    dst = out if tmp is None else tmp
    if b is not None:
        torch.addmm(b, xc, w.t(), out=dst)
    else:
        torch.mm(xc, w.t(), out=dst)
    if tmp is not None:
        out.copy_(tmp)
    return out


def token_pass(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale,
               need_dx, need_dw, need_db, policy, chunk_rows, drop, backend, dx_into=None):
    """The token-chunked pass; returns (loss, lse, dx, dw, db), unneeded ones empty.
    loss/lse are per token (N,), acc dtype; ignored tokens that were dropped
    get loss 0 and lse NaN."""
    be = backends.load(backend)
    R = _Rows(x, rows, target, ignore_index, drop and dx_into is None)
    N, V, D = R.N, w.shape[0], w.shape[1]
    acc = acc_dtype(x.dtype)
    lowp = x.dtype in _LOWP
    need_grad = need_dx or need_dw or need_db
    loss = torch.zeros(N, dtype=acc, device=x.device)
    lse = torch.full((N,), float("nan"), dtype=acc, device=x.device)
    dx = x.new_empty(0)
    if need_dx:
        if dx_into is not None:
            dx = dx_into
        else:
            full = R.sel is None and rows is None and x.shape[0] == N
            dx = torch.empty_like(x, memory_format=torch.contiguous_format) if full \
                else torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dw_acc = None
    if need_dw:
        dw_acc = torch.zeros(w.shape, dtype=acc if lowp else w.dtype, device=w.device)
    db_acc = torch.zeros(V, dtype=acc, device=x.device) if need_db else None
    # Chunk buffers, allocated once and reused: logits in the kernel's dtype,
    # its gradient, and (fp32 logits from low-precision matmuls) the raw product.
    kdt = acc if (lowp and policy == "accurate") else x.dtype
    n = max(1, min(chunk_rows, R.n))
    zbuf = torch.empty((n, V), dtype=kdt, device=x.device)
    gbuf = torch.empty((n, V), dtype=kdt, device=x.device) if need_grad else None
    tbuf = torch.empty((n, V), dtype=x.dtype, device=x.device) if kdt != x.dtype else None
    row_scale = scale.dim() > 0
    for tok, xc in R.chunks(n):
        m = xc.shape[0]
        z = _logits(xc, w, b, zbuf[:m], None if tbuf is None else tbuf[:m])
        tc = R.take(target, tok)
        sc = R.take(scale, tok) if row_scale else scale
        g = gbuf[:m] if need_grad else None
        lc, sc_lse, _ = be.ce_forward(z, tc, weight, ignore_index, eps, z_loss, softcap, sc,
                                      need_grad, grad_into=g)
        if isinstance(tok, slice):
            loss[tok], lse[tok] = lc, sc_lse
        else:
            loss.index_copy_(0, tok, lc.to(acc))
            lse.index_copy_(0, tok, sc_lse.to(acc))
        if not need_grad:
            continue
        if need_db:
            db_acc += g.sum(0, dtype=acc)
        if need_dw:
            _addmm_acc(dw_acc, g.t(), xc)
        if need_dx:
            gl = g if g.dtype == x.dtype else tbuf[:m].copy_(g)
            if rows is None and isinstance(tok, slice) and dx.is_contiguous():
                torch.mm(gl, w, out=dx[tok])  # straight into place (rows of x are rows of dx)
            else:
                R.put(dx, tok, torch.mm(gl, w))
    dw = w.new_empty(0) if dw_acc is None else (dw_acc if dw_acc.dtype == w.dtype else dw_acc.to(w.dtype))
    db = x.new_empty(0) if db_acc is None else db_acc.to(b.dtype if b is not None else x.dtype)
    return loss, lse, dx, dw, db


def _block_grad(z: Tensor, v0: int, V: int, tc: Tensor, lse: Tensor, scale: Tensor,
                weight: Optional[Tensor], ignore_index: int, eps: float, z_loss: float,
                softcap: float, tw_sum: Optional[Tensor]) -> Tensor:
    """d(sum scale*loss)/dlogits for classes [v0, v0 + z.shape[1]) of some rows,
    in place in z (acc dtype), from the rows' saved lse; formulas of
    backends/base.py."""
    Vb = z.shape[1]
    acc = z.dtype
    zero = torch.zeros((), dtype=acc, device=z.device)
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
        dcap = 1 - (z / softcap).square()
    lse_c = lse.to(acc).unsqueeze(1)
    sc = scale.to(acc).unsqueeze(1) if scale.dim() else scale.to(acc)
    zterm = 2 * z_loss * lse_c if z_loss else 0.0
    w = None if weight is None else weight.to(acc)[v0:v0 + Vb]
    p = z.sub_(lse_c).exp_()
    if tc.is_floating_point():
        t = tc.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / V
        tw = t if w is None else t * w
        p.mul_(sc * (tw_sum.to(acc).unsqueeze(1) + zterm)).sub_(sc * tw)
    else:
        valid = tc != ignore_index
        inb = (tc >= 0) & (tc < V)
        ysafe = torch.where(valid & inb, tc, torch.zeros((), dtype=tc.dtype, device=tc.device)).long()
        mrow = torch.where(valid, torch.ones((), dtype=acc, device=z.device), zero)
        mrow = torch.where(valid & ~inb, torch.full((), float("nan"), dtype=acc, device=z.device), mrow)
        wy = weight.to(acc)[ysafe] if weight is not None else torch.ones_like(mrow)
        sum_w = float(V) if weight is None else weight.to(acc).sum()
        mcol = mrow.unsqueeze(1)
        sm = torch.where(mcol != 0, sc * mcol, zero)  # (n, 1); ignored rows exactly 0
        p.mul_(sm * ((1 - eps) * wy.unsqueeze(1) + (eps / V) * sum_w + zterm))
        if eps > 0:
            p.sub_(sm * (eps / V) * (1.0 if w is None else w))
        local = ysafe - v0
        hit = (local >= 0) & (local < Vb)
        hot = torch.where(hit, -(1 - eps) * sm.squeeze(1) * wy, zero)
        p.scatter_add_(1, local.clamp(0, Vb - 1).unsqueeze(1), hot.unsqueeze(1))
    if softcap:
        p.mul_(dcap)
    return p


def vocab_pass(x, rows, w, b, target, weight, lse, ignore_index, eps, z_loss, softcap, scale,
               need_dw, need_db, budget, drop):
    """dW (and db) by blocks of classes, recomputing logits from the saved lse."""
    R = _Rows(x, rows, target, ignore_index, drop)
    V, D = w.shape
    acc = acc_dtype(x.dtype)
    dw = torch.empty_like(w) if need_dw else w.new_empty(0)
    db = torch.zeros(V, dtype=b.dtype if b is not None else x.dtype, device=x.device) if need_db \
        else x.new_empty(0)
    tw_sum = None
    if target.is_floating_point():
        t = target.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / V
        tw_sum = (t if weight is None else t * weight.to(acc)).sum(1)
    if R.n == 0:
        if need_dw:
            dw.zero_()
        return dw, db
    elt = torch.finfo(acc).bits // 8 + (x.element_size() if x.dtype != acc else 0)
    vb = max(32, budget // max(1, R.n * elt))
    vb = min(V, -(-vb // 32) * 32)
    n = R.n if R.n * vb * elt <= 2 * budget else max(1, budget // (vb * elt))
    row_scale = scale.dim() > 0
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        wb = w[v0:v1]
        bb = None if b is None else b[v0:v1]
        blk_acc = None
        dbb = torch.zeros(v1 - v0, dtype=acc, device=x.device) if need_db else None
        for tok, xc in R.chunks(n):
            z = torch.addmm(bb, xc, wb.t()) if bb is not None else torch.mm(xc, wb.t())
            z = z.to(acc)
            tc = R.take(target, tok)
            if tc.is_floating_point():
                tc = tc[:, v0:v1]
            g = _block_grad(z, v0, V, tc, R.take(lse, tok), R.take(scale, tok) if row_scale else scale,
                            weight, ignore_index, eps, z_loss, softcap,
                            None if tw_sum is None else R.take(tw_sum, tok))
            if need_db:
                dbb += g.sum(0)
            if need_dw:
                if n >= R.n and blk_acc is None:  # one contraction over all tokens: rounded once
                    if g.dtype == w.dtype:
                        torch.mm(g.t(), xc, out=dw[v0:v1])
                    else:
                        blk_acc = torch.zeros((v1 - v0, D), dtype=acc, device=x.device)
                        _addmm_acc(blk_acc, g.t(), xc)
                else:
                    if blk_acc is None:
                        blk_acc = torch.zeros((v1 - v0, D), dtype=acc, device=x.device)
                    _addmm_acc(blk_acc, g.t(), xc)
            del z, g  # free this block's logits before the next one is allocated
        if blk_acc is not None:
            dw[v0:v1].copy_(blk_acc)
        if need_db:
            db[v0:v1].copy_(dbb)
    return dw, db


def run(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale, need_dx, need_dw,
        need_db, policy, chunk_rows, budget, drop, backend, dx_into=None):
    if policy == "compact":
        loss, lse, dx, _, _ = token_pass(x, rows, w, b, target, weight, ignore_index, eps, z_loss,
                                         softcap, scale, need_dx, False, False, policy, chunk_rows,
                                         drop, backend, dx_into)
        dw, db = w.new_empty(0), x.new_empty(0)
        if need_dw or need_db:
            dw, db = vocab_pass(x, rows, w, b, target, weight, lse, ignore_index, eps, z_loss,
                                softcap, scale, need_dw, need_db, budget, drop)
        return loss, lse, dx, dw, db
    return token_pass(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale,
                      need_dx, need_dw, need_db, policy, chunk_rows, drop, backend, dx_into)


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------
def _fake(x, rows, w, b, target, need_dx, need_dw, need_db):
    N = target.shape[0]
    acc = acc_dtype(x.dtype)
    e = x.new_empty(0)
    return (x.new_empty(N, dtype=acc), x.new_empty(N, dtype=acc),
            x.new_empty(x.shape) if need_dx else e, w.new_empty(w.shape) if need_dw else e,
            (b if b is not None else x).new_empty(w.shape[0]) if need_db else e)


@custom_op("crossent::linear_ce", mutates_args=())
def linear_ce(x: Tensor, rows: Optional[Tensor], w: Tensor, b: Optional[Tensor], target: Tensor,
              weight: Optional[Tensor], ignore_index: int, eps: float, z_loss: float, softcap: float,
              scale: Tensor, need_dx: bool, need_dw: bool, need_db: bool, policy: str,
              chunk_rows: int, budget: int, drop: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss (N,), lse (N,), dx, dw, db): gradients of sum(scale * loss), or empty."""
    return run(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale, need_dx,
               need_dw, need_db, policy, chunk_rows, budget, drop, backend)


@linear_ce.register_fake
def _(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale, need_dx, need_dw,
      need_db, policy, chunk_rows, budget, drop, backend):
    return _fake(x, rows, w, b, target, need_dx, need_dw, need_db)


@custom_op("crossent::linear_ce_inplace", mutates_args=("x",))
def linear_ce_inplace(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                      weight: Optional[Tensor], ignore_index: int, eps: float, z_loss: float,
                      softcap: float, scale: Tensor, need_dw: bool, need_db: bool, policy: str,
                      chunk_rows: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Like linear_ce (accurate/balanced token pass) but dx overwrites x, chunk
    by chunk, once that chunk's contribution to dW has been taken."""
    loss, lse, _, dw, db = token_pass(x, None, w, b, target, weight, ignore_index, eps, z_loss,
                                      softcap, scale, True, need_dw, need_db, policy, chunk_rows,
                                      False, backend, dx_into=x)
    return loss, lse, dw, db


@linear_ce_inplace.register_fake
def _(x, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale, need_dw, need_db,
      policy, chunk_rows, backend):
    out = _fake(x, None, w, b, target, False, need_dw, need_db)
    return out[0], out[1], out[3], out[4]
