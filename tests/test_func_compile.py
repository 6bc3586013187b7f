"""torch.func transforms inside torch.compile, and double backward through a compiled call.

Dynamo inlines grad / vjp / jacrev / vmap / jvp, so a compiled transform hands crossent
GradTrackingTensor / BatchedTensor inputs; crossent's custom ops have no functorch rules,
so there it computes with torch's batchable ops (_validate.func_transforms).  torch's own
functions under the same compiled transform are the oracle.  Compiling is slow on a small
CI machine, so the matrix runs on aot_eager (AOT autograd's tracing, as inductor, without
codegen) and one case on inductor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vjp, vmap

import crossent

G = torch.Generator().manual_seed(0)
X = torch.randn(4, 5, generator=G, dtype=torch.float64)
XB = torch.randn(3, 4, 5, generator=G, dtype=torch.float64)
T = torch.tensor([0, 4, -100, 2])
P = torch.softmax(torch.randn(4, 5, generator=G, dtype=torch.float64), 1)
LIN = torch.randn(6, 5, generator=G, dtype=torch.float64)   # linear_cross_entropy's (V, D) weight

CASES = {
    "ce mean": (lambda z: crossent.cross_entropy(z, T), lambda z: F.cross_entropy(z, T)),
    "ce prob none": (lambda z: crossent.cross_entropy(z, P, reduction="none"),
                     lambda z: F.cross_entropy(z, P, reduction="none")),
    "log_softmax": (lambda z: crossent.log_softmax(z, 1), lambda z: F.log_softmax(z, 1)),
    "nll": (lambda z: crossent.nll_loss(z, T, reduction="none"), lambda z: F.nll_loss(z, T, reduction="none")),
    "linear_ce": (lambda z: crossent.linear_cross_entropy(z, LIN, T),
                  lambda z: F.cross_entropy(F.linear(z, LIN), T)),
}
TRANSFORMS = {
    "grad": lambda f: grad(lambda z: f(z).sum())(X),
    "vjp": lambda f: (lambda out, pull: pull(torch.ones_like(out))[0])(*vjp(f, X)),
    "jacrev": lambda f: jacrev(f)(X),
    "vmap": lambda f: vmap(f)(XB),
    "jvp": lambda f: jvp(f, (X,), (torch.ones_like(X),))[1],
}


def compiled(transform, f, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(lambda: TRANSFORMS[transform](f), backend=backend, fullgraph=True)()


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("case", list(CASES))
def test_transform_inside_compile_matches_torch(case, transform):
    """Where this torch compiles the transform of its own function, crossent's gives the
    same result.  Where it cannot (torch 2.4's AOT autograd and jacrev: "Cannot access
    storage of TensorWrapper"), crossent may fail as well, or work and match eager torch."""
    ours, theirs = CASES[case]
    try:
        expected = compiled(transform, theirs)
    except torch._dynamo.exc.BackendCompilerFailed:
        try:
            got = compiled(transform, ours)
        except torch._dynamo.exc.BackendCompilerFailed:
            return
        torch.testing.assert_close(got, TRANSFORMS[transform](theirs))
        return
    torch.testing.assert_close(compiled(transform, ours), expected)


def test_grad_inside_inductor_and_kernels_outside_transforms():
    """inductor too; and the same loss compiled outside any transform still runs
    crossent's own op (the probe is folded per graph, not once)."""
    ours, theirs = CASES["ce mean"]
    torch.testing.assert_close(compiled("grad", ours, "inductor"), compiled("grad", theirs, "inductor"))
    graphs = []

    def backend(gm, _inputs):
        graphs.append(str(gm.graph))
        return gm
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ours, backend=backend, fullgraph=True)(X), theirs(X))
    torch.testing.assert_close(torch.compile(lambda: grad(ours)(X), backend=backend, fullgraph=True)(),
                               grad(theirs)(X))
    assert len(graphs) == 2 and "crossent" in graphs[0] and "crossent" not in graphs[1], graphs


def test_compiled_probability_target_that_requires_grad():
    """Gradients w.r.t. probability targets take the reference path, which fullgraph=True
    traces.  Compared with eager torch (torch 2.4 cannot compile its own call here)."""
    grads = []
    for f in (torch.compile(crossent.cross_entropy, backend="aot_eager", fullgraph=True), F.cross_entropy):
        x, p = X.clone().requires_grad_(), P.clone().requires_grad_()
        torch._dynamo.reset()
        f(x, p).backward()
        grads.append((x.grad, p.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_compiled_double_backward_is_not_supported():
    """README deliberate difference 12.  With backend="eager" torch's compiled loss gives a
    gradient with a graph; crossent's compiled backward hands back the gradient its forward
    formed, which has none (in eager mode crossent's double backward works: test_autograd.py)."""
    for fn, has_graph in ((F.cross_entropy, True), (crossent.cross_entropy, False)):
        torch._dynamo.reset()
        x = X.clone().requires_grad_()
        loss = torch.compile(lambda z, fn=fn: fn(z, T), backend="eager")(x)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        assert gx.requires_grad == has_graph, fn
