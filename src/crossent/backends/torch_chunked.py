"""Portable backend: fused cross-entropy from plain torch ops, in row chunks.

Works on any device torch supports.  The logits are visited one cache-sized
chunk at a time, so no fp32 N x C intermediate exists beyond the gradient
itself: per chunk we compute max, exp, sum (-> lse), the loss terms and, when
asked, the gradient, writing it straight into its final buffer.  The
per-chunk loss and gradient terms are in backends/torch_terms.py.

softmax / log_softmax use torch's own fused kernels (nothing to gain by
re-expressing them in torch ops) and keep torch's autograd, double backward
included.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .._validate import target_masks
from . import torch_block
from .torch_terms import _col, _Terms

# One chunk is at most this many bytes of fp32 work, and at most 1/16 of the
# whole input so chunk temporaries stay small beside the gradient.  Big
# chunks matter more than cache fit: each op on a chunk is a parallel region
# whose barrier stalls whenever another process holds a core, so fewer, larger
# ops are several times faster on a busy machine (measured on 2 cores: 32 MiB
# chunks 0.7-0.9 s vs 2 MiB chunks 3.7-10 s for 2048 x 32000 under load).
try:
    _CHUNK_BYTES = int(os.environ.get("CROSSENT_CHUNK_BYTES", 32 << 20))
except ValueError:
    raise ValueError("CROSSENT_CHUNK_BYTES must be a whole number of bytes, got "
                     f"{os.environ['CROSSENT_CHUNK_BYTES']!r}") from None
_MIN_CHUNK_BYTES = 1 << 20
_HUGE = 2 << 20  # x86-64 transparent huge page size
_POPULATE_MAX = 128 << 20


# ---------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------
_libc = None


def _madvise_huge(t: Tensor) -> None:
    """Ask Linux to back a large fresh CPU buffer with 2 MiB pages.

    A fresh N x C gradient is written exactly once; with 4 KiB pages the page
    faults cost as much as the arithmetic (~200 ms for 512 MiB on a 2-core
    machine), with huge pages about a quarter of that.  Only buffers we
    allocate ourselves are advised, never user tensors.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except OSError:
            _libc = False
    if not _libc:
        return
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = (start + _HUGE - 1) // _HUGE * _HUGE, (start + nbytes) // _HUGE * _HUGE
    if hi > lo:
        _libc.madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; failure is harmless
    if nbytes <= _POPULATE_MAX:
        # MADV_POPULATE_WRITE (Linux >= 5.14; an error elsewhere is harmless):
        # fault the whole buffer in one call.  Faulting it from inside the
        # chunk ops makes both threads of an op fight over the same huge page
        # (measured: 45-50 ms instead of 60-95 ms for a 44 MB K-dim gradient).
        # One kernel thread zeroes it, so above this size parallel faults win.
        page = start // 4096 * 4096
        _libc.madvise(page, start + nbytes - page, 23)


