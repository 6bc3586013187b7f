"""crossent: PyTorch-exact softmax, log_softmax, nll_loss and cross-entropy,
fused and memory-lean, on CPU and NVIDIA GPUs.

Importing crossent imports torch only: no triton, no CUDA initialisation.
The public names load on first use (PEP 562), so ``crossent --help`` answers
without importing torch; ``crossent.distributed`` is imported on demand.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "softmax": "functional", "log_softmax": "functional", "nll_loss": "functional",
    "cross_entropy": "functional", "cross_entropy_with_stats": "functional",
    "CrossEntropyOutput": "functional", "linear_cross_entropy": "linear",
    "linear_cross_entropy_with_stats": "linear", "linear_cross_entropy_plan": "linear",
    "LinearCrossEntropyOptions": "linear", "LinearCrossEntropyPlan": "linear",
    "log_probs": "logprobs", "linear_log_probs": "logprobs", "LogProbsOutput": "logprobs",
}

__all__ = ["softmax", "log_softmax", "nll_loss", "cross_entropy", "cross_entropy_with_stats",
           "CrossEntropyOutput", "linear_cross_entropy", "linear_cross_entropy_with_stats",
           "linear_cross_entropy_plan", "LinearCrossEntropyOptions", "LinearCrossEntropyPlan", "nn",
           "log_probs", "linear_log_probs", "LogProbsOutput",
           "__version__"]


def _load() -> None:
    """Import the library proper and bind every public name on the package."""
    g = globals()
    g["nn"] = importlib.import_module(".nn", __name__)
    for name, mod in _EXPORTS.items():
        g[name] = getattr(importlib.import_module(f".{mod}", __name__), name)


def __getattr__(name: str):
    if name in _EXPORTS or name == "nn":
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
