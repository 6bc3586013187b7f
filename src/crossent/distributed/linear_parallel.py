"""Vocab-parallel linear + cross-entropy: the tensor-parallel classifier head.

Each rank holds rows [start, start + V_l) of the (V, D) classifier weight
(and of the bias).  The logits are computed one chunk of tokens at a time and
never exist in full on any rank: the forward keeps only O(N) statistics, the
backward recomputes each chunk's logits from the saved global lse and turns
them straight into the input, weight and bias gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as V
from .._autograd import VocabParallelLinearCrossEntropyFunction
from . import _core as K
from ._checks import amp_cast, check_args
from ._core import VPOptions

__all__ = ["vocab_parallel_linear_cross_entropy", "VocabParallelLinearCrossEntropyFunction"]


def _head_shapes(input: Tensor, weight_shard: Tensor, linear_bias_shard: Tensor | None) -> None:
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (..., D)")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != input.shape[-1]:
        raise RuntimeError(f"weight_shard must be (V_local, {input.shape[-1]}), got {list(weight_shard.shape)}")
    if linear_bias_shard is not None and tuple(linear_bias_shard.shape) != (weight_shard.shape[0],):
        raise RuntimeError(f"linear_bias_shard must be ({weight_shard.shape[0]},), got "
                           f"{list(linear_bias_shard.shape)}")


def check_head(fname: str, input: Tensor, weight_shard: Tensor, target: Tensor,
               linear_bias_shard: Tensor | None) -> None:
    """Argument types and shapes of a vocab-sharded head (shared with crossent.distributed.logprobs)."""
    V.tensor_arg(input, fname, "input", 1)
    V.tensor_arg(weight_shard, fname, "weight_shard", 2)
    V.tensor_arg(target, fname, "target", 3)
    _head_shapes(input, weight_shard, linear_bias_shard)


def vocab_parallel_linear_cross_entropy(input: Tensor, weight_shard: Tensor, target: Tensor, *,
                                        group=None, linear_bias_shard: Tensor | None = None,
                                        weight: Tensor | None = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        z_loss: float = 0.0, softcap: float | None = None,
                                        vocab_start_index: int | Tensor | None = None,
                                        reduce_input_grad: bool = True,
                                        chunk_size: int | None = None) -> Tensor:
    """cross_entropy(input @ W.T + bias, target) with W's rows (the vocabulary)
    sharded across the ranks of ``group``; the logits are never materialised
    beyond one chunk of tokens per rank.

    input: (..., D), the same (replicated) hidden states on every rank.
    weight_shard: (V_l, D), this rank's rows [vocab_start_index, +V_l) of the
        (V, D) classifier weight, slices contiguous and in rank order (uneven
        allowed).  linear_bias_shard: (V_l,) or None.
    target: (...) global class indices (identical on every rank), or this
        rank's shard (..., V_l) of probability targets.
    weight (class weights), ignore_index, reduction, label_smoothing, z_loss,
    softcap, vocab_start_index, group: as vocab_parallel_cross_entropy.
    chunk_size: tokens per chunk (default: ~8 MiB of fp32 logits on CPU,
        ~256 MiB on accelerators).

    Returns the value of crossent.cross_entropy(F.linear(input, W, bias), ...)
    on every rank.  Gradients:
      * weight_shard / linear_bias_shard: exactly this rank's slice of the
        full gradient.
      * input, reduce_input_grad=True (default): the FULL gradient, the same
        on every rank: the partial gradients of all vocab slices are summed
        with one all_reduce of N x D in the backward.  This is what a
        Megatron ColumnParallelLinear returns to the layer before it (its
        copy_to_tensor_model_parallel_region does that all_reduce), so this
        function is a drop-in for ColumnParallelLinear + vocab-parallel CE.
      * input, reduce_input_grad=False: only this rank's partial sum
        dL/dlogits_shard @ weight_shard.  Use it when the caller reduces the
        input gradient itself (input passed through its own
        copy_to_tensor_model_parallel_region, or a sequence-parallel
        reduce-scatter); reducing twice would multiply by the world size.
    Weight/bias gradients accumulate chunk by chunk in fp32 and are rounded
    once.  The backward recomputes each chunk's logits (one extra matmul, no
    extra memory); without ``vocab_start_index`` the forward adds one
    all_reduce of ``world`` numbers (class targets).  backward(create_graph=
    True) gives differentiable gradients (it holds the N x V_l logits, as
    any graph of them does).  Errors and autocast: those of cross_entropy(
    F.linear(input, W, bias), target) with the batch dims flattened.
    """
    V.tensor_arg(input, "linear", "input", 1)
    V.tensor_arg(weight_shard, "linear", "weight", 2)
    V.optional_tensor_arg(linear_bias_shard, "linear", "bias", 3)
    _head_shapes(input, weight_shard, linear_bias_shard)
    dev = input.device.type
    if torch.is_autocast_enabled(dev):  # the matmul in the autocast dtype, the loss in float32 (check_args)
        lp = torch.get_autocast_dtype(dev)
        input, weight_shard, linear_bias_shard = (amp_cast(t, lp) for t in (input, weight_shard, linear_bias_shard))
    lead, D, v_local = tuple(input.shape[:-1]), input.shape[-1], weight_shard.shape[0]
    N = math.prod(lead)
    x2 = input.reshape(N, D)
    # F.linear's dtype checks and messages (a 1-D input has its own), on
    # empty slices; its result's dtype.
    b0 = None if linear_bias_shard is None else linear_bias_shard[:0]
    ldt = F.linear(input if input.dim() == 1 else x2[:0], weight_shard[:0], b0).dtype
    # Then cross_entropy's checks on the logits (rows flattened, as for batch dims).
    if input.dim() > 2:
        t_chk = target.reshape(math.prod(target.shape[:-1]), target.shape[-1]) if target.dim() == input.dim() \
            else target.reshape(-1)
        logits = torch.empty((N, v_local), dtype=ldt, device="meta")
    else:
        t_chk, logits = target, torch.empty(lead + (v_local,), dtype=ldt, device="meta")
    group, _, world = K.resolve_group(group)
    red, ignore_index, eps, z_loss, cap, prob, out_dtype = check_args(
        logits, t_chk, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, world, dev)
    if out_dtype == torch.float64 and x2.dtype != torch.float64:
        # fp64 probability targets or class weights make the loss fp64: compute in it, as
        # linear_cross_entropy does (autograd casts the gradients back)
        x2, weight_shard = x2.double(), weight_shard.double()
        linear_bias_shard = None if linear_bias_shard is None else linear_bias_shard.double()
    t2 = target.reshape(N, v_local) if prob else target.reshape(N)
    w = None if weight is None else weight.reshape(-1)  # any shape with C elements, as torch
    opts = VPOptions(reduction=red, ignore_index=ignore_index, label_smoothing=eps, z_loss=z_loss,
                     softcap=cap, prob=prob, out_dtype=out_dtype,
                     reduce_input_grad=bool(reduce_input_grad))
    loss = VocabParallelLinearCrossEntropyFunction.apply(x2, weight_shard, linear_bias_shard, t2, w,
                                                         opts, group, vocab_start_index, chunk_size)
    if red == "none":
        loss = loss.reshape(lead)
    return loss
