"""Helpers for tests that run crossent's call and torch's side by side."""
from __future__ import annotations

REDUCTIONS = ["none", "mean", "sum"]


def outcome(fn):
    """fn()'s result, or its exception as (type, message)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - compared with torch's, whatever it is
        return type(e), str(e)
