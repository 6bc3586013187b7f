"""Launches per cross-entropy forward+backward through the triton backend under torch.compile
(issue 10, item 2: at most 2; tests/test_triton_launches.py counts eager mode).  Compiled, the
backward reruns the kernel (_autograd.ce._reruns_kernel), after one O(N) kernel for 'mean'.

Inductor compiles the graphs here for the CPU (C++ kernels), the Triton kernels run under the
interpreter, so what would launch on CUDA is counted from two sources:
  * the generated wrapper code of the forward and backward graphs: every call in it of one of
    inductor's own kernels, an extern kernel or an aten fallback is one launch (inductor's
    fusion decides how many of them there are);
  * crossent's custom ops in those graphs: their Triton launches, recorded at runtime as in
    test_triton_launches.py (an interpreter STAGE 1 + STAGE 2 pair is one cooperative launch).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", minversion="3.6")  # backends.triton.MIN_TRITON
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts launches under the Triton interpreter (CPU tensors)", allow_module_level=True)

import crossent  # noqa: E402
from test_compile_backward import CALL, graphs  # noqa: E402
from test_triton_launches import VARIANTS, _inputs, launches, path  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter


def _count(fn, x, y, log):
    """(launches of one compiled forward+backward, calls in the generated code, loss,
    the code of the graphs it compiled)."""
    seed = torch.ones_like(fn(x, y))
    codes = graphs(lambda: fn(x, y).backward(seed))   # compiles the forward and backward
    calls = [c for code in codes for c in CALL.findall(code)]
    ours = [c for c in calls if c.startswith("torch.ops.crossent.")]
    x.grad = None
    log.triton.clear()
    loss = fn(x, y)
    loss.backward(seed)
    return log.production() + len(calls) - len(ours), calls, loss, codes


def _reference(x, y, kw, reduction):
    xr = x.detach().float().requires_grad_()
    kr = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items() if k != "z_loss"}
    ref = F.cross_entropy(xr, y.float() if y.is_floating_point() else y, reduction=reduction, **kr)
    ref.backward(torch.ones_like(ref))
    return ref, xr.grad


def _check(loss, x, ref, ref_grad):
    tol = dict(rtol=2e-2, atol=2e-2) if x.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    assert loss.dtype == x.dtype
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), ref_grad, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["plain", "ignore", "weight", "smooth", "probs"])
def test_compiled_launches(launches, reduction, variant):
    """One launch forms the forward (loss, reduction) and writes no gradient; the backward
    reruns the kernel with the upstream gradient (_autograd.ce._reruns_kernel: three
    passes over the logits' size, not four), after one O(N) kernel forming g / W for
    'mean': no other denominator, reduction or cast kernels around them."""
    torch._dynamo.reset()
    x, y, kw = _inputs(VARIANTS[variant], 6, 13, torch.bfloat16)
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, reduction=reduction, **kw), fullgraph=True)
    n, calls, loss, codes = _count(fn, x, y, launches)
    scale = ["cpp_fused_"] if reduction == "mean" else []
    assert n <= 2 + len(scale), (calls, launches.triton)
    assert [c if c.startswith("torch.ops") else "cpp_fused_" for c in calls] == [
        "torch.ops.crossent.ce_forward_fused", *scale, "torch.ops.crossent.ce_backward"], calls
    assert "False, 'triton')" in codes[0], codes[0]  # need_grad=False: the forward writes no gradient
    _check(loss, x, *_reference(x, y, kw, reduction))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_launches_paths(launches, path, reduction):
    """Both kernel paths (single tile, split row), fp32, every option at once."""
    torch._dynamo.reset()
    x, y, kw = _inputs(VARIANTS["all"], 6, 40, torch.float32)
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, reduction=reduction, **kw), fullgraph=True)
    n, calls, loss, codes = _count(fn, x, y, launches)
    assert n <= (3 if reduction == "mean" else 2), (calls, launches.triton)
    xr = x.detach().requires_grad_()
    ref = crossent.reference.cross_entropy(xr, y, kw["weight"], kw["ignore_index"], reduction,
                                           kw["label_smoothing"], z_loss=kw["z_loss"])
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_upstream_gradient(launches, reduction):
    """The rerun takes the upstream gradient: a linear head whose loss is scaled by 3 and
    joined by another term (g = 3 per element, folded in by inductor), then a second
    backward through the same graphs with g = -0.5; torch's gradients (fp64 reference)."""
    torch._dynamo.reset()
    x, y, kw = _inputs(VARIANTS["all"], 6, 40, torch.float32)
    h = x.detach()[:, :8].clone().requires_grad_()
    w = torch.randn(40, 8)

    def model(ce, h, w):
        loss = ce(h @ w.T) * 3
        return (loss if reduction != "none" else loss.sum()) + h.square().mean()
    fn = torch.compile(lambda h: model(lambda z: crossent.cross_entropy(z, y, reduction=reduction, **kw), h, w),
                       fullgraph=True)
    ref_weight = kw["weight"].double()

    def ref_ce(z):
        return crossent.reference.cross_entropy(z, y, ref_weight, kw["ignore_index"], reduction,
                                                kw["label_smoothing"], z_loss=kw["z_loss"])
    for g in (1.0, -0.5):
        (ours,) = torch.autograd.grad(fn(h), h, torch.tensor(g))
        hr = h.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(model(ref_ce, hr, w.double()), hr, torch.tensor(g, dtype=torch.float64))
        torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-5)


