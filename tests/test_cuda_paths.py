"""crossent's CUDA-only branches, reached on the CPU where that needs no lie about CUDA.

Each test names the branch it stands in for: the device's memory query
(torch.cuda's API answered by a stub), the auto backend's pick for CUDA tensors,
and the code that runs after a check that CUDA skips (the bounds check, the
entropy's host re-check), which is device-agnostic torch code run here on CPU
tensors, where an out-of-bounds index raises instead of reading garbage.
What only a GPU answers (a failed cooperative launch, stream capture, the real
allocator, device-side asserts) is in tests/gpu/test_gpu_paths.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import _logprobs_ops, _validate, backends
from crossent import linear as L

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the Triton interpreter


# ----------------------------------------------------------------------------- linear._free_bytes

def test_free_bytes_on_cuda_counts_the_allocators_cache(monkeypatch):
    """linear._free_bytes' CUDA branch: the device's free memory plus what torch's caching
    allocator reserved and holds unused (reusable by the chunks); None when the query
    fails or while compiling; _plan reads it for CUDA tensors."""
    dev = torch.device("cuda", 0)
    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (seen.append(d), (5 << 30, 80 << 30))[1])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1 << 30)
    assert L._free_bytes(dev) == (5 << 30) + (2 << 30) and seen == [dev]

    N, D, V = 8192, 4096, 128256
    room = L._free_bytes(dev) - (N + V) * D * 2
    via_cuda = L._plan(N, D, V, torch.bfloat16, dev, None, "torch")[0]
    monkeypatch.setattr(L, "_free_bytes", lambda device, free=room + (N + V) * D * 2: free)
    assert via_cuda == L._plan(N, D, V, torch.bfloat16, dev, None, "torch")[0]
    monkeypatch.undo()

    def fails(d=None):
        raise RuntimeError("CUDA error: out of memory")
    monkeypatch.setattr(torch.cuda, "mem_get_info", fails)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 0)
    assert L._free_bytes(dev) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert L._free_bytes(torch.device("cpu")) is None


# ----------------------------------------------------------------------------- backends.select

def test_auto_picks_triton_for_cuda_tensors_only(monkeypatch):
    """select's CUDA branch: 'auto' takes the triton backend for CUDA tensors where Triton
    imports and CUDA is there, and the torch backend otherwise (and always on the CPU)."""
    pytest.importorskip("triton", minversion="3.6")   # backends.triton.MIN_TRITON
    monkeypatch.setattr(backends, "_triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.select("cuda", "auto").name == "triton"
    assert backends.select("cpu", "auto").name == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.select("cuda", "auto").name == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_triton_importable", lambda: False)
    assert backends.select("cuda", "auto").name == "torch"


# ----------------------------------------------------------------------------- out-of-range targets

@pytest.fixture(params=["torch", "triton"])
def unchecked(request, monkeypatch):
    """A backend, with the bounds check skipped as on CUDA (it would sync with the host)."""
    if request.param == "triton":
        tb = pytest.importorskip("crossent.backends.triton")
        ok, why = tb.TritonBackend().available(torch.device("cpu"))   # these are CPU tensors
        if not ok:
            pytest.skip(why)
    monkeypatch.setenv("CROSSENT_BACKEND", request.param)
    monkeypatch.setattr(_validate, "check_target_bounds", lambda *a: None)
    return request.param


def _bad_and_safe(device, C=11, shape=(6,)):
    """(targets, out-of-range mask, targets with a real class where they were out of range):
    C, -3 and C + 29 out of range, -100 ignored."""
    t = torch.tensor([0, C, -3, -100, 5, C + 29]).reshape(shape)
    bad = (t != -100) & ((t < 0) | (t >= C))
    return t.to(device), bad.to(device), torch.where(bad, 1, t).to(device)


def _check_rows(ours, theirs, bad, what):
    """NaN where the target was out of range, torch's values elsewhere (other rows' NaNs
    must not leak into them)."""
    assert ours[bad].isnan().all(), (what, ours)
    torch.testing.assert_close(ours[~bad], theirs[~bad], rtol=1e-4, atol=1e-5, msg=what)


# The checks below take the device: tests/gpu/test_gpu_paths.py runs them on CUDA tensors,
# where the bounds check is skipped for real.

def check_cross_entropy_out_of_range(device, kind):
    """cross_entropy and nll_loss: out-of-range class targets reach the kernels, which give
    NaN rows (loss and gradient) and read no memory out of bounds; other rows are torch's."""
    g = torch.Generator().manual_seed(0)
    C = 50000 if kind == "2d-wide" else 11
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    if kind == "kdim-weight":
        x0, (t, bad, safe), kw = torch.randn(2, C, 3, generator=g), _bad_and_safe(device, C, (2, 3)), {}
    else:
        x0, (t, bad, safe), kw = torch.randn(6, C, generator=g), _bad_and_safe(device, C), dict(label_smoothing=0.1)
    x0 = x0.to(device)
    x, xt = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ours = crossent.cross_entropy(x, t, w, reduction="none", **kw)
    theirs = F.cross_entropy(xt, safe, w, reduction="none", **kw)
    _check_rows(ours, theirs, bad, "loss")
    ours.sum().backward()
    theirs.sum().backward()
    gx, gt = x.grad.movedim(1, -1), xt.grad.movedim(1, -1)   # class dim last: rows of the target's shape
    assert gx[bad].isnan().all()
    torch.testing.assert_close(gx[~bad], gt[~bad], rtol=1e-4, atol=1e-5)
    lp = torch.log_softmax(x0, 1)
    _check_rows(crossent.nll_loss(lp, t, w, reduction="none"), F.nll_loss(lp, safe, w, reduction="none"), bad,
                "nll_loss")
    assert crossent.cross_entropy(x0, t, w).isnan() and crossent.nll_loss(lp, t, w).isnan()


