"""The Megatron-core door: crossent's vocab-parallel cross-entropy with
Megatron's signatures and its [s, b] layout.

Tested against megatron-core 0.16.1 (its tensor_parallel.vocab_parallel_cross_entropy
is the numerical reference).  Only ``vocab_parallel_cross_entropy`` imports
megatron (for ``parallel_state``'s group); the rest needs only torch.

* ``fused_vocab_parallel_cross_entropy(logits, target, tp_group)``: the
  per-token signature of Megatron's native fused loss
  (``cross_entropy_fusion_impl='native'``).
* ``vocab_parallel_cross_entropy(logits, target, label_smoothing=0.0)``:
  ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``'s.
* ``compute_language_model_loss(labels, logits, tp_group)`` and the mixin
  ``CrossentLanguageModelLoss`` (``class GPT(CrossentLanguageModelLoss,
  GPTModel)``): ``LanguageModule.compute_language_model_loss``.

Differences from Megatron's own: the logits are never overwritten (Megatron
writes the softmax into fp32 logits); bf16 logits are not upcast, the loss is
still fp32; label smoothing is torch's over the GLOBAL vocabulary (Megatron's
spreads it over K - 1 classes per shard, Megatron #737); shards may be uneven
(slices in rank order); a target equal to ``ignore_index`` (-100) gives 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .vocab_parallel import vocab_parallel_cross_entropy as _vpce

__all__ = ["fused_vocab_parallel_cross_entropy", "vocab_parallel_cross_entropy",
           "compute_language_model_loss", "CrossentLanguageModelLoss"]


def fused_vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor, tp_group, *,
                                       label_smoothing: float = 0.0, z_loss: float = 0.0,
                                       softcap: float | None = None, ignore_index: int = -100) -> Tensor:
    """[s, b, V/tp] logits (this rank's vocabulary slice), [s, b] global
    class ids -> [s, b] per-token loss (fp32, fp64 for fp64 logits), every
    rank the same."""
    v = vocab_parallel_logits.shape[-1]
    loss = _vpce(vocab_parallel_logits.reshape(-1, v), target.reshape(-1), group=tp_group, reduction="none",
                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, ignore_index=ignore_index,
                 dtype=torch.promote_types(vocab_parallel_logits.dtype, torch.float32))
    return loss.view(target.shape)


def vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor,
                                 label_smoothing: float = 0.0) -> Tensor:
    """megatron.core.tensor_parallel.vocab_parallel_cross_entropy: the group
    is Megatron's tensor-model-parallel group."""
    from megatron.core import parallel_state
    return fused_vocab_parallel_cross_entropy(vocab_parallel_logits, target,
                                              parallel_state.get_tensor_model_parallel_group(),
                                              label_smoothing=label_smoothing)


def compute_language_model_loss(labels: Tensor, logits: Tensor, tp_group, **kwargs) -> Tensor:
    """labels [b, s], logits [s, b, V/tp] -> loss [b, s] (LanguageModule's layout).
    kwargs: label_smoothing, z_loss, softcap, ignore_index."""
    loss = fused_vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), tp_group, **kwargs)
    return loss.transpose(0, 1).contiguous()


class CrossentLanguageModelLoss:
    """Mixin for a Megatron LanguageModule (``class GPT(CrossentLanguageModelLoss,
    GPTModel)``): its ``compute_language_model_loss`` runs crossent.
    ``crossent_loss_kwargs`` (a class or instance attribute) passes
    label_smoothing, z_loss, softcap."""

    crossent_loss_kwargs: dict = {}

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        # LanguageModule.tp_group: its pg_collection's TP group, or parallel_state's.
        return compute_language_model_loss(labels, logits, self.tp_group, **self.crossent_loss_kwargs)
