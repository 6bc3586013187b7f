"""The checks of a vocab-parallel call, and where this rank's slice sits.

cross_entropy's argument checks read only shapes and dtypes and run before
any collective.  The checks that need the global class count C (the slice
fits, the class weight has C elements, the class indices are in range) wait
for the first collective, and read C and the targets on the host: only on
the CPU in eager mode, where that is free.  On an accelerator, and under
torch.compile on any device, they would be a host sync or a data-dependent
graph break, so they are skipped there, and the shard math masks instead:
an out-of-range target gives a NaN loss row, never an out-of-bounds index
(README, deliberate difference 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import _validate as V
from ..functional import _ce_checks

if TYPE_CHECKING:
    from ._core import ShardMath


def host_checks(device: torch.device) -> bool:
    """Whether the checks that read device values on the host run: CPU tensors
    in eager mode only (see the module docstring)."""
    return device.type == "cpu" and not V._compiling()


@dataclass
class Layout:
    """Where this rank's slice sits: start (0-d int64) and C (0-d acc) as device
    tensors, so nothing syncs with the host on an accelerator."""

    start: Tensor
    C: Tensor
    c_local: int


def slice_layout(sizes: Tensor | None, vocab_start_index, rank: int, c_local: int, acc, device,
                 weight: Tensor | None = None) -> Layout:
    """This rank's Layout from the slice sizes (or the weight's class count),
    and where host_checks allows, the check that the slice fits."""
    if isinstance(vocab_start_index, Tensor):
        start = vocab_start_index.to(device=device, dtype=torch.int64).reshape(())
    elif vocab_start_index is not None:  # a fill kernel, not a host->device copy
        start = torch.full((), int(vocab_start_index), dtype=torch.int64, device=device)
    else:
        start = sizes[:rank].sum().to(torch.int64)
    if sizes is not None:
        C = sizes.sum().to(acc)
    else:
        C = torch.full((), float(weight.numel()), dtype=acc, device=device)
    if host_checks(device):
        s, c = int(start), int(C.item())
        if s < 0 or s + c_local > c:
            raise ValueError(f"vocab slice [{s}, {s + c_local}) does not fit in {c} classes")
    return Layout(start, C, c_local)


def layout_from(sizes: Tensor | None, vocab_start_index, rank: int, c_local: int, sm: ShardMath,
                weight: Tensor | None) -> Layout:
    """slice_layout, then the checks that need the global class count C (where
    host_checks allows): the weight's size and the class indices, with torch's
    messages, before anything indexes with them."""
    lay = slice_layout(sizes, vocab_start_index, rank, c_local, sm.acc, sm.device, weight)
    if host_checks(sm.device):
        c = int(lay.C.item())
        if weight is not None and weight.numel() != c:
            check_weight_classes(weight, c, sm.o.prob, sm.ndim > 2)
        if not sm.o.prob:
            V.check_target_bounds(sm.target, c, sm.o.ignore_index)
    return lay



# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
def amp_cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` as torch.autocast casts an op's argument: floating, not float64."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _standins(x: Tensor, target: Tensor, weight: Tensor | None, world: int, amp: bool):
    """Meta tensors with the full logits' (and probability target's) shape
    and the dtypes cross_entropy sees (float32 under autocast)."""
    cd = 0 if x.dim() == 1 else 1
    shape = list(x.shape)
    if world > 1:
        shape[cd] = weight.numel() if weight is not None else max(shape[cd], 1)
    f32 = (lambda t: amp_cast(t, torch.float32)) if amp else (lambda t: t)
    xs = torch.empty(shape, dtype=f32(x).dtype, device="meta")
    ts = torch.empty(shape, dtype=f32(target).dtype, device="meta") if x.shape == target.shape else target
    return xs, ts, f32(weight)


def check_args(x: Tensor, target: Tensor, weight, ignore_index, label_smoothing, z_loss, softcap,
               reduction, world: int, device_type: str | None = None):
    """crossent.cross_entropy's argument checks (functional._cross_entropy's
    preamble and _ce_checks), in its order and with its messages, for the
    full logits that the shards form.

    They read only shapes and dtypes, so meta tensors stand in for the full
    logits and a probability target: with the GLOBAL class count where this
    rank knows it (one rank: its own; else the count the weight claims, which
    layout_from compares with the true one after the first collective; else
    at least one class, so that a rank holding none passes the others'
    checks), in float32 under autocast (torch's autocast casts cross_entropy's
    arguments to float32 on CPU, nll_loss's on CUDA: a float32 loss either
    way).  device_type: the logits' (when x is a meta tensor already).
    Returns (reduction, ignore_index, eps, z_loss, softcap or 0,
    prob, out_dtype).
    """
    red = V.reduction(None, None, reduction)
    V.tensor_arg(x, "cross_entropy_loss", "input", 1)
    V.tensor_arg(target, "cross_entropy_loss", "target", 2)
    V.optional_tensor_arg(weight, "cross_entropy_loss", "weight", 3)
    ignore_index = V.int_arg(ignore_index, "cross_entropy_loss", "ignore_index", 5, unpack=False)
    amp = torch.is_autocast_enabled(device_type or x.device.type)
    if (world > 1 or amp) and x.dim() > 0:
        x, target, weight = _standins(x, target, weight, world, amp)
    eps, z_loss, cap, prob, _, out_dtype = _ce_checks(x, target, weight, ignore_index, label_smoothing,
                                                      z_loss, softcap, red)
    if not prob:  # (a stand-in has classes: a shard without any is no error)
        V.no_class_k_dim(x, target)
    if prob and torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)):
        raise NotImplementedError("vocab-parallel cross-entropy is not differentiable with respect to "
                                  "probability targets or class weights")
    return red, ignore_index, eps, z_loss, cap, prob, out_dtype


def check_weight_classes(weight: Tensor, C: int, prob: bool, spatial: bool) -> None:
    """torch's error for a class weight without C elements (C, the global
    count, is known only after the first collective): _ce_checks on stand-ins
    with C classes."""
    x = torch.empty((1, C, 1) if spatial else (1, C), dtype=weight.dtype, device="meta")
    t = x if prob else torch.empty((1, 1) if spatial else (1,), dtype=torch.int64, device="meta")
    _ce_checks(x, t, weight, -100, 0.0, 0.0, None)
