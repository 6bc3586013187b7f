"""Fused linear + cross-entropy kernels, as torch custom ops.

Each op runs a whole chunked pass in eager code (so torch.compile with
fullgraph=True sees one opaque node, not a data-dependent Python loop) and
reaches the cross-entropy math only through a backend's ``ce_forward``
(backends/base.py), so the Triton backend serves CUDA with no extra code.

Layout: ``x`` is (M, D), the hidden states as rows (any strides allowed by
mm); ``rows`` is None (token i is x[i]) or an int64 (N,) map token -> row of x
(used by shift=True on batched input, so the shifted view is never copied);
``target`` is (N,) class indices (int64) or (N, V) probabilities; ``w`` is (V, D).

Passes (N tokens, V classes, D features):
  token pass   per chunk of tokens, one (n, V) buffer in x's dtype that
               crossent owns: logits = x_c @ w.T (+ b) written into it by the
               GEMM -> ce_forward(grad_into=buffer): the CE kernel overwrites
               the logits with their gradient (no fp32 copy of either; the
               kernel computes in fp32) -> dx_c = g @ w (a full contraction
               over V: rounded once) -> dW: with one chunk, dW = g.T @ x is a
               single GEMM accumulated in fp32 inside and rounded once;
               otherwise an fp32 accumulator (dW itself for fp32/fp64) that
               the first chunk writes with beta=0 (no zero-fill, no add) and
               the others add to, rounded once at the end.  6*N*D*V FLOPs.
  vocab pass   (acc_policy="compact", V > 1) per block of classes: logits of all
               tokens for that block in x's dtype, overwritten by their
               gradient from the saved lse (the backend's ``block_grad_``: one
               read and one write on the Triton backend, no fp32 copy),
               dW[block] = g.T @ x in one contraction over
               the tokens (or an fp32 block accumulator when the tokens have to
               be tiled).  No V x D fp32 buffer; 2 extra N*D*V matmuls.
Nothing is accumulated with atomics; each output element is produced by a
fixed sequence of matmuls, so results are deterministic run to run.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op infers its schema from
# annotation objects, not strings.
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import backends
from .backends.base import acc_dtype, wide_dtype

_LOWP = (torch.float16, torch.bfloat16)
# Devices where torch offers (or should offer: CUDA, since torch 2.8) a GEMM of
# low-precision operands with a float32 output (mm/addmm ``out_dtype``).  No
# torch release has it on CPU, so there its absence is by design, not news.
_FP32_OUT_GEMM_DEVICES = ("cuda",)
_fp32_out_gemm: dict = {}
# _gemm's CPU path upcasts a low-precision operand in row blocks of this many bytes.
_UPCAST_BYTES = 16 << 20


def has_fp32_out_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch can multiply ``dtype`` operands into a float32 output
    (accumulating in fp32, never rounding a partial sum to ``dtype``).

    Probed once per (device type, dtype) on a 1x1 problem: an unsupported
    ``out_dtype`` raises at dispatch, on the host, so the probe never syncs.
    Where the device should have it and this torch lacks it, warn once: the
    caller then takes the next best path deliberately (see ``_gemm``)."""
    key = (device.type, dtype)
    if key not in _fp32_out_gemm:
        ok = False
        if device.type in _FP32_OUT_GEMM_DEVICES:
            a = torch.zeros((1, 1), dtype=dtype, device=device)
            c = torch.zeros((1, 1), dtype=torch.float32, device=device)
            try:
                torch.mm(a, a, out_dtype=torch.float32, out=c)
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                ok = True
            except (RuntimeError, TypeError, NotImplementedError):
                warnings.warn(
                    f"torch {torch.__version__} has no float32-output {dtype} GEMM on "
                    f"{device.type} (torch.mm/torch.addmm out_dtype=torch.float32): "
                    "crossent.linear_cross_entropy adds each chunk's weight-gradient product "
                    f"(fp32-accumulated inside the GEMM, rounded once to {dtype}) into a float32 "
                    "accumulator, and prefers one chunk where memory allows; a torch with "
                    "out_dtype support avoids that rounding", RuntimeWarning, stacklevel=2)
        _fp32_out_gemm[key] = ok
    return _fp32_out_gemm[key]


