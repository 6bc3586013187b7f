"""Shared test setup.

Without CUDA, Triton kernels run in its interpreter on CPU tensors; the
variable must be set before anything imports triton.
"""
import os

try:  # torch imports fast and never initialises CUDA here
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

# The suite tests crossent's own kernels: with the backend left automatic, small
# fp32/fp64 CPU calls take the lean path to torch's kernels (tests/test_fastpath.py
# tests that path and sets "auto" itself).
os.environ.setdefault("CROSSENT_BACKEND", "torch")

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
