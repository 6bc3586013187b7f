"""The linear head's plan, chunking and memory: chunk counts and sizes,
the chunk-rows rule, compact's memory bound (the CPU allocator's peak), dW's
first GEMM, the fallback without an fp32-output GEMM, and auto's choice from
free memory."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from crossent import _linear_ops, linear as L
from crossent.linear import LinearCrossEntropyOptions as Opts, linear_cross_entropy, linear_cross_entropy_plan
from _linear_cases import POLICIES, T, assert_all_close, eager_ce, inputs, profile_peak, rel_err, value_and_grads


@pytest.mark.parametrize("policy", POLICIES)
def test_one_chunk_and_tile_multiple_chunks(policy):
    """One chunk when the budget allows it; else equal chunks of a multiple of
    the GEMM tile (128 rows on CPU).  Same results as eager and, from torch
    2.13 on, as torch's F.linear_cross_entropy (CI's older tiers run the rest)."""
    N, D, V = 300, 8, 64
    h, W, b, t = inputs(N, D, V)
    T[0] = t
    ref = value_and_grads(eager_ce("sum"), h, W, b)
    for budget, want in ((N * V * 8, 1), (200 * V * 8, 3)):
        opts = Opts(acc_policy=policy, chunk_bytes=budget * (4 if policy == "compact" else 1))
        plan = linear_cross_entropy_plan(h, W, options=opts)
        assert plan.num_chunks == want, plan
        assert want == 1 or plan.chunk_size % 128 == 0, plan
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, reduction="sum",
                                                                    options=opts), h, W, b)
        assert_all_close(ours, ref, what=f"{policy} {plan}")
        if hasattr(F, "linear_cross_entropy"):
            tor = value_and_grads(lambda h, W, b: F.linear_cross_entropy(h, W, t, linear_bias=b, reduction="sum"),
                                  h, W, b)
            assert_all_close(ours, tor, what="vs torch F.linear_cross_entropy")


@pytest.mark.parametrize("N,cap,tile", [(1000, 1000, 128), (1000, 900, 128), (1000, 300, 128),
                                        (4097, 2048, 256), (7, 3, 128), (513, 129, 128)])
def test_chunk_rows_rule(N, cap, tile):
    rows = L._chunk_rows(N, 1, cap, tile)
    k = -(-N // rows)
    assert rows <= max(cap, 1)
    if N <= cap:
        assert rows == N
    elif cap >= tile:
        assert rows % tile == 0
        # the fewest tile-multiple chunks that fit: one chunk fewer would not
        assert -(-(-(-N // (k - 1))) // tile) * tile > cap if k > 1 else True


@pytest.mark.parametrize("dtype,softcap,shift", [(torch.float32, None, False), (torch.bfloat16, 5.0, False),
                                                 (torch.float32, None, True)])
def test_compact_memory_bound(dtype, softcap, shift):
    """compact's promise: extra memory <= the gradients + chunk_bytes (default
    256 MiB), plus O(N + V) per-token / per-class vectors (loss, lse, target
    as int64), measured as the CPU allocator's peak over forward + backward."""
    N, D, V, budget = 1024, 64, 8192, 8 << 20  # eager's logits: 32 MiB in fp32
    h, W, _, t = inputs(N, D, V, dtype=dtype, bias=False, batch=(4, N // 4) if shift else None)
    h.requires_grad_(True)
    W.requires_grad_(True)
    opts = Opts(acc_policy="compact", chunk_bytes=budget)

    def step():
        linear_cross_entropy(h, W, t, options=opts, softcap=softcap, shift=shift).backward()

    step()  # warm-up: lazy imports and one-time buffers
    h.grad = W.grad = None
    peak = profile_peak(step)
    grads = (h.numel() + W.numel()) * h.element_size()
    assert peak <= grads + budget + 32 * (N + V), (peak, grads, budget)
    h.grad = W.grad = None
    eager = profile_peak(lambda: F.cross_entropy(F.linear(h, W).reshape(-1, V), t.reshape(-1)).backward())
    assert eager > grads + N * V * h.element_size()  # the measurement sees the logits it must see


def test_accurate_first_chunk_writes_dw_with_beta_zero():
    """Several chunks: the first chunk's GEMM writes the dW accumulator
    (beta=0), so no V x D zero-fill and no V x D add happen."""
    from torch.profiler import ProfilerActivity, profile
    N, D, V = 96, 8, 40
    h, W, _, t = inputs(N, D, V, dtype=torch.float32, bias=False)
    h.requires_grad_(True)
    W.requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        linear_cross_entropy(h, W, t, options=Opts(chunk_size=32)).backward()
    vd = [e for e in prof.events() if [V, D] in [list(s) for s in e.input_shapes]]
    names = {e.name for e in vd}
    assert "aten::mm" in names and "aten::addmm_" in names, names
    assert not names & {"aten::zero_", "aten::fill_", "aten::zeros", "aten::add_"}, names


def test_missing_fp32_output_gemm_warns_once(monkeypatch):
    """Simulated on CPU (whose torch has no float32-output bf16 GEMM): a
    device expected to have it warns once, naming the torch version, and the
    fallback (each chunk's bf16 product, rounded once, summed in fp32) stays
    within sqrt(chunks) of eager's dW error (4 chunks here: 2x)."""
    monkeypatch.setattr(_linear_ops, "_FP32_OUT_GEMM_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_linear_ops, "_fp32_out_gemm", {})
    N, D, V = 64, 32, 300
    h, W, b, t = inputs(N, D, V, dtype=torch.bfloat16)
    T[0] = t
    opts = Opts(chunk_size=16)
    with pytest.warns(RuntimeWarning, match=re.escape(f"torch {torch.__version__} has no float32-output")):
        ours = value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=opts), h, W, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value_and_grads(lambda h, W, b: linear_cross_entropy(h, W, t, linear_bias=b, options=opts), h, W, b)
    eager = value_and_grads(eager_ce(), h, W, b)
    ref = value_and_grads(eager_ce(), h.double(), W.double(), b.double())
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        bound = (2.0 if i == 2 else 1.05) * rel_err(e, r) + 1e-3
        assert rel_err(o, r) <= bound, (i, rel_err(o, r), rel_err(e, r))


def test_auto_plan_from_free_memory(monkeypatch):
    """On an accelerator, auto picks from free memory: one chunk when it fits
    in half the room beyond the gradients; else tile-multiple chunks (256 rows)
    with the fp32 accumulator; compact when that accumulator would not fit."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    for (N, D, V), room, policy, chunks in (((8192, 4096, 128256), 80 << 30, "accurate", 1),
                                            ((65536, 1024, 32000), 4 << 30, "accurate", 2),
                                            ((8192, 4096, 128256), 3 << 30, "compact", None)):
        grads = (N + V) * D * 2
        monkeypatch.setattr(L, "_free_bytes", lambda device, free=grads + room: free)
        plan, _ = L._plan(N, D, V, bf16, dev, Opts(), "triton")
        assert plan.policy == policy, (room, plan)
        if chunks == 1:
            assert plan.num_chunks == 1 and plan.extra_bytes == N * V * 2
        elif chunks:
            assert plan.num_chunks >= 2 and plan.chunk_size % 256 == 0, plan
            assert plan.extra_bytes <= room, plan
        else:
            assert plan.extra_bytes == 256 << 20 and plan.flops == 8 * N * D * V
    N, D, V = 8192, 4096, 128256
    monkeypatch.setattr(L, "_free_bytes", lambda device: None)  # unknown (torch.compile): 1 GiB chunks
    plan, _ = L._plan(N, D, V, bf16, dev, Opts(), "triton")
    assert plan.policy == "accurate" and plan.chunk_size * V * 2 <= 1 << 30 and plan.chunk_size % 256 == 0
    assert L._plan(N, D, V, bf16, dev, Opts(acc_policy="balanced"), "triton")[0].policy == "accurate"
