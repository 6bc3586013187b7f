"""Vocab-parallel token log-probabilities and entropy (crossent.log_probs on
class-sharded logits, or on a vocab-sharded LM head).

Each rank holds the classes [start, start + V_l) and computes, per row, from
its own columns only (z = logits / T):
  lse_r = logsumexp(z),  H_r = entropy of the local softmax,  z[y] if it owns y.
One MAX all_reduce gives M = max_r lse_r (the slice sizes ride along), one SUM
all_reduce the stack
  S = sum_r w_r,  Q = sum_r w_r (lse_r - M - H_r),  zy = sum_r z[y]_r,   w_r = exp(lse_r - M)
and then lse = M + log S, log_prob = zy - lse, H = log S - Q / S: the
single-process result, with O(N) numbers on the wire.  The backward needs only
the global lse and H (saved): no communication, except the input gradient's
all_reduce of the linear variant.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validate as V
from .._autograd import (LogProbsOptions, VocabParallelLinearLogProbsFunction, VocabParallelLogProbsFunction,
                         lp_coeffs)
from .._linear_ops import acc_dtype
from .._logprobs_ops import grad_rows, scaled, stats
from ..logprobs import LogProbsOutput, check_args
from . import _core as K
from ._checks import host_checks, slice_layout
from .linear_parallel import check_head

__all__ = ["vocab_parallel_log_probs", "vocab_parallel_linear_log_probs"]


class ShardLogProbs:
    """One rank's O(N) state for one call: global lse and entropy, target ownership."""

    def __init__(self, opts: LogProbsOptions, target: Tensor, v_local: int, group, vocab_start_index, dtype,
                 device):
        self.opts, self.target, self.v_local, self.vsi = opts, target, v_local, vocab_start_index
        self.group, self.rank, self.world = K.resolve_group(group)
        self.acc, self.device = acc_dtype(dtype), device

    def forward(self, chunks, zy_fn) -> tuple[Tensor, Tensor]:
        """chunks: (row slice, logits chunk, chunk is ours to overwrite); zy_fn(idx):
        the logits at local class idx per row."""
        o, acc, dev = self.opts, self.acc, self.device
        R = self.target.shape[0]
        # this shard's row max and log-sum-exp relative to it, kept apart as stats() keeps
        # them (max + log s in one fp32 number costs an ulp of |lse| in every log-prob)
        m_r = torch.full((R,), -math.inf, dtype=acc, device=dev)
        ls_r = torch.zeros(R, dtype=acc, device=dev)
        h_r = torch.zeros(R if o.entropy else 0, dtype=acc, device=dev)
        if self.v_local:
            for ri, xc, own in chunks:
                z = scaled(xc, o.temperature, own)
                _, h, shift = stats(z, None, o.entropy)
                # NaN where log s is (a NaN or +inf logit, an all -inf row), as max + log s was
                m_r[ri], ls_r[ri] = shift[:, 0] + shift[:, 1] * 0, shift[:, 1]
                if o.entropy:
                    h_r[ri] = h
        buf = K.sizes_onehot(self.v_local, self.rank, self.world, acc, dev, first=m_r)
        K.all_reduce_(buf, dist.ReduceOp.MAX, self.group, self.world)
        M = buf[:R]
        lay = slice_layout(buf[R:], self.vsi, self.rank, self.v_local, acc, dev)
        self.C = lay.C.long()
        if host_checks(dev):
            V.check_target_bounds(self.target, int(self.C), o.ignore_index)
        t = self.target.long()
        valid, inb = t != o.ignore_index, (t >= 0) & (t < self.C)
        loc = t - lay.start
        self.owner = valid & inb & (loc >= 0) & (loc < self.v_local)
        self.idx = torch.where(self.owner, loc, 0)
        zero = torch.zeros((), dtype=acc, device=dev)
        zy = torch.where(self.owner, zy_fn(self.idx).to(acc) * (1.0 / o.temperature), zero) if self.v_local \
            else torch.zeros(R, dtype=acc, device=dev)
        Ms = torch.where(M.abs() == math.inf, zero, M)
        d = (m_r - Ms) + ls_r  # this shard's lse - Ms
        w = torch.exp(d)
        parts = [w, zy] + ([torch.where(w > 0, w * (d - h_r), zero)] if o.entropy else [])
        summed = K.all_reduce_(torch.stack(parts), dist.ReduceOp.SUM, self.group, self.world)
        logS = summed[0].log()
        self.shift = torch.stack([Ms, logS], 1)  # lse = Ms + logS, kept apart (see _logprobs_ops.stats)

        def mask(v):
            return torch.where(valid, torch.where(inb, v, math.nan), zero)

        lp = mask((summed[1] - Ms) - logS)
        self.ent = mask(logS - summed[2] / summed[0]) if o.entropy else h_r
        return lp, self.ent

    def coeffs(self, g_lp, g_ent):
        return lp_coeffs(self.target, self.opts, self.C, g_lp, g_ent, self.acc)

    def grad_rows(self, xc: Tensor, out: Tensor, ri, a: Tensor, b: Tensor | None) -> Tensor:
        """d(sum a*log_prob + b*H)/d(logits shard) for the rows ri, into out."""
        if self.v_local == 0:  # an empty shard: an empty gradient
            return out if out is not None else torch.empty(xc.shape, dtype=self.acc, device=xc.device)
        hot = torch.where(self.owner[ri], a[ri], 0.0)
        return grad_rows(xc, out, self.idx[ri], self.shift[ri],
                         None if b is None else self.ent[ri], a[ri], None if b is None else b[ri],
                         self.opts.temperature, hot)


