"""crossent.linear_cross_entropy against the eager composition
F.cross_entropy(F.linear(...)) (or crossent.reference where crossent has extras):
values and gradients at chunk boundaries, in low precision, with leading dims,
shift, z_loss/softcap and stats, in-place gradients, torch.compile, small
integer targets, a common logit offset, and the Triton backend under its CPU
interpreter.  Nothing here needs torch 2.13's F.linear_cross_entropy, so CI's
torch 2.11 and 2.4 tiers run it too."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference
from crossent.linear import (LinearCrossEntropyOptions as Opts, linear_cross_entropy,
                             linear_cross_entropy_plan, linear_cross_entropy_with_stats)
from _linear_cases import POLICIES, T, assert_all_close, eager_ce, inputs, rel_err, value_and_grads
from _tol import assert_close_to_ref


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("N", [15, 16, 17, 1])
def test_chunk_boundaries(policy, N):
    # chunk_size 16 with N = 15/16/17; V = 101 is no multiple of any block (vocab blocks of 32)
    D, V = 8, 101
    h, W, b, t = inputs(N, D, V, ignore=N > 2)
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=16, chunk_bytes=16 * 32 * 8)
    for red in ("mean", "none"):
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                                    options=opts), h, W, b)
        assert_all_close(ours, value_and_grads(eager_ce(red), h, W, b), what=f"N={N} {red}")


@pytest.mark.parametrize("policy", POLICIES)
def test_fp32_and_leading_dims_and_no_bias(policy):
    h, W, _, t = inputs(0, 16, 50, dtype=torch.float32, bias=False, batch=(3, 7))
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=4)
    for red in ("mean", "sum", "none"):
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, reduction=red, options=opts), h, W, None)
        ref = value_and_grads(eager_ce(red), h, W, None)
        assert_all_close(ours, ref, tol=2e-5, what=red)
        assert ours[0].shape == ((3, 7) if red == "none" else ())


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("policy", POLICIES + ["auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch_eager(policy, dtype, chunks):
    """Values and gradients (dW included) against fp64: no worse than eager in
    the same dtype, whether dW is one GEMM or an fp32 sum over chunks."""
    N, D, V = 64, 32, 300
    h, W, b, t = inputs(N, D, V, dtype=dtype)
    T[0] = t
    opts = Opts(acc_policy=policy, chunk_size=16 if chunks == "several" else None,
                chunk_bytes=64 * 64 * 4 if chunks == "several" else 1 << 30)
    assert (linear_cross_entropy_plan(h, W, options=opts).num_chunks == 1) == (chunks == "one")
    ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=opts), h, W, b)
    eager = value_and_grads(eager_ce(), h, W, b)
    ref = value_and_grads(eager_ce(), h.double(), W.double(), b.double())
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        assert o.dtype == e.dtype
        assert rel_err(o, r) <= 1.05 * rel_err(e, r) + 1e-3, (policy, i, rel_err(o, r), rel_err(e, r))


def test_none_nonuniform_upstream_and_retain_graph():
    """Liger #968: per-token upstream gradients under 'none'; and a second
    backward (retain_graph) recomputes instead of reusing consumed buffers."""
    h, W, b, t = inputs(19, 8, 21)
    T[0] = t
    for policy in POLICIES:
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, t, options=Opts(acc_policy=policy, chunk_size=4))
        loss.backward(retain_graph=True)
        g1 = hh.grad.clone()
        loss.backward(torch.tensor(2.0, dtype=loss.dtype))
        torch.testing.assert_close(hh.grad, 3 * g1)


def test_ignore_all_and_ignore_index_value():
    h, W, b, t = inputs(6, 4, 5)
    t[:] = 3
    for red in ("mean", "sum", "none"):
        T[0] = t
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                                    ignore_index=3), h, W, b)
        assert_all_close(ours, value_and_grads(eager_ce(red, ii=3), h, W, b), what=red)


def test_shift_semantics():
    h, W, b, t = inputs(0, 8, 30, batch=(3, 6))
    for policy in POLICIES:
        opts = Opts(acc_policy=policy, chunk_size=4)
        for red in ("mean", "none"):
            ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                                        options=opts, shift=True), h, W, b)
            ref = value_and_grads(lambda h, W, b: F.cross_entropy(F.linear(h[:, :-1], W, b).reshape(-1, 30),
                                                                  t[:, 1:].reshape(-1), reduction=red)
                                  .reshape(-1 if red == "none" else ()).reshape((3, 5) if red == "none" else ()),
                                  h, W, b)
            assert_all_close(ours, ref, what=f"shift {policy} {red}")
            assert ours[1][:, -1].abs().sum() == 0  # the last position predicts nothing
    # 2-D input: one sequence
    h2, t2 = h[0], t[0]
    ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t2, linear_bias=b, shift=True), h2, W, b)
    ref = value_and_grads(lambda h, W, b: F.cross_entropy(F.linear(h[:-1], W, b), t2[1:]), h2, W, b)
    assert_all_close(ours, ref)


@pytest.mark.parametrize("policy", POLICIES)
def test_z_loss_softcap_and_stats(policy):
    N, D, V = 17, 8, 45
    h, W, b, t = inputs(N, D, V)
    zl, cap = 1e-2, 3.0

    def ref(h, W, b, red="mean"):
        return reference.cross_entropy(F.linear(h, W, b), t, reduction=red, z_loss=zl, softcap=cap,
                                       label_smoothing=0.1)
    opts = Opts(acc_policy=policy, chunk_size=5, chunk_bytes=5 * 64 * 8)
    for red in ("mean", "none"):
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, z_loss=zl, softcap=cap,
                                                                    label_smoothing=0.1, reduction=red, options=opts),
                               h, W, b)
        assert_all_close(ours, value_and_grads(lambda h, W, b: ref(h, W, b, red), h, W, b), what=red)
    st = linear_cross_entropy_with_stats(h, W, t, linear_bias=b, z_loss=zl, softcap=cap, options=opts)
    assert isinstance(st, crossent.CrossEntropyOutput)
    lse = reference.logsumexp(F.linear(h, W, b), 1, cap)
    torch.testing.assert_close(st.lse, lse)
    valid = t != -100
    torch.testing.assert_close(st.z_loss, (zl * lse[valid] ** 2).sum() / valid.sum())


def test_inplace_permission():
    h, W, b, t = inputs(20, 8, 33, bias=False)
    T[0] = t
    ref = value_and_grads(eager_ce(), h, W, None)
    hh = h.clone().requires_grad_()
    x = hh * 1.0  # a non-leaf whose storage may be reused
    x.retain_grad()
    WW = W.clone().requires_grad_()
    loss = linear_cross_entropy(x, WW, t, options=Opts(allow_inplace=True, chunk_size=6))
    loss.backward(torch.tensor(1.7, dtype=loss.dtype))
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(hh.grad, ref[1])
    torch.testing.assert_close(WW.grad, ref[2])
    assert torch.equal(x.detach(), hh.grad)  # the hidden states' storage now holds the gradient


def test_compile_fullgraph():
    h, W, b, t = inputs(30, 8, 40, dtype=torch.float32)
    T[0] = t

    def f(h, W, b):
        return linear_cross_entropy(h, W, t, linear_bias=b, options=Opts(chunk_size=8), z_loss=1e-3)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_all_close(value_and_grads(cf, h, W, b), value_and_grads(f, h, W, b), tol=1e-5)


def test_determinism():
    h, W, b, t = inputs(50, 8, 70, dtype=torch.float32)
    def f(h, W, b):
        return linear_cross_entropy(h, W, t, linear_bias=b, options=Opts(chunk_size=7))
    a, c = value_and_grads(f, h, W, b), value_and_grads(f, h, W, b)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- issue 9 regressions
@pytest.mark.parametrize("policy", POLICIES)
def test_small_integer_targets_compare_ignore_index_exactly(policy):
    """A uint8 target 156 is class 156 under ignore_index=-100 (uint8 would
    wrap -100 to 156), and 3 is class 3 under ignore_index=259."""
    N, D, V = 4, 8, 200
    h, W, b, _ = inputs(N, D, V)
    opts = Opts(acc_policy=policy, chunk_size=3)
    t = torch.tensor([156, 3, 156, 199], dtype=torch.uint8)
    for ii in (None, 259):
        kw = {} if ii is None else {"ignore_index": ii}
        for red in ("none", "mean"):
            ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                                        options=opts, **kw), h, W, b)
            ref = value_and_grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, reduction=red, **kw), h, W, b)
            assert_all_close(ours, ref, what=f"{t.dtype} {red}")
            assert torch.isfinite(ours[0]).all()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_common_offset_costs_no_accuracy_beyond_torch(policy, offset):
    """A common offset in the logits (here through the bias, which softmax
    ignores) costs no accuracy beyond torch's own fp32 error (tests/_tol.py)."""
    N, D, V = 48, 16, 120
    h, W, b, t = inputs(N, D, V)
    b = b + offset
    opts = Opts(acc_policy=policy, chunk_size=16)
    for red in ("sum", "none"):
        ref = value_and_grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, reduction=red), h, W, b)
        f32 = [v.float() for v in (h, W, b)]
        tor = value_and_grads(lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t, reduction=red), *f32)
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction=red,
                                                                    options=opts), *f32)
        for i, name in enumerate(("d input", "d weight", "d bias"), 1):
            assert_close_to_ref(ours[i], tor[i], ref[i], what=f"{policy} {red} {name}")
        # The loss is the CE backend's (crossent.cross_entropy's kernels, issue 9
        # item 4 there): the linear path must add nothing to that backend's
        # error on the same fp32 logits, and be within torch's bound once the
        # backend is.
        ce = crossent.cross_entropy(F.linear(*f32), t, reduction=red)
        e_ours, e_ce = (ours[0].double() - ref[0]).abs().max(), (ce.double() - ref[0]).abs().max()
        if e_ours > 1.5 * e_ce:
            assert_close_to_ref(ours[0], tor[0], ref[0], what=f"{policy} {red} loss")