def empty_like_fast(x: Tensor) -> Tensor:
    """A contiguous empty tensor like ``x``; huge-page backed on Linux CPU."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.device.type == "cpu" and out.numel() * out.element_size() >= 8 * _HUGE:
        _madvise_huge(out)
    return out


def _chunks(x: Tensor):
    """Yield (x index, row index) pairs that tile x into ~_CHUNK_BYTES pieces.

    x is (R, C) or (B, C, S); rows are (R,) or (B, S).  A K-dim slice that is
    itself too big is split along S as well.
    """
    C = max(x.shape[1], 1)
    limit = min(_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, x.numel() * 4 // 16))
    budget = max(1, limit // 4 // C)  # rows per chunk
    if x.dim() == 2:
        for r in range(0, x.shape[0], budget):
            sl = slice(r, r + budget)
            yield (sl,), (sl,)
        return
    B, S = x.shape[0], x.shape[2]
    if C * S * 4 <= _CHUNK_BYTES:
        # Whole (C, S) slices, even past `limit`: a slice is contiguous, so the
        # two threads of an op fault in different (huge) pages of a fresh
        # gradient buffer; S-pieces interleave them and contend (2x slower).
        step = max(1, limit // (4 * C * S))
        for b in range(0, B, step):
            sl = slice(b, b + step)
            yield (sl,), (sl,)
    else:
        budget = max(1, _CHUNK_BYTES // 4 // C)
        for b in range(B):
            for s in range(0, S, budget):
                bs, ss = slice(b, b + 1), slice(s, s + budget)
                yield (bs, slice(None), ss), (bs, ss)


class _ChunkPool:
    """Worker threads that each run whole chunks with single-threaded ops.

    torch's CPU ops split every op across the intra-op threads and join at a
    barrier: a chunked sweep makes ~15 such parallel regions per chunk, and
    when another process holds a core each barrier waits for a descheduled
    thread (measured on 2 cores under one competing process: 2-4x slower).
    Here the parallelism is over chunks instead: each worker takes the next
    chunk from a shared iterator and runs all its ops with one intra-op thread
    (torch.set_num_threads is per thread under OpenMP, so the caller's setting
    is untouched), so a stalled worker delays only its own chunk while the
    others take the rest.  Results do not depend on which worker runs a chunk.
    """

    def __init__(self):
        self._pool, self._size, self._pid = None, 0, 0

    def executor(self, n: int) -> ThreadPoolExecutor:
        # A new pool when the thread count changed, or after a fork (the
        # child inherits the pool object but none of its threads).
        if self._pool is None or self._size != n or self._pid != os.getpid():
            if self._pool is not None and self._pid == os.getpid():
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="crossent-chunk",
                                            initializer=torch.set_num_threads, initargs=(1,))
            self._size, self._pid = n, os.getpid()
        return self._pool


_POOL = _ChunkPool()


def _for_each_chunk(body, x: Tensor, chunks=None) -> None:
    """body(*c) for every c in chunks (default: _chunks(x)): in this thread on
    accelerators (their kernels are asynchronous) or with one intra-op thread,
    else on the chunk pool with as many workers as torch has intra-op threads."""
    chunks = list(_chunks(x) if chunks is None else chunks)
    n = min(torch.get_num_threads(), len(chunks))
    if x.device.type != "cpu" or n < 2:
        for c in chunks:
            body(*c)
        return
    it, lock = iter(chunks), threading.Lock()
    inference = torch.is_inference_mode_enabled()

    def work():
        # Grad and inference mode are per thread: carry the caller's over (the
        # sweep is never recorded; inference tensors need inference mode).
        with torch.inference_mode() if inference else torch.no_grad():
            while True:
                with lock:
                    c = next(it, None)
                if c is None:
                    return
                body(*c)
    for f in [_POOL.executor(torch.get_num_threads()).submit(work) for _ in range(n)]:
        f.result()  # re-raises a worker's exception here


_LOG2E = 1.4426950408889634


def _exp_(e: Tensor) -> Tensor:
    """exp(e) in place.  On CPU fp32 as exp2(e * log2(e)): torch's exp2 kernel
    is 2-3x faster there than its exp (measured 0.3-1.0 vs 0.9-2.0 ns per
    element, AVX-512 and AVX2), and exp is most of a sweep's arithmetic.  The
    rounded product adds |e| * 2**-24 relative error to exp(e), the error
    torch's own exp(log_softmax) has (log_softmax is rounded at that scale)."""
    if e.dtype == torch.float32 and e.device.type == "cpu":
        return e.mul_(_LOG2E).exp2_()
    return e.exp_()


# ---------------------------------------------------------------------------
# K-dim inputs: (B, C, S) logits with few classes (segmentation maps)
# ---------------------------------------------------------------------------
# Logit bytes per K-dim tile, at most.  Each tile costs ~35 small ops (~90 us
# of Python and dispatch on the 2-core EPYC), so tiles must be big; past the
# caches every pass over a tile goes to memory.  Measured there for
# (8, 21, 256, 256) fp32, one thread, CPU time: 0.5 MiB 43 ms, 1 MiB 38 ms,
# 2 MiB 37 ms, 4 MiB 37 ms, one (C, S) slice (the row-chunked sweep) 55 ms.
_KDIM_TILE_BYTES = 2 << 20


def _kdim_plain(k: _Terms, x: Tensor, grad: Tensor | None) -> bool:
    """Does the K-dim tile sweep apply: contiguous (B, C, S) fp32/fp64 logits,
    class-index targets, no label smoothing, z-loss or softcap."""
    return (x.dim() == 3 and x.dtype == k.acc and x.is_contiguous() and not k.prob
            and not (k.eps or k.z_loss or k.softcap)
            and (grad is None or grad.is_contiguous()))


