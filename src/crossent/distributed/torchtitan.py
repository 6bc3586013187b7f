"""The torchtitan door: crossent losses as torchtitan loss configurations.

Needs torchtitan (tested with 0.3.0); importing this module imports it.

* ``CrossEntropyLoss.Config(label_smoothing=..., z_loss=..., softcap=...)``:
  a drop-in for ``torchtitan.components.loss.CrossEntropyLoss.Config`` (the
  trainer's ``loss`` field, or ChunkedLossWrapper's ``loss_fn``).  Its ``fn``
  is sum-reduced over the tokens, ignores -100, and the inherited
  ``__call__(pred, labels, global_valid_tokens)`` divides by the global token
  count, as torchtitan's.  Tensor-parallel logits (a DTensor sharded on the
  vocabulary, or under the spmd_types backend a plain local shard) go through
  crossent's vocab-parallel kernels; smoothing is over the global vocabulary.
* ``LinearCrossEntropyLoss.Config(...)``: the fused head.  Like
  ``ChunkedLossWrapper`` it is called with the hidden states (the model run
  with ``_skip_lm_head=True``) after ``set_lm_head(model.output)``, but the
  logits are never materialised beyond one chunk of tokens: it runs
  crossent.linear_cross_entropy on ``lm_head.weight`` (a DTensor sharded by
  rows under ColwiseParallel goes vocab-parallel).  An FSDP-wrapped lm_head
  must run its own forward for FSDP's hooks: use
  ``ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(...))`` there.

The loss is fp32 as torchtitan's: vocab-parallel logits are never upcast
(crossent accumulates in fp32 and returns that), whole bf16 logits are
upcast by ``.float()`` as torchtitan does.  The fused head returns the
hidden states' dtype, as torch's F.linear_cross_entropy (fp32 accumulation
inside).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss
from torchtitan.config import CompileConfig
from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
from torchtitan.distributed.utils import get_spmd_backend

from ..functional import cross_entropy as _cross_entropy
from ..linear import linear_cross_entropy as _linear_cross_entropy
from .vocab_parallel import vocab_parallel_cross_entropy

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "cross_entropy_loss"]


def cross_entropy_loss(pred: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                       z_loss: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """torchtitan.components.loss.cross_entropy_loss with crossent underneath:
    (B, L, V) logits, (B, L) labels -> summed loss over non-ignored tokens."""
    kw = dict(reduction="sum", ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
              z_loss=z_loss, softcap=softcap)
    if isinstance(pred, DTensor):
        pl, last = tuple(pred.placements), pred.ndim - 1
        tp = [i for i, p in enumerate(pl) if p.is_shard(last)]
        local_labels = labels.to_local() if isinstance(labels, DTensor) else labels
        x = pred.to_local().flatten(0, 1)
        if tp:
            loss = vocab_parallel_cross_entropy(x, local_labels.flatten(0, 1), dtype=torch.float32,
                                                group=pred.device_mesh.get_group(tp[0]), **kw)
        else:
            loss = _cross_entropy(x.float(), local_labels.flatten(0, 1), **kw)
        if not isinstance(labels, DTensor):
            return loss
        # Both DTensors (torchtitan's local_map path): a sum over a batch-sharded
        # mesh dim is Partial there, Replicate over the vocabulary's.
        out_pl = [Partial() if p.is_shard() and p.dim != last else Replicate() for p in pl]
        return DTensor.from_local(loss, pred.device_mesh, out_pl, run_check=False)
    if get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:  # a plain vocab shard
        group = current_spmd_mesh().get_group("tp")
        return vocab_parallel_cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1), group=group,
                                            dtype=torch.float32, **kw)
    return _cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), **kw)


def _options(config) -> dict:
    return dict(label_smoothing=config.label_smoothing, z_loss=config.z_loss, softcap=config.softcap)


class CrossEntropyLoss(BaseLoss):
    """Sum-reduced crossent cross-entropy, normalised by the caller's token count."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        label_smoothing: float = 0.0
        """Spread over the whole (global) vocabulary, as torch's."""
        z_loss: float = 0.0
        """Adds z_loss * logsumexp(logits)**2 per token."""
        softcap: float | None = None
        """Logits -> softcap * tanh(logits / softcap) first."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        opts = _options(config)
        self.fn = lambda pred, labels: cross_entropy_loss(pred, labels, **opts)
        self._maybe_compile(compile_config)


class LinearCrossEntropyLoss(BaseLoss):
    """The fused lm_head + cross-entropy: called with hidden states, not logits."""

    @dataclass(kw_only=True, slots=True)
    class Config(CrossEntropyLoss.Config):  # the same options; its own class for build()
        pass

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        self.opts = _options(config)
        self.lm_head: torch.nn.Module | None = None

    def set_lm_head(self, lm_head: torch.nn.Module) -> None:
        """Set the lm_head module (an nn.Linear, TP-sharded or not). Before the first call."""
        from torch.distributed.fsdp import FSDPModule
        if isinstance(lm_head, FSDPModule):
            raise NotImplementedError(
                "an FSDP-wrapped lm_head needs its own forward for FSDP's hooks; use "
                "ChunkedLossWrapper.Config(loss_fn=crossent.distributed.torchtitan.CrossEntropyLoss.Config())")
        self.lm_head = lm_head

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del kwargs
        assert self.lm_head is not None, "call set_lm_head before the loss"
        head = self.lm_head
        loss = _linear_cross_entropy(pred, head.weight, labels, linear_bias=head.bias, reduction="sum",
                                     ignore_index=IGNORE_INDEX, **self.opts)
        if isinstance(loss, DTensor) and not isinstance(pred, DTensor):
            loss = loss.to_local()  # replicated over the TP ranks; a plain loss like torchtitan's
        if global_valid_tokens is not None:
            loss = loss / global_valid_tokens
        return loss, {}
