"""crossent.distributed under torch.compile(fullgraph=True), on CPU.

The four vocab-parallel functions trace whole (forward and backward, with
the aot_eager and inductor backends) on a one-rank gloo group in this process
and on two spawned ranks (tests/_dist.py), and give eager's values and
gradients within tests/_tol.py's rule against a float64 eager run.  While
compiling, the checks that read the host (the slice fits, the class weight's
size, the class indices) are skipped as on an accelerator: an out-of-range
class target gives the NaN loss row and NaN gradient row of single-process
crossent compiled (README, deliberate difference 3), and eager CPU still
raises torch's IndexError.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import crossent
from _dist import Checker, check, worker_main
from _tol import assert_close_to_ref

HERE = os.path.abspath(__file__)
V, D, ROWS = 7, 5, 5
SPLITS = {1: [7], 2: [3, 4]}


def _case(name: str, rank: int, world: int, dtype: torch.dtype = torch.float32):
    """(fn, shards): fn(*shards) -> tuple of outputs, computed from this rank's
    shards; the same data on every rank (seeded), sliced to [lo, hi)."""
    import crossent.distributed as Dist

    sizes = SPLITS[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    t = torch.randint(0, V, (ROWS,), generator=g)
    t[1] = -100
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
    x = (torch.randn(ROWS, V, generator=g, dtype=torch.float64) * 3)[:, lo:hi]
    h = torch.randn(ROWS, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)[lo:hi]
    b = torch.randn(V, generator=g, dtype=torch.float64)[lo:hi]
    p = torch.softmax(torch.randn(ROWS, V, generator=g, dtype=torch.float64), 1)[:, lo:hi].to(dtype)
    w = w.to(dtype)
    fns = {
        "ce": (lambda x: (Dist.vocab_parallel_cross_entropy(x, t),), [x]),
        "ce_options": (lambda x: (Dist.vocab_parallel_cross_entropy(
            x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="none",
            vocab_start_index=lo),), [x]),
        "ce_prob": (lambda x: (Dist.vocab_parallel_cross_entropy(x, p, label_smoothing=0.1, reduction="sum"),),
                    [x]),
        "linear_ce": (lambda h, W, b: (Dist.vocab_parallel_linear_cross_entropy(h, W, t, linear_bias_shard=b),),
                      [h, W, b]),
        "linear_ce_options": (lambda h, W, b: (Dist.vocab_parallel_linear_cross_entropy(
            h, W, t, linear_bias_shard=b, weight=w, label_smoothing=0.1, chunk_size=2),), [h, W, b]),
        "log_probs": (lambda x: (Dist.vocab_parallel_log_probs(x, t, temperature=0.7).log_probs,), [x]),
        "log_probs_entropy": (lambda x: tuple(Dist.vocab_parallel_log_probs(x, t, entropy=True)), [x]),
        # a transposed shard (the kernels' out= buffers follow its layout)
        "log_probs_transposed": (lambda xt: tuple(Dist.vocab_parallel_log_probs(
            xt.t(), t, temperature=0.7, entropy=True)), [x.t().contiguous()]),
        "linear_log_probs_entropy": (lambda h, W, b: tuple(Dist.vocab_parallel_linear_log_probs(
            h, W, t, linear_bias_shard=b, entropy=True)), [h, W, b]),
        "linear_log_probs_options": (lambda h, W, b: tuple(Dist.vocab_parallel_linear_log_probs(
            h, W, t, linear_bias_shard=b, temperature=0.7, entropy=True, vocab_start_index=lo,
            chunk_size=2)), [h, W, b]),
    }
    fn, shards = fns[name]
    return fn, [s.to(dtype).requires_grad_() for s in shards]


CASES = ["ce", "ce_options", "ce_prob", "linear_ce", "linear_ce_options", "log_probs", "log_probs_entropy",
         "log_probs_transposed", "linear_log_probs_entropy", "linear_log_probs_options"]
# Each function once, in one graph: an inductor compile costs 5-30 s here, and a spawned rank's more.
SIMPLE = ["ce", "linear_ce", "log_probs_entropy", "linear_log_probs_entropy"]
OPTIONS = ["ce_options", "ce_prob", "linear_ce_options", "log_probs", "linear_log_probs_options"]


def _combined(names, rank, world, dtype=torch.float32):
    """Several cases as one fn over the concatenated shards."""
    parts = [_case(n, rank, world, dtype) for n in names]
    counts = [len(s) for _, s in parts]

    def fn(*shards):
        outs, i = (), 0
        for (f, _), k in zip(parts, counts):
            outs, i = outs + f(*shards[i:i + k]), i + k
        return outs
    return fn, [s for _, ss in parts for s in ss]


def _run(fn, shards, upstream_seed: int = 0):
    """Outputs and the gradients of sum(out * g) with seeded upstreams g."""
    outs = fn(*shards)
    g = torch.Generator().manual_seed(upstream_seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, shards, ups)
    return [o.detach() for o in outs] + list(grads)


def compare(names, rank: int, world: int, backend: str, dtype: torch.dtype = torch.float32) -> None:
    """fn compiled (fullgraph=True) against fn eager, both in dtype, judged against fp64 eager."""
    torch._dynamo.reset()
    fn, shards = _combined(names, rank, world, dtype)
    fn64, shards64 = _combined(names, rank, world, torch.float64)
    ours = _run(torch.compile(fn, backend=backend, fullgraph=True), shards)
    theirs, ref = _run(fn, shards), _run(fn64, shards64)
    for i, (o, e, r) in enumerate(zip(ours, theirs, ref)):
        assert_close_to_ref(o, e, r, what=f"{names} {backend} result {i}")


def _oob_pairs():
    """(vocab-parallel fn, single-process fn) pairs on one rank, with a class target of V."""
    import crossent.distributed as Dist

    t = torch.tensor([0, V, 3, -100, 6])
    return [
        (lambda x: (Dist.vocab_parallel_cross_entropy(x, t, reduction="none"),),
         lambda x: (crossent.cross_entropy(x, t, reduction="none"),)),
        (lambda x: (Dist.vocab_parallel_cross_entropy(x, t, weight=torch.ones(V), label_smoothing=0.1),),
         lambda x: (crossent.cross_entropy(x, t, weight=torch.ones(V), label_smoothing=0.1),)),
        (lambda x: tuple(Dist.vocab_parallel_log_probs(x, t, entropy=True)),
         lambda x: tuple(crossent.log_probs(x, t, entropy=True))),
    ]


# ---------------------------------------------------------------------------
# One rank, in this process
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    import _fuzz
    _fuzz.init_single_process()


@pytest.mark.parametrize("name", CASES)
def test_one_rank_aot_eager(one_rank, name):
    compare([name], 0, 1, "aot_eager")


@pytest.mark.parametrize("name", ["linear_ce_options", "linear_log_probs_options"])
def test_one_rank_bf16_head_first_call(one_rank, name):
    """The heads' backward probes torch for a float32-output bf16 GEMM once per
    process; compiled first, the probe's cache is no side effect of the trace."""
    from crossent import _linear_ops
    _linear_ops._fp32_out_gemm.clear()  # as in a fresh process
    compare([name], 0, 1, "aot_eager", torch.bfloat16)


