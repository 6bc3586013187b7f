"""crossent.linear_cross_entropy on a real GPU (Triton backend for the CE part,
cuBLAS for the matmuls) against eager PyTorch, F.cross_entropy(F.linear(...)).

Tolerance: the project's rule (tests/_tol.py): crossent's error against a
float64 reference at most 4x eager PyTorch's own same-dtype error plus a few
ulps.  Covers fp32 and bf16, every acc_policy, reductions (with a
non-uniform upstream gradient for 'none'), ignore_index, label smoothing,
class weights, bias, chunk boundaries, and that accurate's bf16 weight
gradient is no worse than eager bf16's.  Small shapes: well under a minute.

CROSSENT_GPU_TEST_DEVICE=cpu runs the same checks on the CPU (smaller shapes),
to check this file's logic without a GPU.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

DEV = os.environ.get("CROSSENT_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tol import assert_close_to_ref  # noqa: E402

import crossent  # noqa: E402
from crossent import LinearCrossEntropyOptions as Opts  # noqa: E402

POLICIES = ["accurate", "balanced", "compact", "auto"]
SHAPE = (1024, 256, 32003) if DEV == "cuda" else (48, 16, 1003)   # V: no multiple of any block
CASES = {
    "mean": dict(),
    "sum-ignore": dict(reduction="sum", ignore=True),
    "none-smoothing": dict(reduction="none", label_smoothing=0.1, ignore=True),
    "bias-weight-ii": dict(bias=True, weight=True, label_smoothing=0.05, ignore=True, ignore_index=7),
}


def _data(N, D, V, dtype, seed=0, wscale=2.0, bias=False, weight=False, ignore=False, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * (wscale / D ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if weight else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 2:
        t[1::5] = ignore_index
    cv = (lambda x: None if x is None else x.to(device=DEV, dtype=dtype))
    return cv(h), cv(W), cv(b), cv(w), t.to(DEV)


def _grads(fn, h, W, b, red):
    """[loss, dh, dW(, db)] of fn(h, W, b); 'none' gets a non-uniform upstream gradient."""
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = fn(h, W, b)
    if red == "none":
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        out.backward(g.to(device=out.device, dtype=out.dtype))
    else:
        out.backward(torch.tensor(1.7, dtype=out.dtype, device=out.device))
    return [out.detach(), h.grad, W.grad] + ([] if b is None else [b.grad])


def _eager(t, w=None, red="mean", ls=0.0, ii=-100):
    return lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, weight=None if w is None else w.to(h.dtype),
                                           reduction=red, ignore_index=ii, label_smoothing=ls)


def _ours(t, w=None, red="mean", ls=0.0, ii=-100, opts=None):
    return lambda h, W, b: crossent.linear_cross_entropy(
        h, W, t, linear_bias=b, weight=None if w is None else w.to(h.dtype), reduction=red, ignore_index=ii,
        label_smoothing=ls, options=opts)


def _check(ours_fn, eager_fn, h, W, b, red, what):
    dtype = h.dtype
    ours = _grads(ours_fn, h, W, b, red)
    eager = _grads(eager_fn, h, W, b, red)
    ref = _grads(eager_fn, h.double(), W.double(), None if b is None else b.double(), red)
    names = ["loss", "dh", "dW", "db"]
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        assert o.dtype == e.dtype and o.shape == e.shape, (what, names[i], o.dtype, e.dtype, o.shape, e.shape)
        assert o.device.type == torch.device(DEV).type
        assert_close_to_ref(o, e, r, dtype=dtype, what=f"{what} {names[i]}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_vs_eager(dtype, policy, case):
    kw = CASES[case]
    red, ls, ii = kw.get("reduction", "mean"), kw.get("label_smoothing", 0.0), kw.get("ignore_index", -100)
    h, W, b, w, t = _data(*SHAPE, dtype, bias=kw.get("bias", False), weight=kw.get("weight", False),
                          ignore=kw.get("ignore", False), ignore_index=ii)
    opts = Opts(acc_policy=policy)
    _check(_ours(t, w, red, ls, ii, opts), _eager(t, w, red, ls, ii), h, W, b, red, f"{dtype} {policy} {case}")


@pytest.mark.parametrize("N", [1, 255, 256, 257, 1000])
@pytest.mark.parametrize("policy", ["accurate", "balanced", "compact"])
def test_chunk_boundaries(policy, N):
    """chunk_size 256 with N around it; a 1 MiB chunk budget makes compact's
    vocabulary pass take many blocks, the last one partial (V = 4099)."""
    D, V = (128, 4099) if DEV == "cuda" else (16, 515)
    h, W, b, _, t = _data(N, D, V, torch.float32, seed=1, bias=True, ignore=True)
    opts = Opts(acc_policy=policy, chunk_size=256, chunk_bytes=1 << 20)
    plan = crossent.linear_cross_entropy_plan(h, W, options=opts)
    assert plan.chunk_size == min(256, N) and plan.num_chunks == -(-N // 256)
    for red in ("mean", "none"):
        _check(_ours(t, red=red, opts=opts), _eager(t, red=red), h, W, b, red, f"N={N} {policy} {red}")


def test_chunk_boundaries_bf16():
    D, V = (128, 4099) if DEV == "cuda" else (16, 515)
    h, W, b, _, t = _data(1000, D, V, torch.bfloat16, seed=2, bias=True, ignore=True)
    for policy in ("accurate", "compact"):
        opts = Opts(acc_policy=policy, chunk_size=256, chunk_bytes=1 << 20)
        _check(_ours(t, opts=opts), _eager(t), h, W, b, "mean", f"bf16 {policy}")


def _rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item(), ((a - ref).abs().max() / ref.abs().max()).item()


def test_accurate_bf16_dW_no_worse_than_eager():
    """bf16, peaked logits (std ~4), 8 token chunks: accurate's dW and dh
    (softmax and p - 1 in fp32, stored in bf16 over the chunk's logits as
    eager stores its gradient; dW accumulated across chunks in fp32 and
    rounded once) against eager bf16's (one cross_entropy over bf16 logits),
    both vs float64 from the same bf16 inputs.  Both round the logits and the matmul
    operands to bf16, so the errors are close: 'no worse' = Frobenius error
    within 5%, max error within 25% (one element; noisy)."""
    N, D, V = (4096, 256, 8192) if DEV == "cuda" else (256, 32, 1024)
    h, W, _, _, t = _data(N, D, V, torch.bfloat16, seed=3, wscale=4.0)
    opts = Opts(acc_policy="accurate", chunk_size=N // 8)
    assert crossent.linear_cross_entropy_plan(h, W, options=opts).num_chunks == 8
    ours = _grads(_ours(t, opts=opts), h, W, None, "mean")
    eager = _grads(_eager(t), h, W, None, "mean")
    ref = _grads(_eager(t), h.double(), W.double(), None, "mean")
    for i, name in ((1, "dh"), (2, "dW")):
        (of, om), (ef, em) = _rel(ours[i], ref[i]), _rel(eager[i], ref[i])
        msg = f"{name}: accurate fro {of:.3g} max {om:.3g}; eager bf16 fro {ef:.3g} max {em:.3g}"
        print(msg)
        assert of <= 1.05 * ef, msg
        assert om <= 1.25 * em, msg


def test_fp32_output_gemm_and_its_fallback(monkeypatch):
    """_gemm, the weight-gradient accumulation: beta=0 on the first chunk
    (the accumulator starts as garbage), fp32 sums of bf16 products, through
    torch's float32-output GEMM where this torch has it (else it warned once)
    and through the deliberate fallback (each product rounded once)."""
    from crossent import _linear_ops as ops
    dev = torch.device(DEV)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(96, 300, device=dev, generator=g).bfloat16()
    b = torch.randn(300, 40, device=dev, generator=g).bfloat16()
    want = a.double() @ b.double()
    for fast in (True, False):
        if not fast:
            monkeypatch.setitem(ops._fp32_out_gemm, (dev.type, torch.bfloat16), False)
        acc = torch.full((96, 40), float("nan"), device=dev)
        ops._gemm(acc, a, b, first=True, scratch=torch.empty(96, 40, device=dev, dtype=torch.bfloat16))
        ops._gemm(acc, a, b, first=False, scratch=torch.empty(96, 40, device=dev, dtype=torch.bfloat16))
        err = ((acc.double() - 2 * want).abs().max() / want.abs().max()).item()
        exact = fast and ops.has_fp32_out_gemm(dev, torch.bfloat16)
        assert err <= (1e-5 if exact else 2 ** -8), (fast, exact, err)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA allocator statistics")
@pytest.mark.parametrize("policy", ["accurate", "compact"])
def test_extra_memory_bf16(policy):
    """accurate with one chunk: extra <= gradients + that chunk (its logits,
    overwritten by their gradient; no fp32 copy of either); compact: extra <=
    gradients + chunk_bytes (+ O(N + V) vectors and allocator rounding)."""
    N, D, V = 4096, 1024, 32000
    h, W, _, _, t = _data(N, D, V, torch.bfloat16, seed=4)
    h.requires_grad_()
    W.requires_grad_()
    budget = 32 << 20
    opts = Opts(acc_policy=policy, chunk_bytes=budget if policy == "compact" else 1 << 34)
    plan = crossent.linear_cross_entropy_plan(h, W, options=opts)
    crossent.linear_cross_entropy(h, W, t, options=opts).backward()   # warm-up (Triton compile)
    h.grad = W.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    crossent.linear_cross_entropy(h, W, t, options=opts).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (N + V) * D * 2
    allowed = grads + (N * V * 2 if policy == "accurate" else budget) + 64 * (N + V) + (4 << 20)
    assert (plan.num_chunks == 1) or policy == "compact", plan
    assert extra <= allowed, (policy, extra / 2 ** 20, allowed / 2 ** 20)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA's sync debug mode")
@pytest.mark.parametrize("policy", ["accurate", "compact", "auto"])
def test_no_host_sync(policy):
    """Forward + backward of several token chunks (and, for compact, vocabulary blocks)
    with ignored tokens, class weights, smoothing and a bias make no host sync: one
    would drain the launch queue and idle the GPU while the host refills it."""
    h, W, b, w, t = _data(1000, 128, 4099, torch.bfloat16, seed=6, bias=True, weight=True, ignore=True)
    opts = Opts(acc_policy=policy, chunk_size=256 if policy != "auto" else None, chunk_bytes=1 << 20)
    h.requires_grad_()
    W.requires_grad_()
    b.requires_grad_()

    def step(red):
        out = crossent.linear_cross_entropy(h, W, t, linear_bias=b, weight=w, reduction=red,
                                            label_smoothing=0.1, options=opts)
        (out.sum() if red == "none" else out).backward()
    for red in ("mean", "none"):
        step(red)   # compile and warm up first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(red)
        finally:
            torch.cuda.set_sync_debug_mode(0)
