"""crossent.log_probs / linear_log_probs (RL log-probs and entropy) against eager PyTorch.

The eager reference is the formula RL trainers use,
``log_softmax(logits.float() / T).gather(-1, t)`` and ``-(p * log p).sum(-1)``;
its float64 version is the ground truth of the tolerance rule (tests/_tol.py).
Each case draws random upstream gradients for both outputs (or one of them).
The Triton kernels run through the interpreter with CROSSENT_BACKEND=triton;
the vocab-parallel variants run on gloo with 2 and 3 processes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import crossent
from _tol import assert_close_to_ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the Triton interpreter

HERE = Path(__file__).resolve().parent
BACKENDS = ["torch", "triton"]


def _has_triton() -> bool:
    """The triton backend can run here (a Triton it accepts, CUDA or TRITON_INTERPRET=1)."""
    try:
        from crossent.backends.triton import TritonBackend
    except ImportError:
        return False
    return TritonBackend().available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Select a backend; shrink chunk and tile sizes so small shapes take the
    multi-chunk / multi-tile paths."""
    from crossent import _logprobs_ops as logprobs
    from crossent.backends import torch_chunked
    if request.param == "triton":
        if not _has_triton():
            pytest.skip("the triton backend cannot run here (Triton >= 3.6, CUDA or TRITON_INTERPRET=1)")
        from crossent.backends.triton import ce
        monkeypatch.setattr(ce, "_SINGLE_MAX", 64)
        monkeypatch.setattr(ce, "_LOOP_BLOCK", 32)
        monkeypatch.setattr(ce, "_TILE_ELEMS", 128)
    monkeypatch.setenv("CROSSENT_BACKEND", request.param)
    monkeypatch.setattr(torch_chunked, "_CHUNK_BYTES", 2048)
    monkeypatch.setattr(torch_chunked, "_MIN_CHUNK_BYTES", 1024)
    monkeypatch.setattr(logprobs, "_CPU_CHUNK_BYTES", 4096)  # and the torch kernels' blocks: a row or two
    return request.param


