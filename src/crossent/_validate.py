"""Argument checks with PyTorch 2.13's exception types, messages and order.

Only shapes, dtypes and Python values are inspected here, never tensor data,
except in ``check_target_bounds``, which reads targets on the CPU (free: no
device to sync with) and is skipped on accelerators and under torch.compile
unless CROSSENT_CHECK=1 asks for it.
"""
from __future__ import annotations

import operator
import os
import warnings

import torch
from torch import Tensor

from ._fast import _eager, _env_get, _transforms_active, env_key

# torch's C++ ScalarType names, as they appear in its error messages.
_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble", torch.complex32: "ComplexHalf",
}
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "").capitalize())


def _type_name(v) -> str:
    return type(v).__name__


# ---------------------------------------------------------------------------
# Python-level arguments
# ---------------------------------------------------------------------------
def tensor_arg(v, fname: str, arg: str, pos: int) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"{fname}(): argument '{arg}' (position {pos}) must be Tensor, not {_type_name(v)}")
    return v


def int_arg(v, fname: str, arg: str, pos: int, unpack: bool = True) -> int:
    """An int argument as torch's C++ binding accepts it (ints, 0-d int tensors).
    The binding checks every argument's type before it unpacks any value:
    unpack=False leaves the int64 range check to ``int64``, to call after the
    later arguments' type checks."""
    if isinstance(v, bool) or (isinstance(v, float)):
        raise TypeError(f"{fname}(): argument '{arg}' (position {pos}) must be int, not {_type_name(v)}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{fname}(): argument '{arg}' (position {pos}) must be int, not {_type_name(v)}") from None
    return int64(v) if unpack else v


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def int64(v: int) -> int:
    if not _INT64_MIN <= v <= _INT64_MAX:  # torch's binding unpacks a C++ int64
        raise ValueError("Overflow when unpacking long long")
    return v


def optional_tensor_arg(v, fname: str, arg: str, pos: int) -> None:
    if v is not None and not isinstance(v, Tensor):
        raise TypeError(f"{fname}(): argument '{arg}' (position {pos}) must be Tensor, not {_type_name(v)}")


def float_arg(v, fname: str, arg: str, pos: int) -> float:
    if isinstance(v, (bool, str)) or v is None:
        raise TypeError(f"{fname}(): argument '{arg}' (position {pos}) must be float, not {_type_name(v)}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{fname}(): argument '{arg}' (position {pos}) must be float, not {_type_name(v)}") from None


def legacy_reduction(size_average, reduce) -> str:
    """torch.nn._reduction.legacy_get_string, warning included."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    ret = "none" if not reduce else ("mean" if size_average else "sum")
    warnings.warn(f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
                  stacklevel=3)
    return ret


def reduction(size_average, reduce, reduction: str) -> str:
    """The effective reduction string ('none' | 'mean' | 'sum')."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    if reduction == "elementwise_mean":
        if _compiling():   # Dynamo cannot trace warnings.warn (fullgraph=True failed; torch's traces)
            _warn_elementwise_mean_while_tracing()
        else:   # attributed to crossent's public function, as torch attributes it to torch.nn.functional
            warnings.warn(_ELEMENTWISE_MEAN, stacklevel=2)
        return "mean"
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


_ELEMENTWISE_MEAN = "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead."


@torch.compiler.assume_constant_result
def _warn_elementwise_mean_while_tracing() -> bool:
    """The deprecation warning, issued while Dynamo traces (it runs this function then and
    bakes in the result), as torch's own compiled cross_entropy warns: at compile time, not
    on each call of the compiled graph."""
    warnings.warn(_ELEMENTWISE_MEAN)
    return True


def softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch.nn.functional._get_softmax_dim: the implicit dim, with its warning."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  "Change the call to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def wrap_dim(dim, ndim: int, fname: str = "softmax") -> int:
    dim = int_arg(dim, fname, "dim", 1)
    lo, hi = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if not lo <= dim <= hi:
        raise IndexError(f"Dimension out of range (expected to be in range of [{lo}, {hi}], but got {dim})")
    return dim % max(ndim, 1)


def floating_input(x: Tensor, kernel: str) -> None:
    """Reject non-floating inputs the way torch's CPU kernels do."""
    if x.dtype not in _FLOATING:
        raise NotImplementedError(f'"{kernel}" not implemented for \'{dtype_name(x.dtype)}\'')


def softmax_kernel(log: bool, dim: int, ndim: int) -> str:
    lastdim = "_lastdim" if dim == max(ndim, 1) - 1 else ""
    return f"{'log_' if log else ''}softmax{lastdim}_kernel_impl"


def softmax_input(x: Tensor, log: bool, dim: int) -> None:
    """floating_input for torch's (log_)softmax kernel, whose name is formed only for the message."""
    if x.dtype not in _FLOATING:
        floating_input(x, softmax_kernel(log, dim, x.dim()))


