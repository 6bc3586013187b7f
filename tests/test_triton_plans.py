"""The triton backend's launch plans (ce._launch, issue 10 item 3) are never stale.

A plan (path, constexprs, strides, grid, launchers) is built once per key and reused.  Each
case of tests/_plan_cases.py changes one component of that key from the case it names; run
after it, the call must build a new plan (the cache misses), and its results must be those
of a cold start (every cache cleared) and of the float64 reference.  Under the Triton
interpreter on CPU tensors; tests/_launch_path.py --plans checks the same cases' launches
through the fake sm_90 driver (tests/test_triton_compile.py runs it).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernels under the Triton interpreter (CPU tensors)", allow_module_level=True)

import _plan_cases as P  # noqa: E402
from crossent import reference  # noqa: E402
from crossent.backends.triton import _device, _grid, ce, split  # noqa: E402
import test_triton_launches  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter
CASES = P.cases()
path = test_triton_launches.path   # the fixture: the single-tile kernel, or the split-row kernel


def _reference(x, t, w=None, eps=0.0, z=0.0, cap=0.0, reduction="sum", need_grad=True, **_):
    """(loss, lse, gradient of the summed loss) in float64 from the same values."""
    x64 = x.detach().double().requires_grad_()
    t64 = t.double() if t.is_floating_point() else t
    loss = reference.cross_entropy(x64, t64, None if w is None else w.double(), -100, reduction, eps,
                                   z_loss=z, softcap=cap or None)
    lse = reference.logsumexp(x64.detach(), 1, cap or None)
    grad = torch.autograd.grad(loss.sum(), x64)[0] if need_grad else None
    return loss.detach(), lse, grad


def _check(ours, ref, label):
    for name, a, b in zip(("loss", "lse", "gradient"), ours, ref):
        assert (a is None) == (b is None), f"{label}: {name}"
        if a is not None:
            torch.testing.assert_close(a.double().reshape(b.shape), b, rtol=2e-2, atol=2e-2,
                                       msg=lambda m: f"{label}: {name}: {m}")


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("label", [k for k in CASES if k != "base"])
def test_one_key_component_changed_misses_the_cache(label):
    parent, kw = CASES[label]
    P.call(ce, **CASES[parent][1])
    before = set(ce._PLANS)
    warm = P.call(ce, **kw)
    assert len(set(ce._PLANS) - before) == 1, f"{label}: no new plan after {parent!r}"
    ce.configure()   # cold: every plan, launcher and workspace built afresh
    cold = P.call(ce, **kw)
    for name, a, b in zip(("loss", "lse", "gradient"), warm, cold):
        assert (a is None and b is None) or torch.equal(a, b), f"{label}: {name} differs from a cold start"
    _check(warm, _reference(**kw), label)


@pytest.mark.usefixtures("path")
def test_repeated_call_hits_and_dtype_is_the_launchers_key():
    """The same call again reuses its plan; other logit dtypes share it (the lean launcher keys
    its compiled kernels on dtypes), with each dtype's results."""
    kw = CASES["weight"][1]
    P.call(ce, **kw)
    n = len(ce._PLANS)
    P.call(ce, **kw)
    assert len(ce._PLANS) == n
    kw32 = dict(kw, x=kw["x"].float(), w=kw["w"].float())
    out = P.call(ce, **kw32)
    assert len(ce._PLANS) == n
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.float32
    _check(out, _reference(**kw32), "fp32")


def test_device_is_part_of_the_key(monkeypatch):
    """Plans are per device: the same shapes on another device ('meta', with the kernel
    replaced by a recorder that launches nothing) build their own plan."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(args[0].device)
    kw = CASES["base"][1]
    P.call(ce, **kw)
    before = set(ce._PLANS)
    monkeypatch.setattr(ce, "_ce_kernel", Recorder())
    monkeypatch.setattr(_grid, "_WORKSPACES", {})   # the meta workspace: this test's own
    ce.ce_forward_fused(kw["x"].to("meta"), kw["t"].to("meta"), None, torch.zeros((), device="meta"), -100,
                        0.0, 0.0, 0.0, "sum", kw["x"].dtype, True, False)
    (key,) = set(ce._PLANS) - before
    assert torch.device("meta") in key and launched and launched[0].type == "meta"


def test_knobs_and_a_failed_cooperative_launch_forget_the_plans(recwarn):
    """configure() (launch knobs) and a failed cooperative launch (paths without the
    split kernel from then on) drop the plans: the next call decides its path afresh."""
    kw = CASES["base"][1]
    defaults = dict(_SINGLE_MAX=ce._SINGLE_MAX, _SPLIT_BLOCK=split._SPLIT_BLOCK, _ROW_PATH=ce._ROW_PATH)
    cpu = torch.device("cpu")
    try:
        P.call(ce, **kw)
        assert {p.path for p in ce._PLANS.values()} == {"single"}
        ce.configure(_SINGLE_MAX=16, _SPLIT_BLOCK=16, _ROW_PATH="split")
        assert not ce._PLANS
        P.call(ce, **kw)
        assert {p.path for p in ce._PLANS.values()} == {"split"}
        _device.cooperative_failed(cpu, RuntimeError("no cooperative launch here"))
        assert not ce._PLANS
        out = P.call(ce, **kw)
        assert {p.path for p in ce._PLANS.values()} == {"twopass"}
        _check(out, _reference(**kw), "two-pass after the failure")
    finally:
        _device._NO_COOPERATIVE.discard(cpu)
        ce.configure(**defaults)


def test_rescale_plan_per_size():
    """rescale_'s grid is kept per element count and device: each size scales all of its gradient."""
    g = torch.full((), 0.5)
    for n in (4096 * 17 + 3, 8, 4096 * 17 + 3):
        grad = torch.arange(n, dtype=torch.float32)
        ce.rescale_(grad, g)
        torch.testing.assert_close(grad, torch.arange(n, dtype=torch.float32) * 0.5, rtol=0, atol=0)


def test_plans_through_the_fake_sm90_driver(tmp_path):
    """The same cases compiled for sm_90 and launched through the installed Triton's JIT to a
    fake launcher (tests/_launch_path.py --plans): each launches what a cold start launches."""
    from test_triton_compile import _has_cuda_tools, _has_nvidia_backend, _run
    if not (_has_nvidia_backend() and _has_cuda_tools()):
        pytest.skip("this triton build has no NVIDIA backend or no ptxas / cuobjdump / nvdisasm")
    _run("_launch_path.py", tmp_path, "plan ", "--plans")
