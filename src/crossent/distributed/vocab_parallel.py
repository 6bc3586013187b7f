"""Vocab-parallel cross-entropy: each rank holds a contiguous slice of the classes.

Forward: one pass over the local logits (local logsumexp and weighted sums),
then one MAX all_reduce and one SUM all_reduce of O(N) numbers (plus, only for
weighted smoothing / weighted probability targets without ``vocab_start_index``,
one all_reduce of ``world`` numbers for the slice sizes).  The logits never
travel.  Backward: the shard's gradient from the saved global lse, locally,
with no communication.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._autograd import VocabParallelCrossEntropyFunction
from ..functional import _canonical
from . import _core as K
from ._checks import check_args
from ._core import VPOptions

__all__ = ["vocab_parallel_cross_entropy", "VocabParallelCrossEntropyFunction"]


def vocab_parallel_cross_entropy(logits_shard: Tensor, target: Tensor, *, group=None,
                                 weight: Tensor | None = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0,
                                 z_loss: float = 0.0, softcap: float | None = None,
                                 vocab_start_index: int | Tensor | None = None,
                                 dtype: torch.dtype | None = None) -> Tensor:
    """Cross-entropy over logits sharded by class across the ranks of ``group``.

    Every rank of ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None for the
    default group) calls this with its own slice of the classes and returns
    the same value as ``crossent.cross_entropy`` on the full logits, with the
    same semantics: all reductions, weighted mean, ignore_index, label
    smoothing (with the GLOBAL class count C), z_loss and softcap.

    logits_shard: (C_l), (N, C_l) or (N, C_l, d1..dk): this rank's classes
        [vocab_start_index, vocab_start_index + C_l), contiguous, slices in
        rank order; slices may be uneven (even one class, or none).
    target: class indices (), (N) or (N, d1..dk) in GLOBAL class numbering,
        identical on every rank; or probability targets: then ``target`` is
        this rank's shard of the (N, C, ...) probabilities, the same shape as
        ``logits_shard`` (floating; ignore_index must be negative).
    weight: the FULL (C,) class-weight tensor, identical on every rank.
    dtype: the loss's dtype; None: torch's (the logits' dtype, or the
        promoted one for probability targets).  torch.float32 returns the
        fp32 accumulation for fp16/bf16 logits without upcasting them (the
        loss dtype of Megatron-core and torchtitan).
    vocab_start_index: this rank's first class.  None: derived from the slice
        sizes, which ride along with the first all_reduce (no extra collective,
        no host sync) except for weighted smoothing/probability targets, which
        need one tiny extra all_reduce of ``world`` numbers first.

    Gradient: the gradient of this rank's shard is exactly that slice of the
    full gradient (not multiplied by the world size); with create_graph=True
    it is differentiable again (double backward).  target and weight are not
    differentiable here.  Communication: forward, one MAX and one SUM
    all_reduce of O(N) fp32 numbers (the SUM in fp64 with label smoothing or
    probability targets: sums over classes near fp32's range); backward, none
    (create_graph=True: one SUM all_reduce of O(N)).  Errors: cross_entropy's, for the same input.
    """
    group, _, world = K.resolve_group(group)
    red, ignore_index, eps, z_loss, cap, prob, out_dtype = check_args(
        logits_shard, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, world)
    if out_dtype == torch.float64 and logits_shard.dtype != torch.float64:
        # fp64 probability targets or weights promote the loss: compute in it,
        # as cross_entropy does (autograd records the copy).
        logits_shard = logits_shard.to(torch.float64)
    if dtype is not None:
        out_dtype = dtype
    xc, tc = _canonical(logits_shard, target)
    w = None if weight is None else weight.reshape(-1)  # any shape with C elements, as torch
    opts = VPOptions(reduction=red, ignore_index=ignore_index, label_smoothing=eps, z_loss=z_loss,
                     softcap=cap, prob=prob, out_dtype=out_dtype)
    loss = VocabParallelCrossEntropyFunction.apply(xc, tc, w, opts, group, vocab_start_index)
    if red == "none":  # cross_entropy's shape: 0-d for 1-D logits (even with a (1,) target)
        loss = loss.reshape(() if logits_shard.dim() == 1 else
                            target.shape[:1] + target.shape[2:] if prob else target.shape)
    return loss
