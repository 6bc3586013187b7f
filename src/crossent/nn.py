"""Module forms.  Each subclasses the matching torch.nn module, so the
constructor, buffers, ``state_dict``, ``__constants__`` and repr are torch's
own (a checkpoint moves across unchanged, and isinstance checks still pass);
only ``forward`` runs crossent.  On torch < 2.13, which has no
torch.nn.LinearCrossEntropyLoss, LinearCrossEntropyLoss subclasses a copy of 2.13's."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import functional as F

if TYPE_CHECKING:  # crossent.linear is imported on first use (tests/test_lean_import.py)
    from .linear import LinearCrossEntropyOptions

__all__ = ["Softmax", "LogSoftmax", "NLLLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss"]


_UNSET = object()


def _class_weight(loss: torch.nn.modules.loss._WeightedLoss) -> Tensor | None:
    """``loss.weight`` without Module.__getattr__: that runs only after Python has raised and
    caught an AttributeError for the name (~1 us, half a small loss call; torch's loss modules
    pay it).  _WeightedLoss registers the weight as a buffer; one assigned as a Parameter
    since lives in _parameters instead, and is read the usual way."""
    w = loss._buffers.get("weight", _UNSET)
    return loss.weight if w is _UNSET else w


class Softmax(torch.nn.Softmax):
    """crossent.softmax over ``dim`` (same arguments as torch.nn.Softmax)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """crossent.log_softmax over ``dim`` (same arguments as torch.nn.LogSoftmax)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class NLLLoss(torch.nn.NLLLoss):
    """crossent.nll_loss (same arguments as torch.nn.NLLLoss)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, _class_weight(self), None, self.ignore_index, None, self.reduction)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """crossent.cross_entropy (same arguments as torch.nn.CrossEntropyLoss),
    plus keyword-only ``z_loss`` and ``softcap`` (see crossent.cross_entropy)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=_class_weight(self), ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap)


class _LinearCrossEntropyLoss213(torch.nn.modules.loss._WeightedLoss):
    """torch 2.13's torch.nn.LinearCrossEntropyLoss, its constructor, checks, state and
    repr, for torch < 2.13 (which has no such module): a checkpoint moves across torch
    versions unchanged (``weight`` buffer, ``linear.weight``, ``linear.bias``)."""

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # stored flat, as torch stores it: Linear has no multi-dimensional weight
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)
        self.options = options

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes},"
                f" out_features={self.out_features}, bias={self.linear.bias is not None},"
                f" reduction={self.reduction}, ignore_index={self.ignore_index},"
                f" label_smoothing={self.label_smoothing}, options={self.options}")


# torch.nn.LinearCrossEntropyLoss is new in torch 2.13: subclass it where it exists (isinstance
# checks pass), and its 2.13 form above on older torch.
_LinearBase = getattr(torch.nn, "LinearCrossEntropyLoss", _LinearCrossEntropyLoss213)


class LinearCrossEntropyLoss(_LinearBase):
    """crossent.linear_cross_entropy (same arguments and state_dict as torch 2.13's
    torch.nn.LinearCrossEntropyLoss, on any torch; ``options`` may also be a
    crossent.LinearCrossEntropyOptions), plus keyword-only ``z_loss`` and ``softcap``."""

    # torch's parameters spelt out (not **kwargs), so that inspect.signature and IDEs show them
    # and a misspelt keyword raises TypeError naming this class.
    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0,
                 options: LinearCrossEntropyOptions | torch.nn.LinearCrossEntropyOptions | None = None,
                 z_loss: float = 0.0, softcap: float | None = None) -> None:
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                         dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        from .linear import linear_cross_entropy
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features,
                                                    self.linear.in_features))
        linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                       if self.linear.bias is not None else None)
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    weight=self.weight, reduction=self.reduction,
                                    ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                    options=self.options, z_loss=self.z_loss, softcap=self.softcap)
