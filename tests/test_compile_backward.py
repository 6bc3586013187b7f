"""What the compiled backward does when the forward formed the gradient (issue 10, item 2).

With reduction 'mean' / 'sum' the forward writes the gradient of loss * 1 into a buffer of
its own (cross_entropy on the torch backend: N x C; linear_cross_entropy: dx and dw), and
the backward only scales it by the upstream gradient g.  Eager mode does that in place and
skips the pass on the device when g == 1.  A compiled backward cannot skip it
(_autograd.ce._rescaled says why); it must do the least a functional backward can: one
kernel that reads the saved buffer once and writes the result into that same buffer.
(Compiled, the triton backend forms no gradient in the forward and reruns its kernel in the
backward instead: tests/test_compile_launches.py.)  These tests read the code inductor
generates (C++ kernels here; the wrapper is the same on CUDA) and count, in the backward
graph, the calls that launch work and the buffers of the gradient's size, then compare the
gradients with torch's for g == 1, g != 1 and a loss inside a larger graph.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import crossent
from _tol import assert_close_to_ref

# Writing the backward's result into a saved tensor's buffer needs AOT autograd's donated
# buffers (torch 2.4 has none: its backward allocates a new gradient, as torch's own does there).
pytestmark = pytest.mark.skipif(not getattr(torch._functorch.config, "donated_buffer", False),
                                reason="this torch's AOT autograd donates no saved buffers to the backward")

# A call in inductor's wrapper code that launches work: its kernels (cpp_fused_* on CPU,
# triton_* on CUDA), extern kernels, aten fallbacks, and custom ops (crossent's own).
CALL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|"
                  r"(?:torch\.ops\.)?aten\.\w+|torch\.ops\.\w+\.\w+)[.(]", re.M)
_ALLOC = re.compile(r"= empty_strided_\w+\(\(([\d, ]*)\)")
# `buf0 = getitem_2; del getitem_2  # reuse`: a kernel's output written into an input's buffer
_REUSE = re.compile(r"^\s+(\w+) = (?:reinterpret_tensor\()?(\w+)\b.*# reuse$", re.M)


def graphs(step) -> list[str]:
    """The wrapper code of the graphs that step() compiles, each cut to the body of its
    call(), forward graphs first (a backward graph's inputs are tangents)."""
    _, codes = run_and_get_code(step)
    bodies = []
    for code in codes:
        start = code.index("def call(")
        bodies.append(code[start:code.index("\n", code.index("        return (", start))])
    return sorted(bodies, key=lambda body: "tangents_" in body)


def allocations(code: str, numel: int) -> list[str]:
    """The buffers of `numel` elements that the code allocates."""
    return [s for s in _ALLOC.findall(code) if math.prod(int(d) for d in s.split(",") if d.strip()) == numel]


def assert_scaled_in_place(bw: str, saved: int, numels: tuple[int, ...]) -> None:
    """The backward is one inductor kernel, no crossent op and no copy, which writes
    each of the `saved` gradients into the saved tensor's own buffer; nothing of
    the gradients' sizes is allocated."""
    calls = CALL.findall(bw)
    assert len(calls) == 1 and calls[0].startswith(("cpp_fused_", "triton_")), bw
    assert "clone" not in calls[0] and "crossent" not in calls[0], bw
    reused = {out for out, _ in _REUSE.findall(bw)}
    returned = set(re.findall(r"\bbuf\d+\b", bw[bw.index("return ("):]))
    assert len(returned) == saved and returned <= reused, bw
    for n in numels:
        assert not allocations(bw, n), bw


def _ref_close(ours, x, y, kw, reduction, g):
    """ours against torch's gradient in x's dtype, both against fp64 (the project's rule)."""
    grads = []
    for dtype in (x.dtype, torch.float64):
        xr = x.detach().to(dtype).requires_grad_()
        w = kw.get("weight")
        kr = dict(kw, weight=None if w is None else w.to(dtype))
        loss = F.cross_entropy(xr, y, reduction=reduction, **kr)
        loss.backward(g.to(loss.dtype).expand_as(loss))
        grads.append(xr.grad)
    assert_close_to_ref(ours, *grads, what="dx")


CASES = {
    "plain": {},
    "weight_ignore_smooth": dict(weight=True, ignore_index=2, label_smoothing=0.1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_backward_one_pass_in_place(reduction, case):
    """cross_entropy, mean / sum: the backward reads and writes the saved gradient once,
    in place; torch's gradient at g = 1 and g = 3 (the same compiled graphs)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    N, C = 8, 1031
    x = (torch.randn(N, C) * 3).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, C, (N,))
    y[0] = 2
    kw = dict(CASES[case])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, dtype=torch.bfloat16) + 0.5
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, reduction=reduction, **kw), fullgraph=True)
    fw, bw = graphs(lambda: fn(x, y).backward())
    assert "crossent.ce_forward" in fw
    assert_scaled_in_place(bw, 1, (N * C,))
    for g in (1.0, 3.0):
        x.grad = None
        fn(x, y).backward(torch.tensor(g, dtype=x.dtype))
        _ref_close(x.grad, x, y, kw, reduction, torch.tensor(g))


def test_compiled_backward_none_reruns_kernel():
    """'none' keeps no gradient from the forward: the backward is the kernel rerun with
    the per-row upstream gradient, its output returned as it is (no pass over it)."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    N, C = 6, 1031
    x = torch.randn(N, C, requires_grad=True)
    y = torch.randint(0, C, (N,))
    fn = torch.compile(lambda x, y: crossent.cross_entropy(x, y, reduction="none", label_smoothing=0.1),
                       fullgraph=True)
    g = torch.randn(N)
    _, bw = graphs(lambda: fn(x, y).backward(g))
    assert [c for c in CALL.findall(bw) if not c.startswith("cpp_fused_")] == ["torch.ops.crossent.ce_backward"], bw
    assert not allocations(bw, N * C), bw
    _ref_close(x.grad, x, y, dict(label_smoothing=0.1), "none", g)


def _head(N: int, C: int, D: int = 16):
    """(hidden states (N, D), head weight (C, D), targets) for a fresh compile."""
    torch._dynamo.reset()
    torch.manual_seed(N + C)
    return torch.randn(N, D, requires_grad=True), torch.randn(C, D, requires_grad=True), torch.randint(0, C, (N,))


def test_compiled_backward_in_a_larger_graph():
    """A linear head, the loss times 3 plus another term: crossent's share of the
    backward is still one multiply into the saved gradient (the 3 folded into it),
    which the head's matmuls then read; torch's gradients."""
    N, C = 8, 1031
    h, w, y = _head(N, C)

    def model(ce):
        return lambda h, w, y: ce(h @ w.T, y, label_smoothing=0.1) * 3 + h.square().mean()
    fn = torch.compile(model(crossent.cross_entropy), fullgraph=True)
    _, bw = graphs(lambda: fn(h, w, y).backward())
    assert "crossent" not in bw and not allocations(bw, N * C), bw
    ours = torch.autograd.grad(fn(h, w, y), (h, w))
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.autograd.grad(model(F.cross_entropy)(hr, wr, y), (hr, wr))
    theirs = torch.autograd.grad(model(F.cross_entropy)(h, w, y), (h, w))
    for o, t, r in zip(ours, theirs, ref):
        assert_close_to_ref(o, t, r)


def test_compiled_linear_backward_one_pass_in_place():
    """linear_cross_entropy: dx and dw, formed in the forward, are scaled in one kernel
    that writes each into its saved buffer (before: a copy of each, then the op)."""
    N, V = 8, 1031
    h, w, y = _head(N, V)
    fn = torch.compile(lambda h, w, y: crossent.linear_cross_entropy(h, w, y), fullgraph=True)
    _, bw = graphs(lambda: fn(h, w, y).backward())
    assert_scaled_in_place(bw, 2, (h.numel(), w.numel()))
    for g in (1.0, 3.0):
        ours = torch.autograd.grad(fn(h, w, y), (h, w), torch.tensor(g))
        hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = torch.autograd.grad(F.cross_entropy(hr @ wr.T, y), (hr, wr), torch.tensor(g, dtype=torch.float64))
        theirs = torch.autograd.grad(F.cross_entropy(h @ w.T, y), (h, w), torch.tensor(g))
        for o, t, r in zip(ours, theirs, ref):
            assert_close_to_ref(o, t, r)
