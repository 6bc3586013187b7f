"""Regression tests for the classes the fuzz tier's log_probs family and
compile mode found (session 5, fuzz8), one test per class, judged against
torch itself or through the fuzz judge's rules; see tests/test_fuzz_classes.py
for the others."""
from __future__ import annotations

import pytest
import torch

import crossent
from _tol import assert_close_to_ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_vocab_parallel_linear_log_probs_low_precision_temperature(dtype, entropy):
    """The vocab-parallel head's backward recomputed z / T as torch.mul(z, 1/T,
    out=fp32 buffer) from fp16/bf16 logits, which multiplies in fp16/bf16 (an
    ulp of 16 at 2e4): input gradient 37 off at 94 (seed 1605208166, T = 0.05).
    Judged against torch's composition (tests/_fuzz_torch.py) and its float64 run."""
    import _fuzz
    import _fuzz_torch
    from crossent import distributed as D
    _fuzz.init_single_process()
    g = torch.Generator().manual_seed(11)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64)
    W = torch.randn(7, 4, generator=g, dtype=torch.float64) + 30  # logits ~ 1e2, scaled by 1/T = 20
    t = torch.tensor([1, 6, -100, 0, 3])
    u = [torch.randn(5, generator=g) for _ in range(2)]

    def grad(fn, dt):
        hi = h.to(dt).requires_grad_()
        out = fn(hi, W.to(dt), t, temperature=0.05, entropy=entropy)
        outs = [o for o in out if o is not None]
        return torch.autograd.grad(outs, hi, [ui.to(o.dtype) for ui, o in zip(u, outs)])[0]
    ours = grad(D.vocab_parallel_linear_log_probs, dtype)
    theirs = grad(lambda hi, Wi, ti, **kw: _fuzz_torch.torch_log_probs(hi, ti, Wi, **kw), dtype)
    # float64 at the logits torch rounds to dtype (the rounding passes the gradient through)
    ref = grad(lambda hi, Wi, ti, **kw: _fuzz_torch.torch_log_probs((hi @ Wi.T).to(dtype).double(), ti, **kw),
               torch.float64)
    assert_close_to_ref(ours.double(), theirs.double(), ref, dtype, "grad of input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("entropy", [False, True])
def test_vocab_parallel_log_probs_far_from_zero(dtype, entropy):
    """The vocab-parallel log-probs formed each shard's lse as max + log s in
    one fp32 number, an ulp of |lse| (1e-3 at 1e4) in every log-prob: 4e-4 off
    where torch's log_softmax, relative to the row max, is 5e-7 off (seed
    1822956111).  Judged against torch's composition and its float64 run."""
    import _fuzz
    import _fuzz_torch
    from crossent import distributed as D
    _fuzz.init_single_process()
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(6, 97, generator=g, dtype=torch.float64) * 3 - 1e4).to(dtype)
    t = torch.randint(0, 97, (6,), generator=g)
    u = [torch.randn(6, generator=g) for _ in range(2)]

    def run(fn, xi):
        xi = xi.clone().requires_grad_()
        outs = [o for o in fn(xi, t, entropy=entropy) if o is not None]
        (gx,) = torch.autograd.grad(outs, xi, [ui.to(o.dtype) for ui, o in zip(u, outs)])
        return [o.detach() for o in outs], gx
    ours, theirs, ref = run(D.vocab_parallel_log_probs, x), run(_fuzz_torch.torch_log_probs, x), \
        run(_fuzz_torch.torch_log_probs, x.double())
    for i, (o, th, r) in enumerate(zip(ours[0], theirs[0], ref[0])):
        assert_close_to_ref(o.double(), th.double(), r, th.dtype, f"output {i}")
    assert_close_to_ref(ours[1].double(), theirs[1].double(), ref[1], dtype, "grad of logits")


