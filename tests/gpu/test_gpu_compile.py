"""The triton backend's cross-entropy under torch.compile on a real GPU (issue 10, item 2):
at most 2 kernels per forward+backward, 3 for 'mean' (torch.profiler's device events; the
compiled backward reruns the kernel, see _autograd.ce._reruns_kernel), no host sync,
torch's values, and CUDA graphs (mode="reduce-overhead").  The CPU twin, which counts the
same launches from inductor's generated code, is tests/test_compile_launches.py."""
import pytest
import torch
import torch.nn.functional as F

from _kernels import device_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def _inputs(R, C, probs=False):
    torch.manual_seed(R + C)
    x = (torch.randn(R, C, device=DEV) * 3).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, C, (R,), device=DEV)
    y[1] = -100
    if probs:
        y = torch.softmax(torch.randn(R, C, device=DEV), 1).to(torch.bfloat16)
    return x, y


def _reference(x, y, reduction, kw):
    xr = x.detach().float().requires_grad_()
    ref = F.cross_entropy(xr, y.float() if y.is_floating_point() else y, reduction=reduction, **kw)
    ref.backward(torch.ones_like(ref))
    return ref, xr.grad


@pytest.mark.parametrize("reduction,probs", [("mean", False), ("sum", True), ("none", False)])
def test_compiled_launches_and_values(reduction, probs, monkeypatch):
    import crossent
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    torch._dynamo.reset()
    kw = dict(label_smoothing=0.1)
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, reduction=reduction, **kw), fullgraph=True)
    x, y = _inputs(300, 32000, probs)
    seed = torch.ones(300 if reduction == "none" else (), device=DEV, dtype=torch.bfloat16)
    fn(x, y).backward(seed)   # compile and warm
    x.grad = None

    def step():
        loss = fn(x, y)
        loss.backward(seed)
        return loss
    loss, device_events = device_kernels(step)
    assert len(device_events) <= (3 if reduction == "mean" else 2), device_events
    ref, ref_grad = _reference(x, y, reduction, kw)
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), ref_grad, rtol=2e-2, atol=2e-3)


def test_compiled_cuda_graphs(monkeypatch):
    """mode="reduce-overhead": inductor warms the step up in its graph pool, records it in a
    CUDA graph and replays it; the kernels' workspace is first made there (no cached one)."""
    import crossent
    from crossent.backends.triton import _grid
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    monkeypatch.setattr(_grid, "_WORKSPACES", {})
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y), fullgraph=True, mode="reduce-overhead")
    x, y = _inputs(512, 128256)
    runs = []
    for _ in range(4):   # warm-up, recording, replays
        loss = fn(x, y)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
        x.grad = None
    eager = crossent.cross_entropy(x, y)
    eager.backward()
    for loss, grad in runs:
        torch.testing.assert_close(loss, eager.detach(), rtol=0, atol=0)
        torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)