# ---------------------------------------------------------------------------
# nll_loss_nd / cross_entropy shape and dtype checks
# ---------------------------------------------------------------------------
def _check_weight_dtype(x: Tensor, weight: Tensor | None) -> None:
    if weight is not None and weight.dtype != x.dtype:
        raise RuntimeError(f"expected scalar type {dtype_name(x.dtype)} but found {dtype_name(weight.dtype)}")


_CLASS_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _check_target_dtype(target: Tensor) -> None:
    # Deliberate difference: int32 targets are accepted everywhere.
    if target.dtype not in _CLASS_DTYPES:
        dt = target.dtype
        if dt in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(target.device.type):
            dt = torch.float32  # autocast casts the fp32 losses' fp16/bf16 arguments before torch's check
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {dtype_name(dt)}")


def class_target(x: Tensor, target: Tensor, weight: Tensor | None, reduction: str = "none") -> None:
    """aten's nll_loss_nd, then its nll_loss / nll_loss2d autograd wrapper and
    kernel checks, in their order, for class-index targets (input dtype
    included: its message names the kernel)."""
    xd, td = x.dim(), target.dim()   # each dim() call is a C call: read once
    if xd < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {xd})")
    if xd != 1 and x.shape[0] != (target.shape[0] if td > 0 else 0):
        tb = target.shape[0] if td > 0 else 0
        raise ValueError(f"Expected input batch_size ({x.shape[0]}) to match target batch_size ({tb}).")
    spatial = xd > 2
    if spatial and xd != 4 and tuple(target.shape[1:]) != tuple(x.shape[2:]):
        expected = [x.shape[0], *x.shape[2:]]
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    # nll_loss_nd reshapes 3-D and >= 5-D input to 4-D and calls nll_loss2d.
    weight_no_grad(weight, "nll_loss2d_forward" if spatial else "nll_loss_forward")
    if not spatial:
        if td > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        _check_target_dtype(target)
        if xd == 1 and td == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        C = x.shape[-1]
        if weight is not None and (weight.dim() != 1 or weight.numel() != C):
            raise RuntimeError(f"weight tensor should be defined either for all {C} classes or no classes "
                               f"but got weight tensor of shape: {list(weight.shape)}")
        floating_input(x, "nll_loss_out_frame")
        _check_weight_dtype(x, weight)
        return
    if x.dim() == 4 and target.dim() != 3:
        raise RuntimeError("only batches of spatial targets supported (3D tensors) but got targets "
                           f"of dimension: {target.dim()}")
    _check_target_dtype(target)
    if weight is not None and weight.numel() != x.shape[1]:  # any shape with C elements
        raise RuntimeError("weight tensor should be defined either for all or no classes")
    if x.dim() == 4 and tuple(x.shape[2:]) != tuple(target.shape[1:]):
        raise RuntimeError(f"size mismatch (got input: {list(x.shape)} , target: {list(target.shape)}")
    no_class_k_dim(x, target)  # the same check on nll_loss_nd's reshaped 3-D / 5-D+ input
    floating_input(x, "nll_loss2d_forward_out_frame")
    _check_weight_dtype(x, weight)
    # 'mean' and 'sum' return before reading an empty target (C == 0 with
    # targets does read it); 'none' does not (nor does torch's batching rule
    # under vmap).
    if target.dtype == torch.uint8 and \
            (target.numel() > 0 or (reduction == "none" and not func_transforms()[0])):
        raise RuntimeError("expected scalar type Long but found Byte")


def no_class_k_dim(x: Tensor, target: Tensor) -> None:
    """torch's nll_loss_nd reshapes a 3-D or >= 5-D input without elements to
    (N, C, 0, 0) and a non-empty target to (N, 1, S): with C == 0 that is a
    size mismatch, raised where nll_loss2d checks sizes (class_target; a
    vocab-parallel shard without classes of its own is checked on a
    stand-in that has them)."""
    if x.dim() == 3 or x.dim() >= 5:
        if x.numel() == 0 and target.numel() != 0:
            n = x.shape[0]
            raise RuntimeError(f"size mismatch (got input: {[n, x.shape[1], 0, 0]} , "
                               f"target: {[n, 1, target.numel() // n]}")