def test_triton_interpreter_tier():
    """CROSSENT_BACKEND=triton under TRITON_INTERPRET=1, in a subprocess (env
    read at import): the CE kernel writes each chunk's gradient over its own
    logits; several, one and tile-multiple chunks; uint8 targets (156 is a
    class, not -100 wrapped)."""
    pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(crossent.__file__), "backends", "triton", "__init__.py")):
        pytest.skip("no triton backend")
    code = (
        "import torch, torch.nn.functional as F\n"
        "from crossent.linear import linear_cross_entropy, linear_cross_entropy_plan, LinearCrossEntropyOptions as O\n"
        "from crossent import backends\n"
        "assert backends.name_for('cpu') == 'triton'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "N, D, V = 300, 8, 160\n"
        "h = torch.randn(N, D, generator=g, requires_grad=True)\n"
        "W = torch.randn(V, D, generator=g, requires_grad=True)\n"
        "b = torch.randn(V, generator=g, requires_grad=True)\n"
        "t = torch.randint(0, V, (N,), generator=g, dtype=torch.uint8); t[::7] = 156; t[2] = 3\n"
        "def grads(f):\n"
        "  h.grad = W.grad = b.grad = None; f().backward()\n"
        "  return h.grad.clone(), W.grad.clone(), b.grad.clone()\n"
        "ref = grads(lambda: F.cross_entropy(F.linear(h, W, b), t, ignore_index=3, label_smoothing=0.1))\n"
        "for pol in ('accurate', 'compact'):  # compact's token chunk: its whole budget on this backend\n"
        "  for o, chunks in ((O(acc_policy=pol, chunk_size=64), 5), (O(acc_policy=pol, chunk_bytes=N * V * 4), 1),\n"
        "                    (O(acc_policy=pol, chunk_bytes=150 * V * 4), 3)):\n"
        "    assert linear_cross_entropy_plan(h, W, options=o).num_chunks == chunks, (pol, o)\n"
        "    a = grads(lambda: linear_cross_entropy(h, W, t, linear_bias=b, ignore_index=3, options=o,\n"
        "                                           label_smoothing=0.1))\n"
        "    for x, y in zip(a, ref): torch.testing.assert_close(x, y)\n"
        "print('OK')\n")
    env = dict(os.environ, CROSSENT_BACKEND="triton", TRITON_INTERPRET="1")
    src = os.path.dirname(os.path.dirname(crossent.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "cannot run on cpu" in (r.stderr + r.stdout):
        pytest.skip("triton backend unavailable on CPU here")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