_COMPILED_CASES = {  # grad mode "compile": crossent under torch.compile(backend="aot_eager")
    # rule 14: a reduced loss rescales its forward's gradient by a NaN upstream (README 9), only
    # inside the strided view (torch's side multiplied the leaf's gradient, gaps included)
    "rescaled": {"fn": "module", "backend": "torch", "seed": 1984710064, "dtype": "float32",
                 "module": "CrossEntropyLoss", "shape": [33, 211], "layout": "strided", "values": "huge",
                 "grad": "compile", "upstream": "nan", "target": "index", "target_dtype": "int64",
                 "ignore": "class", "target_layout": "strided", "weight": "negative", "weight_layout": "expanded",
                 "reduction": "mean", "label_smoothing": 0.1},
    # 'none' reruns the kernel with the upstream: torch's own pattern, not rule 14's
    "none": {"fn": "cross_entropy", "backend": "torch", "seed": 648449929, "dtype": "float64", "shape": [257],
             "layout": "transposed", "values": "normal", "grad": "compile", "upstream": "inf", "target": "index",
             "target_dtype": "int64", "ignore": "class", "target_shape_1": True, "target_layout": "contig",
             "weight": "zero_some", "weight_layout": "strided", "reduction": "none", "softcap": 5.0},
    # rule 16: an out-of-range target gives NaN where torch raises (README 3)
    "out_of_range": {"fn": "nll_loss", "backend": "torch", "seed": 320813312, "dtype": "float32",
                     "shape": [5, 0], "layout": "contig", "values": "offset1e4", "grad": "compile",
                     "upstream": "randn", "target": "index", "target_dtype": "uint8", "ignore": "big",
                     "target_layout": "contig", "weight": "all_zero", "weight_layout": "expanded",
                     "reduction": "elementwise_mean", "legacy": [None, False]},
}


@pytest.mark.parametrize("name", list(_COMPILED_CASES))
def test_fuzz_compiled_case_rules(name):
    """The fuzz's compile mode (seeds 500-501): crossent compiled against eager
    torch, with the README's compile differences as judge rules 14 and 16."""
    import _fuzz
    spec = _COMPILED_CASES[name]
    assert _fuzz.check(spec) is None
    if name == "out_of_range":  # the rule is narrow: eager crossent raises torch's error
        assert _fuzz.check({**spec, "grad": "backward"}) is None
        assert _fuzz.run({**spec, "grad": "backward"}, "ours")["error"][1] == "IndexError"


def test_fuzz_vocab_parallel_linear_log_probs_own_target_logit():
    """Rule 15 (seed 717185034): the vocab-parallel head's target logit is its
    own dot product, so at the row's max its fp32 log-prob is an ulp of the
    scaled logits above torch's exact 0; the bound is that ulp, not more."""
    import _fuzz
    _fuzz.init_single_process()
    spec = {"fn": "log_probs", "backend": "torch", "seed": 717185034, "dtype": "float32", "linear": True,
            "vp": True, "shape": [2, 5], "classes": 3, "bias": True, "layout": "expanded", "values": "wide",
            "grad": "backward", "upstream": "randn", "target": "index", "target_dtype": "int64", "ignore": "some",
            "target_layout": "contig", "temperature": 0.05, "entropy": False}
    assert _fuzz.check(spec) is None
    ours = _fuzz.run(spec, "ours")["outs"][0]
    bound = _fuzz._target_logit_error(spec, {}, frozenset())["output 0"]
    assert 0 < ours.abs().max() <= bound
    assert _fuzz._target_logit_error({**spec, "vp": False}, {}, frozenset()) == {}


@pytest.mark.parametrize("entropy", [False, True])
def test_linear_log_probs_uint8_target_not_wrapped_ignore_index(entropy):
    """The fused head dropped the rows whose uint8 target equals ignore_index
    after wrapping (-100 -> 156) and returned 0 there (seed 980683354: output
    25.3 off); log_probs and torch compare in int64."""
    import _fuzz_torch
    g = torch.Generator().manual_seed(14)
    h, W = torch.randn(4, 3, generator=g), torch.randn(211, 3, generator=g)
    t = torch.tensor([156, 3, 156, 7], dtype=torch.uint8)
    ours = crossent.linear_log_probs(h, W, t, entropy=entropy)
    theirs = _fuzz_torch.torch_log_probs(h, t, W, entropy=entropy)
    ref = _fuzz_torch.torch_log_probs(h.double(), t, W.double(), entropy=entropy)
    for i, (o, th, r) in enumerate(zip([o for o in ours if o is not None], theirs, ref)):
        assert_close_to_ref(o.double(), th.double(), r, th.dtype, f"output {i}")


def test_fuzz_log_probs_reciprocal_temperature_error():
    """Rule 17 (seed 2116862314): fp64 entropy at logits ~-1e4 / T = 0.7 is
    1.7e-13 off, torch's z / T 1.3e-14 (one draw); torch's same ops on
    z * (1/T), as crossent scales, are as far off, and the rule is only for T != 1."""
    import _fuzz
    import _tol
    spec = {"fn": "log_probs", "backend": "torch", "seed": 2116862314, "dtype": "float64", "linear": False,
            "vp": False, "shape": [3, 5], "layout": "expanded", "values": "offset1e4", "grad": "backward",
            "upstream": "randn", "target": "index", "target_dtype": "int64", "ignore": "default",
            "target_layout": "contig", "temperature": 0.7, "entropy": True}
    assert _fuzz.check(spec) is None
    ref = _fuzz.run(spec, "ref")
    ours = _tol._err(_fuzz.run(spec, "ours")["outs"][1], ref["outs"][1])
    assert ours <= 4 * _fuzz._reciprocal_temperature_error(spec, ref, frozenset())["output 1"]
    assert _fuzz._reciprocal_temperature_error({**spec, "temperature": 1.0}, ref, frozenset()) == {}


