"""crossent's autograd Functions, all of them, one per op (never one per backend):
cross-entropy, (log_)softmax and nll_loss's pick (ce.py), linear cross-entropy
(linear.py), the vocab-parallel ones behind crossent.distributed
(vocab_parallel.py), and token log-probabilities (logprobs.py).

Every backend runs under these same Functions; a backend only supplies
kernels (see backends/base.py).  Options travel as a frozen dataclass on ctx.

Cross-entropy saves the per-row log-sum-exp, never probabilities.  For 'sum'
and 'mean' the gradient is computed in the forward pass (the logits are read
once, while they are hot) and only rescaled by the upstream gradient in the
backward; for 'none', or when that buffer was already handed out (a second
backward with retain_graph=True), the backward recomputes it in the same
sweep, bitwise equal.  backward(create_graph=True) recomputes it with torch's
differentiable ops instead, so double backward works.
"""
from .ce import (CEOptions, CrossEntropyFunction, CrossEntropyJvpFunction, PickFunction, SoftmaxFunction,
                 fuses_forward, softmax)
from .linear import LinearCEOptions, LinearCrossEntropyFunction
from .logprobs import (LinearLogProbsFunction, LogProbsFunction, LogProbsOptions, VocabParallelLinearLogProbsFunction,
                       VocabParallelLogProbsFunction, lp_coeffs)
from .vocab_parallel import (GlobalSoftmaxFunction, VocabParallelCrossEntropyFunction,
                             VocabParallelLinearCrossEntropyFunction)

__all__ = ["CEOptions", "CrossEntropyFunction", "CrossEntropyJvpFunction", "GlobalSoftmaxFunction", "LinearCEOptions",
           "LinearCrossEntropyFunction", "LinearLogProbsFunction", "LogProbsFunction", "LogProbsOptions",
           "PickFunction", "SoftmaxFunction", "VocabParallelCrossEntropyFunction",
           "VocabParallelLinearCrossEntropyFunction", "VocabParallelLinearLogProbsFunction",
           "VocabParallelLogProbsFunction", "fuses_forward", "lp_coeffs", "softmax"]
