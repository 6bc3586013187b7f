"""linear_cross_entropy(acc_policy="compact") on the Triton backend, under the interpreter:
the block-gradient kernel (backends/triton/block_grad.py) against the torch backend's
block_grad_ and a float64 reference; the whole compact path against the float64
composition, torch's same-dtype composition and the torch backend; its plan (token chunks
of the whole budget, vocabulary blocks without an fp32 copy) and its memory bound; the
kernel compiled for sm_90 (registers, no spills)."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", minversion="3.6")  # backends.triton.MIN_TRITON
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton interpreter runs these on CPU tensors", allow_module_level=True)

from _linear_cases import inputs, profile_peak  # noqa: E402
from _tol import assert_close_to_ref  # noqa: E402

from crossent import reference  # noqa: E402
from crossent.backends import torch_block  # noqa: E402
from crossent.backends.triton import TritonBackend, block_grad as BG  # noqa: E402
from crossent.linear import LinearCrossEntropyOptions as Opts, linear_cross_entropy, \
    linear_cross_entropy_plan  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 rows x 32 classes, so tiny blocks take several programs each way."""
    monkeypatch.setattr(BG, "_TILE_ELEMS", 256)
    monkeypatch.setattr(BG, "_MAX_BLOCK_V", 32)


# ----------------------------------------------------------------------------- the kernel alone

CASES = [  # weight, label smoothing, z_loss, softcap, probability targets, per-row scale
    (False, 0.0, 0.0, 0.0, False, False),
    (True, 0.0, 0.0, 0.0, False, True),
    (False, 0.1, 1e-3, 0.0, False, True),
    (True, 0.2, 1e-3, 5.0, False, False),
    (True, 0.1, 1e-3, 5.0, True, True),
    (False, 0.0, 0.0, 3.0, True, False),
]


