"""The backend registry and the portable chunked backend's own promises:
chunk boundaries, no mutation of user tensors, buffer hand-over, retain_graph,
non-unit upstream gradients, and the opt-in in-place gradient."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import backends
from crossent.backends import torch_chunked


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    assert backends.select("cpu").name == "torch"


def test_override_unknown_backend_fails_loudly(monkeypatch):
    monkeypatch.setenv("CROSSENT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown crossent backend 'bogus'"):
        backends.select("cpu")


def test_override_triton_on_cpu_without_interpreter_fails_loudly():
    code = ("import os, torch; os.environ.pop('TRITON_INTERPRET', None);"
            "os.environ['CROSSENT_BACKEND']='triton'; import crossent\n"
            "try:\n crossent.cross_entropy(torch.randn(2,3), torch.tensor([0,1]))\n"
            "except RuntimeError as e: print('RAISED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RAISED CROSSENT_BACKEND=triton was requested" in out.stdout, out.stdout + out.stderr


def test_triton_older_than_tested_is_refused(monkeypatch):
    """A Triton older than crossent's kernels are tested with: 'auto' takes the torch backend,
    an explicit request says why (CUDA is faked: the check comes first)."""
    triton = pytest.importorskip("triton")
    from crossent.backends import triton as tb
    assert tb._version("3.6.0+git9f2c") == (3, 6) and tb._version("3.10.1") == (3, 10)
    if os.environ.get("CROSSENT_EXPECT_TRITON"):   # .ci/run's main tier installs a Triton the kernels run on
        assert tb._version(triton.__version__) >= tb.MIN_TRITON
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_triton_importable", lambda: True)
    assert backends.select("cuda", "auto").name == "torch"
    with pytest.raises(RuntimeError, match=r"CROSSENT_BACKEND=triton was requested but cannot run on cuda: "
                                           r"crossent's Triton kernels need Triton >= 3\.6 \(this is 3\.4\.0\)"):
        backends.select("cuda", "triton")

@pytest.mark.parametrize("shape", [(17, 11), (5, 11, 13), (3, 4099)])
@pytest.mark.parametrize("chunk_bytes", [44, 4 * 11 * 3, 4 * 4099 + 4, 1 << 20])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_boundaries(monkeypatch, shape, chunk_bytes, reduction):
    """Rows per chunk of 1, a few, a remainder, and one chunk for all."""
    monkeypatch.setattr(torch_chunked, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    C = shape[1]
    t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
    w = torch.rand(C, generator=g, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = crossent.cross_entropy(xa, t, w, reduction=reduction, label_smoothing=0.1)
    b = F.cross_entropy(xb, t, w, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_user_tensors_not_mutated():
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    w = torch.rand(10)
    snap = (x.detach().clone(), t.clone(), w.clone())
    crossent.cross_entropy(x, t, w, label_smoothing=0.2, z_loss=1e-2, softcap=3.0).backward()
    assert torch.equal(x.detach(), snap[0]) and torch.equal(t, snap[1]) and torch.equal(w, snap[2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradient_not_one(reduction):
    x = torch.randn(6, 9, dtype=torch.float64)
    t = torch.randint(0, 9, (6,))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = crossent.cross_entropy(xa, t, reduction=reduction), F.cross_entropy(xb, t, reduction=reduction)
    g = torch.linspace(-2, 3, a.numel(), dtype=torch.float64).reshape(a.shape)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_retain_graph_backward_twice():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    loss = crossent.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    (loss * 3).backward()
    ref = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    torch.testing.assert_close(x.grad, 4 * ref)


def test_gradient_buffer_is_adopted_without_copy(monkeypatch):
    """The forward's gradient buffer becomes x.grad as it is (no extra N x C copy)."""
    seen = []
    real = torch_chunked.empty_like_fast

    def spy(x):
        out = real(x)
        seen.append(out.data_ptr())
        return out

    monkeypatch.setattr(torch_chunked, "empty_like_fast", spy)
    x = torch.randn(64, 100, requires_grad=True)
    crossent.cross_entropy(x, torch.randint(0, 100, (64,))).backward()
    assert seen == [x.grad.data_ptr()]


def test_inplace_backward_is_opt_in_and_correct():
    x = torch.randn(6, 9, dtype=torch.float64)
    t = torch.randint(0, 9, (6,))
    xr = x.clone().requires_grad_()
    F.cross_entropy(xr, t).backward()
    xi = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xi, t, inplace_backward=True)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    loss.backward()
    torch.testing.assert_close(xi.grad, xr.grad)
    assert xi.grad.data_ptr() == xi.data_ptr()  # the logits' storage holds the gradient
    with pytest.raises(ValueError, match="inplace_backward"):
        crossent.cross_entropy(x.clone().requires_grad_(), t, reduction="none", inplace_backward=True)


def test_half_precision_true_class_term():
    """p - 1 is formed in fp32 before rounding: a confident bf16 row keeps its tiny gradient."""
    x = torch.tensor([[12.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    t = torch.tensor([0])
    crossent.cross_entropy(x, t).backward()
    xd = x.detach().double().requires_grad_()
    F.cross_entropy(xd, t).backward()
    assert x.grad[0, 0] != 0
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-2, atol=0)