def linear_zy(x: Tensor, w: Tensor, b: Tensor | None, idx: Tensor) -> Tensor:
    """x[i] . w[idx[i]] (+ b[idx[i]]) per row, rounded to x's dtype as F.linear's
    logits are; O(N*D), in row chunks."""
    acc = acc_dtype(x.dtype)
    out = torch.empty(idx.shape, dtype=x.dtype, device=x.device)
    step = max(1, (8 << 20) // max(1, 4 * x.shape[1]))
    for r in range(0, idx.shape[0], step):
        sl = slice(r, r + step)
        v = (x[sl].to(acc) * w.index_select(0, idx[sl]).to(acc)).sum(-1)
        out[sl] = v if b is None else v + b.index_select(0, idx[sl]).to(acc)
    return out


def vocab_parallel_log_probs(logits_shard: Tensor, target: Tensor, *, group=None, temperature: float = 1.0,
                             ignore_index: int = -100, entropy: bool = False,
                             vocab_start_index: int | Tensor | None = None) -> LogProbsOutput:
    """crossent.log_probs over logits sharded by class across the ranks of ``group``.

    logits_shard: (*B, V_l), this rank's classes [vocab_start_index, + V_l),
        slices contiguous and in rank order (uneven, even empty, allowed).
    target: (*B) GLOBAL class indices, identical on every rank.
    group: ProcessGroup, 1-D DeviceMesh or None (default group).
    vocab_start_index: this rank's first class; None derives it from the slice
        sizes, which ride on the first all_reduce (no extra collective).
    Returns the same ``LogProbsOutput`` on every rank.  The gradient of this
    rank's shard is exactly that slice of the full gradient.  Communication:
    one MAX and one SUM all_reduce of O(N) numbers, none in the backward.
    """
    V.tensor_arg(logits_shard, "vocab_parallel_log_probs", "logits_shard", 1)
    V.tensor_arg(target, "vocab_parallel_log_probs", "target", 2)
    if logits_shard.dim() < 1:
        raise ValueError("vocab_parallel_log_probs: expected logits with at least 1 dimension (classes last)")
    V.floating_input(logits_shard, "vocab_parallel_log_probs")
    lead = tuple(logits_shard.shape[:-1])
    T, ii, entropy = check_args("vocab_parallel_log_probs", lead, target, temperature, ignore_index, entropy)
    x = logits_shard.reshape(math.prod(lead), logits_shard.shape[-1])  # -1 is ambiguous for an empty shard
    if V._compiling():  # the kernels write rows of x's layout with out=, which Dynamo traces only when contiguous
        x = x.contiguous()
    opts = LogProbsOptions(ignore_index=ii, temperature=T, entropy=entropy)
    lp, ent = VocabParallelLogProbsFunction.apply(x, target.reshape(-1), opts, group, vocab_start_index)
    return LogProbsOutput(lp.reshape(target.shape), ent.reshape(target.shape) if entropy else None)


def vocab_parallel_linear_log_probs(input: Tensor, weight_shard: Tensor, target: Tensor, *, group=None,
                                    linear_bias_shard: Tensor | None = None, temperature: float = 1.0,
                                    ignore_index: int = -100, entropy: bool = False,
                                    vocab_start_index: int | Tensor | None = None,
                                    reduce_input_grad: bool = True,
                                    chunk_size: int | None = None) -> LogProbsOutput:
    """crossent.linear_log_probs with the LM head's rows (the vocabulary) sharded
    across ``group``; logits exist one chunk of tokens at a time on each rank.

    input: (*B, D), replicated.  weight_shard: (V_l, D) rows [vocab_start_index,
    + V_l) of the head; linear_bias_shard: (V_l,) or None.  target: (*B) global
    class indices.  reduce_input_grad, chunk_size: as
    crossent.distributed.vocab_parallel_linear_cross_entropy (True: the input
    gradient is summed over the ranks with one N x D all_reduce in the backward).
    """
    check_head("vocab_parallel_linear_log_probs", input, weight_shard, target, linear_bias_shard)
    V.floating_input(input, "vocab_parallel_linear_log_probs")
    lead = tuple(input.shape[:-1])
    T, ii, entropy = check_args("vocab_parallel_linear_log_probs", lead, target, temperature, ignore_index,
                                entropy)
    opts = LogProbsOptions(ignore_index=ii, temperature=T, entropy=entropy, chunk_rows=chunk_size or 0,
                           reduce_input_grad=bool(reduce_input_grad))
    lp, ent = VocabParallelLinearLogProbsFunction.apply(input.reshape(-1, input.shape[-1]), weight_shard,
                                                        linear_bias_shard, target.reshape(-1), opts, group,
                                                        vocab_start_index)
    return LogProbsOutput(lp.reshape(target.shape), ent.reshape(target.shape) if entropy else None)