def check_linear_cross_entropy_out_of_range(device, variant):
    """linear_cross_entropy: NaN loss and input-gradient rows where the target is out of range."""
    g = torch.Generator().manual_seed(1)
    h0, W0 = torch.randn(6, 8, generator=g).to(device), torch.randn(11, 8, generator=g).to(device)
    t, bad, safe = _bad_and_safe(device)
    h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    if variant == "with_stats":
        ours = crossent.linear_cross_entropy_with_stats(h, W, t, reduction="none").loss
    else:
        opts = crossent.LinearCrossEntropyOptions(allow_inplace=variant == "allow_inplace")
        ours = crossent.linear_cross_entropy(h, W, t, reduction="none", options=opts)
    ht = h0.clone().requires_grad_()
    theirs = F.cross_entropy(ht @ W0.T, safe, reduction="none")
    _check_rows(ours, theirs, bad, "loss")
    ours.sum().backward()
    theirs.sum().backward()
    assert h.grad[bad].isnan().all()
    torch.testing.assert_close(h.grad[~bad], ht.grad[~bad], rtol=1e-4, atol=1e-5)


def check_log_probs_out_of_range(device):
    """log_probs and linear_log_probs: NaN at out-of-range targets, 0 at the ignored
    position, the eager formula's values at the others."""
    g = torch.Generator().manual_seed(2)
    h, W = torch.randn(6, 8, generator=g).to(device), torch.randn(11, 8, generator=g).to(device)
    t, bad, safe = _bad_and_safe(device)
    keep = t != -100
    z = h @ W.T
    ls = torch.log_softmax(z, -1)
    want = torch.where(keep, ls.gather(1, safe.clamp_min(0)[:, None])[:, 0], 0.0)
    ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
    for name, out in (("log_probs", crossent.log_probs(z, t, entropy=True)),
                      ("linear_log_probs", crossent.linear_log_probs(h, W, t, entropy=True))):
        _check_rows(out.log_probs, want, bad, name)
        _check_rows(out.entropy, ent, bad, name + " entropy")


@pytest.mark.parametrize("kind", ["2d-weight-smoothing", "2d-wide", "kdim-weight"])
def test_cross_entropy_and_nll_loss_out_of_range(unchecked, kind):
    check_cross_entropy_out_of_range("cpu", kind)


@pytest.mark.parametrize("variant", ["default", "allow_inplace", "with_stats"])
def test_linear_cross_entropy_out_of_range(unchecked, variant):
    """CUDA keeps every token's row (no host sync to find the ignored ones); on the CPU
    ignored rows are dropped, except with allow_inplace or with_stats: those run CUDA's way."""
    check_linear_cross_entropy_out_of_range("cpu", variant)


def test_log_probs_out_of_range(unchecked):
    check_log_probs_out_of_range("cpu")


# ----------------------------------------------------------------------------- log-probs entropy

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_without_the_host_recheck_is_the_same(monkeypatch, dtype):
    """_logprobs_ops.stats off the CPU (and compiled) clamps every block's log-probabilities
    at _FLOOR up front instead of re-checking for NaN on the host: the same values, bit for
    bit (exp underflows to 0 below the floor either way), -inf logits included."""
    z = torch.randn(5, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    z[1, ::3] = -math.inf
    z[2, 7] = -3000.0            # finite, far below the floor
    z[3] = -math.inf
    z[3, 4] = 2.0                # one live class
    z = z.to(dtype)
    ys = torch.tensor([0, 1, 7, 4, 299])
    host = _logprobs_ops.stats(z.clone(), ys, True)
    monkeypatch.setattr(_logprobs_ops, "_compiling", lambda: True)   # host = False, as on CUDA
    dev = _logprobs_ops.stats(z.clone(), ys, True)
    assert torch.isfinite(host[1]).all(), host[1]
    for a, b in zip(host, dev):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