def _block_case(dtype, weighted, eps, zl, cap, prob, per_row, R=21, C=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset (the kernel works relative to the saved lse), but not one that saturates softcap
    z = torch.randn(R, C, generator=g, dtype=torch.float64) * 4 + (0 if cap else 50)
    w = torch.rand(C, generator=g, dtype=torch.float64).float() + 0.1 if weighted else None
    if prob:
        t = torch.softmax(torch.randn(R, C, generator=g, dtype=torch.float64), 1).float()
    else:
        t = torch.randint(0, C, (R,), generator=g)
        t[::4] = -100
    scale = (torch.rand(R, generator=g) + 0.5) if per_row else torch.tensor(1.3)
    return z.to(dtype), t, w, scale


def _ref_grad(z, t, w, eps, zl, cap, scale, dtype):
    """d(sum scale*loss)/dz by torch's autograd through reference.cross_entropy, in ``dtype``."""
    z = z.detach().to(dtype).requires_grad_(True)
    loss = reference.cross_entropy(z, t.to(dtype) if t.is_floating_point() else t,
                                   None if w is None else w.to(dtype), -100, "none", eps, z_loss=zl,
                                   softcap=cap or None)
    loss.backward(scale.to(dtype).expand(loss.shape))
    return z.grad.detach()


def _tw_sum(t, w, eps, C):
    if not t.is_floating_point():
        return None
    tt = t * (1 - eps) + eps / C
    return (tt if w is None else tt * w).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_block_grad_kernel(small_tiles, dtype, case):
    """Blocks at the start, middle (a partial program at the end) and end of the classes:
    the kernel within the tolerance rule of torch's own same-dtype gradient against float64,
    and within an ulp or two of the torch backend's block_grad_ (fp32 math, rounded once)."""
    weighted, eps, zl, cap, prob, per_row = case
    z, t, w, scale = _block_case(dtype, weighted, eps, zl, cap, prob, per_row)
    C = z.shape[1]
    zc = cap * torch.tanh(z.double() / cap) if cap else z.double()
    lse = torch.logsumexp(zc, 1).float()
    ref = _ref_grad(z, t, w, eps, zl, cap, scale, torch.float64)
    theirs = _ref_grad(z, t, w, eps, zl, cap, scale, dtype)
    tw = _tw_sum(t, w, eps, C)
    for v0, vb in ((0, 40), (40, 77), (117, 33)):
        ours = z[:, v0:v0 + vb].clone()
        assert BG.block_grad_(ours, v0, C, t, lse, scale, w, -100, eps, zl, cap, tw) is ours
        assert_close_to_ref(ours, theirs[:, v0:v0 + vb], ref[:, v0:v0 + vb], dtype, what=f"{case} [{v0}:+{vb}]")
        portable = torch_block.block_grad_(z[:, v0:v0 + vb].clone(), v0, C, t, lse, scale, w, -100, eps, zl, cap,
                                           tw)
        ulps = 2 * torch.finfo(dtype).eps * ref[:, v0:v0 + vb].abs().max().item()
        torch.testing.assert_close(ours.double(), portable.double(), atol=ulps, rtol=0)


def test_block_grad_kernel_ignored_and_out_of_range_rows(small_tiles):
    """Ignored rows are exact zeros whatever their scale (inf too); a counted target outside
    [0, C) gives a NaN row (never an out-of-bounds read), as the torch backend's; a target in
    another block contributes no hot term here."""
    C, v0, vb = 90, 30, 40
    z, t, w, _ = _block_case(torch.float32, True, 0.1, 0.0, 0.0, False, True, R=9, C=C)
    t = torch.tensor([-100, 5, 200, 35, -100, -1, 69, 70, 30])
    scale = torch.tensor([float("inf"), 1.0, 1.0, 2.0, float("nan"), 1.0, 1.0, 1.0, 1.0])
    lse = torch.logsumexp(z, 1)
    ours = z[:, v0:v0 + vb].clone()
    BG.block_grad_(ours, v0, C, t, lse, scale, w, -100, 0.1, 0.0, 0.0, None)
    portable = torch_block.block_grad_(z[:, v0:v0 + vb].clone(), v0, C, t, lse, scale, w, -100, 0.1, 0.0, 0.0, None)
    assert torch.equal(ours[[0, 4]], torch.zeros(2, vb))
    assert ours[[2, 5]].isnan().all() and not ours[[1, 3, 6, 7, 8]].isnan().any()
    torch.testing.assert_close(ours, portable, equal_nan=True)


def test_block_grad_strided_target_and_empty_block():
    """A probability target read through its own strides (a transposed view); an empty block
    launches nothing."""
    z, t, w, scale = _block_case(torch.float32, True, 0.1, 0.0, 0.0, True, True, R=6, C=50)
    t = t.t().contiguous().t()   # column-major (6, 50)
    lse = torch.logsumexp(z, 1)
    tw = _tw_sum(t, w, 0.1, 50)
    ours = z[:, 10:30].clone()
    BG.block_grad_(ours, 10, 50, t, lse, scale, w, -100, 0.1, 0.0, 0.0, tw)
    ref = _ref_grad(z, t, w, 0.1, 0.0, 0.0, scale, torch.float64)[:, 10:30]
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    empty = z[:0, :5].clone()
    assert BG.block_grad_(empty, 0, 50, t[:0], lse[:0], scale[:0], w, -100, 0.1, 0.0, 0.0, tw[:0]) is empty


# ----------------------------------------------------------------------------- the compact path

E2E = [  # reduction, weight, label smoothing, z_loss, softcap, shift, probability targets
    ("mean", False, 0.0, 0.0, None, False, False),
    ("sum", True, 0.1, 0.0, None, False, False),
    ("none", False, 0.0, 1e-3, 4.0, False, False),
    ("mean", True, 0.0, 0.0, None, True, False),
    ("mean", False, 0.1, 0.0, None, False, True),
]


def _run_lce(backend, monkeypatch, h, W, b, t, kw, opts):
    monkeypatch.setenv("CROSSENT_BACKEND", backend)
    h, W, b = (v.detach().clone().requires_grad_(True) for v in (h, W, b))
    out = linear_cross_entropy(h, W, t, linear_bias=b, options=opts, **kw)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(gout.to(out.dtype) if out.dim() else torch.tensor(1.7, dtype=out.dtype))
    return [out.detach(), h.grad, W.grad, b.grad]


def _composition(h, W, b, t, kw, dtype):
    """reference.cross_entropy(F.linear(...)) in ``dtype``: float64 is the reference, the
    input dtype is torch's own error."""
    h, W, b = (v.detach().to(dtype).requires_grad_(True) for v in (h, W, b))
    hh, tt = (h[:, :-1], t[:, 1:]) if kw["shift"] else (h, t)
    logits = F.linear(hh, W, b).reshape(-1, W.shape[0])
    tt = tt.reshape(-1, W.shape[0]).to(dtype) if tt.is_floating_point() else tt.reshape(-1)
    out = reference.cross_entropy(logits, tt, None if kw["weight"] is None else kw["weight"].to(dtype),
                                  -100, kw["reduction"], kw["label_smoothing"], z_loss=kw["z_loss"],
                                  softcap=kw["softcap"])
    if kw["reduction"] == "none" and kw["shift"]:
        out = out.reshape(t.shape[0], -1)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(gout.to(out.dtype) if out.dim() else torch.tensor(1.7, dtype=out.dtype))
    return [out.detach(), h.grad, W.grad, b.grad]


@pytest.mark.parametrize("dtype,case", [pytest.param(torch.float32, c, id=f"fp32-{i}") for i, c in enumerate(E2E)]
                         + [pytest.param(torch.bfloat16, c, id=f"bf16-{i}") for i, c in enumerate(E2E) if i])
def test_compact_matches_torch(small_tiles, monkeypatch, dtype, case):
    """Several token chunks and several vocabulary blocks (the last one partial): loss and
    the gradients of input, weight and bias within the tolerance rule against the float64
    composition, and close to the torch backend's compact; every block's gradient came
    from the Triton kernel."""
    red, weighted, eps, zl, cap, shift, prob = case
    N, D, V = 48, 16, 200
    h, W, b, t = inputs(N, D, V, dtype=dtype, prob=prob, batch=(3, N // 3) if shift else None)
    wt = (torch.rand(V, generator=torch.Generator().manual_seed(1)) + 0.1).to(dtype) if weighted else None
    kw = dict(reduction=red, weight=wt, label_smoothing=eps, z_loss=zl, softcap=cap, shift=shift)
    opts = Opts(acc_policy="compact", chunk_size=16, chunk_bytes=N * h.element_size() * 64)
    plan = linear_cross_entropy_plan(h, W, options=opts, shift=shift)
    assert plan.num_chunks >= 3 and plan.vocab_block < V, plan
    calls = []

    def spy(z, v0, *a):
        calls.append((v0, z.shape[1]))
        return BG.block_grad_(z, v0, *a)
    monkeypatch.setattr(TritonBackend, "block_grad_", staticmethod(spy))
    ours = _run_lce("triton", monkeypatch, h, W, b, t, kw, opts)
    assert len({v0 for v0, _ in calls}) >= 2 and sum(vb for _, vb in set(calls)) == V, calls
    portable = _run_lce("torch", monkeypatch, h, W, b, t, kw, opts)
    ref = _composition(h, W, b, t, kw, torch.float64)
    theirs = _composition(h, W, b, t, kw, dtype)
    for name, o, p, th, r in zip(("loss", "dx", "dW", "db"), ours, portable, theirs, ref):
        assert_close_to_ref(o, th, r, dtype, what=f"{case} {name}")
        assert_close_to_ref(o, p, r, dtype, what=f"{case} {name} vs the torch backend")


def test_compact_plan_uses_the_whole_budget_on_triton(monkeypatch):
    """The Triton backend writes the gradient over the logits with no temporaries of their
    size: compact's token chunk takes the whole budget (the torch backend a quarter), and the
    vocabulary blocks need no fp32 copy (twice as wide in bf16 as the torch backend's)."""
    h, W = torch.empty(8192, 64, dtype=torch.bfloat16), torch.empty(32000, 64, dtype=torch.bfloat16)
    budget = 64 << 20
    plans = {}
    for be in ("triton", "torch"):
        monkeypatch.setenv("CROSSENT_BACKEND", be)
        plans[be] = linear_cross_entropy_plan(h, W, options=Opts(acc_policy="compact", chunk_bytes=budget))
        assert plans[be].extra_bytes == budget
    tri, tor = plans["triton"], plans["torch"]
    assert tri.chunk_size * 32000 * 2 <= budget < 2 * tri.chunk_size * 32000 * 2, tri
    assert tri.num_chunks * 4 <= tor.num_chunks + 4 and tor.chunk_size * 32000 * 2 <= budget // 4, (tri, tor)
    assert 8192 * tri.vocab_block * 2 <= budget and tri.vocab_block >= 3 * tor.vocab_block - 64, (tri, tor)


def test_compact_memory_bound_on_triton(monkeypatch):
    """compact's promise on the Triton backend, whose chunks now take the whole budget:
    extra memory <= the gradients + chunk_bytes + O(N + V) vectors (the CPU allocator's
    peak over forward + backward), and the token pass did run in several chunks.  fp32:
    a CPU bf16 GEMM allocates fp32 copies of its operands (a GPU's allocates nothing)."""
    dtype = torch.float32
    from triton.runtime.interpreter import GridExecutor
    launch = GridExecutor.__call__

    def collected(self, *args, **kwargs):
        # The interpreter leaves reference cycles that hold its arguments' storage until the
        # next garbage collection (a GPU launch holds nothing): collect them at once, so a
        # buffer is freed when crossent drops it, as on the device.
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect()
    monkeypatch.setattr(GridExecutor, "__call__", collected)
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    N, D, V = 128, 32, 1024
    h, W, _, t = inputs(N, D, V, dtype=dtype, bias=False)
    budget = N * V * h.element_size() // 2   # half the logits
    h.requires_grad_(True)
    W.requires_grad_(True)
    opts = Opts(acc_policy="compact", chunk_bytes=budget)
    plan = linear_cross_entropy_plan(h, W, options=opts)
    assert plan.num_chunks >= 2 and plan.chunk_size * V * h.element_size() > budget // 2, plan

    def step():
        linear_cross_entropy(h, W, t, options=opts).backward()

    step()
    h.grad = W.grad = None
    peak = profile_peak(step)
    grads = (h.numel() + W.numel()) * h.element_size()
    assert peak <= grads + budget + 32 * (N + V), (peak, grads, budget)


# ----------------------------------------------------------------------------- compiled for sm_90

def _has_toolchain() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((tools / t).exists() for t in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not _has_toolchain(), reason="this triton build has no NVIDIA backend or no ptxas / cuobjdump")
def test_block_grad_kernel_compiles_for_sm90(tmp_path):
    """The kernel compiles for sm_90 in bf16 with no flag, each flag alone and all of them
    (class-index and probability targets), fp16 and fp32, at the production tile, with no
    spills and registers for >= 4 CTAs of 4 warps per SM."""
    script = r"""
import sys
sys.path.insert(0, sys.argv[1])
import _aot_compile as A  # unsets TRITON_INTERPRET before importing triton
from crossent.backends.triton import block_grad as BG
ok = True
br, bv = BG.tile(8192, 16384)
alone = [tuple(i == j for j in range(5)) for i in range(5)]   # each flag alone
for xdt, flags in [("bf16", (False,) * 5), *(("bf16", f) for f in alone), ("bf16", (True, False, True, True, True)),
                   ("bf16", (True,) * 5), ("fp16", (True,) * 5), ("fp32", (False,) * 5)]:
    consts = dict(zip(("HAS_W", "PROB", "SMOOTH", "HAS_ZL", "HAS_CAP"), flags), BLOCK_R=br, BLOCK_V=bv)
    args = dict(z_ptr=A.Ptr(xdt), sz_r=16384, t_ptr=A.Ptr("fp32" if flags[1] else "i64"), st_r=128256,
                st_c=1, w_ptr=A.Ptr("fp32"), lse_ptr=A.Ptr("fp32"), lo_ptr=A.Ptr("fp32"), scale_ptr=A.Ptr("fp32"),
                scale_stride=1,
                p1_ptr=A.Ptr("fp32"), R=8192, VB=16384, v0=32768, C=128256, n_vblk=16, ignore_index=-100,
                one_m_eps=0.9, eps_over_c=1e-6, z_loss=1e-4, cap=30.0)
    try:
        res = A.cubin_usage(A.compile_kernel(BG._block_grad_kernel, args, consts, dict(num_warps=4)).asm["cubin"])
    except Exception as e:  # noqa: BLE001
        print(f"FAIL {xdt} {consts}: {type(e).__name__}: {e}")
        ok = False
        continue
    good = res["local"] == 0 and res["stack"] == 0 and A.ctas_per_sm(res["regs"], res["shared"], 4) >= 4
    ok &= good
    print(f"{'OK  ' if good else 'FAIL'} {xdt} {consts} regs {res['regs']} local {res['local']}")
print("ALL OK" if ok else "SOME FAILED")
"""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here.parent / "src"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", script, str(here)], env=env, capture_output=True, text=True,
                         timeout=600)
    print(out.stdout)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]


# ----------------------------------------------------------------------------- the GPU benchmark's profile

@pytest.mark.parametrize("flag", [False, True])
def test_gpu_linear_bench_profile_is_opt_in(tmp_path, flag):
    """benchmarks/gpu_linear_bench.py --profile (off by default): its dry run names what it
    would profile, at the first shape of the run."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_linear_bench.py"
    argv = [sys.executable, str(bench), "--dry-run", "--json", str(tmp_path / "b.json"), "--shapes", "64x8x100,32x8x50"]
    out = subprocess.run(argv + (["--profile"] if flag else []), capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(bench.parents[1] / "src")))
    assert out.returncode == 0, out.stderr[-3000:]
    line = "then profile: crossent-accurate, crossent-compact at 64x8x100 (three fwd+bwd each"
    assert (line in out.stdout) == flag, out.stdout
