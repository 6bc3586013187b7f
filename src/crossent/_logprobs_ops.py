"""The kernels behind crossent.log_probs / linear_log_probs (public API: logprobs.py).

Per row, with z = x / T (fp32; fp64 for fp64; computed as x * (1/T)), m = max z, e = z - m, s = sum exp(e):
  lse = m + log s,   log_prob = z[y] - lse,   H = log s - sum(exp(e) * e) / s = -sum p * (z - lse)
and for upstream gradients (g, h) of (log_prob, H), with L = z - lse, p = exp(L):
  dx = ( g * ([c == y] - p) - h * p * (L + H) ) / T
All sums are relative to the row max, so nothing cancels at large |logits|.

Layers (QuACK order): the torch kernels (one chunk of rows) -> the chunked
passes of the fused head -> torch custom ops (torch.compile sees one opaque
node each).  The autograd Functions live in crossent._autograd; the Triton
kernels in crossent.backends.triton.logprobs.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op infers its schema from
# annotation objects, not strings.
import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from ._linear_ops import _gemm, _logits, _Rows, acc_dtype
from ._validate import _compiling

# exp(-1024) is 0 in fp32 and fp64: clamping z - m there changes no probability
# but turns a -inf logit's p * log p = 0 * -inf = NaN into 0 (0 log 0 = 0).
_FLOOR = -1024.0
# Fused head on CPU: the memory budget of one chunk, all it needs included: the
# chunk's logits (in x's dtype; then, in place, their gradient) and its hidden
# rows' copies (see _cpu_chunk_rows), and the torch kernels' fp32 temporaries,
# which cover blocks of rows (see _blocks) in at most half of it: the entropy's
# probabilities and, for logits that are not crossent's to overwrite or not in
# fp32, an fp32 copy or log-softmax.  Few, large blocks: each op is a parallel
# region, and on a loaded machine each region can wait a scheduler tick for its
# second thread (1 MiB blocks ran 2x slower there).  Chunks of 512 tokens (V =
# 32k fp32) run the GEMMs as fast as 1024 within this machine's noise.
_CPU_CHUNK_BYTES = 128 << 20


# ---------------------------------------------------------------------------
# torch kernels: one chunk of rows z (r, V)
# ---------------------------------------------------------------------------
def safe_index(target: Tensor, ignore_index: int, V: int) -> Tensor:
    """int64 class index that is always in bounds (0 for ignored / out-of-range rows)."""
    t = target.long()  # compare in int64: ignore_index is never wrapped into a narrow dtype
    return torch.where((t != ignore_index) & (t >= 0) & (t < V), t, 0)


def scaled(xc: Tensor, temperature: float, own: bool) -> Tensor:
    """z = xc * (1/T) in the accumulation dtype; in place when ``own`` or when
    the cast made a copy.  Multiplying (within an ulp of xc / T) is what the
    backward's recomputation does too, so both see the same z."""
    z = xc.to(acc_dtype(xc.dtype))
    if temperature != 1.0:
        inv = 1.0 / temperature
        z = z.mul_(inv) if own or z.dtype != xc.dtype else z * inv  # (a cast copies: no data_ptr test to trace)
    return z


