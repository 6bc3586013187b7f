"""Backend registry: one backend object per name, picked per device.

``CROSSENT_BACKEND=auto|torch|triton`` overrides the choice.  A named backend
that cannot run on the tensor's device raises instead of falling back, so a
benchmark or CI job never measures the wrong thing silently.
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import _fast
from .base import Backend

# name -> "module:attribute"; imported lazily so `import crossent` never pulls in triton.
_REGISTRY = {
    "torch": "crossent.backends.torch_chunked:TorchChunkedBackend",
    "triton": "crossent.backends.triton:TritonBackend",
}
_INSTANCES: dict[str, Backend] = {}


def names() -> list[str]:
    return sorted(_REGISTRY)


def load(name: str) -> Backend:
    """The backend called ``name`` (no availability check)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown crossent backend {name!r}; choose one of auto, {', '.join(names())}")
    if name not in _INSTANCES:
        module, attr = _REGISTRY[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), attr)()
    return _INSTANCES[name]


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def select(device: torch.device | str, requested: str | None = None) -> Backend:
    """The backend to use for tensors on ``device``.

    ``requested`` (else $CROSSENT_BACKEND, else "auto"): "auto" picks triton for
    CUDA tensors when triton imports, and the portable torch backend otherwise.
    """
    device = torch.device(device)
    name = (requested or os.environ.get("CROSSENT_BACKEND") or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda" and _triton_importable():
            backend = load("triton")
            if backend.available(device)[0]:
                return backend
        return load("torch")
    try:
        backend = load(name)
    except ImportError as e:
        raise RuntimeError(f"CROSSENT_BACKEND={name} was requested but cannot be imported: {e}") from e
    ok, why = backend.available(device)
    if not ok:
        raise RuntimeError(f"CROSSENT_BACKEND={name} was requested but cannot run on {device}: {why}")
    return backend


# name_for's answers, keyed on everything select reads that can change while a
# process runs: the two environment variables (read raw: os.environ.get costs
# ~0.7 us each).  Device availability and triton's import are fixed per process.
_NAMES: dict = {}
_ENV_KEYS = (_fast.env_key("CROSSENT_BACKEND"), _fast.env_key("TRITON_INTERPRET"))


def name_for(device_type: str) -> str:
    """select(device_type).name; a constant to torch.compile, so tracing never
    runs the registry (imports, environment lookups) inside a graph.  Memoized:
    select costs ~2 us a call (an import lookup, CUDA's availability)."""
    key = (device_type, *map(_fast._env_get, _ENV_KEYS))
    name = _NAMES.get(key)
    if name is None:   # select raises for a backend that cannot run: never stored
        name = _NAMES[key] = select(device_type).name
    return name


# What torch.compiler.assume_constant_result does, without the import of
# torch._dynamo (and through it triton) that calling it at import time costs.
name_for._dynamo_marked_constant = True


__all__ = ["Backend", "load", "name_for", "names", "select"]