def _kdim_sweep(k: _Terms, x: Tensor, grad: Tensor | None, scale: Tensor, lse: Tensor,
                loss: Tensor | None) -> None:
    """_sweep for _kdim_plain inputs, one (C, blk) tile of one batch entry at a time.

    The row-chunked sweep treats a K-dim chunk as a whole (C, S) slice (5.5 MiB
    at (8, 21, 256, 256)), so each of its passes goes to memory, and the
    per-position terms cost a dozen ops over a (1, 1, S) view, with a gather
    along the strided class dim that reads the whole slice again.  Here a tile
    is at most _KDIM_TILE_BYTES (mostly cache-resident), the class-index terms
    are a few ops on blk positions, and the target logit is a take() at flat
    offsets y * S + s of the batch entry's contiguous (C, S) block: no permuted
    copy.  Same formulas as _Terms (backends/base.py) with eps = z_loss = 0.
    Accelerators take _CHUNK_BYTES tiles (fewer kernel launches).
    """
    B, C, S = x.shape
    budget = _KDIM_TILE_BYTES if x.device.type == "cpu" else _CHUNK_BYTES
    n = -(-S * C * x.element_size() // budget)  # tiles per batch entry, of even widths
    blk = -(-S // n)
    pos = torch.arange(S, device=x.device)
    w = None if k.w is None else k.w.reshape(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)  # where(out=) takes no Python scalar

    def tile(b: int, s0: int, s1: int) -> None:
        xb, xt, t = x[b].view(-1), x[b, :, s0:s1], k.target[b, s0:s1]
        valid, ok = target_masks(t, k.ignore_index, C)
        bad = valid & ~ok              # counted but out of range: NaN loss and gradient row, as _Terms
        y = t.long().clamp(0, C - 1)  # a safe index (bad rows read a real class, then become NaN)
        flat = torch.add(pos[s0:s1], y, alpha=S)
        m = xt.amax(0)
        # before the sub below may overwrite x (grad_into=x); in the loss's wide dtype
        # (an O(positions) cast): lse - z[y] can exceed fp32's range (backends/base.py)
        zy = None if loss is None else xb.take(flat).to(k.wide).sub_(m)
        e = torch.sub(xt, m) if grad is None else torch.sub(xt, m, out=grad[b, :, s0:s1])
        s = _exp_(e).sum(0)
        ls = s.log()
        torch.where(m.isinf(), m, ls + m, out=lse[b, s0:s1])  # +-inf where the max is, as torch.logsumexp
        wy = None if w is None else torch.where(valid, w.take(y), 0.0)   # ignored: 0, not w[0] (as _Terms)
        if loss is not None:
            nll = zy.neg_().add_(ls) if wy is None else zy.neg_().add_(ls).mul_(wy)
            # where(), not a multiply: an ignored row stays 0 even if its logits are inf/NaN.
            torch.where(valid, nll, zero, out=loss[b, s0:s1]).masked_fill_(bad, float("nan"))
        if grad is not None:
            sc = scale if scale.dim() == 0 else scale[b, s0:s1]
            # sc per counted row, exactly 0 for ignored ones even when sc is inf
            coef = torch.where(valid, sc, 0.0).masked_fill_(bad, float("nan"))
            if wy is not None:
                coef.mul_(wy)
            picked = coef.neg()
            e.mul_(coef.div_(s))  # sc * w[y] * softmax
            grad[b].view(-1).scatter_add_(0, flat, picked)  # - sc * w[y] at the target

    tiles = [(b, s0, min(s0 + blk, S)) for b in range(B) for s0 in range(0, S, blk)]
    _for_each_chunk(tile, x, tiles)


def _rounding_error(a: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """(a + b) - s exactly, for s = a + b rounded (TwoSum); 0 where a is +-inf."""
    bv = s - a
    err = (a - (s - bv)) + (b - bv)
    return torch.where(a.isinf(), 0.0, err)


class TorchChunkedBackend:
    name = "torch"
    softmax_native_autograd = True

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    # -- cross-entropy -------------------------------------------------------
    def ce_forward(self, x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                   scale, need_grad, grad_into=None, lse_lo=None):
        k = _Terms(x, target, weight, ignore_index, label_smoothing, z_loss, softcap)
        grad = x.new_empty(0)
        if need_grad:
            grad = grad_into if grad_into is not None else empty_like_fast(x)
        loss, lse = self._sweep(k, x, grad if need_grad else None, scale, with_loss=True,
                                may_alias=grad_into is not None, lse_lo=lse_lo)
        return loss, lse, grad

    def ce_backward(self, x, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                    scale):
        # The same sweep as the forward (max and sum recomputed, not taken from
        # the saved lse), so a recomputed gradient is bitwise the forward's one.
        k = _Terms(x, target, weight, ignore_index, label_smoothing, z_loss, softcap)
        grad = empty_like_fast(x)
        self._sweep(k, x, grad, scale, with_loss=False)
        return grad

    @staticmethod
    def _sweep(k: _Terms, x: Tensor, grad: Tensor | None, scale: Tensor, with_loss: bool,
               may_alias: bool = False, lse_lo: Tensor | None = None):
        """One pass over x in chunks: per-row lse (and loss), and the gradient
        into ``grad`` when given.  Row terms are built per chunk too, so no
        O(rows) temporaries exist beyond loss and lse (small C, e.g. a K-dim
        segmentation map, has as many rows as a few logits).  ``may_alias``:
        grad may be x's own memory (grad_into); only then are pointers compared
        (forward-mode AD's wrapped tensors have none).  ``lse_lo``: (R, C) x
        only (linear's token pass), receives lse's rounding error."""
        rows = x.shape[:1] + x.shape[2:]
        lse = torch.empty(rows, dtype=k.acc, device=x.device)
        loss = torch.empty(rows, dtype=k.wide, device=x.device) if with_loss else None
        if x.numel() == 0:  # no classes (lse = log(0)) or no rows
            lse.fill_(float("-inf"))
            if with_loss:
                loss.copy_(k.degenerate_loss())
            return loss, lse
        if _kdim_plain(k, x, grad):
            _kdim_sweep(k, x, grad, scale, lse, loss)
            return loss, lse

        def chunk(xi, ri):
            # Write e = z - max straight into the gradient buffer when dtypes
            # agree: the chunk then lives in one place from here on.
            out = grad[xi] if grad is not None and x.dtype == k.acc else None
            z, e, m = k.logits(x[xi], out, may_alias)
            # probability targets are (B, C, S) like x: a K-dim chunk split along S
            # takes x's index, whose (b, s) row index would slice C instead
            rt = k.row_terms(xi if k.prob else ri)
            zs = k.shifted_sum(e, rt) if with_loss else None
            _exp_(e)
            s = e.sum(1, keepdim=True)
            ls = torch.log(s)  # lse - m, (r, 1[, s])
            # +-inf where the row's max is (an inf logit, or every logit -inf), as
            # torch.logsumexp; z - m is NaN there, so the loss stays NaN as torch's
            lse_c = torch.where(m.isinf(), m, ls + m)
            lse[ri] = lse_c.squeeze(1)
            if lse_lo is not None:
                lse_lo[ri] = _rounding_error(m, ls, lse_c).squeeze(1)
            if with_loss:
                loss[ri] = k.loss(z, m, ls, lse_c, zs, rt).squeeze(1)
            if grad is not None:
                k.grad_(e, z, lse_c, rt, scale if scale.dim() == 0 else _col(scale[ri]), 1.0 / s)
                if out is None:
                    grad[xi].copy_(e)

        _for_each_chunk(chunk, x)
        return loss, lse

    def rescale_(self, grad: Tensor, g: Tensor) -> None:
        if grad.device.type == "cpu":
            # Reading a CPU scalar is free (no device to sync with); skipping the
            # pass when g == 1 saves a full read+write of the N x C gradient.
            gv = float(g)
            if gv != 1.0:
                grad.mul_(gv)
        else:
            grad.mul_(g.to(grad.dtype))

    def ce_in_place(self, dtype: torch.dtype) -> bool:
        return False  # each piece of the sweep has fp32 temporaries (_chunks)

    # linear_cross_entropy's vocabulary pass (contract: base.py)
    block_grad_ = staticmethod(torch_block.block_grad_)
    block_grad_scratch = staticmethod(torch_block.block_grad_scratch)

    # -- softmax -------------------------------------------------------------
    def softmax_forward(self, x: Tensor, dim: int, log: bool) -> Tensor:
        return torch._log_softmax(x, dim, False) if log else torch._softmax(x, dim, False)

    def softmax_backward(self, g, y, dim, log, input_dtype):
        if log:
            return torch._log_softmax_backward_data(g, y, dim, input_dtype)
        return torch._softmax_backward_data(g, y, dim, input_dtype)
