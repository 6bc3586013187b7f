"""The lean call path: torch's own kernels where fusing buys nothing.

On a small problem a fused chunked sweep cannot win: torch's CPU kernels for
cross_entropy, nll_loss and (log_)softmax already do one pass over a few
cache-resident rows, and every microsecond of Python in front of them is a
loss (a 32 x 10 cross_entropy forward takes ~13 us in torch).  So the public
functions first ask this module whether the call can go to torch unchanged,
and if so return torch's result: torch then runs its own checks and raises
its own errors, exactly.

A call takes this path only where crossent promises nothing torch does not
already deliver (README, "Deliberate differences"):
  * the backend is automatic (CROSSENT_BACKEND unset or "auto"); a named
    backend always runs its own kernels, so tests and benchmarks measure them;
  * CPU tensors in fp32 / fp64 (fp16/bf16 keep crossent's fp32 accumulation);
  * int64 class indices, or probability targets (int32 and uint8 targets keep
    crossent's deviations);
  * no legacy size_average / reduce (their warnings name the caller's line);
  * none of the keyword-only extras;
  * not while torch.compile traces (crossent's custom ops then give NaN, not
    an assert, for an out-of-range target); Dynamo evaluates the type and
    attribute tests to constants and stops at _eager();
  * cross_entropy: at most ``CE_MAX_NUMEL`` logits, the measured
    crossover below which torch's kernel beats the fused sweep.
  * linear_cross_entropy (torch >= 2.13, its F.linear_cross_entropy): the
    same, with the N x C logits counted, a 2-D input and weight, no options,
    and no ignored position (crossent's 0 gradient for non-finite hidden states
    there is a deliberate difference).

Every test is O(1) Python; the whole check costs ~0.25 us (timeit, quiet 2-core EPYC).
linear_cross_entropy also reads its CPU target once (O(N), no device to sync with).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor
from torch._C import _nn
from torch.overrides import has_torch_function_variadic

# Logits per call up to which torch's CPU kernel is used (1024 x 1000 fits).
# Measured on the 2-core EPYC (fp32, interleaved, busy machine; BENCHMARKS.md):
# below ~1M logits the fused sweep's fixed cost (a dozen ops per chunk) is not
# earned back; above it the sweep wins fwd+bwd (it computes the gradient in
# the forward, torch reads the logits three times), while forward-only calls
# are on par with torch only from ~8M logits.
CE_MAX_NUMEL = 1 << 20

_LEAN_DTYPES = (torch.float32, torch.float64)
_LOW = (torch.float16, torch.bfloat16)
_INT64 = torch.int64
# torch.nn._reduction.get_enum for the valid strings; anything else goes
# through torch.nn.functional, which warns or raises as torch does.
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}
_nll_loss_nd, _cross_entropy_loss = _nn.nll_loss_nd, _nn.cross_entropy_loss
is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch < 2.3 has none

# os.environ.get costs ~0.7 us (key encoding, Mapping machinery), as much as
# all other checks together; its backing dict holds the same data, updated by
# every os.environ assignment (monkeypatch.setenv included).
_ENV = getattr(os.environ, "_data", None)
if _ENV is not None:
    env_key, _env_get = os.environ.encodekey, _ENV.get
else:
    env_key, _env_get = str, os.environ.get
_KEY = env_key("CROSSENT_BACKEND")
_AUTO = (b"auto", "auto")


def _auto() -> bool:
    b = _env_get(_KEY)
    return not b or b.strip().lower() in _AUTO


_compiler = torch.compiler
# Dynamo sets the flag while it traces only where it has _compile_session_context (2.13 has it,
# 2.11 does not).
# Before that the flag stays False during tracing and only a call of is_compiling() itself is
# folded to True (Dynamo special-cases that function): reading the flag there would take the
# eager path inside a compiled graph.
if hasattr(_compiler, "_compile_session_context") and hasattr(_compiler, "assume_constant_result"):
    @_compiler.assume_constant_result
    def _eager() -> bool:
        """not torch.compiler.is_compiling() at half its cost: the flag it
        reads, without its torch.jit check (False outside TorchScript).
        Dynamo runs this once while tracing, when the flag is set, and bakes
        the result in (a read of the flag itself would be guarded on, and
        recompile on every call)."""
        return not _compiler._is_compiling_flag
else:
    def _eager() -> bool:
        return not is_compiling()


# The checks below run on every call, so they are written for speed (timed
# with perf_counter_ns, interleaved, p10 of 30k calls each): one boolean
# expression, no helper calls but _eager() (~40 ns each), module-level
# bindings instead of attribute chains, positional arguments to torch's C++
# losses.  The three tensor attribute reads (dtype, is_cpu) are ~70 ns each,
# the largest share; Dynamo folds every test before _eager() to a constant.
def cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                  label_smoothing) -> Tensor | None:
    """torch's cross_entropy for calls where it is the faster exact answer, else None."""
    if (type(input) is Tensor and type(target) is Tensor and size_average is None and reduce is None
            and type(reduction) is str and input.is_cpu and input.dtype in _LEAN_DTYPES
            and (target.dtype is _INT64 or target.is_floating_point()) and input.numel() <= CE_MAX_NUMEL
            and _eager() and not has_torch_function_variadic(input, target, weight)
            and (not (b := _env_get(_KEY)) or b.strip().lower() in _AUTO)):  # _auto(), inlined
        red = _REDUCTION.get(reduction)
        if red is not None:
            return _cross_entropy_loss(input, target, weight, red, ignore_index, label_smoothing)
    return None


