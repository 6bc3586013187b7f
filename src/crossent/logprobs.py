"""Token log-probabilities and entropy for RL fine-tuning (PPO, GRPO, ...).

``log_probs(logits, target)`` is ``log_softmax(logits.float() / T).gather(-1, target)``
and, with ``entropy=True``, ``-(p * log p).sum(-1)`` of the same distribution,
both differentiable, without the N x V log-softmax, probabilities or their
gradients in memory.  ``linear_log_probs(h, W, target)`` does the same from
hidden states and the LM head, never holding more than one chunk of logits.

Per row, with z = x / T (fp32; fp64 for fp64; computed as x * (1/T)), m = max z, e = z - m, s = sum exp(e):
  lse = m + log s,   log_prob = z[y] - lse,   H = log s - sum(exp(e) * e) / s = -sum p * (z - lse)
and for upstream gradients (g, h) of (log_prob, H), with L = z - lse, p = exp(L):
  dx = ( g * ([c == y] - p) - h * p * (L + H) ) / T
All sums are relative to the row max, so nothing cancels at large |logits|.

Layers (QuACK order): the torch kernels (one chunk of rows) -> the chunked
passes -> torch custom ops (torch.compile sees one opaque node each) -> the
public functions.  The autograd Functions live in crossent._autograd; the
Triton kernels in crossent.backends.triton.logprobs.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.library import custom_op

from . import _validate as V
from . import backends
from ._linear_ops import _addmm_acc, _logits, _Rows, acc_dtype

__all__ = ["LogProbsOutput", "log_probs", "linear_log_probs"]

# exp(-1024) is 0 in fp32 and fp64: clamping z - m there changes no probability
# but turns a -inf logit's p * log p = 0 * -inf = NaN into 0 (0 log 0 = 0).
_FLOOR = -1024.0
# Fused head on CPU: chunk buffers of ~128 MiB (~500 tokens at V = 32k fp32).  The
# backward's dW += dlogits.T @ x_chunk re-reads and re-writes all of dW per chunk,
# so chunks of a few hundred tokens run the three GEMMs 20-30% faster than
# linear_cross_entropy's 32 MiB ones (which fold the gradient into the forward
# pass and are done after one sweep).
_CPU_CHUNK_BYTES = 128 << 20


class LogProbsOutput(NamedTuple):
    """What :func:`log_probs` / :func:`linear_log_probs` return, whatever the flags.

    log_probs: log-probability of each target token, shaped like ``target``.
    entropy:   entropy of each position's distribution, shaped like ``target``;
               None unless ``entropy=True`` was passed.
    """

    log_probs: Tensor
    entropy: Optional[Tensor]


# ---------------------------------------------------------------------------
# torch kernels: one chunk of rows z (r, V)
# ---------------------------------------------------------------------------
def safe_index(target: Tensor, ignore_index: int, V: int) -> Tensor:
    """int64 class index that is always in bounds (0 for ignored / out-of-range rows)."""
    t = target.long()  # compare in int64: ignore_index is never wrapped into a narrow dtype
    return torch.where((t != ignore_index) & (t >= 0) & (t < V), t, 0)


def scaled(xc: Tensor, temperature: float, own: bool) -> Tensor:
    """z = xc * (1/T) in the accumulation dtype; in place when ``own`` and no cast
    is needed.  Multiplying (within an ulp of xc / T) is what the backward's
    recomputation does too, so both see the same z."""
    z = xc.to(acc_dtype(xc.dtype))
    if temperature != 1.0:
        inv = 1.0 / temperature
        z = z.mul_(inv) if own and z.data_ptr() == xc.data_ptr() else z * inv
    return z


def stats(z: Tensor, ys: Optional[Tensor], entropy: bool) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """(log_prob at ys or None, H or None, shift), of the rows of z; shift (r, 2)
    holds (max, log sum exp(z - max)), whose sum is the lse.  They are kept
    apart so the backward's z - max - log s rounds like log_softmax does (one
    fp32 lse would cost an ulp of |lse| in every p).

    torch's fused (log_)softmax kernels do the exponentials: on CPU each is
    faster than a bare torch.exp over the same chunk, let alone max, sub, exp
    and sum as separate sweeps.  log s is read back at the row's argmax, where
    log_softmax = -log s exactly.
    """
    m, am = z.max(1, keepdim=True)
    L = torch.log_softmax(z, 1)
    shift = torch.cat([torch.where(m.abs() == math.inf, 0.0, m), -L.gather(1, am)], 1)
    lp = None if ys is None else L.gather(1, ys.unsqueeze(1)).squeeze(1)
    if not entropy:
        return lp, None, shift
    p = torch.softmax(z, 1)
    if z.device.type != "cpu":
        L.clamp_min_(_FLOOR)  # (no host sync to find the few rows that need it)
    # -sum p*L in place (p is not needed again): torch's cascade sum; a bmm dot
    # product is a sweep cheaper but measurably less accurate at 100k+ classes.
    ent = p.mul_(L).sum(1).neg_()
    bad = torch.isnan(ent)
    if z.device.type == "cpu" and bool(bad.any()):  # a -inf logit: 0 * -inf; reading a CPU flag is free
        Lb = L[bad].clamp_min_(_FLOOR)
        ent[bad] = -(Lb.exp() * Lb).sum(1)
    return lp, ent, shift


def grad_rows(x: Tensor, out: Optional[Tensor], ys: Tensor, shift: Tensor, ent: Optional[Tensor], a: Tensor,
              b: Optional[Tensor], temperature: float, hot: Optional[Tensor] = None) -> Tensor:
    """d(sum a*log_prob + b*H)/dx for logits rows x (any float dtype), a and b
    already divided by T (0 at ignored rows), from the saved H and shift (r, 2)
    (max, log-sum; for a vocab shard the global ones): L = (z - max) - log s.
    ``hot``: the one-hot coefficient (default a; vocab-parallel: a on the rank
    owning the target).  Returns the gradient in the acc dtype: in ``out``
    (any dtype; may be x itself) when given, else in a new buffer.
    """
    z = scaled(x, temperature, own=out is not None and out.data_ptr() == x.data_ptr())
    dst = out if out is not None and out.dtype == z.dtype else None
    L = torch.sub(z, shift[:, :1], out=dst).sub_(shift[:, 1:])
    if b is None:
        L.exp_().mul_(a.neg().unsqueeze(1))
    else:
        p = torch.exp(L.clamp_min_(_FLOOR))  # exp(L) is 0 below the floor anyway: no 0 * -inf below
        # -p * (a + b * (L + H)) = p * (-(a + b * H) + L * -b): one addcmul sweep, one mul
        torch.addcmul((a + b * ent).neg_().unsqueeze(1), L, b.neg().unsqueeze(1), out=L).mul_(p)
    L.scatter_add_(1, ys.unsqueeze(1), (a if hot is None else hot).unsqueeze(1).to(L.dtype))
    return L if out is None or L.data_ptr() == out.data_ptr() else out.copy_(L)


def _masked(v: Tensor, target: Tensor, ignore_index: int, V: int) -> Tensor:
    """0 at ignored rows, NaN at out-of-range targets (never read out of bounds)."""
    t = target.long()
    v = torch.where((t >= 0) & (t < V), v, math.nan)
    return torch.where(t != ignore_index, v, 0.0)


class _TorchKernels:
    """The portable kernels: ``rows_*`` work on one chunk, the others chunk a whole tensor."""

    @staticmethod
    def rows_forward(x, ys, temperature, entropy, own):
        return stats(scaled(x, temperature, own), ys, entropy)

    @staticmethod
    def rows_backward(x, out, ys, shift, ent, a, b, temperature):
        return grad_rows(x, out, ys, shift, ent, a, b, temperature)

    @classmethod
    def forward(cls, x, ys, temperature, entropy):
        from .backends.torch_chunked import _chunks
        acc = acc_dtype(x.dtype)
        R = x.shape[0]
        lp, lse = x.new_empty(R, dtype=acc), x.new_empty((R, 2), dtype=acc)
        ent = x.new_empty(R if entropy else 0, dtype=acc)
        for (ri,), _ in _chunks(x):
            l, e, s = cls.rows_forward(x[ri], ys[ri], temperature, entropy, False)
            lp[ri], lse[ri] = l, s
            if entropy:
                ent[ri] = e
        return lp, ent, lse

    @classmethod
    def backward(cls, x, ys, lse, ent, a, b, temperature):
        from .backends.torch_chunked import _chunks, empty_like_fast
        dx = empty_like_fast(x)
        for (ri,), _ in _chunks(x):
            cls.rows_backward(x[ri], dx[ri], ys[ri], lse[ri], None if b is None else ent[ri], a[ri],
                              None if b is None else b[ri], temperature)
        return dx


def kernels(backend: str):
    """The kernel set of a backend: rows_forward, rows_backward (one chunk), forward, backward."""
    if backend == "triton":
        from .backends.triton import logprobs as tk
        return tk
    return _TorchKernels


# ---------------------------------------------------------------------------
# Fused head: token-chunked passes over x (N, D) @ w.T (V, D)
# ---------------------------------------------------------------------------
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
    # The chunk's logits; the kernels add at most two chunk-sized temporaries.
    zbuf = x.new_empty((max(1, min(chunk_rows, R.n)), V))
    for tok, xc in R.chunks(zbuf.shape[0]):
        z = _logits(xc, w, b, zbuf[:xc.shape[0]])
        l, e, s = k.rows_forward(z, R.take(ys, tok), temperature, entropy, True)
        for dst, src in ((lp, l), (lse, s)) + (((ent, e),) if entropy else ()):
            if isinstance(tok, slice):
                dst[tok] = src
            else:
                dst.index_copy_(0, tok, src)
    return lp, ent, lse


def linear_backward(x, w, b, target, lse, ent, a, cb, ignore_index, temperature, need_dx, need_dw,
                    need_db, chunk_rows, backend):
    """(dx, dw, db) of sum(a * log_prob + cb * H), a and cb divided by T; the
    logits of each chunk are recomputed and turned into their gradient (in
    place where the kernel allows)."""
    k = kernels(backend)
    R = _Rows(x, None, target, ignore_index, True)
    V = w.shape[0]
    acc = acc_dtype(x.dtype)
    ys = safe_index(target, ignore_index, V)
    e = x.new_empty(0)
    dx = (torch.zeros_like(x) if R.sel is not None else torch.empty_like(x)) if need_dx else e
    lowp = acc != x.dtype
    # dW accumulates over chunks in fp32 and is rounded once (for fp32 it is dW itself).
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else e
    db = torch.zeros(V, dtype=acc, device=x.device) if need_db else e
    n = max(1, min(chunk_rows, R.n))
    zbuf = x.new_empty((n, V))
    gbuf = x.new_empty((n, V), dtype=acc) if lowp else zbuf
    for tok, xc in R.chunks(n):
        m = xc.shape[0]
        z = _logits(xc, w, b, zbuf[:m])
        rows = [None if t is None else R.take(t, tok) for t in (ys, lse, None if cb is None else ent, a, cb)]
        g = k.rows_backward(z, gbuf[:m], *rows, temperature)
        if need_db:
            db += g.sum(0)
        if need_dw:
            _addmm_acc(dw, g.t(), xc)
        if need_dx:
            gl = g if g.dtype == x.dtype else zbuf[:m].copy_(g)
            if isinstance(tok, slice):
                torch.mm(gl, w, out=dx[tok])
            else:
                R.put(dx, tok, torch.mm(gl, w))
    return dx, dw.to(w.dtype) if need_dw else e, db.to((b if b is not None else x).dtype) if need_db else e


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
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e, w.new_empty(w.shape) if need_dw else e,
            (b if b is not None else x).new_empty(w.shape[0]) if need_db else e)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------
def check_args(fname: str, lead: tuple, target: Tensor, temperature, ignore_index,
               entropy) -> tuple[float, int, bool]:
    """Shared argument checks (also used by crossent.distributed); returns
    (temperature, ignore_index, entropy) as Python values."""
    T = V.float_arg(temperature, fname, "temperature", 3)
    if not (0.0 < T < math.inf):
        raise ValueError(f"{fname}: temperature must be positive and finite, got {T}")
    ignore_index = V.int_arg(ignore_index, fname, "ignore_index", 4)
    if not isinstance(entropy, bool):
        raise TypeError(f"{fname}(): argument 'entropy' must be bool, not {type(entropy).__name__}")
    if tuple(target.shape) != lead:
        raise ValueError(f"{fname}: expected target of shape {list(lead)}, got {list(target.shape)}")
    V._check_target_dtype(target)
    return T, ignore_index, entropy


def _check_classes(fname: str, V_: int, target: Tensor, ignore_index: int) -> None:
    if V_ == 0:
        raise ValueError(f"{fname}: expected at least one class, got a vocabulary of size 0")
    V.check_target_bounds(target, V_, ignore_index)


def _output(lp: Tensor, ent: Tensor, shape, entropy: bool) -> LogProbsOutput:
    return LogProbsOutput(lp.reshape(shape), ent.reshape(shape) if entropy else None)


def log_probs(logits: Tensor, target: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
              entropy: bool = False) -> LogProbsOutput:
    """Per-token log-probability of ``target`` (and the entropy) under
    ``softmax(logits / temperature)``, classes on the last dim.

    Equals ``torch.log_softmax(logits.float() / temperature, -1).gather(-1,
    target[..., None])[..., 0]`` and ``-(p * log p).sum(-1)`` with
    p = softmax(logits.float() / temperature), without materialising either
    N x V tensor.

    logits: (*B, V), any float dtype.  target: (*B) class indices (int64/int32/uint8).
    Returns ``LogProbsOutput(log_probs, entropy)``, both shaped like ``target``
    and in fp32 for fp32/fp16/bf16 logits (fp64 for fp64), 0 at positions where
    ``target == ignore_index``; ``entropy`` is None unless ``entropy=True``.
    Differentiable w.r.t. ``logits`` for any upstream gradients of either output
    (the gradient includes the 1/temperature).  A logit of -inf (a masked
    class) contributes 0 to the entropy (0 log 0 = 0); the eager formula gives NaN.
    """
    from ._autograd import LogProbsFunction, LogProbsOptions
    V.tensor_arg(logits, "log_probs", "logits", 1)
    V.tensor_arg(target, "log_probs", "target", 2)
    if logits.dim() < 1:
        raise ValueError("log_probs: expected logits with at least 1 dimension (classes last), got 0")
    V.floating_input(logits, "log_probs")
    lead, V_ = tuple(logits.shape[:-1]), logits.shape[-1]
    T, ii, entropy = check_args("log_probs", lead, target, temperature, ignore_index, entropy)
    _check_classes("log_probs", V_, target, ii)
    opts = LogProbsOptions(ignore_index=ii, temperature=T, entropy=entropy,
                           backend=backends.name_for(logits.device.type))
    x = logits.reshape(-1, V_)
    lp, ent = LogProbsFunction.apply(x if x.stride(-1) == 1 else x.contiguous(), target.reshape(-1), opts)
    return _output(lp, ent, target.shape, entropy)


def linear_log_probs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                     linear_bias: Tensor | None = None, temperature: float = 1.0,
                     ignore_index: int = -100, entropy: bool = False) -> LogProbsOutput:
    """:func:`log_probs` of ``F.linear(input, linear_weight, linear_bias)``
    without the logits in memory: tokens are processed in chunks (the chunk
    sizes of :func:`crossent.linear_cross_entropy`), so the only (rows, V)
    buffers are one chunk's logits and their gradient.

    input: (*B, D) hidden states; linear_weight: (V, D); linear_bias: (V,) or
    None; target: (*B) class indices.  Returns ``LogProbsOutput`` as
    :func:`log_probs` does (fp32 results for low-precision inputs; the logits
    are rounded to the input dtype first, as the eager ``F.linear`` does).
    Differentiable w.r.t. input, linear_weight and linear_bias; the backward
    recomputes each chunk's logits (one extra matmul instead of an N x V
    buffer).  The weight gradient accumulates in fp32 and is rounded once.
    On CPU, ignored positions skip the matmuls altogether.
    """
    from ._autograd import LinearLogProbsFunction, LogProbsOptions
    from .linear import LinearCrossEntropyOptions, _checks, _plan
    V.tensor_arg(input, "linear_log_probs", "input", 1)
    V.tensor_arg(linear_weight, "linear_log_probs", "linear_weight", 2)
    V.tensor_arg(target, "linear_log_probs", "target", 3)
    _checks(input, linear_weight, linear_bias)
    if linear_weight.dim() != 2:
        raise RuntimeError(f"linear_log_probs: expected a 2-D linear_weight (V, D), got {linear_weight.dim()}-D")
    D, V_ = input.shape[-1], linear_weight.shape[0]
    bias0 = None if linear_bias is None else linear_bias[:0]
    TF.linear(input.reshape(-1, D)[:0], linear_weight[:0], bias0)  # F.linear's dtype/device errors
    V.floating_input(input, "linear_log_probs")
    lead = tuple(input.shape[:-1])
    T, ii, entropy = check_args("linear_log_probs", lead, target, temperature, ignore_index, entropy)
    _check_classes("linear_log_probs", V_, target, ii)
    t = target.reshape(-1)
    backend = backends.name_for(input.device.type)
    budget = _CPU_CHUNK_BYTES if input.device.type == "cpu" else None
    plan, _ = _plan(t.shape[0], D, V_, input.dtype, input.device,
                    LinearCrossEntropyOptions(acc_policy="accurate", chunk_bytes=budget), backend)
    opts = LogProbsOptions(ignore_index=ii, temperature=T, entropy=entropy, backend=backend,
                           chunk_rows=plan.chunk_size)
    lp, ent = LinearLogProbsFunction.apply(input.reshape(-1, D), linear_weight, linear_bias, t, opts)
    return _output(lp, ent, target.shape, entropy)
