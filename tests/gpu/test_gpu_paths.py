"""crossent's CUDA-only branches on a real GPU, where the CPU cannot reach them
(tests/test_cuda_paths.py reaches the rest on the CPU):

* a cooperative launch that fails (MPS, some MIG setups: simulated by refusing it)
  warns once and takes the two-pass kernels (ce's split path, the mean's cooperative
  launch, softmax's split path), and raises instead while a CUDA graph is captured;
* linear._free_bytes reads the device and the caching allocator;
* 'auto' picks the triton backend for CUDA tensors, and with it (and the torch backend)
  out-of-range class targets give NaN rows, never a device-side assert (the bounds
  check is skipped on CUDA: it would sync with the host).

tests/conftest.py sets CROSSENT_BACKEND=torch for the whole suite, so GPU tests reach
the triton backend only where they set it themselves: test_gpu_linear.py and
test_gpu_logprobs.py run the torch backend's CE and log-prob kernels on CUDA, and their
checks are run here once more under 'auto' (what users get: triton).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import crossent  # noqa: E402
import test_gpu_linear as GL  # noqa: E402
import test_gpu_logprobs as GLP  # noqa: E402
from crossent import backends  # noqa: E402
from test_cuda_paths import (check_cross_entropy_out_of_range, check_linear_cross_entropy_out_of_range,  # noqa: E402
                             check_log_probs_out_of_range)

DEV = "cuda"


def _refuse(*args, **kwargs):
    raise RuntimeError("simulated: cooperative launch refused")


@pytest.fixture
def coop():
    """The current CUDA device, with fresh launch plans; afterwards cooperative again
    and the launch knobs as they were."""
    from crossent.backends.triton import _device, ce
    dev = torch.device(DEV, torch.cuda.current_device())
    saved = dict(_ROW_PATH=ce._ROW_PATH)
    _device._NO_COOPERATIVE.discard(dev)   # (a test before may have failed)
    ce.configure()
    yield dev
    _device._NO_COOPERATIVE.discard(dev)
    ce.configure(**saved)   # also forgets the plans made without cooperative launches


def _bf16_rows(R, C, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(R, C, device=DEV, generator=g) * 3).to(torch.bfloat16)
    y = torch.randint(0, C, (R,), device=DEV, generator=g)
    y[3] = -100
    return x, y


def _close_bf16(ours, want, what):
    """bf16 results against fp32 torch on the same inputs: within bf16's rounding of the
    largest value (the gradients of a mean are small everywhere)."""
    torch.testing.assert_close(ours.float(), want, rtol=2 ** -7, atol=2 ** -8 * float(want.abs().max()), msg=what)


def test_split_ce_falls_back_when_the_cooperative_launch_fails(coop, monkeypatch):
    from crossent.backends.triton import TritonBackend, _device, ce, split
    ce.configure(_ROW_PATH="split")
    x, y = _bf16_rows(64, 32000, 0)
    monkeypatch.setattr(split, "ce", _refuse)
    with pytest.warns(RuntimeWarning, match="cooperative launch failed"):
        loss, _, g = TritonBackend().ce_forward(x, y, None, -100, 0.0, 0.0, 0.0, torch.ones((), device=DEV), True)
    assert not _device.cooperative(coop)
    xt = x.float().requires_grad_()
    want = F.cross_entropy(xt, y, reduction="none")
    want.sum().backward()
    torch.testing.assert_close(loss.float(), want.detach(), rtol=1e-5, atol=1e-5)
    _close_bf16(g, xt.grad, "gradient")


def test_mean_falls_back_when_the_cooperative_launch_fails(coop, monkeypatch):
    """crossent.cross_entropy's mean over class targets forms its denominator in one
    cooperative launch; sizing its grid fails here (as the launch itself may)."""
    from crossent.backends.triton import _device, _grid
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    monkeypatch.setattr(_grid, "resident", _refuse)
    x0, y = _bf16_rows(300, 1000, 1)
    x = x0.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="cooperative launch failed"):
        loss = crossent.cross_entropy(x, y)
    loss.backward()
    assert not _device.cooperative(coop)
    xt = x0.float().requires_grad_()
    want = F.cross_entropy(xt, y)
    want.backward()
    _close_bf16(loss, want.detach(), "loss")
    _close_bf16(x.grad, xt.grad, "gradient")


@pytest.mark.parametrize("log", [False, True])
def test_split_softmax_falls_back_when_the_cooperative_launch_fails(coop, monkeypatch, log):
    from crossent.backends.triton import TritonBackend, _device, ce, split
    ce.configure(_ROW_PATH="split")
    x, _ = _bf16_rows(16, 32000, 2)
    monkeypatch.setattr(split, "softmax", _refuse)
    with pytest.warns(RuntimeWarning, match="cooperative launch failed"):
        y = TritonBackend().softmax_forward(x, -1, log)
    assert not _device.cooperative(coop)
    fn = torch.log_softmax if log else torch.softmax
    torch.testing.assert_close(y.float(), fn(x.float(), -1), rtol=2e-2, atol=4e-3)


def test_failed_cooperative_launch_raises_while_capturing(coop, monkeypatch):
    """In a CUDA graph capture no fallback is taken (the error surfaces, the device keeps
    its cooperative launches)."""
    from crossent.backends.triton import TritonBackend, _device, ce, split
    ce.configure(_ROW_PATH="split")
    x, y = _bf16_rows(64, 32000, 3)
    s1 = torch.ones((), device=DEV)   # made outside: no host-to-device copy during capture
    monkeypatch.setattr(split, "ce", _refuse)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="simulated: cooperative launch refused"):
        with torch.cuda.graph(graph):
            TritonBackend().ce_forward(x, y, None, -100, 0.0, 0.0, 0.0, s1, True)
    torch.cuda.synchronize()
    assert _device.cooperative(coop)


def test_free_bytes_reads_the_device_and_the_allocator():
    from crossent import linear as L
    dev = torch.device(DEV, torch.cuda.current_device())
    x = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    del x   # now held unused by the caching allocator: counted as free
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    free = L._free_bytes(dev)
    assert isinstance(free, int) and cached >= 64 << 20
    assert cached <= free <= torch.cuda.get_device_properties(dev).total_memory


def _use(backend: str, monkeypatch) -> str:
    monkeypatch.setenv("CROSSENT_BACKEND", backend)
    if backend == "auto":   # what users get on CUDA
        assert backends.name_for(DEV) == "triton"
    return backend


@pytest.fixture
def auto(monkeypatch):
    return _use("auto", monkeypatch)


@pytest.fixture(params=["auto", "torch"])
def backend(request, monkeypatch):
    return _use(request.param, monkeypatch)


@pytest.mark.parametrize("policy", ["accurate", "compact"])
def test_linear_cross_entropy_under_auto(auto, policy):
    """test_gpu_linear.py's parity check with the triton kernels for the CE part, bf16: several
    chunks (the fp32 weight-gradient accumulator), bias, class weight, smoothing, ignored tokens."""
    dtype = torch.bfloat16
    h, W, b, w, t = GL._data(*GL.SHAPE, dtype, bias=True, weight=True, ignore=True)
    opts = crossent.LinearCrossEntropyOptions(acc_policy=policy, chunk_size=256, chunk_bytes=4 << 20)
    for red in ("mean", "none"):
        GL._check(GL._ours(t, w, red, 0.05, opts=opts), GL._eager(t, w, red, 0.05), h, W, b, red,
                  f"auto {dtype} {policy} {red}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_under_auto(auto, dtype):
    """test_gpu_logprobs.py's checks (Llama-3's vocabulary) with the triton kernels."""
    GLP.test_log_probs_gpu(dtype)
    GLP.test_linear_log_probs_gpu(dtype)


@pytest.mark.parametrize("kind", ["2d-weight-smoothing", "2d-wide", "kdim-weight"])
def test_cross_entropy_out_of_range(backend, kind):
    check_cross_entropy_out_of_range(DEV, kind)
    torch.cuda.synchronize()   # a device-side assert would surface here


@pytest.mark.parametrize("variant", ["default", "with_stats"])
def test_linear_cross_entropy_out_of_range(backend, variant):
    check_linear_cross_entropy_out_of_range(DEV, variant)
    torch.cuda.synchronize()


def test_log_probs_out_of_range(backend):
    check_log_probs_out_of_range(DEV)
    torch.cuda.synchronize()