_linear_ce = getattr(torch.nn.functional, "linear_cross_entropy", None)   # torch >= 2.13
_transforms_active = torch._C._are_functorch_transforms_active


def linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                         label_smoothing, options, z_loss, softcap, shift) -> Tensor | None:
    """torch's F.linear_cross_entropy (its unchunked reference, options=None) where it is the
    faster exact answer, else None: the cross_entropy conditions with the logits counted as
    N x C, a 2-D input and weight, no extras, and no ignored position among int64 targets (where
    hidden states there are non-finite crossent promises a 0 gradient and torch gives NaN;
    reading a CPU target of <= CE_MAX_NUMEL / C rows costs no sync)."""
    if (_linear_ce is not None and type(input) is Tensor and type(linear_weight) is Tensor
            and type(target) is Tensor and options is None and not z_loss and softcap is None and not shift
            and type(reduction) is str and input.is_cpu and input.dtype in _LEAN_DTYPES
            and input.dim() == 2 and linear_weight.dim() == 2 and input.numel() and linear_weight.numel()
            and input.shape[0] * linear_weight.shape[0] <= CE_MAX_NUMEL
            and _eager() and not has_torch_function_variadic(input, linear_weight, target, linear_bias, weight)
            and not torch.is_autocast_enabled("cpu") and not _transforms_active()   # vmap: t cannot be read
            and _auto()):
        if target.dtype is _INT64:
            if not (target != (-100 if ignore_index is None else ignore_index)).all():
                return None
        elif not target.is_floating_point():
            return None
        return _linear_ce(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                          reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return None


def nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction) -> Tensor | None:
    """torch's nll_loss (a gather and a reduction: nothing to fuse) where exact, else None."""
    if (type(input) is Tensor and type(target) is Tensor and size_average is None and reduce is None
            and type(reduction) is str and target.dtype is _INT64 and input.is_cpu
            and input.dtype in _LEAN_DTYPES
            and _eager() and not has_torch_function_variadic(input, target, weight)
            and (not (b := _env_get(_KEY)) or b.strip().lower() in _AUTO)):  # _auto(), inlined
        red = _REDUCTION.get(reduction)
        if red is not None:
            return _nll_loss_nd(input, target, weight, red, ignore_index)
    return None


def softmax(log: bool, input, dim, dtype) -> Tensor | None:
    """torch's (log_)softmax for an explicit dim (crossent runs torch's kernels
    there anyway; this skips the Python around them), else None."""
    if dim is not None and type(input) is Tensor and input.is_cpu and _eager() and _auto():
        # The exact calls torch.nn.functional makes, so even a bad dim gets its message.
        fn = input.log_softmax if log else input.softmax
        return fn(dim) if dtype is None else fn(dim, dtype=dtype)
    return None


def autocast_out_dtype(input: Tensor, out_dtype: torch.dtype) -> torch.dtype:
    """The loss dtype torch.autocast gives: torch lists cross_entropy and
    nll_loss among its fp32 ops (fp16/bf16 inputs are cast to fp32 first), so
    under autocast for input's device the loss is fp32.  crossent reads the
    fp16/bf16 logits as they are (it accumulates in fp32 anyway, so the result
    is the same without torch's fp32 copy of the logits) and only returns fp32."""
    if out_dtype in _LOW and torch.is_autocast_enabled(input.device.type):
        return torch.float32
    return out_dtype


def _autocast_on(t: Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def autocast_inputs(input: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(input, weight) as cross_entropy / nll_loss compute with them.

    Outside autocast, unchanged.  Under autocast torch casts fp16/bf16 inputs
    of these ops to fp32.  crossent's kernels accumulate in fp32 anyway, so
    fp16/bf16 logits are used as they are (no fp32 copy; only the loss dtype
    changes, see autocast_out_dtype); only when the class weight's dtype
    differs from the logits' (e.g. bf16 logits, fp32 weight, which autocast
    accepts and crossent's kernels do not) are the fp16/bf16 ones cast, as
    torch does (integer or fp64 tensors stay as they are, and fail as in torch).
    """
    if (isinstance(weight, Tensor) and isinstance(input, Tensor) and weight.dtype != input.dtype
            and (input.dtype in _LOW or weight.dtype in _LOW) and _autocast_on(input)):
        return tuple(t.float() if t.dtype in _LOW else t for t in (input, weight))
    return input, weight


def autocast_linear_args(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None):
    """linear_cross_entropy under autocast equals cross_entropy(F.linear(...)) there:
    the matmul in autocast's dtype (fp32 and other low-precision operands
    cast, fp64 left alone, as for F.linear), the loss in fp32
    (autocast_out_dtype).  Outside autocast, unchanged."""
    if not (isinstance(input, Tensor) and _autocast_on(input)):
        return input, linear_weight, linear_bias
    dt = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        return t.to(dt) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            else t
    return cast(input), cast(linear_weight), cast(linear_bias)


def no_autocast(device_type: str):
    """Autocast off for crossent's own fp32-accumulating matmuls (inputs are
    already in the dtype autocast chose); a no-op context outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
