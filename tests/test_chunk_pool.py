"""The CPU sweep's chunk pool (backends/torch_chunked.py): many chunks run on
worker threads with single-threaded ops; results must not depend on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.backends import torch_chunked as tc


@pytest.fixture
def small_chunks(monkeypatch):
    """1 KiB chunks: dozens of chunks even for small inputs."""
    monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    monkeypatch.setattr(tc, "_CHUNK_BYTES", 1024)
    monkeypatch.setattr(tc, "_MIN_CHUNK_BYTES", 1024)


def _run(x, t, **kw):
    x = x.detach().clone().requires_grad_()
    loss = crossent.cross_entropy(x, t, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("shape", [(300, 40), (4, 7, 9, 11)])
@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"label_smoothing": 0.1, "weight": "w"}])
def test_pool_matches_serial_and_torch(small_chunks, shape, kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    kw = {k: (torch.rand(shape[1], generator=g) if v == "w" else v) for k, v in kw.items()}
    assert len(list(tc._chunks(x.reshape(shape[0], shape[1], -1)))) > 4
    pooled = _run(x, t, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sweep then runs every chunk in this thread
    try:
        serial = _run(x, t, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pooled[0], serial[0]) and torch.equal(pooled[1], serial[1])
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, **kw)
    ref.sum().backward()
    torch.testing.assert_close(pooled[0], ref.detach())
    torch.testing.assert_close(pooled[1], xr.grad)


def test_pool_under_inference_mode_and_no_grad(small_chunks):
    x, t = torch.randn(200, 30), torch.randint(0, 30, (200,))
    ref = F.cross_entropy(x, t, reduction="none")
    with torch.inference_mode():
        torch.testing.assert_close(crossent.cross_entropy(x, t, reduction="none"), ref)
    with torch.no_grad():
        torch.testing.assert_close(crossent.cross_entropy(x, t, reduction="none"), ref)


def test_pool_leaves_callers_thread_count(small_chunks):
    before = torch.get_num_threads()
    _run(torch.randn(200, 30), torch.randint(0, 30, (200,)))
    assert torch.get_num_threads() == before


def test_pool_reraises_worker_errors():
    x = torch.randn(64, 8)

    def body(xi, ri):
        raise ZeroDivisionError("from a chunk")
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 intra-op threads for the pool")
    with pytest.raises(ZeroDivisionError, match="from a chunk"):
        tc._for_each_chunk(body, x)
