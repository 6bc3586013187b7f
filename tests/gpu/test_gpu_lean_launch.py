"""The lean launch path (backends/triton/_launch.py) on a real GPU: from the second call of a
key on, crossent's launches skip Triton's JIT dispatch and give bitwise what the JIT path
gives, on the current stream and under CUDA graph capture.  The CPU twin, which checks the
launcher's arguments against JITFunction.run's, is tests/_launch_path.py --lean."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


class _JitCalls:
    """Launches of crossent's cross-entropy kernels that go through JITFunction.run."""

    def __init__(self, monkeypatch):
        from crossent.backends.triton import ce, split
        self.n = 0
        for fn in (ce._ce_kernel, ce._rescale_kernel, split._ce_split_kernel):
            monkeypatch.setattr(fn, "run", self._wrap(fn.run))

    def _wrap(self, run):
        def spy(*args, **kwargs):
            self.n += not kwargs.get("warmup")
            return run(*args, **kwargs)
        return spy


@pytest.fixture
def lean(monkeypatch):
    """set(on): the lean path on or off, with fresh plans and launchers."""
    from crossent.backends.triton import _launch, ce

    def set_(on: bool):
        monkeypatch.setattr(_launch, "ENABLED", on)
        ce.configure()
    yield set_
    ce.configure()


def _forward(x, y, reduction):
    from crossent.backends.triton import ce
    denom = torch.zeros((), device=DEV)
    loss, lse, grad = ce.ce_forward_fused(x, y, None, denom, -100, 0.1, 0.0, 0.0, reduction, x.dtype, True, False)
    return loss, lse, grad


@pytest.mark.parametrize("C", [32000, 128256])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_launches_equal_the_jit(C, reduction, lean, monkeypatch):
    torch.manual_seed(C)
    x = (torch.randn(256, C, device=DEV) * 3).to(torch.bfloat16)
    y = torch.randint(0, C, (256,), device=DEV)
    lean(False)
    ref = _forward(x, y, reduction)
    lean(True)
    _forward(x, y, reduction)                 # the first call of the key: through the JIT
    calls = _JitCalls(monkeypatch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):             # the launch goes to the current stream
        out = _forward(x, y, reduction)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert calls.n == 0
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_lean_launch_in_a_cuda_graph(lean, monkeypatch):
    torch.manual_seed(0)
    x = (torch.randn(256, 32000, device=DEV) * 3).to(torch.bfloat16)
    y = torch.randint(0, 32000, (256,), device=DEV)
    lean(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):             # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            ref = _forward(x, y, "none")
    torch.cuda.current_stream().wait_stream(side)
    calls = _JitCalls(monkeypatch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _forward(x, y, "none")
    graph.replay()
    torch.cuda.synchronize()
    assert calls.n == 0                       # the captured launch is the lean one
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
