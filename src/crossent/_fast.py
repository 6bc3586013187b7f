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
    crossent's deviations; a 2-D nll_loss reads no target dtype: torch raises
    for every target crossent treats otherwise, and the error goes to crossent);
  * none of the inputs where torch fails and crossent computes (README 8): a
    (1,) class target of a (C,) input, a non-contiguous 4-D nll_loss input,
    label smoothing with a class weight of a shape other than (C,);
  * no legacy size_average / reduce (their warnings name the caller's line);
  * none of the keyword-only extras;
  * not while torch.compile traces (crossent's custom ops then give NaN, not
    an assert, for an out-of-range target); Dynamo evaluates the type and
    attribute tests to constants and stops at _lean();
  * cross_entropy: at most ``CE_MAX_NUMEL`` logits, the measured
    crossover below which torch's kernel beats the fused sweep.
  * linear_cross_entropy (torch >= 2.13, its F.linear_cross_entropy): the
    same, with the N x C logits counted, a 2-D input and weight, no options,
    and no ignored position (crossent's 0 gradient for non-finite hidden states
    there is a deliberate difference).

Every test is O(1) Python, ~50 ns each; together they cost about what torch's
own Python wrapper does, which this path skips (it calls torch's C++ entry
points directly).  linear_cross_entropy also reads its CPU target once (O(N),
no device to sync with).
"""
from __future__ import annotations

import contextlib
import functools
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
_nll_loss_nd, _nll_loss_2d, _cross_entropy_loss = _nn.nll_loss_nd, _nn.nll_loss, _nn.cross_entropy_loss
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

    @_compiler.assume_constant_result
    def _lean() -> bool:
        """_eager() and the backend automatic (CROSSENT_BACKEND unset or "auto"), in one call
        (a call costs ~40 ns): baked in as False while Dynamo traces, as _eager()."""
        if _compiler._is_compiling_flag:
            return False
        b = _env_get(_KEY)
        return not b or b.strip().lower() in _AUTO
else:
    def _eager() -> bool:
        return not is_compiling()

    def _lean() -> bool:
        if is_compiling():   # folded to True while Dynamo traces: the environment is not read
            return False
        b = _env_get(_KEY)
        return not b or b.strip().lower() in _AUTO


# The checks below run on every call, so they are written for speed (timed
# with perf_counter_ns, interleaved, best of 300 batches each): one boolean
# expression, no helper calls but _lean() (~40 ns each), module-level
# bindings instead of attribute chains, positional arguments to torch's C++
# losses.  Each tensor attribute read (dtype, is_cpu, dim()) costs ~50 ns,
# the largest share; Dynamo folds every test before _lean() to a constant.
def cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                  label_smoothing) -> Tensor | None:
    """torch's cross_entropy for calls where it is the faster exact answer, else None."""
    if (type(input) is Tensor and type(target) is Tensor and size_average is None and reduce is None
            and type(reduction) is str and input.is_cpu and input.dtype in _LEAN_DTYPES
            and input.numel() <= CE_MAX_NUMEL and _lean()
            and not has_torch_function_variadic(input, target, weight)
            and (red := _REDUCTION.get(reduction)) is not None):
        tdt = target.dtype
        if tdt is _INT64:
            if input.dim() == 1 and target.dim():   # README "Deliberate differences" 8: torch's backward fails
                return None
        elif not tdt.is_floating_point:   # int32, uint8: README "Deliberate differences" 1, 4, 11
            return None
        # README 8: label smoothing with a class weight of a shape other than (C,) fails in torch.
        if weight is not None and label_smoothing and not (isinstance(weight, Tensor) and weight.dim() == 1):
            return None
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
            and _lean() and not has_torch_function_variadic(input, linear_weight, target, linear_bias, weight)
            and not torch.is_autocast_enabled("cpu") and not _transforms_active()):  # vmap: t cannot be read
        if target.dtype is _INT64:
            if not (target != (-100 if ignore_index is None else ignore_index)).all():
                return None
        elif not target.is_floating_point():
            return None
        return _linear_ce(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                          reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return None


def nll_loss_front(impl):
    """crossent.nll_loss: torch's nll_loss (a gather and a reduction: nothing to fuse) where it
    is the exact answer, else ``impl`` (crossent's own path; same signature).  The public
    function itself rather than a helper it calls: a Python frame less per call (~0.1 us of
    torch's ~1.8 us for a small loss)."""
    @functools.wraps(impl)
    def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean"):
        if (type(input) is Tensor and type(target) is Tensor and size_average is None and reduce is None
                and type(reduction) is str and input.is_cpu and input.dtype in _LEAN_DTYPES
                and _lean() and not has_torch_function_variadic(input, target, weight)
                and (red := _REDUCTION.get(reduction)) is not None):
            d = input.dim()
            if d == 2:
                # nll_loss_nd is, for 2-D input, a batch-size check and then nll_loss: calling
                # nll_loss saves a dispatch (~90 ns), and the target's dtype need not be read:
                # of the dtypes torch accepts, int64 and uint8, crossent differs only for an
                # out-of-range uint8 target, where torch raises.  On any error crossent's path
                # raises torch's error (nll_loss_nd's messages) or computes (README 1: int32).
                try:
                    return _nll_loss_2d(input, target, weight, red, ignore_index)
                except Exception:  # noqa: BLE001, S110 - impl below raises or computes
                    pass
            # README "Deliberate differences" 8: torch's backward fails for a (1,) target of a
            # (C,) input and for a non-contiguous (channels_last) 4-D input; crossent's does not.
            elif target.dtype is _INT64 and not ((d == 1 and target.dim()) or (d == 4 and not input.is_contiguous())):
                return _nll_loss_nd(input, target, weight, red, ignore_index)
        return impl(input, target, weight, size_average, ignore_index, reduce, reduction)
    return nll_loss


def softmax(log: bool, input, dim, dtype) -> Tensor | None:
    """torch's (log_)softmax for an explicit dim (crossent runs torch's kernels
    there anyway; this skips the Python around them), else None."""
    if dim is not None and type(input) is Tensor and input.is_cpu and _lean():
        # The exact calls torch.nn.functional makes, so even a bad dim gets its message.
        if dtype is None:
            return input.log_softmax(dim) if log else input.softmax(dim)
        return input.log_softmax(dim, dtype=dtype) if log else input.softmax(dim, dtype=dtype)
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


# Device types whose autocast runs (log_)softmax in fp32 (fp16/bf16 inputs without a
# dtype); CPU autocast leaves them in the input's dtype (tests/test_autocast_devices.py).
# MPS is left out: its list gained them after torch 2.4.
AUTOCAST_FP32_SOFTMAX = ("cuda", "xpu")


def autocast_softmax_dtype(input: Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype (log_)softmax computes and returns under torch.autocast: float32 for
    fp16/bf16 input on a device type in AUTOCAST_FP32_SOFTMAX, an explicit dtype winning,
    as torch's; else ``dtype``."""
    if (dtype is None and input.dtype in _LOW and input.device.type in AUTOCAST_FP32_SOFTMAX
            and torch.is_autocast_enabled(input.device.type)):
        return torch.float32
    return dtype


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
