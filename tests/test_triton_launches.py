"""Launches per cross-entropy forward+backward through the triton backend (issue 10, item 2:
at most 2, no host sync, no N x V work in the backward when the upstream gradient is 1).

Counted without a GPU, on CPU tensors under the Triton interpreter:
  * every Triton launch, through a recorder put in place of each kernel of the backend;
  * every torch op that would launch a kernel on CUDA, through a TorchDispatchMode
    (views, empty allocations and other metadata-only ops launch nothing).
The plan is the production one except for one thing: a cooperative launch (all
programs resident, a grid barrier inside) cannot run in the interpreter, which runs
programs one after another, so there the kernel runs as STAGE 1 (what precedes the
barrier) and STAGE 2 (the rest).  On CUDA that pair is one launch (STAGE 0), and is
counted as one here; the test checks that every STAGE 1 launch is followed by its
STAGE 2.  The two checks crossent makes only on CPU tensors, where reading a value
costs no host sync (the target bounds, a finite upstream gradient), are switched
off as they are on CUDA.  The autograd engine's seed (``ones`` for ``loss.backward()``) is made by
the test outside the count: it is torch's launch, not crossent's.  The torch.compile path is
counted in tests/test_compile_launches.py.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", minversion="3.6")  # backends.triton.MIN_TRITON
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts launches under the Triton interpreter (CPU tensors)", allow_module_level=True)

import crossent  # noqa: E402
from crossent import _autograd, _validate  # noqa: E402
from crossent.backends.triton import _grid, ce, split  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter

_NO_LAUNCH = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh",
              "promote_types", "result_type", "is_same_size"}   # allocation or metadata only


class Launches(TorchDispatchMode):
    """Records aten ops that launch a kernel on CUDA, and Triton launches (kernel, STAGE)."""

    def __init__(self):
        super().__init__()
        self.torch_ops, self.triton = [], []
        self.in_kernel = False   # the interpreter's own host copies around a launch are not ops of ours

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.in_kernel or func.is_view or name in _NO_LAUNCH):
            self.torch_ops.append(name)
        return func(*args, **(kwargs or {}))

    def production(self) -> int:
        """Triton launches of the CUDA plan: an interpreter STAGE 1 + STAGE 2 pair is one launch."""
        stages = [s for _, s in self.triton]
        for i, s in enumerate(stages):
            if s == 1:
                assert i + 1 < len(stages) and stages[i + 1] == 2 and self.triton[i][0] == self.triton[i + 1][0]
        return sum(1 for s in stages if s != 1)


class _Recorder:
    def __init__(self, fn, log: Launches):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.triton.append((self.fn.__name__, kwargs.get("STAGE", 0)))
            self.log.in_kernel = True
            try:
                return self.fn[grid](*args, **kwargs)
            finally:
                self.log.in_kernel = False
        return launch


@pytest.fixture
def launches(monkeypatch):
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    monkeypatch.setattr(_validate, "check_target_bounds", lambda *a: None)   # as on CUDA
    monkeypatch.setattr(_autograd.ce, "_rescalable", lambda g: True)        # as on CUDA
    log = Launches()
    for mod, name in ((ce, "_ce_kernel"), (ce, "_rescale_kernel"), (split, "_ce_split_kernel")):
        monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), log))
    return log


@pytest.fixture(params=["single", "split"])
def path(request):
    """The single-tile kernel, or the split-row kernel (tiles shrunk to 16 classes)."""
    knobs = dict(_SINGLE_MAX=16, _SPLIT_BLOCK=16, _ROW_PATH="split") if request.param == "split" else {}
    defaults = {k: getattr(split if hasattr(split, k) else ce, k) for k in knobs}
    ce.configure(**knobs)
    yield request.param
    ce.configure(**defaults)


VARIANTS = {
    "plain": {},
    "ignore": dict(ignore_index=3),
    "weight": dict(weight=True),
    "smooth": dict(label_smoothing=0.1),
    "zloss_softcap": dict(z_loss=1e-3, softcap=20.0),
    "all": dict(weight=True, ignore_index=3, label_smoothing=0.2, z_loss=1e-3),
    "probs": dict(probs=True),
}


def _inputs(variant: dict, R: int, C: int, dtype):
    torch.manual_seed(R + C)
    x = (torch.randn(R, C) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, C, (R,))
    y[1] = 3   # the ignore_index variant ignores a row
    kw = {k: v for k, v in variant.items() if k not in ("weight", "probs")}
    if variant.get("weight"):
        kw["weight"] = torch.rand(C).to(dtype)
    if variant.get("probs"):
        y = torch.softmax(torch.randn(R, C), 1).to(dtype)
    return x, y, kw


def _run(x, y, kw, reduction, log):
    """(loss, x.grad) of one forward+backward, counted; the seed made outside the count."""
    probe = crossent.cross_entropy(x, y, reduction=reduction, **kw)   # warm the plans and workspace
    seed = torch.ones_like(probe)
    probe.backward(seed)
    x.grad = None
    log.torch_ops.clear()
    log.triton.clear()
    with log:
        loss = crossent.cross_entropy(x, y, reduction=reduction, **kw)
        forward = (list(log.torch_ops), log.production())
        loss.backward(seed)
    return loss, forward


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_launches_per_forward_backward(launches, path, reduction, variant):
    R, C = 6, 40 if path == "split" else 13
    # bf16: the loss is written in it and the upstream gradient read in it, with no cast launched
    for dtype in (torch.bfloat16, torch.float32) if variant == "plain" else (torch.bfloat16,):
        x, y, kw = _inputs(VARIANTS[variant], R, C, dtype)
        loss, (fwd_ops, fwd_launches) = _run(x, y, kw, reduction, launches)
        assert fwd_ops == [], f"torch ops in the forward: {fwd_ops}"
        assert fwd_launches == 1, launches.triton
        assert launches.torch_ops == [], f"torch ops in forward+backward: {launches.torch_ops}"
        assert launches.production() <= 2, launches.triton
        # the launches computed torch's result (the full comparison is test_triton_interpret.py)
        xr = x.detach().float().requires_grad_()
        kr = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        kr.pop("z_loss", None), kr.pop("softcap", None)
        if "z_loss" not in kw:
            ref = F.cross_entropy(xr, y.float() if y.is_floating_point() else y, reduction=reduction, **kr)
            ref.backward(torch.ones_like(ref))
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loss.float(), ref, **tol)
            torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
        assert loss.dtype == dtype


def test_backward_with_unit_gradient_does_no_n_by_v_work(launches, path):
    """The mean's backward with g == 1 is the rescale kernel alone, over a small
    persistent grid, and its loop runs zero times (nothing of the N x V gradient is read)."""
    x, y, kw = _inputs({}, 6, 40, torch.float32)
    loss = crossent.cross_entropy(x, y)
    grad_before = None
    launches.triton.clear()
    with launches:
        loss.backward()
        grad_before = x.grad.clone()
    assert [k for k, _ in launches.triton] == ["_rescale_kernel"]
    assert launches.torch_ops.count("ones_like") + launches.torch_ops.count("fill") <= 1   # autograd's seed
    x.grad = None
    loss = crossent.cross_entropy(x, y)
    loss.backward(torch.tensor(1.0))
    torch.testing.assert_close(x.grad, grad_before, rtol=0, atol=0)


def test_workspace_resets_itself(launches, path):
    """The counters crossent owns are back to zero after every call (no memset needed)."""
    for reduction in ("mean", "sum"):
        x, y, kw = _inputs(VARIANTS["all"], 5, 40, torch.float32)
        crossent.cross_entropy(x, y, reduction=reduction, **kw).backward()
        for cnt, _ in _grid._WORKSPACES.values():
            assert int(cnt.abs().sum()) == 0


def test_all_ignored_mean_is_nan_like_torch(launches, path):
    """W == 0 inside the kernel: NaN loss, zero gradient, as torch."""
    x = torch.randn(4, 40, requires_grad=True)
    y = torch.full((4,), -100)
    for kw in ({}, dict(label_smoothing=0.1), dict(weight=torch.rand(40))):
        loss = crossent.cross_entropy(x, y, **kw)
        loss.backward()
        xr = x.detach().clone().requires_grad_()
        ref = F.cross_entropy(xr, y, **kw)
        ref.backward()
        torch.testing.assert_close(loss, ref, equal_nan=True)
        torch.testing.assert_close(x.grad, xr.grad, equal_nan=True)
        x.grad = None


def test_parity_edge_cases_through_the_one_launch_forward(monkeypatch):
    """tests/test_parity.py's edge cases (non-finite logits, all ignored, zero weights, C = 1,
    empty batches...) through the triton backend, where W, the reduction and the loss dtype
    are formed in the kernel (e.g. an inf row loss over W = 1 stays inf, not inf - inf)."""
    from test_parity import EDGE_CASES
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    for name, (x, t, kw) in EDGE_CASES.items():
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = crossent.cross_entropy(xa, t, **kw), F.cross_entropy(xb, t, **kw)
        torch.testing.assert_close(a, b, equal_nan=True, msg=name)
        if a.numel() and xa.numel():
            a.sum().backward()
            b.sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kdim_two_launches(launches, reduction):
    """(B, C, S) logits, addressed through their own strides: the same count."""
    torch.manual_seed(3)
    x = torch.randn(3, 11, 5, requires_grad=True)
    y = torch.randint(0, 11, (3, 5))
    y[0, 0] = -100
    loss, (fwd_ops, fwd_launches) = _run(x, y, dict(label_smoothing=0.1), reduction, launches)
    assert fwd_ops == [] and fwd_launches == 1 and launches.torch_ops == [], launches.torch_ops
    assert launches.production() <= 2, launches.triton
    xr = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(xr, y, label_smoothing=0.1, reduction=reduction)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, xr.grad)
