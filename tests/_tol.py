"""The project's tolerance rule: crossent's error against a float64 reference
may be at most a small multiple of PyTorch's own same-dtype error."""
from __future__ import annotations

import torch

FACTOR = 4.0


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    both_nan = torch.isnan(a) & torch.isnan(ref)
    same_inf = torch.isinf(a) & (a == ref)
    d = torch.where(both_nan | same_inf, torch.zeros_like(a), (a - ref).abs())
    return float(d.nan_to_num(nan=float("inf")).max()) if d.numel() else 0.0


def floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Absolute slack of a few ulps at the reference's magnitude, so a
    case where torch happens to be exact does not demand exactness of us."""
    finite = ref[torch.isfinite(ref)].double()
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return 16 * torch.finfo(dtype).eps * max(scale, 1.0)


def assert_close_to_ref(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                        dtype: torch.dtype | None = None, what: str = "") -> None:
    """|ours - ref| <= FACTOR * |theirs - ref| + floor, NaN/inf patterns equal."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    dtype = dtype or theirs.dtype
    nan_o, nan_r = torch.isnan(ours), torch.isnan(ref)
    assert torch.equal(nan_o, nan_r), f"{what}: NaN pattern differs"
    e_ours, e_theirs = _err(ours, ref), _err(theirs, ref)
    bound = FACTOR * e_theirs + floor(ref, dtype)
    assert e_ours <= bound, f"{what}: error {e_ours:.3g} > {bound:.3g} (torch's own error {e_theirs:.3g})"