# A constant to Dynamo, which calls it while tracing (as torch.compiler.assume_constant_result does): the
# vocab-parallel heads' traced backward (an autograd.Function) may not fill the cache, a side effect.
has_fp32_out_gemm._dynamo_marked_constant = True


def _gemm(acc: Tensor, a: Tensor, b: Tensor, first: bool, scratch: Optional[Tensor] = None) -> None:
    """acc = a @ b (``first``: beta=0, so acc may be uninitialised) or
    acc += a @ b, with acc's precision for the sum of the products.

    Low-precision a, b and an fp32 acc: the fp32-output GEMM where torch has
    it; on CPU an fp32 GEMM of upcast copies (the CPU's fast, portable path:
    most CPUs emulate low-precision GEMMs); on an accelerator whose torch
    lacks out_dtype, the product in a's dtype (fp32-accumulated inside the
    GEMM, rounded once) through ``scratch``, then added in fp32: never an
    fp32 GEMM there (an order of magnitude slower than the tensor cores),
    never a low-precision running sum (Liger #512)."""
    exact = a.dtype == acc.dtype and b.dtype == acc.dtype
    if not exact and has_fp32_out_gemm(acc.device, a.dtype):
        if first:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif exact or acc.device.type not in _FP32_OUT_GEMM_DEVICES:
        # a (the chunk's gradient, transposed) is upcast by blocks of rows: never an
        # fp32 copy of the whole chunk next to it
        b = b.to(acc.dtype)
        step = max(1, a.shape[0] if exact else _UPCAST_BYTES // max(1, acc.element_size() * a.shape[1]))
        for r in range(0, a.shape[0], step):
            ar = a[r:r + step].to(acc.dtype)
            if first:
                torch.mm(ar, b, out=acc[r:r + step])
            else:
                acc[r:r + step].addmm_(ar, b)
    else:
        p = torch.mm(a, b) if scratch is None else torch.mm(a, b, out=scratch)
        if first:
            acc.copy_(p)
        else:
            acc.add_(p)


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in acc's precision (a, b are cast to one dtype first)."""
    if a.dtype != b.dtype:
        lp = b.dtype if b.dtype != acc.dtype else a.dtype
        a, b = a.to(lp), b.to(lp)
    _gemm(acc, a, b, first=False)


def _logits(xc: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    """out (n, V) <- xc @ w.T + b, in out's (x's) dtype."""
    if b is not None:
        return torch.addmm(b, xc, w.t(), out=out)
    return torch.mm(xc, w.t(), out=out)


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
            valid = target.long() != ignore_index  # in int64: -100 is no uint8 156
            if not bool(valid.all()):
                self.sel = valid.nonzero().squeeze(1)
        self.n = self.N if self.sel is None else self.sel.numel()
        # True when hidden() copies rows (a gather) instead of slicing x
        self.gathers = rows is not None or self.sel is not None

    def chunks(self, step: int):
        for c0 in range(0, self.n, step):
            c1 = min(c0 + step, self.n)
            tok = slice(c0, c1) if self.sel is None else self.sel[c0:c1]
            yield tok, self.hidden(tok)

    def hidden(self, tok) -> Tensor:
        if self.rows is None:
            return self.x[tok] if isinstance(tok, slice) else self.x.index_select(0, tok)
        return self.x.index_select(0, self.rows[tok])

    def put(self, dx: Tensor, tok, val: Tensor) -> None:
        """dx (rows of x) <- val at the rows of tokens ``tok``."""
        if self.rows is None and isinstance(tok, slice):
            dx[tok].copy_(val)
        else:
            r = self.rows[tok] if self.rows is not None else tok
            dx.index_copy_(0, r, val.to(dx.dtype))

    def take(self, t: Tensor, tok) -> Tensor:
        return t[tok] if isinstance(tok, slice) else t.index_select(0, tok)


def token_pass(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale,
               need_dx, need_dw, need_db, chunk_rows, drop, backend, dx_into=None, lse_lo=None):
    """The token-chunked pass; returns (loss, lse, dx, dw, db), unneeded ones empty.
    loss/lse are per token (N,), in the wide / acc dtype (as ce_forward's); ignored
    tokens that were dropped get loss 0 and lse NaN.  lse_lo: an (N,) acc-dtype
    tensor that receives lse's rounding error (ce_forward's lse_lo; the vocab pass)."""
    be = backends.load(backend)
    R = _Rows(x, rows, target, ignore_index, drop and dx_into is None)
    N, V = R.N, w.shape[0]
    acc = acc_dtype(x.dtype)
    need_grad = need_dx or need_dw or need_db
    loss = torch.zeros(N, dtype=wide_dtype(x.device), device=x.device)
    lse = torch.full((N,), float("nan"), dtype=acc, device=x.device)
    dx = x.new_empty(0)
    if need_dx:
        if dx_into is not None:
            dx = dx_into
        else:
            full = R.sel is None and rows is None and x.shape[0] == N
            dx = torch.empty_like(x, memory_format=torch.contiguous_format) if full \
                else torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    n = max(1, min(chunk_rows, R.n))
    single = n >= R.n
    dw = db = None
    if need_dw:
        # One chunk: dW = g.T @ x is one GEMM straight into dW, accumulated in
        # fp32 inside and rounded once.  Several: an fp32 accumulator (dW
        # itself for fp32/fp64), rounded once at the end.
        dw = torch.empty(w.shape, dtype=w.dtype if single else acc, device=w.device)
    scratch = None
    if need_dw and not single and dw.dtype != x.dtype and x.device.type in _FP32_OUT_GEMM_DEVICES \
            and not has_fp32_out_gemm(x.device, x.dtype):
        scratch = torch.empty(w.shape, dtype=x.dtype, device=w.device)  # _gemm's fallback
    # The chunk's logits, then (in place, by the CE kernel) their gradient: one
    # buffer in x's dtype, allocated once and reused by every chunk.
    zbuf = torch.empty((n, V), dtype=x.dtype, device=x.device)
    row_scale = scale.dim() > 0
    first = True
    for tok, xc in R.chunks(n):
        z = _logits(xc, w, b, zbuf[:xc.shape[0]])
        tc = R.take(target, tok)
        sc = R.take(scale, tok) if row_scale else scale
        lo = None if lse_lo is None else lse_lo[tok] if isinstance(tok, slice) else lse_lo.new_empty(z.shape[0])
        lc, lse_c, _ = be.ce_forward(z, tc, weight, ignore_index, eps, z_loss, softcap, sc,
                                     need_grad, grad_into=z if need_grad else None, lse_lo=lo)
        if isinstance(tok, slice):
            loss[tok], lse[tok] = lc, lse_c
        else:
            loss.index_copy_(0, tok, lc.to(loss.dtype))
            lse.index_copy_(0, tok, lse_c.to(acc))
            if lo is not None:
                lse_lo.index_copy_(0, tok, lo)
        if not need_grad:
            continue
        g = z  # now d(sum scale*loss)/dlogits
        if need_db:
            gs = g.sum(0, dtype=acc)
            db = gs if first else db.add_(gs)
        if need_dw:  # before dx: with dx_into=x, dx overwrites these rows of x
            _gemm(dw, g.t(), xc, first, scratch)
        if need_dx:
            if rows is None and isinstance(tok, slice) and dx.is_contiguous():
                torch.mm(g, w, out=dx[tok])  # straight into place (rows of x are rows of dx)
            else:
                R.put(dx, tok, torch.mm(g, w))
        first = False
    if first and need_dw:  # every token was ignored and dropped: nothing ran
        dw.zero_()
    out_dw = w.new_empty(0) if dw is None else dw.to(w.dtype)
    if need_db:
        db = torch.zeros(V, dtype=acc, device=x.device) if db is None else db
        out_db = db.to(b.dtype if b is not None else x.dtype)
    else:
        out_db = x.new_empty(0)
    return loss, lse, dx, out_dw, out_db


def vocab_tiles(n_tok: int, V: int, D: int, x_elt: int, acc_elt: int, gathers: bool, scratch: int,
                budget: int) -> tuple[int, int]:
    """(classes per block, tokens per tile) of the vocab pass, so that its
    buffers stay within ``budget`` bytes: per (token, class) the logits in
    x's dtype (overwritten by their gradient, the GEMM's operand) and the
    backend's ``scratch`` bytes (block_grad_scratch: 0 for the Triton kernel,
    the fp32 copy and temporaries of the torch backend); per token its
    gathered hidden row (shift / dropped rows); per class of a tiled block its
    fp32 dW accumulator row."""
    elt = x_elt + scratch
    row = D * x_elt if gathers else 0
    n_tok = max(1, n_tok)
    room = budget - n_tok * row
    if room >= n_tok * min(V, 128) * elt:
        # All tokens in one contraction: dW[block] rounded once, no accumulator.
        return min(V, max(32, room // (n_tok * elt) // 32 * 32)), n_tok
    vb = min(V, 128)
    return vb, max(1, (budget - vb * D * acc_elt) // (vb * elt + row))


def _vocab_tile(be, R: _Rows, tok, xc: Tensor, wb: Tensor, bb: Optional[Tensor], v0: int, V: int,
                target: Tensor, weight, lse, lse_lo, ignore_index, eps, z_loss, softcap, scale, tw_sum,
                need_db: bool, dw_out: Optional[Tensor], whole: bool, first: bool) -> Optional[Tensor]:
    """One (tokens x classes) tile of the vocab pass: its logits, overwritten
    by their gradient (the backend's block_grad_), and its dW contribution
    into ``dw_out`` (dW[block] itself when the tile holds every token, else
    the block's fp32 accumulator, written with beta=0 by the first tile).
    Returns the gradient's column sums."""
    g = torch.addmm(bb, xc, wb.t()) if bb is not None else torch.mm(xc, wb.t())
    be.block_grad_(g, v0, V, R.take(target, tok), R.take(lse, tok), R.take(scale, tok) if scale.dim() else scale,
                   weight, ignore_index, eps, z_loss, softcap, None if tw_sum is None else R.take(tw_sum, tok),
                   R.take(lse_lo, tok))
    if dw_out is not None:
        if whole:  # one contraction over all tokens: fp32 inside the GEMM, rounded once
            torch.mm(g.t(), xc, out=dw_out)
        else:
            _gemm(dw_out, g.t(), xc, first)
    return g.sum(0, dtype=lse.dtype) if need_db else None


def vocab_pass(x, rows, w, b, target, weight, lse, lse_lo, ignore_index, eps, z_loss, softcap, scale,
               need_dw, need_db, budget, drop, backend):
    """dW (and db) by blocks of classes, recomputing logits from the saved lse
    (and its rounding error lse_lo: token_pass's)."""
    be = backends.load(backend)
    R = _Rows(x, rows, target, ignore_index, drop)
    V, D = w.shape
    acc = acc_dtype(x.dtype)
    # contiguous, as the token pass's and the fake's (empty_like would keep a transposed w's strides)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_dw else w.new_empty(0)
    db = torch.zeros(V, dtype=b.dtype if b is not None else x.dtype, device=x.device) if need_db \
        else x.new_empty(0)
    prob = target.is_floating_point()
    tw_sum = None
    if prob:
        t = target.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / V
        tw_sum = (t if weight is None else t * weight.to(acc)).sum(1)
    if R.n == 0:
        if need_dw:
            dw.zero_()
        return dw, db
    vb, n = vocab_tiles(R.n, V, D, x.element_size(), torch.finfo(acc).bits // 8, R.gathers,
                        be.block_grad_scratch(x.dtype, bool(softcap), prob), budget)
    whole = n >= R.n
    # All tokens in one tile: gather their hidden rows once, not per block.
    tiles = list(R.chunks(n)) if whole else None
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        wb = w[v0:v1]
        bb = None if b is None else b[v0:v1]
        blk = None if whole or not need_dw else torch.empty((v1 - v0, D), dtype=acc, device=x.device)
        dbb = None
        for i, (tok, xc) in enumerate(tiles if whole else R.chunks(n)):
            # A function call, so the tile's buffers are freed before the next
            # tile's are allocated (the budget counts one tile).
            gsum = _vocab_tile(be, R, tok, xc, wb, bb, v0, V, target, weight, lse, lse_lo, ignore_index, eps,
                               z_loss, softcap, scale, tw_sum, need_db,
                               dw[v0:v1] if need_dw and whole else blk, whole, i == 0)
            if need_db:
                dbb = gsum if dbb is None else dbb.add_(gsum)
        if blk is not None and need_dw:
            dw[v0:v1].copy_(blk)
        if need_db:
            db[v0:v1].copy_(dbb)
    return dw, db


def run(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale, need_dx, need_dw,
        need_db, policy, chunk_rows, budget, drop, backend, dx_into=None):
    # One class: the vocabulary pass would recompute the very logits the token pass
    # had, by another GEMM shape wherever the budget tiles the tokens differently, and
    # exp(z' - lse) is then 1 +- an ulp where the softmax of one class is exactly 1
    # (torch's dW exactly 0 for class targets; fuzz F9c).  The token pass takes dW and
    # db itself: its accumulator is 1 x D fp32, the vocabulary pass's block buffer.
    if policy == "compact" and w.shape[0] != 1:
        lse_lo = torch.zeros(target.shape[0], dtype=acc_dtype(x.dtype), device=x.device) \
            if need_dw or need_db else None
        loss, lse, dx, _, _ = token_pass(x, rows, w, b, target, weight, ignore_index, eps, z_loss,
                                         softcap, scale, need_dx, False, False, chunk_rows, drop,
                                         backend, dx_into, lse_lo)
        dw, db = w.new_empty(0), x.new_empty(0)
        if need_dw or need_db:
            dw, db = vocab_pass(x, rows, w, b, target, weight, lse, lse_lo, ignore_index, eps, z_loss,
                                softcap, scale, need_dw, need_db, budget, drop, backend)
        return loss, lse, dx, dw, db
    return token_pass(x, rows, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale,
                      need_dx, need_dw, need_db, chunk_rows, drop, backend, dx_into)


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------
def _fake(x, rows, w, b, target, need_dx, need_dw, need_db):
    N = target.shape[0]
    acc = acc_dtype(x.dtype)
    return (x.new_empty(N, dtype=wide_dtype(x.device)), x.new_empty(N, dtype=acc),   # outputs never alias
            x.new_empty(x.shape) if need_dx else x.new_empty(0), w.new_empty(w.shape) if need_dw else x.new_empty(0),
            (b if b is not None else x).new_empty(w.shape[0]) if need_db else x.new_empty(0))


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
                      softcap: float, scale: Tensor, need_dw: bool, need_db: bool,
                      chunk_rows: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Like linear_ce (the token pass of acc_policy='accurate') but dx overwrites x, chunk
    by chunk, once that chunk's contribution to dW has been taken."""
    loss, lse, _, dw, db = token_pass(x, None, w, b, target, weight, ignore_index, eps, z_loss,
                                      softcap, scale, True, need_dw, need_db, chunk_rows, False,
                                      backend, dx_into=x)
    return loss, lse, dw, db


@linear_ce_inplace.register_fake
def _(x, w, b, target, weight, ignore_index, eps, z_loss, softcap, scale, need_dw, need_db,
      chunk_rows, backend):
    out = _fake(x, None, w, b, target, False, need_dw, need_db)
    return out[0], out[1], out[3], out[4]