def eager(logits, target, T, ii, dtype):
    """The RL trainers' formula in ``dtype``: (log_probs, entropy), 0 at ignored positions."""
    keep = target != ii
    lsm = torch.log_softmax(logits.to(dtype) / T, -1)
    lp = lsm.gather(-1, torch.where(keep, target, 0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def _data(shape, V, dtype, seed, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, V, shape, generator=g)
    if ignore:
        t.view(-1)[::3] = -100
    ga = torch.randn(shape, generator=g, dtype=torch.float64)
    gb = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, t, ga, gb


def _grads(outputs, params, ga, gb, which):
    lp, ent = outputs
    loss = 0
    if which in ("lp", "both"):
        loss = loss + (lp * ga.to(lp.dtype)).sum()
    if which in ("ent", "both"):
        loss = loss + (ent * gb.to(ent.dtype)).sum()
    return torch.autograd.grad(loss, params)


def _check(ours, params, ref_fn, ga, gb, which, in_dtype):
    """Values and gradients: ours vs the fp32 eager formula, both against fp64."""
    ref_params = [p.detach().double().requires_grad_() for p in params]
    eag_params = [p.detach().clone().requires_grad_() for p in params]
    ref = ref_fn(*ref_params, torch.float64)
    theirs = ref_fn(*eag_params, torch.float32)
    assert ours.log_probs.dtype == (torch.float64 if in_dtype == torch.float64 else torch.float32)
    assert_close_to_ref(ours.log_probs.detach(), theirs[0].detach(), ref[0].detach(), torch.float32, "log_probs")
    assert_close_to_ref(ours.entropy.detach(), theirs[1].detach(), ref[1].detach(), torch.float32, "entropy")
    g_ours = _grads(ours, params, ga, gb, which)
    g_ref = _grads(ref, ref_params, ga, gb, which)
    g_theirs = _grads(theirs, eag_params, ga, gb, which)
    for name, a, b, r in zip("xwb", g_ours, g_theirs, g_ref):
        assert a.dtype == in_dtype
        assert_close_to_ref(a, b, r, in_dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,which,shape", [(1.0, "both", (2, 5)), (0.7, "lp", (9,)), (1.6, "ent", (3, 1, 3))])
def test_log_probs_matches_eager(backend, dtype, T, which, shape):
    for V in (37, 150):  # one tile / several tiles and chunks
        x, t, ga, gb = _data(shape, V, dtype, seed=V)
        xp = x.clone().requires_grad_()
        out = crossent.log_probs(xp, t, temperature=T, entropy=True)
        assert out.log_probs.shape == t.shape and out.entropy.shape == t.shape
        _check(out, [xp], lambda lg, dt: eager(lg, t, T, -100, dt), ga, gb, which, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,T,which", [(False, 1.0, "both"), (True, 0.6, "lp"), (True, 1.3, "ent")])
def test_linear_log_probs_matches_eager(backend, dtype, bias, T, which):
    V, D = 150, 24
    x, t, ga, gb = _data((3, 7), V, torch.float64, seed=11)
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(3, 7, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    params = [h, W] + ([b] if bias else [])
    out = crossent.linear_log_probs(h, W, t, linear_bias=b, temperature=T, entropy=True)

    def ref_fn(h, W, *rest, dt):
        # the logits are rounded to the input dtype by F.linear, in eager and in crossent
        lg = F.linear(h, W, rest[0] if rest else None)
        return eager(lg if lg.dtype == torch.float64 else lg.to(dtype), t, T, -100, dt)

    _check(out, params, lambda *a: ref_fn(*a[:-1], dt=a[-1]), ga, gb, which, dtype)


@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), V=st.integers(1, 70),
       T=st.floats(0.05, 20.0), scale=st.floats(0.1, 30.0), seed=st.integers(0, 2 ** 16),
       fused=st.booleans())
def test_property_matches_float64(lead, V, T, scale, seed, fused):
    """Any leading shape (empty too), vocabulary, temperature and logit scale:
    fp32 results within the tolerance rule of the float64 eager formula."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, lead, generator=g)
    t.view(-1)[::2] = -100
    ga, gb = torch.randn(lead, generator=g, dtype=torch.float64), torch.randn(lead, generator=g,
                                                                            dtype=torch.float64)
    if fused:
        h = (torch.randn(*lead, 6, generator=g) * scale).requires_grad_()
        W = torch.randn(V, 6, generator=g).requires_grad_()
        out = crossent.linear_log_probs(h, W, t, temperature=T, entropy=True)
        _check(out, [h, W], lambda h, W, dt: eager(F.linear(h, W), t, T, -100, dt), ga, gb, "both",
               torch.float32)
    else:
        x = (torch.randn(*lead, V, generator=g) * scale).requires_grad_()
        out = crossent.log_probs(x, t, temperature=T, entropy=True)
        _check(out, [x], lambda x, dt: eager(x, t, T, -100, dt), ga, gb, "both", torch.float32)


def test_fp64_and_output_type(backend):
    x, t, ga, gb = _data((4,), 40, torch.float64, seed=5)
    xp = x.clone().requires_grad_()
    out = crossent.log_probs(xp, t, temperature=0.9)
    assert type(out) is crossent.LogProbsOutput and out.entropy is None
    lp, _ = eager(x, t, 0.9, -100, torch.float64)
    torch.testing.assert_close(out.log_probs, lp, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad((out.log_probs * ga).sum(), xp)
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad((eager(xr, t, 0.9, -100, torch.float64)[0] * ga).sum(), xr)
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


def test_ignored_positions_are_exact_zeros(backend):
    x, t, _, _ = _data((6,), 30, torch.float32, seed=2)
    t[:] = -7
    t[2] = 4
    xp = x.clone().requires_grad_()
    out = crossent.log_probs(xp, t, ignore_index=-7, entropy=True)
    keep = t != -7
    assert torch.all(out.log_probs[~keep] == 0) and torch.all(out.entropy[~keep] == 0)
    out.log_probs.sum().add(out.entropy.sum()).backward()
    assert torch.all(xp.grad[~keep] == 0) and torch.all(xp.grad[keep] != 0)


def test_masked_classes_entropy_is_finite(backend):
    """-inf logits (a masked vocabulary): 0 log 0 = 0, the same values and
    gradients as the distribution over the remaining classes."""
    x, t, ga, gb = _data((5,), 40, torch.float32, seed=9, ignore=False)
    t = t % 30
    xm = x.clone()
    xm[:, 30:] = float("-inf")
    xp = xm.clone().requires_grad_()
    out = crossent.log_probs(xp, t, entropy=True)
    assert torch.isfinite(out.entropy).all()
    sub = x[:, :30].clone().requires_grad_()
    ref = crossent.log_probs(sub, t, entropy=True)
    torch.testing.assert_close(out.log_probs, ref.log_probs)
    torch.testing.assert_close(out.entropy, ref.entropy)
    (g,) = torch.autograd.grad((out.log_probs * ga + out.entropy * gb).sum(), xp)
    (gr,) = torch.autograd.grad((ref.log_probs * ga + ref.entropy * gb).sum(), sub)
    torch.testing.assert_close(g[:, :30], gr)
    assert torch.all(g[:, 30:] == 0)


def test_linear_ignored_rows_and_bias_grads(backend):
    """All-ignored chunks are skipped on CPU: their input-gradient rows are 0."""
    V, D = 60, 8
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    t = torch.randint(0, V, (20,), generator=g)
    t[:12] = -100
    out = crossent.linear_log_probs(h, W, t, entropy=True)
    (out.log_probs + 0.5 * out.entropy).sum().backward()
    ref = eager(F.linear(h.detach(), W.detach()), t, 1.0, -100, torch.float32)
    torch.testing.assert_close(out.log_probs, ref[0])
    assert torch.all(h.grad[:12] == 0)


@pytest.mark.parametrize("dtype,entropy,T", [(torch.float32, True, 1.0), (torch.float32, False, 0.7),
                                             (torch.bfloat16, True, 0.7), (torch.bfloat16, False, 1.0)])
def test_linear_memory_within_one_chunk(monkeypatch, dtype, entropy, T):
    """The fused head's promise on CPU: beyond the gradients it returns, forward
    + backward allocate at most one chunk budget (the logits, then their
    gradient, and the kernels' blocks) + O(N) per-token vectors (outputs, lse,
    coefficients) + for bf16 over several chunks dW's fp32 accumulator; from the
    memory events of torch's profiler (every CPU allocation and free)."""
    from _linear_cases import profile_peak

    from crossent import _logprobs_ops as logprobs
    budget = 8 << 20
    monkeypatch.setattr(logprobs, "_CPU_CHUNK_BYTES", budget)
    monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    N, D, V = 1024, 64, 8192  # eager's fp32 logits: 32 MiB
    rows = logprobs._cpu_chunk_rows(N, D, V, dtype, entropy)
    assert rows < N  # several chunks
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100  # dropped rows: the chunks gather their hidden rows
    adv = torch.randn(N, generator=g)

    def step(fn):
        lp, ent = fn()
        ((lp * adv).sum() + (ent.sum() if entropy else 0)).backward()
        h.grad = W.grad = None

    def ours():
        return crossent.linear_log_probs(h, W, t, temperature=T, entropy=entropy)

    def theirs():
        return eager(F.linear(h, W), t, T, -100, torch.float32)

    step(ours)  # warm-up: lazy imports, one-time buffers
    grads = (N + V) * D * h.element_size()
    acc = V * D * 4 if dtype != torch.float32 else 0
    peak = profile_peak(lambda: step(ours))
    assert peak <= grads + acc + budget + 64 * N, (peak - grads - acc) / budget
    assert peak > grads + rows * V * h.element_size()  # the measurement sees the chunk
    assert profile_peak(lambda: step(theirs)) > grads + N * V * 4  # ... and eager's logits


@pytest.mark.parametrize("tdtype", [torch.int32, torch.uint8])
def test_narrow_target_dtypes_compare_exactly(tdtype):
    """ignore_index is compared in int64: uint8 class 156 is not ignore_index -100."""
    x = torch.randn(3, 200)
    t = torch.tensor([156, 3, 7], dtype=tdtype if tdtype != torch.uint8 else torch.uint8)
    out = crossent.log_probs(x, t)
    torch.testing.assert_close(out.log_probs, eager(x, t.long(), 1.0, -100, torch.float32)[0])
    assert out.log_probs[0] != 0


def test_errors():
    x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    for T in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            crossent.log_probs(x, t, temperature=T)
    with pytest.raises(TypeError, match="temperature"):
        crossent.log_probs(x, t, temperature="hot")
    with pytest.raises(TypeError, match="ignore_index"):
        crossent.log_probs(x, t, ignore_index=1.5)
    with pytest.raises(TypeError, match="entropy"):
        crossent.log_probs(x, t, entropy=1)
    with pytest.raises(ValueError, match="target of shape"):
        crossent.log_probs(x, t[:3])
    with pytest.raises(RuntimeError, match="expected target dtype"):
        crossent.log_probs(x, t.float())
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        crossent.log_probs(x, torch.tensor([0, 10, 1, 2]))
    with pytest.raises(NotImplementedError):
        crossent.log_probs(x.long(), t)
    with pytest.raises(TypeError, match="must be Tensor"):
        crossent.log_probs(x.tolist(), t)
    with pytest.raises(RuntimeError, match="in_features"):
        crossent.linear_log_probs(torch.randn(4, 3), torch.randn(10, 5), t)
    with pytest.raises(RuntimeError):  # F.linear's own dtype error
        crossent.linear_log_probs(torch.randn(4, 5), torch.randn(10, 5, dtype=torch.float64), t)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("grads", ["hW", "h", "W", "hWb"])
def test_compile_fullgraph(fused, grads):
    """Compiled = eager, values and gradients, for each set of inputs that require grad
    (the unused gradients of the backward op are distinct empties: a custom op's outputs
    may not alias each other, which torch checks only when the op runs compiled)."""
    g = torch.Generator().manual_seed(0)
    h, W, b = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    t = torch.randint(0, 40, (6,), generator=g)
    t[1] = -100
    bias = "b" in grads

    def fn(h, W, b):
        out = (crossent.linear_log_probs(h, W, t, linear_bias=b if bias else None, temperature=0.8, entropy=True)
               if fused else
               crossent.log_probs(h @ W.t() + (b if bias else 0), t, temperature=0.8, entropy=True))
        return out.log_probs.sum() * 2 + out.entropy.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    res = []
    for f in (fn, compiled):
        hp, Wp, bp = (v.clone().requires_grad_(k in grads) for k, v in zip("hWb", (h, W, b)))
        loss = f(hp, Wp, bp)
        res.append((loss.detach(), *torch.autograd.grad(loss, [v for k, v in zip("hWb", (hp, Wp, bp))
                                                                if k in grads])))
    for a, b_ in zip(*res):
        torch.testing.assert_close(a, b_)


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _has_triton() or not _has_nvidia_backend(), reason="no triton NVIDIA backend")
def test_triton_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code the real compiler rejects; compile every variant for sm_90."""
    script = r"""
import itertools, sys
sys.path.insert(0, sys.argv[1])
import _aot_compile as A  # unsets TRITON_INTERPRET before importing triton
from crossent.backends.triton import logprobs as L
ok = True
for xdt, (br, bv), ent in itertools.product(("bf16", "fp32"), ((1, 8192), (8, 512)), (False, True)):
    sig = {"x_ptr": f"*{xdt}", "sx_r": "i64", "sx_c": "i64", "ys_ptr": "*i64", "lp_ptr": "*fp32",
           "ent_ptr": "*fp32", "shift_ptr": "*fp32", "R": "i64", "V": "i32", "inv_t": "fp32"}
    ok &= A.compile_one(L._lp_fwd_kernel, sig, dict(BLOCK_R=br, BLOCK_V=bv, ENTROPY=ent), f"fwd {xdt} {br}x{bv} {ent}")
    sig = {"x_ptr": f"*{xdt}", "sx_r": "i64", "sx_c": "i64", "ys_ptr": "*i64", "shift_ptr": "*fp32",
           "ent_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "g_ptr": "*fp32",
           "sg_r": "i64", "sg_c": "i64", "R": "i64", "V": "i32", "inv_t": "fp32"}
    ok &= A.compile_one(L._lp_bwd_kernel, sig, dict(BLOCK_R=br, BLOCK_V=bv, HAS_B=ent), f"bwd {xdt} {br}x{bv} {ent}")
print("ALL OK" if ok else "SOME FAILED")
"""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", script, str(HERE)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]


# ---------------------------------------------------------------------------
# Vocab-parallel, gloo, 2 and 3 processes (spawned as in tests/test_distributed.py)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_log_probs(world):
    from _dist import check
    check(__file__, world, "logprobs")


def _dist_cases(ck, rank: int, world: int):
    import itertools

    import torch.distributed as dist

    from crossent.distributed import vocab_parallel_linear_log_probs as vplp
    from crossent.distributed import vocab_parallel_log_probs as vlp
    from _dist import groups as _groups
    from _dist import splits as _splits

    groups = _groups(world, "cpu")
    D = 5
    for si, sizes in enumerate(_splits(world)):
        V = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        combos = itertools.product(["logits", "linear"], [1.0, 0.7], ["lp", "ent", "both"], [False, True])
        for ci, (kind, T, which, vsi_given) in enumerate(combos):
            g = torch.Generator().manual_seed(100 * si + ci)
            t = torch.randint(0, V, (3, 4), generator=g)
            t[0, 0] = -100
            ga, gb = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
                                                                                     dtype=torch.float64)
            kw = dict(temperature=T, entropy=True, vocab_start_index=lo if vsi_given else None,
                      group=groups[ci % len(groups)])
            name = f"split={sizes} {kind} T={T} {which} vsi={vsi_given}"
            if kind == "logits":
                x = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3
                xs = x[..., lo:hi].clone().requires_grad_()
                xf = x.clone().requires_grad_()
                out = vlp(xs, t, **kw)
                ref = crossent.log_probs(xf, t, temperature=T, entropy=True)
                gs = _grads(out, [xs], ga, gb, which)
                gf = [gr[..., lo:hi] for gr in _grads(ref, [xf], ga, gb, which)]
            else:
                h = torch.randn(3, 4, D, generator=g, dtype=torch.float64)
                W = torch.randn(V, D, generator=g, dtype=torch.float64)
                b = torch.randn(V, generator=g, dtype=torch.float64)
                hs, Ws, bs = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_(), \
                    b[lo:hi].clone().requires_grad_()
                hf, Wf, bf = h.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
                out = vplp(hs, Ws, t, linear_bias_shard=bs, chunk_size=5, **kw)
                ref = crossent.linear_log_probs(hf, Wf, t, linear_bias=bf, temperature=T, entropy=True)
                gs = _grads(out, [hs, Ws, bs], ga, gb, which)
                gf = _grads(ref, [hf, Wf, bf], ga, gb, which)
                gf = [gf[0], gf[1][lo:hi], gf[2][lo:hi]]
            ck.close(name + " log_probs", out.log_probs, ref.log_probs)
            ck.close(name + " entropy", out.entropy, ref.entropy)
            for i, (a, r) in enumerate(zip(gs, gf)):
                ck.close(f"{name} grad {i}", a, r)
            ck.cases += 1
    # fp32 / bf16 logits: fp32 results, close to single process
    sizes = _splits(world)[1]
    V = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(5))
    t = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(6))
    for dt in (torch.float32, torch.bfloat16):
        out = vlp(x[:, lo:hi].to(dt), t, entropy=True)
        ref = crossent.log_probs(x.to(dt), t, entropy=True)
        ck.close(f"{dt} log_probs", out.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)
        ck.close(f"{dt} entropy", out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
        ck.cases += 1
    try:
        vlp(x[:, lo:hi], torch.tensor([0, V, 1, 2, 3, 4]))
        ck.failures.append(f"rank {rank}: out-of-range target did not raise")
    except IndexError:
        pass
    dist.barrier()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    from _dist import worker_main
    worker_main({"logprobs": [_dist_cases]})