def test_fuzz_linear_log_probs_skipped_rows():
    """Rule 8 for linear_log_probs (seed 331034070): it skips ignored rows, so a
    non-finite bias gives torch's NaN gradient there but not crossent's; the
    vocab-parallel head computes every row and keeps torch's pattern."""
    import _fuzz
    import _fuzz_rules
    _fuzz.init_single_process()
    spec = {"fn": "log_probs", "backend": "torch", "seed": 331034070, "dtype": "float64", "linear": True,
            "vp": False, "shape": [3, 1, 3, 8], "classes": 1, "bias": True, "layout": "contig",
            "values": "nonfinite", "grad": "backward", "upstream": "randn", "target": "index",
            "target_dtype": "int32", "ignore": "class", "target_layout": "contig", "temperature": 0.7,
            "entropy": False}
    assert _fuzz.check(spec) is None
    assert _fuzz_rules._linear_skipped_rows(spec, "grad of input")
    assert not _fuzz_rules._linear_skipped_rows({**spec, "vp": True}, "grad of input")
    assert _fuzz.check({**spec, "vp": True}) is None


def test_fuzz_vocab_parallel_linear_log_probs_own_target_logit_masked_classes():
    """Rule 15 with masked (-inf) classes (seed 13757555: fp32, a 1-D input, log-prob
    3.8e-6 off where torch's is exact): the bound is an ulp of the largest finite
    scaled logit; the -inf ones left it undefined and the rule unapplied."""
    import _fuzz
    _fuzz.init_single_process()
    spec = {"fn": "log_probs", "backend": "torch", "seed": 13757555, "dtype": "float32", "linear": True, "vp": True,
            "shape": [16], "classes": 13, "bias": True, "layout": "contig", "values": "masked", "grad": "backward",
            "upstream": "inf", "target": "index", "target_dtype": "int64", "ignore": "none_present",
            "target_layout": "contig", "temperature": 1.0, "entropy": True}
    assert _fuzz.check(spec) is None
    bound = _fuzz._target_logit_error(spec, {}, frozenset())["output 0"]
    assert 0 < bound < float("inf")


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_log_probs_under_torch_func_and_double_backward(linear, entropy):
    """log_probs and linear_log_probs raised under torch.func.grad / vmap / jvp ("it must
    override the setup_context staticmethod") and gave a gradient without a graph to
    backward(create_graph=True), where torch's composition works (README deliberate
    difference 10: torch.func works as with torch).  Each output's first- and second-order
    results, an inf upstream's inf/NaN pattern included, against torch's composition
    (tests/_fuzz_torch.py) in float64."""
    from _fuzz_torch import torch_log_probs
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6 if linear else 7, generator=g, dtype=torch.float64)
    x[0, 1, -1] = float("-inf") if not linear else x[0, 1, -1]   # a masked class
    W = torch.randn(7, 6, generator=g, dtype=torch.float64) if linear else None
    t = torch.randint(0, 7, (3, 4), generator=g)
    t[1, 2] = -100
    kw = dict(temperature=0.7, entropy=entropy)

    def ours(z, k):
        out = crossent.linear_log_probs(z, W, t, **kw) if linear else crossent.log_probs(z, t, **kw)
        return out[k]

    def theirs(z, k):
        return torch_log_probs(z, t, W, **kw)[k]

    for k in range(1 + entropy):
        up = torch.randn(t.shape, generator=g, dtype=torch.float64)
        res = []
        for f in (ours, theirs):
            fk = lambda z: f(z, k)  # noqa: E731
            out = [torch.func.grad(lambda z: (fk(z) * up).sum())(x), torch.func.vmap(fk)(torch.stack([x, 2 * x])),
                   torch.func.jvp(fk, (x,), (torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                                         dtype=x.dtype),))[1]]
            xx = x.clone().requires_grad_()
            for u in (up, torch.where(t == 0, float("inf"), up)):
                (g1,) = torch.autograd.grad(fk(xx), xx, u, create_graph=True)
                out.append(g1.detach())
                if g1.isfinite().all():
                    out.append(torch.autograd.grad(g1.pow(2).sum(), xx)[0])
            res.append(out)
        for o, th in zip(*res):
            torch.testing.assert_close(o, th, equal_nan=True)
