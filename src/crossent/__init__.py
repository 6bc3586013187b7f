"""crossent: PyTorch-exact softmax, log_softmax, nll_loss and cross-entropy,
fused and memory-lean, on CPU and NVIDIA GPUs.

Importing crossent imports torch only: no triton, no CUDA initialisation.
``crossent.distributed`` (vocab-parallel losses) is imported on demand.
"""
from . import nn
from .functional import (CrossEntropyOutput, cross_entropy, cross_entropy_with_stats, log_softmax,
                         nll_loss, softmax)
from .logprobs import LogProbsOutput, linear_log_probs, log_probs
from .linear import (LinearCrossEntropyOptions, LinearCrossEntropyPlan, linear_cross_entropy,
                     linear_cross_entropy_plan, linear_cross_entropy_with_stats)

__version__ = "0.1.0"

__all__ = ["softmax", "log_softmax", "nll_loss", "cross_entropy", "cross_entropy_with_stats",
           "CrossEntropyOutput", "linear_cross_entropy", "linear_cross_entropy_with_stats",
           "linear_cross_entropy_plan", "LinearCrossEntropyOptions", "LinearCrossEntropyPlan", "nn",
           "log_probs", "linear_log_probs", "LogProbsOutput",
           "__version__"]
