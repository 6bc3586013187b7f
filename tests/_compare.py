"""Helpers for tests that run crossent's call and torch's side by side."""
from __future__ import annotations

import pytest
import torch

REDUCTIONS = ["none", "mean", "sum"]


def outcome(fn):
    """fn()'s result, or its exception as (type, message)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - compared with torch's, whatever it is
        return type(e), str(e)


def grad_run(fn, x, *args, upstream=None, **kw):
    """(value, input gradient) of fn(x, ...); upstream defaults to ones."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    out = fn(x, *args, **kw)
    if not x.requires_grad:
        return out, None
    g = torch.ones_like(out) if upstream is None else torch.full_like(out, upstream)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), gx


def same_as_torch(ours_fn, torch_fn, x, *args, upstream=None, backward=True, **kw):
    """Same value and gradient as torch, or the same exception."""
    try:
        b, gb = grad_run(torch_fn, x, *args, upstream=upstream, **kw) if backward else \
            (torch_fn(x, *args, **kw), None)
    except Exception as e:  # noqa: BLE001 - torch's own error is the expectation
        with pytest.raises(type(e)) as ours:
            grad_run(ours_fn, x, *args, upstream=upstream, **kw)
        assert str(ours.value) == str(e)
        return
    a, ga = grad_run(ours_fn, x, *args, upstream=upstream, **kw) if backward else (ours_fn(x, *args, **kw), None)
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, equal_nan=True)
    if gb is not None:
        torch.testing.assert_close(ga, gb, equal_nan=True)