def _block_rows(V: int, elt: int, temps: int) -> int:
    """Rows per block for kernels with ``temps`` temporaries of ``elt`` bytes per
    element: together at most half a chunk's budget (at least one row)."""
    return max(1, _CPU_CHUNK_BYTES // (2 * temps) // (elt * max(1, V)))


def _blocks(n: int, V: int, elt: int, temps: int):
    step = _block_rows(V, elt, temps)
    return (slice(r, min(r + step, n)) for r in range(0, n, step))


def _probs_buffer(like: Tensor, work: Optional[Tensor]) -> Tensor:
    """Where a block's probabilities go: ``work`` (a flat buffer the caller
    reuses across chunks: a fresh 64 MiB tensor costs more in page faults than
    the exp that fills it) viewed like ``like``, else a new tensor."""
    return torch.empty_like(like) if work is None else work[:like.numel()].view(like.shape)


def stats(z: Tensor, ys: Optional[Tensor], entropy: bool, inplace: bool = False,
          work: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """(log_prob at ys or None, H or None, shift), of the rows of z (acc dtype); shift (r, 2)
    holds (max, log sum exp(z - max)), whose sum is the lse.  They are kept
    apart so the backward's z - max - log s rounds like log_softmax does (one
    fp32 lse would cost an ulp of |lse| in every p).

    torch's fused log_softmax kernel does the exponentials (on CPU faster than
    max, sub, exp and sum as separate sweeps), into z itself when ``inplace``
    (z is then overwritten; it reads each row before writing it).  log s is
    read back at the row's argmax, where log_softmax = -log s exactly.  The
    entropy's probabilities exist one block of rows at a time.
    """
    m, am = z.max(1, keepdim=True)
    L = torch.log_softmax(z, 1, out=z) if inplace else torch.log_softmax(z, 1)
    shift = torch.cat([torch.where(m.abs() == math.inf, 0.0, m), -L.gather(1, am)], 1)
    lp = None if ys is None else L.gather(1, ys.unsqueeze(1)).squeeze(1)
    if not entropy:
        return lp, None, shift
    ent = L.new_empty(L.shape[0])
    # the NaN re-check reads the host: CPU in eager mode only (vocab-parallel's Functions trace this)
    host = z.device.type == "cpu" and not _compiling()
    for r in _blocks(L.shape[0], L.shape[1], L.element_size(), 1):
        Lr = L[r]
        if not host:
            Lr.clamp_min_(_FLOOR)  # (no host sync to find the few rows that need it)
        # -sum p*L: torch's cascade sum; a bmm dot product is a sweep cheaper but
        # measurably less accurate at 100k+ classes.  p = softmax(L) (L is normalised):
        # on CPU torch's softmax kernel is faster than a bare exp (~25%), as accurate.  Assigned,
        # not out=: torch 2.4's Dynamo traces a Function's forward on grad-tracking tensors.
        ent[r] = torch.sum(torch.softmax(Lr, 1, out=_probs_buffer(Lr, work)).mul_(Lr), 1)
        if host and bool(torch.isnan(ent[r]).any()):  # a -inf logit: 0 * -inf
            Lr.clamp_min_(_FLOOR)  # (L is z or new: ours)
            ent[r] = torch.sum(torch.softmax(Lr, 1, out=_probs_buffer(Lr, work)).mul_(Lr), 1)
    return lp, ent.neg_(), shift


def grad_rows(x: Tensor, out: Optional[Tensor], ys: Tensor, shift: Tensor, ent: Optional[Tensor], a: Tensor,
              b: Optional[Tensor], temperature: float, hot: Optional[Tensor] = None,
              work: Optional[Tensor] = None) -> Tensor:
    """d(sum a*log_prob + b*H)/dx for logits rows x (any float dtype), a and b
    already divided by T (0 at ignored rows), from the saved H and shift (r, 2)
    (max, log-sum; for a vocab shard the global ones): L = (z - max) - log s.
    ``hot``: the one-hot coefficient (default a; vocab-parallel: a on the rank
    owning the target).  Returns the gradient in ``out`` (any dtype; may be x
    itself), or in a new buffer of the acc dtype.  ``work``: see _probs_buffer.

    With ``out`` in the acc dtype the math runs in it, over all rows at once,
    and only the entropy term's probabilities take a block-sized temporary;
    otherwise block by block through an fp32 copy of each block.
    """
    acc = acc_dtype(x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=acc, device=x.device)
    hot = (a if hot is None else hot).unsqueeze(1).to(acc)
    if b is not None:
        c0 = (a + b * ent).neg_().unsqueeze(1)  # -(a + b * H)
        nb = b.neg().unsqueeze(1)
    spans = [slice(0, x.shape[0])] if out.dtype == acc else _blocks(x.shape[0], x.shape[1], acc.itemsize, 2)
    for r in spans:
        if out.dtype == acc:
            L = out[r]
            # as scaled() does: cast, then multiply (torch.mul(x, c, out=L) would multiply in x's fp16/bf16)
            z = x[r] if temperature == 1.0 else L.copy_(x[r]).mul_(1.0 / temperature)
            torch.sub(z, shift[r, :1], out=L)
        else:
            L = scaled(x[r], temperature, own=False).sub_(shift[r, :1])  # a copy
        L.sub_(shift[r, 1:])
        if b is None:
            L.exp_().mul_(a[r].neg().unsqueeze(1))
        else:
            for q in _blocks(L.shape[0], L.shape[1], acc.itemsize, 1):
                Lq = L[q].clamp_min_(_FLOOR)  # exp(L) is 0 below the floor anyway: no 0 * -inf below
                p = torch.exp(Lq, out=_probs_buffer(Lq, work))
                # -p * (a + b * (L + H)) = p * (-(a + b * H) + L * -b): one addcmul sweep, one mul
                torch.addcmul(c0[r][q], Lq, nb[r][q], out=Lq).mul_(p)
                del p  # freed before the next block's is allocated
        L.scatter_add_(1, ys[r].unsqueeze(1), hot[r])
        if out.dtype != acc:  # L is a copy (a data_ptr test would break torch.compile's tracing)
            out[r].copy_(L)
    return out


def _masked(v: Tensor, target: Tensor, ignore_index: int, V: int) -> Tensor:
    """0 at ignored rows, NaN at out-of-range targets (never read out of bounds)."""
    t = target.long()
    v = torch.where((t >= 0) & (t < V), v, math.nan)
    return torch.where(t != ignore_index, v, 0.0)


class _TorchKernels:
    """The portable kernels.  ``rows_*`` work on one chunk, in place where it is
    ours and in the acc dtype, else block by block (see _blocks), so the
    whole-tensor ones are the same calls."""

    @staticmethod
    def work_buffer(x: Tensor, rows: int, entropy: bool) -> Optional[Tensor]:
        """One flat buffer for the probabilities' blocks of every chunk of ``rows``
        rows of x's shape (see _probs_buffer); None where no kernel needs one."""
        acc = acc_dtype(x.dtype)
        if not entropy or x.device.type != "cpu":
            return None
        temps = 1 if x.dtype == acc else 2  # low precision: the blocks' fp32 copies take half
        return x.new_empty(min(rows, _block_rows(x.shape[1], acc.itemsize, temps)) * x.shape[1], dtype=acc)

    @staticmethod
    def rows_forward(x, ys, temperature, entropy, own, work=None):
        acc = acc_dtype(x.dtype)
        R = x.shape[0]
        if own and x.dtype == acc:
            lp, e, shift = stats(scaled(x, temperature, True), ys, entropy, inplace=True, work=work)
            return lp, x.new_empty(0) if e is None else e, shift
        lp, shift = x.new_empty(R, dtype=acc), x.new_empty((R, 2), dtype=acc)
        ent = x.new_empty(R if entropy else 0, dtype=acc)
        for r in _blocks(R, x.shape[1], acc.itemsize, 2):
            z = scaled(x[r], temperature, own)
            lp[r], e, shift[r] = stats(z, ys[r], entropy, inplace=own or z.data_ptr() != x[r].data_ptr(),
                                       work=work)
            if entropy:
                ent[r] = e
        return lp, ent, shift

    @staticmethod
    def rows_backward(x, out, ys, shift, ent, a, b, temperature, work=None):
        return grad_rows(x, out, ys, shift, ent, a, b, temperature, work=work)

    @classmethod
    def forward(cls, x, ys, temperature, entropy):
        return cls.rows_forward(x, ys, temperature, entropy, False)

    @classmethod
    def backward(cls, x, ys, lse, ent, a, b, temperature):
        from .backends.torch_chunked import empty_like_fast
        return grad_rows(x, empty_like_fast(x), ys, lse, ent, a, b, temperature)


def kernels(backend: str):
    """The kernel set of a backend: rows_forward, rows_backward (one chunk), forward, backward."""
    if backend == "triton":
        from .backends.triton import logprobs as tk
        return tk
    return _TorchKernels


# ---------------------------------------------------------------------------
# Fused head: token-chunked passes over x (N, D) @ w.T (V, D)
# ---------------------------------------------------------------------------
def _cpu_chunk_rows(N: int, D: int, V: int, dtype: torch.dtype, entropy: bool) -> int:
    """Tokens per chunk on CPU, within _CPU_CHUNK_BYTES: per token its logits (x's
    dtype), its hidden row gathered (when ignored tokens are dropped; later its
    input-gradient row) and, for low precision, that row in fp32 (the dW GEMM's
    operand).  fp32 log-probs
    alone need nothing else (the logits become log-probs, then gradients, in
    place); otherwise the kernels' blocks take half the budget (see _blocks), as
    later does _gemm's fp32 upcast of a block of the gradient (16 MiB)."""
    from .linear import _TILE_ROWS, _chunk_rows
    elt, acc_elt = dtype.itemsize, acc_dtype(dtype).itemsize
    per_row = (V + D) * elt + (D * acc_elt if elt < acc_elt else 0)
    alone = elt == acc_elt and not entropy
    return _chunk_rows(N, per_row, _CPU_CHUNK_BYTES if alone else _CPU_CHUNK_BYTES // 2, _TILE_ROWS["cpu"])


def _work(k, zbuf: Tensor, entropy: bool) -> dict:
    """The torch kernels' reusable probabilities buffer, as keyword arguments."""
    buf = k.work_buffer(zbuf, zbuf.shape[0], entropy) if k is _TorchKernels else None
    return {} if buf is None else {"work": buf}


def linear_forward(x, w, b, target, ignore_index, temperature, entropy, chunk_rows, backend):
    """(log_probs, entropy or empty, shift (N, 2)), acc dtype, unmasked; dropped
    (ignored, CPU) rows are left 0."""
    k = kernels(backend)
    R = _Rows(x, None, target, ignore_index, True)
    N, V = target.shape[0], w.shape[0]
    acc = acc_dtype(x.dtype)
    lp, lse = x.new_zeros(N, dtype=acc), x.new_zeros((N, 2), dtype=acc)
    ent = x.new_zeros(N if entropy else 0, dtype=acc)
    ys = safe_index(target, ignore_index, V)
    # The chunk's logits, the only chunk-sized buffer (the kernels' temporaries are per block).
    zbuf = x.new_empty((max(1, min(chunk_rows, R.n)), V))
    work = _work(k, zbuf, entropy)
    for tok, xc in R.chunks(zbuf.shape[0]):
        z = _logits(xc, w, b, zbuf[:xc.shape[0]])
        l, e, s = k.rows_forward(z, R.take(ys, tok), temperature, entropy, True, **work)
        for dst, src in ((lp, l), (lse, s)) + (((ent, e),) if entropy else ()):
            if isinstance(tok, slice):
                dst[tok] = src
            else:
                dst.index_copy_(0, tok, src)
    return lp, ent, lse


def linear_backward(x, w, b, target, lse, ent, a, cb, ignore_index, temperature, need_dx, need_dw,
                    need_db, chunk_rows, backend):
    """(dx, dw, db) of sum(a * log_prob + cb * H), a and cb divided by T.  Per
    chunk: its logits are recomputed into a buffer crossent owns and turned into
    their gradient in place (in x's dtype: computed in fp32, rounded once, as
    eager rounds the logits' gradient to x's dtype before F.linear's backward),
    then dW and dx take it through the GEMMs.  One (rows, V) buffer in all."""
    k = kernels(backend)
    R = _Rows(x, None, target, ignore_index, True)
    V = w.shape[0]
    acc = acc_dtype(x.dtype)
    ys = safe_index(target, ignore_index, V)
    dx = (torch.zeros_like(x) if R.sel is not None else torch.empty_like(x)) if need_dx else x.new_empty(0)
    n = max(1, min(chunk_rows, R.n))
    # One chunk: dW = g.T @ x is one GEMM, accumulated in fp32 inside and rounded
    # once.  Several: an fp32 accumulator (dW itself for fp32/fp64) that the first
    # chunk writes with beta=0, rounded once at the end.
    dw = torch.empty(w.shape, dtype=w.dtype if n >= R.n else acc, device=w.device) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=x.device) if need_db else None
    zbuf = x.new_empty((n, V))
    work = _work(k, zbuf, cb is not None)
    first = True
    for tok, xc in R.chunks(n):
        z = _logits(xc, w, b, zbuf[:xc.shape[0]])
        rows = [None if t is None else R.take(t, tok) for t in (ys, lse, None if cb is None else ent, a, cb)]
        g = k.rows_backward(z, z, *rows, temperature, **work)  # in place: the logits become their gradient
        if need_db:
            db += g.sum(0, dtype=acc)
        if need_dw:
            _gemm(dw, g.t(), xc, first)
        if need_dx:
            if isinstance(tok, slice):
                torch.mm(g, w, out=dx[tok])
            else:  # xc is a gathered copy, no longer needed: the product goes into it
                R.put(dx, tok, torch.mm(g, w, out=xc))
        first = False
    if first and need_dw:  # every token was ignored and dropped: nothing ran
        dw.zero_()
    # A fresh empty per unused gradient: the custom op's outputs may not alias each other.
    return (dx, dw.to(w.dtype) if need_dw else x.new_empty(0),
            db.to((b if b is not None else x).dtype) if need_db else x.new_empty(0))


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------
def _rows_fake(x, n, entropy):
    acc = acc_dtype(x.dtype)
    return x.new_empty(n, dtype=acc), x.new_empty(n if entropy else 0, dtype=acc), x.new_empty((n, 2), dtype=acc)


@custom_op("crossent::log_probs_fwd", mutates_args=())
def log_probs_fwd(x: Tensor, target: Tensor, ignore_index: int, temperature: float, entropy: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (R, V) -> (log_probs, entropy or empty, shift), acc dtype, masked (shift is not):
    (R,), (R,) or (0,), and (R, 2) = (row max, log-sum) for the backward."""
    V_ = x.shape[1]
    lp, ent, lse = kernels(backend).forward(x, safe_index(target, ignore_index, V_), temperature, entropy)
    return (_masked(lp, target, ignore_index, V_),
            _masked(ent, target, ignore_index, V_) if entropy else ent, lse)


@log_probs_fwd.register_fake
def _(x, target, ignore_index, temperature, entropy, backend):
    return _rows_fake(x, x.shape[0], entropy)


@custom_op("crossent::log_probs_bwd", mutates_args=())
def log_probs_bwd(x: Tensor, target: Tensor, lse: Tensor, ent: Tensor, a: Tensor, b: Optional[Tensor],
                  ignore_index: int, temperature: float, backend: str) -> Tensor:
    return kernels(backend).backward(x, safe_index(target, ignore_index, x.shape[1]), lse, ent, a, b,
                                     temperature)


@log_probs_bwd.register_fake
def _(x, target, lse, ent, a, b, ignore_index, temperature, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("crossent::linear_log_probs_fwd", mutates_args=())
def linear_log_probs_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, ignore_index: int,
                         temperature: float, entropy: bool, chunk_rows: int,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    V_ = w.shape[0]
    lp, ent, lse = linear_forward(x, w, b, target, ignore_index, temperature, entropy, chunk_rows, backend)
    return (_masked(lp, target, ignore_index, V_),
            _masked(ent, target, ignore_index, V_) if entropy else ent, lse)


@linear_log_probs_fwd.register_fake
def _(x, w, b, target, ignore_index, temperature, entropy, chunk_rows, backend):
    return _rows_fake(x, target.shape[0], entropy)


@custom_op("crossent::linear_log_probs_bwd", mutates_args=())
def linear_log_probs_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, lse: Tensor, ent: Tensor,
                         a: Tensor, cb: Optional[Tensor], ignore_index: int, temperature: float,
                         need_dx: bool, need_dw: bool, need_db: bool, chunk_rows: int,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return linear_backward(x, w, b, target, lse, ent, a, cb, ignore_index, temperature, need_dx, need_dw,
                           need_db, chunk_rows, backend)


@linear_log_probs_bwd.register_fake
def _(x, w, b, target, lse, ent, a, cb, ignore_index, temperature, need_dx, need_dw, need_db, chunk_rows,
      backend):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), w.new_empty(w.shape) if need_dw else x.new_empty(0),
            (b if b is not None else x).new_empty(w.shape[0]) if need_db else x.new_empty(0))