def prob_target(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> None:
    """cross_entropy's checks for probability targets (same shape as input)."""
    if not target.is_floating_point():
        raise RuntimeError(f"Expected floating point type for target with class probabilities, "
                           f"got {dtype_name(target.dtype)}")
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if x.dim() == 0:
        raise IndexError("Dimension specified as 1 but tensor has no dimensions")
    C = x.shape[0 if x.dim() == 1 else 1]
    if weight is not None and (weight.dim() != 1 or weight.numel() != C):
        raise RuntimeError(f"cross_entropy: weight tensor should be defined either for all {C} classes or no "
                           f"classes but got weight tensor of shape: {list(weight.shape)}")


def weight_no_grad(weight: Tensor | None, op: str = "nll_loss_forward") -> None:
    # Under vmap torch's batching rule computes (crossent then runs torch's ops).
    if weight is not None and weight.requires_grad and torch.is_grad_enabled() and not func_transforms()[0]:
        raise RuntimeError(f"The function '{op}' is not differentiable with respect to argument "
                           "'weight'. This input cannot have requires_grad True.")


# ---------------------------------------------------------------------------
# Class-index targets as exact integers
# ---------------------------------------------------------------------------
def _fits(v: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= v <= info.max


def not_ignored(t: Tensor, ignore_index: int) -> Tensor:
    """``t != ignore_index`` as exact integers (see target_masks)."""
    return t != ignore_index if _fits(ignore_index, t.dtype) else torch.ones_like(t, dtype=torch.bool)


def target_masks(t: Tensor, ignore_index: int, n_classes: int) -> tuple[Tensor, Tensor]:
    """(counted, in_range) masks of class-index targets, compared as exact
    integers: ``t != ignore_index`` and ``counted & 0 <= t < n_classes``.

    A bare ``t != ignore_index`` casts the Python int to t's dtype, so -100
    matches a uint8 target 156 and 2**32 an int32 target 0; a constant outside
    the dtype's range can equal no target, so it is never compared at all.
    Every front door and backend builds its masks here (or, in a kernel, on
    targets widened to int64 first): see backends/base.py.
    """
    counted = not_ignored(t, ignore_index)
    in_range = counted & (t >= 0)
    if _fits(n_classes, t.dtype):
        in_range = in_range & (t < n_classes)
    return counted, in_range


def _compiling() -> bool:
    """torch.compiler.is_compiling() (False on torch < 2.3), at half its cost (_fast._eager)."""
    return not _eager()


@torch.compiler.assume_constant_result
def _transforms_active_while_tracing() -> bool:
    """_transforms_active(), run by Dynamo at trace time and baked in as a constant
    (Dynamo's own guard on the functorch stack covers it).  A direct call works on
    torch >= 2.11, whose Dynamo folds that probe itself; torch 2.4's cannot trace it
    ("torch.* op returned non-Tensor bool") and broke fullgraph=True."""
    return _transforms_active()


def func_transforms() -> tuple[bool, bool]:
    """(vmap, forward-mode AD): whether either is active around this call.

    vmap: the fused kernels have no batching rule, so the public functions
    then compute with torch's own batchable ops.  Forward mode (torch.func.jvp,
    jacfwd, forward_ad.dual_level): the Function with a jvp rule is used.

    While torch.compile traces, (True, False) under any torch.func transform:
    Dynamo inlines grad / vjp / jacrev / vmap / jvp, so crossent's Functions
    would see GradTrackingTensor / BatchedTensor inputs and hand them to its
    custom ops, which have no functorch rules.  torch's own ops have them.
    Dynamo folds the probe to a constant and guards the graph on the
    functorch stack, so a compiled call outside any transform keeps crossent's
    kernels.
    """
    if _compiling():
        return _transforms_active_while_tracing(), False
    vmap, fwd = False, torch.autograd.forward_ad._current_level >= 0
    if torch._C._functorch.maybe_current_level() is not None:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        keys = {i.key() for i in retrieve_all_functorch_interpreters()}
        T = torch._C._functorch.TransformType
        vmap, fwd = T.Vmap in keys, fwd or T.Jvp in keys
    return vmap, fwd


_CHECK = env_key("CROSSENT_CHECK")


def _check_forced() -> bool:
    """CROSSENT_CHECK set while compiling; a constant to Dynamo (it runs this once per graph),
    which before torch 2.13 can trace neither _env_get's bound dict.get nor a missing key."""
    return os.environ.get("CROSSENT_CHECK", "") not in ("", "0")


# What torch.compiler.assume_constant_result does, without importing torch._dynamo.
_check_forced._dynamo_marked_constant = True


def check_target_bounds(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError for a non-ignored class index outside [0, C), like torch on CPU.

    Runs only where it costs no host sync: CPU tensors in eager mode, or
    anywhere with CROSSENT_CHECK=1.  Elsewhere an out-of-range target gives a
    NaN loss (and NaN gradient row) instead of a device-side assert.
    """
    eager = _eager()
    if not eager or target.device.type != "cpu":   # only on request: a host sync
        # _env_get: os.environ.get costs ~0.7 us in eager mode; Dynamo reads the flag once per graph
        forced = _env_get(_CHECK) not in (None, b"", b"0", "", "0") if eager else _check_forced()
        if not forced:
            return
    if target.numel() == 0:
        return
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
