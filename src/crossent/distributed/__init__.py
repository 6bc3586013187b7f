"""Tensor-parallel (vocab-parallel) losses over torch.distributed.

Works with any backend that has all_reduce MAX and SUM (gloo on CPU, NCCL on
GPU); ``group`` may be a ProcessGroup, a 1-D DeviceMesh or None (the default
group).  Importing this package initialises nothing.

The doors, each a thin layer over these functions:
  dtensor     crossent.cross_entropy / linear_cross_entropy on DTensors
              (reached through those functions; loss_parallel's rules)
  torchtitan  torchtitan loss configurations (imports torchtitan)
  megatron    Megatron-core's signatures and [s, b] layout
"""
from .linear_parallel import VocabParallelLinearCrossEntropyFunction, vocab_parallel_linear_cross_entropy
from .logprobs import vocab_parallel_linear_log_probs, vocab_parallel_log_probs
from .vocab_parallel import VocabParallelCrossEntropyFunction, vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "VocabParallelCrossEntropyFunction", "VocabParallelLinearCrossEntropyFunction",
           "vocab_parallel_log_probs", "vocab_parallel_linear_log_probs"]
