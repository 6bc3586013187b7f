"""Token log-probabilities and entropy (crossent.log_probs / linear_log_probs and their
vocab-parallel variants): their autograd Functions (kernels: crossent/_logprobs_ops.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from .ce import CrossentFunction
from .vocab_parallel import _row_chunks


@dataclass(frozen=True)
class LogProbsOptions:
    ignore_index: int = -100
    temperature: float = 1.0
    entropy: bool = False
    backend: str = "torch"
    chunk_rows: int = 1024        # fused / vocab-parallel linear: tokens per chunk (0: default)
    reduce_input_grad: bool = True  # vocab-parallel linear only


def lp_coeffs(target: Tensor, opts: LogProbsOptions, V: int, g_lp, g_ent, acc):
    """Per-row coefficients (a, b) of the backward kernels: the upstream
    gradients divided by T, 0 at ignored rows (NaN where a target is out of range)."""
    t = target.long()
    keep = t != opts.ignore_index
    a = torch.zeros(t.shape, dtype=acc, device=t.device) if g_lp is None else g_lp.to(acc) / opts.temperature
    a = torch.where(keep, torch.where((t >= 0) & (t < V), a, float("nan")), 0.0)
    b = None if g_ent is None or not opts.entropy else torch.where(keep, g_ent.to(acc) / opts.temperature, 0.0)
    return a, b


def grad_in_torch_ops(z: Tensor, target: Tensor, a: Tensor, b: Tensor | None, opts: LogProbsOptions) -> Tensor:
    """d(sum a * log_probs + b * entropy)/dz in torch's differentiable ops, in a's dtype
    (a, b: lp_coeffs, 1/T included), for backward(create_graph=True) and torch.func.grad,
    whose gradient needs a graph.  The steps of autograd through the definition
    (gather, entropy -(p * where(p > 0, log p, 0)).sum(-1), log_softmax), so a non-finite
    upstream or logit gives torch's inf/NaN pattern."""
    logp = torch.log_softmax(z.to(a.dtype) / opts.temperature, -1)
    p = logp.exp()
    t = target.long()
    idx = torch.where((t >= 0) & (t < z.shape[1]), t, 0).unsqueeze(1)
    g = torch.zeros_like(p).scatter(1, idx, a.unsqueeze(1))   # gather's backward: 0 off the target
    if b is not None:
        nb = -b.unsqueeze(1)
        g = g + (nb * torch.where(p > 0, logp, 0.0)) * p + torch.where(p > 0, nb * p, 0.0)
    return g - p * g.sum(1, keepdim=True)


class LogProbsFunction(CrossentFunction):
    """(x (R, V), target (R,), opts) -> (log_probs (R,), entropy (R,) or empty, lse (R, 2):
    row max and log-sum, not differentiable); acc dtype.  Saves lse and the entropy; the
    backward reads the logits once more."""

    @staticmethod
    def forward(x: Tensor, target: Tensor, opts: LogProbsOptions):
        from .. import _logprobs_ops as L
        return L.log_probs_fwd(x, target, opts.ignore_index, opts.temperature, opts.entropy, opts.backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, opts = inputs
        _, ent, lse = output
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an unused output costs nothing in the backward
        ctx.save_for_backward(x, target, lse, ent)

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None, _g_lse):
        from .. import _logprobs_ops as L
        x, target, lse, ent = ctx.saved_tensors
        o: LogProbsOptions = ctx.opts
        a, b = lp_coeffs(target, o, x.shape[1], g_lp, g_ent, lse.dtype)
        if torch.is_grad_enabled():
            return grad_in_torch_ops(x, target, a, b, o).to(x.dtype), None, None
        return L.log_probs_bwd(x, target, lse, ent, a, b, o.ignore_index, o.temperature, o.backend), None, None


