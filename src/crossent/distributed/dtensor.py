"""The DTensor door: crossent.cross_entropy / linear_cross_entropy on DTensors.

``crossent.cross_entropy(logits, ...)`` lands here when ``logits`` is a
DTensor (torchtitan's and FSDP2 + TP code's loss input, which torch handles
inside ``torch.distributed.tensor.parallel.loss_parallel()``).  The rules are
loss_parallel's (torch 2.13): the class dim (1, or 0 for 1-D input) is sharded
on exactly one mesh dim, the "TP" dim; other mesh dims are Shard on another
dim or Replicate; class targets are a plain tensor when their placements come
out all Replicate, else a DTensor with the placements torch derives; the
class weight is replicated.  The result is a DTensor with torch's placements
('none': the target's; 'sum' and 'mean': Replicate on the TP dim, Partial on
batch-sharded dims, where torch allows 'mean' only on a 1-D mesh), and the
logits' gradient has the logits' placements.

Underneath is the vocab-parallel Function on the local shard: two all_reduces
of O(N) numbers, the logits never gathered.  Unlike loss_parallel, every
crossent argument is globally right: label smoothing over the GLOBAL class
count, class weights with ignore_index, probability targets (a DTensor with
the logits' placements), z_loss, softcap.  It needs no context manager.
DTensors not sharded on the class dim are computed locally with the same
placement rules.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .. import _validate as V
from .._autograd.vocab_parallel import DTensorLocalFunction
from .linear_parallel import vocab_parallel_linear_cross_entropy
from .vocab_parallel import vocab_parallel_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]


def _tp_mesh_dim(placements, dim: int) -> int | None:
    """The mesh dim sharding tensor dim ``dim`` (None if none does), checked
    as loss_parallel checks it."""
    shard = [i for i, p in enumerate(placements) if p.is_shard(dim)]
    if len(shard) > 1:
        raise ValueError(f"loss_parallel() requires exactly one mesh dim to shard tensor dimension {dim}, "
                         f"but got placements {placements} with {len(shard)} such mesh dim(s).")
    for i, p in enumerate(placements):
        if not (p.is_shard() or p.is_replicate()):
            raise ValueError(f"loss_parallel() expects non-TP mesh dims to be Shard or Replicate, "
                             f"got {p} at dim {i}.")
    return shard[0] if shard else None


def _drop_dim(placements, dim: int):
    """Placements once tensor dim ``dim`` is reduced away (torch's _skip_dim
    after replicate_reduction_dims)."""
    out = []
    for p in placements:
        if p.is_shard(dim):
            out.append(Replicate())
        elif p.is_shard() and p.dim > dim:
            out.append(type(p)(p.dim - 1))
        else:
            out.append(p)
    return tuple(out)


def _local(t: Tensor | None, placements, mesh, what: str) -> Tensor | None:
    """A DTensor argument's local tensor (placements checked), or a plain one
    where its placements are all Replicate (it is then the whole tensor)."""
    if t is None:
        return None
    if isinstance(t, DTensor):
        if tuple(t.placements) != tuple(placements):
            raise RuntimeError(f"Expected {tuple(placements)} but got {t.placements}.")
        return t.to_local()
    if any(p.is_shard() for p in placements):
        raise ValueError(f"loss_parallel() requires a DTensor (not a plain torch.Tensor) when the derived "
                         f"placements {tuple(placements)} contain Shard — this happens on a multi-dimensional "
                         f"mesh with a batch-sharded non-TP dim. Wrap the {what} with DTensor.from_local or "
                         f"distribute_tensor to make the sharding explicit.")
    return t


def _full_weight(weight: Tensor | None) -> Tensor | None:
    # Class weights are O(C): a sharded one is gathered (torch requires replicated).
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def _reduced_placements(placements, tp: int | None, red: str, none_placements):
    """The loss's placements: torch's rule for each reduction."""
    if red == "none":
        return none_placements
    if red == "mean" and any(p.is_shard() for i, p in enumerate(placements) if i != tp):
        raise NotImplementedError("loss_parallel() with reduction='mean' is only supported on one-dimensional "
                                  f"DeviceMesh; got mesh with ndim={len(placements)}. Use reduction='sum' or "
                                  "'none' instead.")
    return tuple(Replicate() if i == tp or p.is_replicate() else Partial() for i, p in enumerate(placements))


def _wrap(loss: Tensor, mesh, placements, shape) -> DTensor:
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(loss, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def cross_entropy(input: DTensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
                  inplace_backward: bool = False) -> DTensor:
    """crossent.cross_entropy for a DTensor ``input`` (see the module docstring)."""
    red = V.reduction(size_average, reduce, reduction)
    if inplace_backward:
        raise ValueError("inplace_backward=True is not supported for DTensor inputs")
    mesh, pl = input.device_mesh, tuple(input.placements)
    class_dim = 0 if input.dim() == 1 else 1
    tp = _tp_mesh_dim(pl, class_dim)
    prob = tuple(target.shape) == tuple(input.shape) and target.is_floating_point()
    row_pl = _drop_dim(pl, class_dim)
    t = _local(target, pl if prob else row_pl, mesh, "target")
    x = DTensorLocalFunction.apply(input)  # its gradient: input's placements and strides
    kw = dict(weight=_full_weight(weight), ignore_index=ignore_index, label_smoothing=label_smoothing,
              z_loss=z_loss, softcap=softcap)
    if tp is None:  # not class-sharded: every rank holds whole rows
        from ..functional import cross_entropy as ce
        loss = ce(x, t, reduction=red, **kw)
    else:
        loss = vocab_parallel_cross_entropy(x, t, group=mesh.get_group(tp), reduction=red, **kw)
    shape = tuple(input.shape[:class_dim] + input.shape[class_dim + 1:]) if red == "none" else ()
    return _wrap(loss, mesh, _reduced_placements(pl, tp, red, row_pl), shape)


def linear_cross_entropy(input: Tensor, linear_weight: DTensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                         softcap: float | None = None, shift: bool = False) -> Tensor:
    """crossent.linear_cross_entropy for a classifier ``linear_weight`` that is a
    DTensor sharded by rows (Shard(0) on one mesh dim: ColwiseParallel's
    lm_head), bias likewise.  ``input`` (..., D): a plain tensor, the same on
    every rank, whose gradient is then the full one on every rank; or a
    DTensor (Replicate on the TP dim; a sequence-sharded one is all-gathered
    first, as ColwiseParallel does), whose gradient is Partial on the TP dim,
    as torch's. Returns a DTensor placed as :func:`cross_entropy`'s result."""
    red = V.reduction(None, None, reduction)
    mesh, wpl = linear_weight.device_mesh, tuple(linear_weight.placements)
    tp = _tp_mesh_dim(wpl, 0)
    if tp is None or any(p.is_shard() for i, p in enumerate(wpl) if i != tp):
        raise ValueError(f"linear_cross_entropy needs linear_weight sharded by rows on one mesh dim and "
                         f"replicated on the others (unshard FSDP first), got {wpl}")
    if shift and input.dim() >= 2:  # next-token prediction: position i predicts i+1
        input, target = input[..., :-1, :], target[..., 1:, :] if target.is_floating_point() else target[..., 1:]
    if isinstance(input, DTensor):
        ipl = tuple(Replicate() if i == tp else p for i, p in enumerate(input.placements))
        if ipl != tuple(input.placements):
            input = input.redistribute(mesh, ipl)
        row_pl = _drop_dim(ipl, input.dim() - 1)
        gpl = tuple(Partial() if i == tp else p for i, p in enumerate(ipl))
        x, reduce_dx = input.to_local(grad_placements=gpl), False
    else:
        row_pl, x, reduce_dx = (Replicate(),) * mesh.ndim, input, True
    # Probability targets (..., V) are sharded on their class dim like the logits.
    t_pl = row_pl if not target.is_floating_point() else tuple(
        Shard(x.dim() - 1) if i == tp else p for i, p in enumerate(row_pl))
    t = _local(target, t_pl, mesh, "target")
    bias = linear_bias.to_local() if isinstance(linear_bias, DTensor) else linear_bias
    ii = -100 if ignore_index is None else ignore_index
    chunk = getattr(options, "chunk_size", None)
    loss = vocab_parallel_linear_cross_entropy(
        x, linear_weight.to_local(), t, group=mesh.get_group(tp), linear_bias_shard=bias,
        weight=_full_weight(weight), ignore_index=ii, reduction=red, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, reduce_input_grad=reduce_dx, chunk_size=chunk)
    shape = tuple(input.shape[:-1]) if red == "none" else ()
    return _wrap(loss, mesh, _reduced_placements(row_pl, tp, red, row_pl), shape)

