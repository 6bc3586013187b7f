"""Triton backend on CPU through the Triton interpreter (TRITON_INTERPRET=1).

Every TritonBackend method is compared with a float64 implementation of the
formulas in ``crossent/backends/base.py`` written here, independent of the rest
of crossent, and with the portable torch backend where that imports.  Shapes are
tiny because the interpreter is slow; the launch knobs of the kernels are shrunk
(fixture ``path``) so that the looped and split paths run at these sizes too.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", minversion="3.6")  # backends.triton.MIN_TRITON

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from crossent.backends.base import wide_dtype  # noqa: E402
from crossent.backends.triton import TritonBackend, ce, split  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
BE = TritonBackend()


def _torch_backend():
    try:
        from crossent.backends import load
        return load("torch")
    except Exception:
        return None


# ----------------------------------------------------------------------------- reference

def ref_ce(x, target, weight=None, ignore_index=-100, eps=0.0, zl=0.0, cap=0.0, scale=None):
    """float64 loss, lse, grad of sum(scale*loss), straight from base.py."""
    C = x.shape[1]
    kdim = x.dim() == 3
    z = x.double()
    if kdim:
        z = z.movedim(1, -1)
    z = z.reshape(-1, C)
    if cap:
        z = cap * torch.tanh(z / cap)
    lse_out = torch.logsumexp(z, -1)  # the lse returned: torch.logsumexp's (+inf for a +inf logit)
    # a +inf logit: torch's softmax is NaN (inf - inf), and so is the lse the terms use
    lse = torch.where(z.amax(-1) == float("inf"), float("nan"), lse_out)
    w = weight.double() if weight is not None else torch.ones(C, dtype=torch.float64, device=x.device)
    n = z.shape[0]
    sc = torch.ones(n, dtype=torch.float64, device=x.device) if scale is None else \
        scale.double().reshape(-1).expand(n)
    p = torch.exp(z - lse[:, None])
    if target.is_floating_point():
        t = target.double()
        if kdim:
            t = t.movedim(1, -1)
        t = t.reshape(-1, C)
        tp = t * (1 - eps) + eps / C if eps else t
        loss = (w * tp * (lse[:, None] - z)).sum(-1)
        if zl:
            loss = loss + zl * lse ** 2
        dz = sc[:, None] * (p * ((w * tp).sum(-1) + (2 * zl * lse if zl else 0.0))[:, None] - w * tp)
    else:
        y = target.reshape(-1).long()
        m = y != ignore_index
        inb = (y >= 0) & (y < C)
        ys = torch.where(m & inb, y, 0)
        wy = w[ys]
        zy = z.gather(1, ys[:, None])[:, 0]
        loss = (1 - eps) * wy * (lse - zy)
        if zl:
            loss = loss + zl * lse ** 2
        if eps:
            loss = loss + eps / C * (w * (lse[:, None] - z)).sum(-1)
        nan = torch.full_like(loss, float("nan"))
        loss = torch.where(m, torch.where(inb, loss, nan), torch.zeros_like(loss))
        A = (1 - eps) * wy + eps / C * w.sum() + (2 * zl * lse if zl else 0.0)
        B = (1 - eps) * wy[:, None] * torch.nn.functional.one_hot(ys, C).double() + eps / C * w
        dz = sc[:, None] * (p * A[:, None] - B)
        dz = torch.where(m[:, None], torch.where(inb[:, None], dz, float("nan")), p * 0)
    dx = dz * (1 - (z / cap) ** 2) if cap else dz
    out_shape = (x.shape[0],) + tuple(x.shape[2:])
    if kdim:
        dx = dx.reshape(x.shape[0], -1, C).movedim(-1, 1)
    return loss.reshape(out_shape), lse_out.reshape(out_shape), dx.reshape(x.shape)


TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 4e-3), torch.float16: (4e-3, 1e-3),
       torch.float64: (1e-7, 1e-9)}


def check_ce(x, target, *, weight=None, ignore_index=-100, eps=0.0, zl=0.0, cap=0.0, scale=None,
             also_torch=True):
    scale_t = torch.tensor(1.0) if scale is None else scale
    loss, lse, grad = BE.ce_forward(x, target, weight, ignore_index, eps, zl, cap, scale_t, True)
    rl, rlse, rg = ref_ce(x, target, weight, ignore_index, eps, zl, cap, scale)
    assert loss.dtype == wide_dtype(x.device)   # row losses (backends/base.py)
    if x.dtype != torch.float64:
        assert lse.dtype == torch.float32
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous()
    torch.testing.assert_close(loss.double(), rl, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(lse.double(), rlse, rtol=2e-5, atol=2e-5, equal_nan=True)
    rtol, atol = TOL[x.dtype]
    gmax = rg.nan_to_num().abs().max().item() if rg.numel() else 1.0
    torch.testing.assert_close(grad.double(), rg, rtol=rtol, atol=atol * max(gmax, 1e-3), equal_nan=True)
    # forward without gradient, and backward from the saved lse
    l2, lse2, g2 = BE.ce_forward(x, target, weight, ignore_index, eps, zl, cap, scale_t, False)
    assert g2.numel() == 0
    # fp64 rows of fp32 work, whose launch path may change without the gradient: fp32's tolerance
    torch.testing.assert_close(l2, loss, rtol=1.3e-6, atol=1e-5, equal_nan=True)
    gb = BE.ce_backward(x, target, weight, lse, ignore_index, eps, zl, cap, scale_t)
    torch.testing.assert_close(gb.double(), rg, rtol=rtol, atol=atol * max(gmax, 1e-3), equal_nan=True)
    tb = _torch_backend() if also_torch else None
    if tb is not None:
        tl_, _, tg = tb.ce_forward(x, target, weight, ignore_index, eps, zl, cap, scale_t, True)
        torch.testing.assert_close(loss.double(), tl_.double(), rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(grad.double(), tg.double(), rtol=rtol, atol=atol * max(gmax, 1e-3),
                                   equal_nan=True)
    return loss, lse, grad


# ----------------------------------------------------------------------------- launch paths

PATHS = {
    "single": {},
    # one program per row, two passes over C tiles of 32
    # (the mean's W from one claiming program: ce._MEAN_LAUNCH)
    "looped": dict(_SINGLE_MAX=32, _LOOP_BLOCK=32, _TILE_ELEMS=32, _ROW_PATH="twopass", _MEAN_LAUNCH="claim"),
    # several rows per program, looped; the gradient pass walking the tiles forwards
    "multirow": dict(_SINGLE_MAX=32, _LOOP_BLOCK=16, _TILE_ELEMS=64, _ROW_PATH="twopass", _REVERSE=False),
    # rows split into slices of 32 over programs of 3 row groups (split.py, two stages)
    "split": dict(_SINGLE_MAX=32, _SPLIT_BLOCK=32, _ROW_PATH="split"),
    # slices of 16 (NSPLIT not a power of two at most C), 2 row groups, prefetched rows
    "split16": dict(_SINGLE_MAX=16, _SPLIT_BLOCK=16, _SPLIT_GROUPS=2, _SPLIT_PREFETCH=True, _ROW_PATH="split"),
}
_DEFAULTS = {k: getattr(split if hasattr(split, k) else ce, k) for cfg in PATHS.values() for k in cfg}


@pytest.fixture(params=list(PATHS))
def path(request):
    ce.configure(**PATHS[request.param])
    yield request.param
    ce.configure(**_DEFAULTS)


def randn(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, device=DEV) * scale).to(dtype)


# ----------------------------------------------------------------------------- cross-entropy

_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
SHAPE_CASES = (
    # every dtype on the default launch plan ...
    [("single", R, C, dt) for R, C in [(1, 1), (5, 1), (7, 257), (3, 100), (16, 10)]
     for dt in (_F32, _BF16, _F16)]
    # ... and the looped / split paths (tiles of 16-32 classes) on a few shapes
    + [(p, R, C, dt) for p in ("looped", "multirow", "split", "split16")
       for R, C, dt in [(3, 257, _F32), (1, 100, _BF16), (2, 33, _F16)]]
)


@pytest.mark.parametrize("path,R,C,dtype", SHAPE_CASES, indirect=["path"])
def test_ce_shapes_dtypes(R, C, dtype, path):
    torch.manual_seed(R * 1000 + C)
    x = randn(R, C, dtype=dtype)
    y = torch.randint(0, C, (R,), device=DEV)
    check_ce(x, y)


def test_ce_prime_wide():
    torch.manual_seed(0)
    for R, C in [(3, 4099), (1, 4099)]:
        x = randn(R, C)
        check_ce(x, torch.randint(0, C, (R,), device=DEV))


OPTIONS = [
    dict(weight=True),
    dict(ignore=True),
    dict(eps=0.1),
    dict(eps=0.1, weight=True, ignore=True),
    dict(zl=1e-2),
    dict(cap=5.0),
    dict(cap=5.0, eps=0.2, zl=1e-3, weight=True, ignore=True, row_scale=True),
    dict(prob=True),
    dict(prob=True, weight=True, eps=0.1),
    dict(prob=True, zl=1e-2, cap=3.0, row_scale=True),
]


OPT_CASES = [(p, o, _F32) for p in PATHS for o in OPTIONS] + [("single", o, _BF16) for o in OPTIONS]


@pytest.mark.parametrize("path,opt,dtype", OPT_CASES, indirect=["path"],
                         ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_ce_options(opt, dtype, path):
    torch.manual_seed(1)
    R, C = 4, 97
    x = randn(R, C, dtype=dtype, scale=4.0)
    if opt.get("prob"):
        y = torch.softmax(randn(R, C), -1)
    else:
        y = torch.randint(0, C, (R,), device=DEV)
        if opt.get("ignore"):
            y[::2] = 7 if opt.get("weight") else -100
    ii = 7 if (opt.get("ignore") and opt.get("weight")) else -100
    weight = torch.rand(C, device=DEV) + 0.5 if opt.get("weight") else None
    scale = torch.rand(R, device=DEV) + 0.1 if opt.get("row_scale") else torch.tensor(0.37, device=DEV)
    check_ce(x, y, weight=weight, ignore_index=ii, eps=opt.get("eps", 0.0), zl=opt.get("zl", 0.0),
             cap=opt.get("cap", 0.0), scale=scale)


@pytest.mark.parametrize("tdtype", [torch.int32, torch.uint8])
def test_ce_target_dtypes(tdtype):
    x = randn(9, 33)
    y = torch.randint(0, 33, (9,), device=DEV).to(tdtype)
    check_ce(x, y, ignore_index=-100)


def test_ce_ignore_index_exact(path):
    # issue 9 item 1: the target is compared with ignore_index as an int64, never
    # in its own dtype (-100 would wrap to 156 in uint8; 2**32 to 0 in int32).
    x = randn(3, 200)
    y8 = torch.tensor([156, 3, 199], dtype=torch.uint8, device=DEV)
    # (the reference here compares in int64; the torch backend is fixed elsewhere)
    loss, _, _ = check_ce(x, y8, ignore_index=-100, also_torch=False)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    y32 = torch.tensor([0, 7, 0], dtype=torch.int32, device=DEV)
    loss, _, _ = check_ce(x, y32, ignore_index=2**32, also_torch=False)
    assert (loss > 0).all()
    check_ce(x, y32, ignore_index=7, also_torch=False)


def test_ce_strided_weight_and_targets(path):
    # issue 9 item 2: a strided class weight and strided probability targets
    torch.manual_seed(5)
    R, C = 3, 45
    x = randn(R, C)
    w = (torch.rand(2 * C, device=DEV) + 0.5)[::2]
    y = torch.randint(0, C, (R,), device=DEV)
    check_ce(x, y, weight=w, eps=0.1)
    t = torch.softmax(randn(R, 2 * C), -1)[:, ::2]
    check_ce(x, t, weight=w, eps=0.05)
    check_ce(randn(2, C, 3), torch.softmax(randn(2, 3, C), -1).transpose(1, 2), weight=w)


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_precision_large_offset(offset, path):
    # issue 9 item 4: a common offset, which the softmax ignores, costs no more
    # accuracy than it costs torch in the same dtype (fp32, against fp64).
    torch.manual_seed(6)
    R, C = 4, 150
    x64 = torch.randn(R, C, dtype=torch.float64, device=DEV) * 2 + offset
    x = x64.float()
    y = torch.randint(0, C, (R,), device=DEV)
    rl, _, rg = ref_ce(x.double(), y)
    loss, _, grad = BE.ce_forward(x, y, None, -100, 0.0, 0.0, 0.0, torch.tensor(1.0), True)
    xt = x.clone().requires_grad_()
    tl_ = torch.nn.functional.cross_entropy(xt, y, reduction="none")
    tl_.sum().backward()
    assert _err(loss, rl) <= 4 * _err(tl_, rl) + 1e-6
    assert _err(grad, rg) <= 4 * _err(xt.grad, rg) + 1e-7
    gb = BE.ce_backward(x, y, None, torch.empty(0), -100, 0.0, 0.0, 0.0, torch.tensor(1.0))
    assert _err(gb, rg) <= 4 * _err(xt.grad, rg) + 1e-7
    for log in (False, True):
        ref = (torch.log_softmax if log else torch.softmax)(x.double(), -1)
        ours = BE.softmax_forward(x, -1, log)
        theirs = (torch.log_softmax if log else torch.softmax)(x, -1)
        assert _err(ours, ref) <= 4 * _err(theirs, ref) + 1e-6


def test_ce_all_ignored_inf_scale(path):
    x = randn(4, 50, dtype=torch.bfloat16)
    y = torch.full((4,), -100, device=DEV)
    for scale in (torch.tensor(float("inf")), torch.full((4,), float("inf"))):
        loss, lse, g = BE.ce_forward(x, y, None, -100, 0.1, 1e-3, 0.0, scale, True)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(g.float(), torch.zeros(4, 50)) and not g.isnan().any()
        gb = BE.ce_backward(x, y, None, lse, -100, 0.1, 1e-3, 0.0, scale)
        assert torch.equal(gb.float(), torch.zeros(4, 50))


def test_ce_nonfinite_rows(path):
    x = randn(5, 40)
    x[0, 3] = float("nan")        # valid row with NaN
    x[1, 5] = float("inf")        # valid row with +inf
    x[2] = float("-inf")          # valid row all -inf
    x[3, 1] = float("nan")        # ignored row with NaN: grad NaN, loss 0
    y = torch.tensor([1, 2, 3, -100, 4])
    loss, lse, g = check_ce(x, y, also_torch=False)
    assert loss[3] == 0 and g[3].isnan().all()
    assert loss[:3].isnan().all() and g[:3].isnan().all()  # as torch: NaN, +inf, all -inf rows
    assert torch.isfinite(loss[4]) and torch.isfinite(g[4]).all()
    assert lse[1] == float("inf") and lse[2] == float("-inf")  # torch.logsumexp's (check_ce)


def test_ce_out_of_range_targets(path):
    x = randn(4, 30)
    y = torch.tensor([30, -5, 2, -100])
    loss, lse, g = BE.ce_forward(x, y, None, -100, 0.0, 0.0, 0.0, torch.tensor(1.0), True)
    assert loss[:2].isnan().all() and g[:2].isnan().all()
    assert torch.isfinite(loss[2]) and torch.isfinite(g[2]).all()
    assert loss[3] == 0 and (g[3] == 0).all()
    check_ce(x, y, also_torch=False)


def test_ce_kdim(path):
    torch.manual_seed(2)
    B, C, S = 2, 40, 3
    x = randn(B, C, S)
    y = torch.randint(0, C, (B, S), device=DEV)
    y[0, 1] = -100
    check_ce(x, y, weight=torch.rand(C) + 0.5, eps=0.1, zl=1e-3, cap=4.0,
             scale=torch.rand(B, S) + 0.5)
    # non-contiguous logits (strided in every dim) and targets
    big = randn(B, 2 * C, S + 3, dtype=torch.bfloat16)
    xn = big[:, ::2, 3:]
    yn = torch.randint(0, C, (S, B), device=DEV).t()
    check_ce(xn, yn)
    # channels-last-like (B, C, S) whose class dim is contiguous
    xc = randn(B, S, C).transpose(1, 2)
    check_ce(xc, y)
    # probability targets in K-dim layout
    t = torch.softmax(randn(B, C, S), 1)
    check_ce(x, t, eps=0.1, weight=torch.rand(C) + 0.5)
    # S == 1 goes through the row layout
    check_ce(randn(B * 3, C, 1), torch.randint(0, C, (B * 3, 1), device=DEV))


def test_ce_transposed_2d(path):
    x = randn(29, 12).t()                 # (12, 29) with class stride 12
    y = torch.randint(0, 29, (12,), device=DEV)
    check_ce(x, y, eps=0.05)


def test_ce_grad_into(path):
    torch.manual_seed(3)
    for x0 in (randn(3, 70, dtype=torch.bfloat16), randn(2, 70, 3)):
        y = torch.randint(0, 70, (x0.shape[0],) + tuple(x0.shape[2:]), device=DEV)
        y.view(-1)[1] = -100
        sc = torch.tensor(0.5)
        loss_ref, _, g_ref = BE.ce_forward(x0, y, None, -100, 0.1, 0.0, 2.0, sc, True)
        x = x0.clone()
        loss, lse, g = BE.ce_forward(x, y, None, -100, 0.1, 0.0, 2.0, sc, True, grad_into=x)
        assert g.numel() == 0
        torch.testing.assert_close(loss, loss_ref)
        torch.testing.assert_close(x, g_ref)


def test_ce_empty():
    loss, lse, g = BE.ce_forward(torch.empty(0, 5), torch.empty(0, dtype=torch.long), None, -100,
                                 0.0, 0.0, 0.0, torch.tensor(1.0), True)
    assert loss.shape == (0,) and g.shape == (0, 5)
    # C == 0: the portable backend's degenerate rows (NaN under smoothing, as torch)
    x, y = torch.empty(2, 0), torch.full((2,), -100)
    for eps in (0.0, 0.1):
        loss, lse, _ = BE.ce_forward(x, y, None, -100, eps, 0.0, 0.0, torch.tensor(1.0), False)
        expect = F.cross_entropy(x, y, reduction="none", label_smoothing=eps)
        torch.testing.assert_close(loss, expect.to(wide_dtype(x.device)), equal_nan=True)


def test_ce_fp64_delegates():
    if _torch_backend() is None:
        pytest.skip("torch backend not importable")
    x = randn(4, 9, dtype=torch.float64)
    check_ce(x, torch.randint(0, 9, (4,)))


# ----------------------------------------------------------------------------- rescale_

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescale(dtype):
    # 22 blocks of 4096 over a persistent grid of 16 programs (4 "SMs" under the
    # interpreter): some programs loop twice
    g = randn(3, 30000, dtype=dtype)
    before = g.clone()
    BE.rescale_(g, torch.tensor(1.0))
    assert torch.equal(g, before)
    BE.rescale_(g, torch.tensor(0.25))
    torch.testing.assert_close(g, (before.float() * 0.25).to(dtype))
    nc = randn(10, 6).t()
    ref = nc * 3
    BE.rescale_(nc, torch.tensor(3.0))
    torch.testing.assert_close(nc, ref)


# ----------------------------------------------------------------------------- softmax

SM_SHAPES = [((4, 6, 9), 0), ((4, 6, 9), 1), ((4, 6, 9), -1), ((3, 257), -1), ((2, 100), 0),
             ((1, 1), -1), ((), 0)]
SM_CASES = ([("single", sh, d, dt, lg) for sh, d in SM_SHAPES for dt in (_F32, _BF16) for lg in (False, True)]
            + [(p, sh, d, _F32, lg) for p in ("looped", "multirow", "split", "split16")
               for sh, d in [((3, 257), -1), ((2, 100), 0), ((2, 40, 3), 1)] for lg in (False, True)])


@pytest.mark.parametrize("path,shape,dim,dtype,log", SM_CASES, indirect=["path"])
def test_softmax(shape, dim, dtype, log, path):
    torch.manual_seed(4)
    x = randn(*shape, dtype=dtype)
    y = BE.softmax_forward(x, dim, log)
    ref = (torch.log_softmax if log else torch.softmax)(x.double(), dim)
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    g = randn(*shape, dtype=dtype)
    dx = BE.softmax_backward(g, y, dim, log, dtype)
    yd, gd = y.double(), g.double()
    rdx = gd - yd.exp() * gd.sum(dim, keepdim=True) if log else yd * (gd - (gd * yd).sum(dim, keepdim=True))
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.double(), rdx, rtol=rtol, atol=atol * max(1.0, rdx.abs().max().item()))


def test_softmax_noncontiguous_and_nonfinite():
    x = randn(8, 12).t()
    torch.testing.assert_close(BE.softmax_forward(x, 1, False), torch.softmax(x, 1))
    x = randn(3, 20)
    x[0, 2] = float("inf")
    x[1] = float("-inf")
    for log in (False, True):
        y = BE.softmax_forward(x, -1, log)
        assert y[:2].isnan().all() and torch.isfinite(y[2]).all()


# ----------------------------------------------------------------------------- backend object

def test_available():
    assert BE.name == "triton" and BE.softmax_native_autograd is False
    ok, why = BE.available(torch.device("cpu"))
    assert ok == (os.environ.get("TRITON_INTERPRET") == "1")
    assert BE.available(torch.device("meta"))[0] is False