def test_compiled_kdim_dynamic_shapes(launches):
    """(B, C, S) logits, dynamic shapes: one graph for several sizes, 3 launches, torch's values."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, label_smoothing=0.1), fullgraph=True,
                       dynamic=True)
    for B, C, S in ((3, 11, 5), (2, 9, 7)):
        torch.manual_seed(B)
        x = torch.randn(B, C, S, requires_grad=True)
        y = torch.randint(0, C, (B, S))
        y[0, 0] = -100
        n, calls, loss, codes = _count(fn, x, y, launches)
        assert n <= 3, (calls, launches.triton)
        _check(loss, x, *_reference(x, y, dict(label_smoothing=0.1), "mean"))


def test_compiled_stats_and_second_backward(launches):
    """What the one-launch forward does not return is still right under compile: the z-loss
    term's mean over W (torch ops form W when it is read), and a second backward
    (retain_graph) scales the forward's gradient again, not an already scaled one."""
    torch._dynamo.reset()
    x, y, kw = _inputs(VARIANTS["ignore"], 6, 13, torch.float32)
    fn = torch.compile(lambda x, y: crossent.cross_entropy_with_stats(x, y, z_loss=1e-2, **kw), fullgraph=True)
    out = fn(x, y)
    eager = crossent.cross_entropy_with_stats(x, y, z_loss=1e-2, **kw)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)
    out.loss.backward(torch.tensor(2.0), retain_graph=True)
    first = x.grad
    x.grad = None
    out.loss.backward(torch.tensor(3.0))
    torch.testing.assert_close(x.grad, first * 1.5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiled_inplace_backward(launches, reduction):
    """inplace_backward on the logits of a linear head: the forward writes the gradient into
    them (crossent::ce_forward_fused_inplace), the backward's multiply reuses that buffer;
    2 launches besides the head's two matmuls."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    h, w = torch.randn(6, 5, requires_grad=True), torch.randn(13, 5)
    y = torch.randint(0, 13, (6,))
    fn = torch.compile(lambda h, y: crossent.cross_entropy(h @ w.T, y, reduction=reduction, inplace_backward=True),
                       fullgraph=True)
    n, calls, loss, codes = _count(fn, h, y, launches)
    assert "torch.ops.crossent.ce_forward_fused_inplace" in calls
    assert n - calls.count("extern_kernels.mm") <= 2, (calls, launches.triton)
    hr = h.detach().requires_grad_()
    ref = F.cross_entropy(hr @ w.T, y, reduction=reduction)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, hr.grad)


def test_compiled_under_autocast(launches):
    """autocast around the compiled call: eager's values and gradient (cross_entropy runs in
    fp32 under CPU autocast, as torch's; the cast is autocast's, outside the count)."""
    torch._dynamo.reset()
    x, y, kw = _inputs(VARIANTS["smooth"], 6, 13, torch.bfloat16)
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, **kw), fullgraph=True)
    out = []
    for f in (fn, lambda x, y: crossent.cross_entropy(x, y, **kw)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = f(x, y)
        loss.backward()
        out.append((loss, x.grad))
        x.grad = None
    torch.testing.assert_close(out[0], out[1])