class LinearLogProbsFunction(CrossentFunction):
    """(x (N, D), w (V, D), b (V,) or None, target (N,), opts) -> (log_probs, entropy or empty,
    lse as LogProbsFunction's).  The backward recomputes each chunk's logits (per-token
    upstream gradients cannot be folded into the forward)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: LogProbsOptions):
        from .. import _logprobs_ops as L
        return L.linear_log_probs_fwd(x, w, b, target, opts.ignore_index, opts.temperature, opts.entropy,
                                      opts.chunk_rows, opts.backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, target, opts = inputs
        _, ent, lse = output
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, b, target, lse, ent)

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None, _g_lse):
        from .. import _logprobs_ops as L
        x, w, b, target, lse, ent = ctx.saved_tensors
        o: LogProbsOptions = ctx.opts
        nx, nw = ctx.needs_input_grad[:2]
        nb = b is not None and ctx.needs_input_grad[2]
        a, cb = lp_coeffs(target, o, w.shape[0], g_lp, g_ent, lse.dtype)
        if torch.is_grad_enabled():  # the logits as the forward rounds them, then differentiable ops
            dz = grad_in_torch_ops(torch.nn.functional.linear(x, w, b), target, a, cb, o)
            dx = (dz @ w.to(dz.dtype)).to(x.dtype) if nx else None
            dw = (dz.t() @ x.to(dz.dtype)).to(w.dtype) if nw else None
            return dx, dw, dz.sum(0).to(b.dtype) if nb else None, None, None
        dx, dw, db = L.linear_log_probs_bwd(x, w, b, target, lse, ent, a, cb, o.ignore_index, o.temperature,
                                            nx, nw, nb, o.chunk_rows, o.backend)
        return dx if nx else None, dw if nw else None, db if nb else None, None, None


class VocabParallelLogProbsFunction(torch.autograd.Function):
    """(x_shard (R, V_l), target (R,) global ids, opts, group, vocab_start_index)
    -> (log_probs, entropy or empty), the same on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, opts: LogProbsOptions, group, vocab_start_index):
        from ..backends.torch_chunked import _chunks
        from ..distributed.logprobs import ShardLogProbs
        st = ShardLogProbs(opts, target, x.shape[1], group, vocab_start_index, x.dtype, x.device)
        lp, ent = st.forward(((ri, x[ri], False) for (ri,), _ in _chunks(x)),
                             lambda idx: x.gather(1, idx.unsqueeze(1)).squeeze(1))
        ctx.st = st  # O(N) state: lse, entropy, owner mask; never logits
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        from ..backends.torch_chunked import _chunks, empty_like_fast
        (x,) = ctx.saved_tensors
        st = ctx.st
        a, b = st.coeffs(g_lp, g_ent)
        dx = empty_like_fast(x)
        for (ri,), _ in _chunks(x):
            st.grad_rows(x[ri], dx[ri], ri, a, b)
        return dx, None, None, None, None


class VocabParallelLinearLogProbsFunction(torch.autograd.Function):
    """(x (N, D), w_shard (V_l, D), b_shard | None, target (N,), opts, group,
    vocab_start_index) -> (log_probs, entropy or empty); logits one chunk at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: LogProbsOptions, group,
                vocab_start_index):
        from ..distributed.logprobs import ShardLogProbs, linear_zy
        st = ShardLogProbs(opts, target, w.shape[0], group, vocab_start_index, x.dtype, x.device)
        chunks = _row_chunks(x.shape[0], w.shape[0], x.device, opts.chunk_rows or None)
        lp, ent = st.forward(((ri, torch.nn.functional.linear(x[ri], w, b), True) for ri in chunks),
                             lambda idx: linear_zy(x, w, b, idx))
        ctx.st = st
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w, b)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        from .._linear_ops import _addmm_acc
        from ..distributed import _core as K
        x, w, b = ctx.saved_tensors
        st = ctx.st
        nx, nw = ctx.needs_input_grad[:2]
        nb = b is not None and ctx.needs_input_grad[2]
        a, cb = st.coeffs(g_lp, g_ent)
        acc = a.dtype
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if nx else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if nw else None  # fp32, rounded once
        db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if nb else None
        for ri in _row_chunks(x.shape[0], w.shape[0], x.device, st.opts.chunk_rows or None):
            xc = x[ri]
            z = torch.nn.functional.linear(xc, w, b)
            dz = st.grad_rows(z, None, ri, a, cb)
            if db is not None:
                db += dz.sum(0)
            if dw is not None:
                _addmm_acc(dw, dz.t(), xc)
            if dx is not None:
                torch.mm(dz.to(x.dtype), w, out=dx[ri])
        if dx is not None and st.opts.reduce_input_grad:
            K.all_reduce_(dx, torch.distributed.ReduceOp.SUM, st.group, st.world)
        return (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype),
                None, None, None, None)
