"""The chunked backend's K-dim tile sweep (torch_chunked._kdim_sweep): (B, C, S)
logits in (C, blk) tiles of one batch entry, the target logit by take() at
flat offsets.  Checked against torch, against the row-chunked sweep it stands
in for (non-finite logits, out-of-range targets, infinite scales), and for
results that do not depend on the tiling or the chunk pool."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.backends import torch_chunked as tc

from _tol import assert_close_to_ref


@pytest.fixture
def spy(monkeypatch):
    """Counts _kdim_sweep calls (the tests must exercise the tile path)."""
    monkeypatch.setenv("CROSSENT_BACKEND", "torch")  # no lean path to torch's own kernel
    calls = []
    real = tc._kdim_sweep

    def wrapped(*args):
        calls.append(args[1].shape)
        return real(*args)
    monkeypatch.setattr(tc, "_kdim_sweep", wrapped)
    return calls


@pytest.mark.parametrize("tile_bytes", [4, 4 * 5 * 3, 1 << 20])  # 1 column, 3 columns + remainder, 1 tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tiles_match_torch(spy, monkeypatch, tile_bytes, dtype, weighted, ignore_index, reduction):
    monkeypatch.setattr(tc, "_KDIM_TILE_BYTES", tile_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 7, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 5, (3, 4, 7), generator=g)
    t[0, 0, :3] = ignore_index
    w = torch.rand(5, generator=g, dtype=torch.float64).to(dtype) if weighted else None
    xa, xb = (x.to(dtype).requires_grad_() for _ in range(2))
    a = crossent.cross_entropy(xa, t, w, ignore_index=ignore_index, reduction=reduction)
    b = F.cross_entropy(xb, t, w, ignore_index=ignore_index, reduction=reduction)
    up = torch.linspace(-2, 3, b.numel(), dtype=dtype).reshape(b.shape)  # a non-unit upstream
    a.backward(up)
    b.backward(up)
    xr = x.detach().requires_grad_()
    r = F.cross_entropy(xr, t, None if w is None else w.double(), ignore_index=ignore_index,
                        reduction=reduction)
    r.backward(up.double())
    assert spy, "the K-dim tile sweep did not run"
    assert_close_to_ref(a.detach(), b.detach(), r.detach(), what="loss")
    assert_close_to_ref(xa.grad, xb.grad, xr.grad, what="grad")


def test_int32_targets(spy):
    """int32 class indices (torch's K-dim losses take no uint8 targets)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 33, generator=g, dtype=torch.float64)
    t = torch.randint(0, 6, (2, 33), generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = crossent.cross_entropy(xa, t.int(), ignore_index=3)
    b = F.cross_entropy(xb, t, ignore_index=3)
    a.backward()
    b.backward()
    assert spy
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_inplace_backward(spy):
    x = torch.randn(2, 7, 9, 5, dtype=torch.float64)
    t = torch.randint(0, 7, (2, 9, 5))
    xr = x.clone().requires_grad_()
    F.cross_entropy(xr, t, label_smoothing=0.0).backward()
    xi = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xi, t, inplace_backward=True)
    loss.backward()
    assert spy
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    torch.testing.assert_close(xi.grad, xr.grad)
    assert xi.grad.data_ptr() == xi.data_ptr()


def _sweep(x, t, w, scale, ignore_index, kdim: bool, monkeypatch):
    """(loss, lse, grad) of the backend's sweep, by the tile path or the row-chunked one."""
    monkeypatch.setattr(tc, "_KDIM_TILE_BYTES", 4 * x.shape[1] * 3)
    if not kdim:
        monkeypatch.setattr(tc, "_kdim_plain", lambda *a: False)
    k = tc._Terms(x, t, w, ignore_index, 0.0, 0.0, None)
    grad = torch.empty_like(x)
    loss, lse = tc.TorchChunkedBackend._sweep(k, x, grad, scale, with_loss=True)
    monkeypatch.undo()
    return loss, lse, grad


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("row_scale", [False, True])
def test_edge_values_match_row_sweep(monkeypatch, weighted, row_scale):
    """Backend-level (out-of-range targets get here on accelerators and under
    torch.compile, where no bounds check runs): same NaN/inf pattern and values
    as the row-chunked sweep for non-finite logits, out-of-range and ignored
    targets, and infinite or NaN upstream scales."""
    g = torch.Generator().manual_seed(2)
    B, C, S = 2, 4, 10
    x = torch.randn(B, C, S, generator=g, dtype=torch.float64)
    x[0, 1, 0] = float("inf")                     # one +inf logit
    x[0, :, 1] = float("-inf")                    # a row of -inf
    x[0, 2, 2] = float("nan")                     # a NaN logit
    x[1, 0, 3] = float("-inf")                    # -inf at the target
    x[1, :, 4] = float("inf")                     # ignored row of inf logits
    t = torch.randint(0, C, (B, S), generator=g)
    t[1, 3] = 0
    t[1, 4] = -100
    t[1, 5], t[1, 6], t[0, 7] = C, -1, -100     # out of range, counted
    w = torch.rand(C, generator=g, dtype=torch.float64) if weighted else None
    scale = (torch.linspace(-1, 2, B * S, dtype=torch.float64).reshape(B, S) if row_scale
             else torch.tensor(0.25, dtype=torch.float64))
    if row_scale:
        scale[0, 5], scale[0, 7], scale[1, 8] = float("inf"), float("inf"), float("nan")  # [0, 7] ignored
    ours = _sweep(x, t, w, scale, -100, True, monkeypatch)
    rows = _sweep(x, t, w, scale, -100, False, monkeypatch)
    for a, b, what in zip(ours, rows, ("loss", "lse", "grad")):
        torch.testing.assert_close(a, b, equal_nan=True, msg=what)


def test_inf_scale_keeps_ignored_rows_zero(monkeypatch):
    """mean over no counted rows: scale 1/0; the ignored rows' gradient stays 0."""
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    t = torch.full((1, 5), -100)
    t[0, 0] = 1
    _, _, grad = _sweep(x, t, None, torch.tensor(float("inf"), dtype=torch.float64), -100, True,
                        monkeypatch)
    assert torch.equal(grad[..., 1:], torch.zeros_like(grad[..., 1:]))


def test_pool_matches_serial(spy, monkeypatch):
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 intra-op threads for the chunk pool")
    monkeypatch.setattr(tc, "_KDIM_TILE_BYTES", 4 * 8 * 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 100, generator=g)
    t = torch.randint(0, 8, (3, 100), generator=g)

    def run():
        xr = x.clone().requires_grad_()
        loss = crossent.cross_entropy(xr, t, reduction="sum")
        loss.backward()
        return loss, xr.grad
    pooled = run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pooled[0], serial[0]) and torch.equal(pooled[1], serial[1])
