"""Module forms.  Each subclasses the matching torch.nn module, so the
constructor, buffers, ``state_dict``, ``__constants__`` and repr are torch's
own (a checkpoint moves across unchanged, and isinstance checks still pass);
only ``forward`` runs crossent."""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "NLLLoss", "CrossEntropyLoss"]


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
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


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
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap)


# torch.nn.LinearCrossEntropyLoss is new in torch 2.13; on older torch the
# module form is absent (crossent.linear_cross_entropy works on any torch >= 2.4).
_TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss", None)
if _TorchLinearCrossEntropyLoss is not None:
    class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss):
        """crossent.linear_cross_entropy (same arguments and state_dict as
        torch.nn.LinearCrossEntropyLoss; ``options`` may also be a
        crossent.LinearCrossEntropyOptions), plus keyword-only ``z_loss`` and
        ``softcap``."""

        def __init__(self, in_features: int, num_classes: int, *, z_loss: float = 0.0,
                     softcap: float | None = None, **kwargs) -> None:
            super().__init__(in_features, num_classes, **kwargs)
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

    __all__ += ["LinearCrossEntropyLoss"]
