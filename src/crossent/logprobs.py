"""Token log-probabilities and entropy for RL fine-tuning (PPO, GRPO, ...).

``log_probs(logits, target)`` is ``log_softmax(logits.float() / T).gather(-1, target)``
and, with ``entropy=True``, ``-(p * log p).sum(-1)`` of the same distribution,
both differentiable, without the N x V log-softmax, probabilities or their
gradients in memory.  ``linear_log_probs(h, W, target)`` does the same from
hidden states and the LM head, never holding more than one chunk of logits.

The math per row, the torch kernels, the fused head's chunked passes and the
custom ops torch.compile sees live in crossent._logprobs_ops; the autograd
Functions in crossent._autograd; the Triton kernels in
crossent.backends.triton.logprobs.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch.nn.functional as TF
from torch import Tensor

from . import _validate as V
from . import backends, reference
from ._logprobs_ops import _cpu_chunk_rows

__all__ = ["LogProbsOutput", "log_probs", "linear_log_probs"]


class LogProbsOutput(NamedTuple):
    """What :func:`log_probs` / :func:`linear_log_probs` return, whatever the flags.

    log_probs: log-probability of each target token, shaped like ``target``.
    entropy:   entropy of each position's distribution, shaped like ``target``;
               None unless ``entropy=True`` was passed.
    """

    log_probs: Tensor
    entropy: Optional[Tensor]


def check_args(fname: str, lead: tuple, target: Tensor, temperature, ignore_index,
               entropy) -> tuple[float, int, bool]:
    """Shared argument checks (also used by crossent.distributed); returns
    (temperature, ignore_index, entropy) as Python values."""
    T = V.float_arg(temperature, fname, "temperature", 3)
    if not (0.0 < T < math.inf):
        raise ValueError(f"{fname}: temperature must be positive and finite, got {T}")
    ignore_index = V.int_arg(ignore_index, fname, "ignore_index", 4)
    if not isinstance(entropy, bool):
        raise TypeError(f"{fname}(): argument 'entropy' must be bool, not {type(entropy).__name__}")
    if tuple(target.shape) != lead:
        raise ValueError(f"{fname}: expected target of shape {list(lead)}, got {list(target.shape)}")
    V._check_target_dtype(target)
    return T, ignore_index, entropy


def _check_classes(fname: str, V_: int, target: Tensor, ignore_index: int) -> None:
    if V_ == 0:
        raise ValueError(f"{fname}: expected at least one class, got a vocabulary of size 0")
    V.check_target_bounds(target, V_, ignore_index)


def _output(lp: Tensor, ent: Tensor, shape, entropy: bool) -> LogProbsOutput:
    return LogProbsOutput(lp.reshape(shape), ent.reshape(shape) if entropy else None)


def log_probs(logits: Tensor, target: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
              entropy: bool = False) -> LogProbsOutput:
    """Per-token log-probability of ``target`` (and the entropy) under
    ``softmax(logits / temperature)``, classes on the last dim.

    Equals ``torch.log_softmax(logits.float() / temperature, -1).gather(-1,
    target[..., None])[..., 0]`` and ``-(p * log p).sum(-1)`` with
    p = softmax(logits.float() / temperature), without materialising either
    N x V tensor.

    logits: (*B, V), any float dtype.  target: (*B) class indices (int64/int32/uint8).
    Returns ``LogProbsOutput(log_probs, entropy)``, both shaped like ``target``
    and in fp32 for fp32/fp16/bf16 logits (fp64 for fp64), 0 at positions where
    ``target == ignore_index``; ``entropy`` is None unless ``entropy=True``.
    Differentiable w.r.t. ``logits`` for any upstream gradients of either output
    (the gradient includes the 1/temperature).  A logit of -inf (a masked
    class) contributes 0 to the entropy (0 log 0 = 0); the eager formula gives NaN.
    """
    from ._autograd import LogProbsFunction, LogProbsOptions
    V.tensor_arg(logits, "log_probs", "logits", 1)
    V.tensor_arg(target, "log_probs", "target", 2)
    if logits.dim() < 1:
        raise ValueError("log_probs: expected logits with at least 1 dimension (classes last), got 0")
    V.floating_input(logits, "log_probs")
    lead, V_ = tuple(logits.shape[:-1]), logits.shape[-1]
    T, ii, entropy = check_args("log_probs", lead, target, temperature, ignore_index, entropy)
    _check_classes("log_probs", V_, target, ii)
    if any(V.func_transforms()):   # vmap, forward-mode AD: torch's own ops (README deliberate difference 10)
        return LogProbsOutput(*reference.log_probs(logits, target, T, ii, entropy))
    opts = LogProbsOptions(ignore_index=ii, temperature=T, entropy=entropy,
                           backend=backends.name_for(logits.device.type))
    x = logits.reshape(-1, V_)
    lp, ent, _ = LogProbsFunction.call(x if x.stride(-1) == 1 else x.contiguous(), target.reshape(-1), opts)
    return _output(lp, ent, target.shape, entropy)


def linear_log_probs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                     linear_bias: Tensor | None = None, temperature: float = 1.0,
                     ignore_index: int = -100, entropy: bool = False) -> LogProbsOutput:
    """:func:`log_probs` of ``F.linear(input, linear_weight, linear_bias)``
    without the logits in memory: tokens are processed in chunks, and one
    chunk's logits (turned in place into log-probabilities, then into their
    gradient) is the only (rows, V) buffer.  On CPU, forward and backward
    allocate at most one chunk budget (128 MiB, the kernels' temporaries
    included) beyond the gradients and outputs they return and O(N)
    per-token numbers (plus, for fp16/bf16 over several chunks, the weight
    gradient's fp32 accumulator).

    input: (*B, D) hidden states; linear_weight: (V, D); linear_bias: (V,) or
    None; target: (*B) class indices.  Returns ``LogProbsOutput`` as
    :func:`log_probs` does (fp32 results for low-precision inputs; the logits
    are rounded to the input dtype first, as the eager ``F.linear`` does).
    Differentiable w.r.t. input, linear_weight and linear_bias; the backward
    recomputes each chunk's logits (one extra matmul instead of an N x V
    buffer).  The weight gradient accumulates in fp32 and is rounded once.
    On CPU, ignored positions skip the matmuls altogether.
    """
    from ._autograd import LinearLogProbsFunction, LogProbsOptions
    from .linear import LinearCrossEntropyOptions, _checks, _plan
    V.tensor_arg(input, "linear_log_probs", "input", 1)
    V.tensor_arg(linear_weight, "linear_log_probs", "linear_weight", 2)
    V.tensor_arg(target, "linear_log_probs", "target", 3)
    _checks(input, linear_weight, linear_bias)
    if linear_weight.dim() != 2:
        raise RuntimeError(f"linear_log_probs: expected a 2-D linear_weight (V, D), got {linear_weight.dim()}-D")
    D, V_ = input.shape[-1], linear_weight.shape[0]
    bias0 = None if linear_bias is None else linear_bias[:0]
    TF.linear(input.reshape(-1, D)[:0], linear_weight[:0], bias0)  # F.linear's dtype/device errors
    V.floating_input(input, "linear_log_probs")
    lead = tuple(input.shape[:-1])
    T, ii, entropy = check_args("linear_log_probs", lead, target, temperature, ignore_index, entropy)
    _check_classes("linear_log_probs", V_, target, ii)
    if any(V.func_transforms()):  # the logits in the input's dtype, as the fused head's
        return LogProbsOutput(*reference.log_probs(TF.linear(input, linear_weight, linear_bias), target, T, ii,
                                                   entropy))
    t = target.reshape(-1)
    backend = backends.name_for(input.device.type)
    if input.device.type == "cpu":
        rows = _cpu_chunk_rows(t.shape[0], D, V_, input.dtype, entropy)
    else:  # as many rows as half the free memory allows
        rows = _plan(t.shape[0], D, V_, input.dtype, input.device,
                     LinearCrossEntropyOptions(acc_policy="accurate"), backend)[0].chunk_size
    opts = LogProbsOptions(ignore_index=ii, temperature=T, entropy=entropy, backend=backend, chunk_rows=rows)
    lp, ent, _ = LinearLogProbsFunction.call(input.reshape(-1, D), linear_weight, linear_bias, t, opts)
    return _output(lp, ent, target.shape, entropy)