def test_one_rank_bf16_transposed(one_rank):
    """bf16 rows are copied to fp32 before the kernels write into them with out=."""
    compare(["log_probs_transposed"], 0, 1, "aot_eager", torch.bfloat16)


def test_one_rank_inductor(one_rank):
    compare(SIMPLE, 0, 1, "inductor")


def test_out_of_range_target_is_nan_while_compiling(one_rank):
    """Compiled: single-process crossent's NaN rows (no host check, no
    out-of-bounds read); eager on CPU: torch's IndexError, as before."""
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    for vp, single in _oob_pairs():
        torch._dynamo.reset()
        ours = _run(torch.compile(vp, backend="aot_eager", fullgraph=True), [x.clone().requires_grad_()])
        theirs = _run(torch.compile(single, backend="aot_eager", fullgraph=True), [x.clone().requires_grad_()])
        assert ours[0].isnan().any() and ours[-1].isnan().any()  # a loss row and a gradient row
        for o, e in zip(ours, theirs):
            torch.testing.assert_close(o, e, equal_nan=True)
        with pytest.raises(IndexError, match=f"Target {V} is out of bounds."):
            vp(x)


# ---------------------------------------------------------------------------
# Two ranks, spawned
# ---------------------------------------------------------------------------
def test_two_ranks():
    check(HERE, 2, "compile", min_cases=2, deadline_s=450)


def _two_rank_cases(ck: Checker, rank: int, world: int):
    runs = [(OPTIONS, "aot_eager"), (SIMPLE, "inductor")]
    for names, backend in runs:
        try:
            compare(names, rank, world, backend)
        except AssertionError as e:
            ck.fail(str(e))
        ck.cases += 1


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main({"compile": [_two_rank_cases]})
