"""crossent's CUDA launches through the installed Triton's JIT, without a GPU.

tests/_aot_compile.py compiles each kernel with ``triton.compile``; a CUDA call goes
further: the JIT binds the arguments and keyword options (and refuses one it does
not know), ``_grid.resident`` reads registers and shared memory off the compiled
kernel to size a cooperative grid, and the launcher gets the cooperative flag and
the cluster size from the kernel's metadata.  These are the APIs most likely to
move between Triton releases (the GPU machine has 3.6, CI 3.9), so they are run
here against a fake sm_90 device: Triton's active driver is replaced by one whose
kernels compile for real (this Triton, its ptxas), whose module loading reports
the cubin's real register count (cuobjdump), and whose launcher records each
launch instead of running it; torch.cuda's device queries answer as an H100 SXM.
Checked for bf16 cross-entropy forward+backward at the benchmark shapes and the
softmax forward:
  1. the cluster-reduction probe, reached as a CUDA call reaches it (the active
     driver's target), routes the plan: 'cluster' only where this Triton compiles
     the reduction, otherwise 'twopass' for cross-entropy and 'split' for softmax
     (what measured fastest on an H100);
  2. the cooperative grid is what fits on the device (<= 132 SMs x the CTAs per SM
     that the cubin's registers and shared memory allow), and is launched with the
     cooperative flag; a cluster plan reaches the launcher with its cluster size;
  3. no launch needs Triton's runtime scratch allocator (none is set on the GPU).
Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be
unset when the kernels are imported).  Prints one line per launch, then ALL OK.
``--sweep``: the same for every configuration of benchmarks/gpu_sweep.py instead.
``--lean``: crossent's lean launch path (backends/triton/_launch.py) against JITFunction.run:
every production launch skips the JIT from its second call on and hands the launcher exactly
what the JIT hands it (grid, stream, function, packed metadata, every argument); argument
variants that move Triton's specialisation (alignment, == 1, % 16, beyond 32 bits, dtype)
reach the compiled kernel the JIT reaches; the current device and stream, launch hooks and
rebound globals are honoured; crossent's own call sites take the path.
``--plans``: the triton backend's launch plans (ce._launch) are never stale: a call that differs
from the one before in one component of their key launches what it launches from a cold start.
"""
import contextlib
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import _aot_compile as A   # unsets TRITON_INTERPRET before triton is imported
import torch
import triton
from triton.runtime import driver

from crossent.backends.triton import _device, _grid, _launch, ce, softmax, split

H100 = SimpleNamespace(name="fake H100 SXM (sm_90)", major=9, minor=0, multi_processor_count=A.SMS,
                       regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=228 * 1024,
                       max_threads_per_multi_processor=2048, total_memory=80 << 30)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64, "i64": torch.int64,
           "i32": torch.int32}


class FakeSm90Driver:
    """The parts of a Triton GPU driver that the JIT, CompiledKernel and crossent use."""

    def __init__(self):
        self.launches = []
        self.device, self.stream = 0, 0   # what the current device and stream are (settable)
        self.utils = SimpleNamespace(load_binary=self._load_binary, unload_module=lambda module: None,
                                     get_device_properties=lambda device: dict(
                                         max_shared_mem=227 * 1024, multiprocessor_count=A.SMS))

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 1000 * device + self.stream

    def get_current_target(self):
        return A.TARGET

    @staticmethod
    def _load_binary(name, cubin, shared, device):
        # (module, function, registers, spills, max threads per block), as cuModuleLoadData reports them
        usage = A.cubin_usage(cubin)
        return object(), object(), usage["regs"], usage["local"], 1024

    def launcher_cls(self, src, metadata):
        def launch(gx, gy, gz, stream, function, *args):
            # args: packed metadata, launch metadata, enter / exit hooks, kernel arguments; the hooks
            # are called with the launch metadata, as Triton's launcher calls them
            if args[2] is not None:
                args[2](args[1])
            # call: every positional argument
            self.launches.append(dict(name=metadata.name, grid=(gx, gy, gz),
                                      call=(gx, gy, gz, stream, function) + args,
                                      cooperative=metadata.launch_cooperative_grid, num_ctas=metadata.num_ctas,
                                      scratch=getattr(metadata, "global_scratch_size", 0)
                                      + getattr(metadata, "profile_scratch_size", 0)))
            if args[3] is not None:
                args[3](args[1])
        return launch


def install_fake_device() -> FakeSm90Driver:
    """Make the fake driver Triton's active one and torch.cuda's device queries answer as
    an H100, for the rest of this process (a subprocess of the test: nothing to restore)."""
    fake = FakeSm90Driver()
    driver.set_active(fake)
    torch.cuda.get_device_properties = lambda device=None: H100
    torch.cuda.get_device_capability = lambda device=None: (H100.major, H100.minor)
    torch.cuda.device = lambda device: contextlib.nullcontext()
    for cache in (_device.num_sms, _device.cluster_reductions, _device.compiles_cluster_reduction):
        cache.cache_clear()
    ce.configure()   # fresh plans and resident counts
    return fake


def jit_args(fn, args: dict) -> tuple:
    """The AOT argument set as JIT call arguments: a small CPU tensor per pointer (the
    launcher is fake: nothing is read through it), ints and floats as they are."""
    return tuple(torch.zeros(16, dtype=_DTYPES[args[n].dtype]) if isinstance(args[n], A.Ptr) else args[n]
                 for n in fn.arg_names if n in args)


def production(op: str, R: int, C: int, reduce: int, dev):
    """(path, kernel, JIT args, constexprs and options, grid, cooperative) of bf16 (R, C)
    cross-entropy forward+backward (``reduce`` as in ce._launch) or softmax forward, as
    ce._launch, softmax.softmax_forward and split._run launch it on CUDA."""
    flags = A.FLAG_SETS[0]
    if op == "softmax":
        path, kw = ce.row_path(True, C, True, dev, "softmax"), {}
    else:
        path, kw, n_sblk = ce._plan(1, R, C, C, 1, True, reduce, dev)
    if path == "split":
        p = split.plan(R, C, dev)
        if op == "softmax":
            fn, aot, extra = split._softmax_split_kernel, A.softmax_split_args(R, C), dict(LOG=False)
        else:
            fn, aot, extra = split._ce_split_kernel, A.split_args("bf16", False, R, C), dict(REDUCE=reduce, **flags)
        args = jit_args(fn, aot)
        consts = dict(BLOCK=p["BLOCK"], NSPLIT=p["NSPLIT"], NSPLIT_P2=p["NSPLIT_P2"], PREFETCH=p["PREFETCH"],
                      STAGE=0, num_warps=p["num_warps"], **extra)
        groups = min(R, max(1, _grid.resident(fn, args, consts, dev, split._SPLIT_CTAS) // p["NSPLIT"]))
        return path, fn, args, consts, groups * p["NSPLIT"], True
    if op == "softmax":
        cfg, n_sblk = softmax._plan(1, C, R, C, 1)
        if path == "cluster":
            cfg, n_sblk = {k: v for k, v in ce.cluster_config(C).items() if k not in ("KEEP_L2", "REVERSE")}, R
        fn = softmax._softmax_fwd_kernel
        args = jit_args(fn, dict(x_ptr=A.Ptr("bf16"), y_ptr=A.Ptr("bf16"), S=R, C=C, sb=0, ss=C, sc=1,
                                 n_sblk=n_sblk))
        return path, fn, args, dict(cfg, LOG=False), n_sblk, False
    fn = ce._ce_kernel
    args = jit_args(fn, dict(A.fused_args("bf16", False, R, C), n_sblk=n_sblk, n_tiles=n_sblk))   # one batch
    consts = dict(kw, REDUCE=reduce, STAGE=0, NEED_GRAD=True, **flags)
    if reduce == 3:   # W behind a grid barrier: a cooperative launch of what fits
        return path, fn, args, consts, min(n_sblk, _grid.resident(fn, args, consts, dev)), True
    return path, fn, args, consts, n_sblk, False


def launch(fake, op, R, C, reduce, dev, tag="") -> bool:
    """Launch one production plan through the JIT; check what reached the launcher."""
    path, fn, args, consts, grid, cooperative = production(op, R, C, reduce, dev)
    fn[(grid,)](*args, launch_cooperative_grid=cooperative, **consts)
    rec = fake.launches[-1]
    ck = fn.warmup(*args, grid=(1,), launch_cooperative_grid=cooperative, **consts)
    fits = A.SMS * A.ctas_per_sm(ck.n_regs, ck.metadata.shared, consts["num_warps"])
    good = (rec["grid"] == (grid, 1, 1) and rec["cooperative"] == cooperative
            and rec["num_ctas"] == consts.get("num_ctas", 1) and (path == "cluster") == (rec["num_ctas"] > 1)
            and rec["scratch"] == 0 and (not cooperative or grid <= fits))
    what = "softmax" if op == "softmax" else "mean" if reduce else "none"
    print(f"{'OK  ' if good else 'FAIL'} {R}x{C:<7} {what:7} {path:8} {rec['name']:21} grid {grid:5} "
          f"(fits {fits:4}) cooperative={rec['cooperative']!s:5} num_ctas={rec['num_ctas']} regs {ck.n_regs:3} "
          f"spills {ck.n_spills} "
          f"scratch {rec['scratch']}{tag}")
    return good


def expected_path(op, C, reduce, cluster) -> str:
    """The design's route: one tile when the row fits; clusters only where they compile, and
    never for the mean's forward (its W needs a grid barrier, which only a cooperative launch
    has); otherwise what measured fastest on an H100: two passes for cross-entropy, the
    cooperative split row for softmax (BENCHMARKS.md)."""
    np2 = triton.next_power_of_2(C)
    if np2 <= ce._SINGLE_MAX:
        return "single"
    if cluster and (op == "softmax" or reduce == 0) and np2 <= ce._CLUSTER_CTAS * ce._CLUSTER_BLOCK:
        return "cluster"
    return "split" if op == "softmax" else "twopass"


def sweep(fake, dev, cluster) -> bool:
    """benchmarks/gpu_sweep.py's configurations, launched as the sweep launches them."""
    from _gpu_common import knob_values
    from gpu_sweep import CE_SHAPES, SM_SHAPES, configs
    ok = True
    defaults = knob_values({k for _, kn in configs(True) for k in kn})
    for label, knobs in configs(cluster):
        ce.configure(**{**defaults, **knobs})
        for op, (R, C) in [("cross_entropy", s) for s in CE_SHAPES] + [("softmax", s) for s in SM_SHAPES]:
            try:
                ok &= launch(fake, op, R, C, 0, dev, f"  [{label}]")
            except Exception as e:  # noqa: BLE001 - the sweep reports a failing configuration and goes on
                print(f"FAIL {R}x{C} {op} [{label}]: {type(e).__name__}: {str(e)[:300]}")
                ok = False
    ce.configure(**defaults)
    return ok

# ----------------------------------------------------------------------------- lean launch path (_launch.py)

class JitSpy:
    """Counts the launches that go through JITFunction.run (warmups aside)."""

    def __init__(self, kernels):
        self.calls = 0
        for fn in kernels:
            fn.run = self._wrap(fn.run)

    def _wrap(self, run):
        def spy(*args, **kwargs):
            self.calls += not kwargs.get("warmup")
            return run(*args, **kwargs)
        return spy


def _same(a, b) -> bool:
    return type(a) is type(b) and (a is b or (not isinstance(a, torch.Tensor) and a == b))


def _differs(lean: tuple, jit: tuple) -> str:
    """'' where the lean launch handed the launcher what JITFunction.run hands it: grid, stream,
    function, packed metadata and every argument alike; launch metadata and hooks None where
    the JIT's hooks are empty chains (the launcher passes the metadata only to the hooks)."""
    if len(lean) != len(jit):
        return f"{len(lean)} launcher arguments, the JIT {len(jit)}"
    bad = [i for i in range(len(lean)) if i not in (6, 7, 8) and not _same(lean[i], jit[i])]
    if bad:
        return f"launcher arguments {bad} differ: {[lean[i] for i in bad]} vs the JIT's {[jit[i] for i in bad]}"
    if lean[6:9] != (None, None, None) or not (_launch._quiet(jit[7]) and _launch._quiet(jit[8])):
        return f"launch metadata / hooks {lean[6:9]} vs the JIT's {jit[6:9]}"
    return ""


def lean_check(fake, spy, fn, args, consts, grid, label) -> tuple[bool, object]:
    """Launch twice through _launch, then once through the JIT: the second launch must skip
    the JIT and hand the launcher what the JIT does.  Returns (ok, the function launched)."""
    launch = _launch.launcher(fn, **consts)
    launch(grid, *args)
    calls, n = spy.calls, len(fake.launches)
    launch(grid, *args)
    lean_jit, lean = spy.calls - calls, fake.launches[-1]
    fn[grid](*args, **consts)
    jit = fake.launches[-1]
    err = ("" if lean_jit == 0 and len(fake.launches) == n + 2 else
           f"{lean_jit} JIT dispatches and {len(fake.launches) - n - 1} launches on the second call")
    err = err or _differs(lean["call"], jit["call"])
    print(f"{'FAIL' if err else 'OK  '} lean {label:50} {lean['name']:23} {len(lean['call']) - 9:2} arguments "
          f"cooperative={lean['cooperative']!s:5} num_ctas={lean['num_ctas']} {err}")
    return not err, lean["call"][4]


def lean_variants(fake, spy, fn, args, consts, grid, label, variants) -> bool:
    """Argument variants that may change Triton's specialisation: each must reach the compiled
    kernel the JIT reaches for it (a new one exactly when the JIT compiles one)."""
    ok, base = lean_check(fake, spy, fn, args, consts, grid, label)
    functions = {id(base)}
    for name, vargs in variants:
        good, function = lean_check(fake, spy, fn, vargs, consts, grid, f"{label} {name}")
        ok &= good
        functions.add(id(function))
    if len(functions) < 2:   # the variants must exercise the key, or this check could not fail
        print(f"FAIL {label}: no variant reached another compiled kernel")
        ok = False
    return ok


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.numel() + 1, dtype=t.dtype)[1:]   # data_ptr % 16 != 0 for elements < 16 bytes


def lean_state_checks(fake, spy, dev) -> bool:
    """Device, stream, launch hooks and rebound globals, on the rescale and CE kernels."""
    from triton import knobs
    g, s = torch.zeros(64, dtype=torch.bfloat16), torch.ones((), dtype=torch.float32)
    consts, grid = dict(BLOCK=4096, num_warps=8), (4,)
    ok = True
    fake.stream = 7                              # the current stream, read per launch
    ok &= lean_check(fake, spy, ce._rescale_kernel, (g, s, 64), consts, grid, "rescale, stream 7")[0]
    fake.device = 1                              # another device: its own compiled kernel
    ok &= lean_check(fake, spy, ce._rescale_kernel, (g, s, 64), consts, grid, "rescale, device 1")[0]
    fake.device = fake.stream = 0
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)    # a profiler's hook: the JIT builds its launch metadata
    calls = spy.calls
    _launch.launcher(ce._rescale_kernel, **consts)(grid, g, s, 64)
    knobs.runtime.launch_enter_hook.remove(hook)
    names = [m.get()["name"] for m in seen]   # LazyDict: what the hook reads
    good = spy.calls == calls + 1 and names == [fake.launches[-1]["name"]]
    print(f"{'OK  ' if good else 'FAIL'} lean rescale with a launch hook: through the JIT, the hook saw "
          f"{names}")
    ok &= good
    # A global the kernel reads, rebound: an equal value passes the JIT's check, another raises.
    path, fn, args, consts, grid, coop = production("cross_entropy", 8192, 8192, 0, dev)
    consts = dict(consts, launch_cooperative_grid=coop)
    (name, _), (_, scope) = next(iter(fn.used_global_vals.items()))
    old = scope[name]
    launch = _launch.launcher(fn, **consts)
    scope[name] = type(old)(old.value)
    calls = spy.calls
    launch((grid,), *args)
    launch((grid,), *args)
    good = spy.calls == calls + 1
    scope[name] = type(old)(old.value + 1)
    try:
        launch((grid,), *args)
        good = False
    except RuntimeError as e:
        good &= "has changed" in str(e)
    scope[name] = old
    print(f"{'OK  ' if good else 'FAIL'} lean {fn.__name__} with global {name} rebound: equal value through the "
          f"JIT once, another value raises as the JIT does")
    return ok & good


def lean_call_sites(fake, spy) -> bool:
    """crossent's own launchers (CPU tensors: the kernels compile for sm_90 and reach the fake
    launcher, on the non-cooperative branches): a repeated call dispatches nothing through the JIT."""
    from crossent.backends.triton import logprobs
    torch.manual_seed(0)
    x, y = torch.randn(64, 1000, dtype=torch.bfloat16), torch.randint(0, 1000, (64,))
    wide = torch.randn(4, 3 * ce._SINGLE_MAX, dtype=torch.bfloat16)
    denom, s, a = torch.zeros(()), torch.full((), 0.5), torch.ones(64)
    lse = torch.zeros(64)
    shift = torch.zeros(64, 2)
    ops = {
        "cross_entropy mean, gradient": lambda: ce.ce_forward_fused(x, y, None, denom, -100, 0.0, 0.0, 0.0, "mean",
                                                                    x.dtype, True, False),
        "cross_entropy none": lambda: ce.ce_forward_fused(x, y, None, denom, -100, 0.1, 0.0, 0.0, "none",
                                                          torch.float32, False, False),
        "cross_entropy backward": lambda: ce.ce_backward(x, y, None, lse, -100, 0.0, 0.0, 0.0, a),
        "cross_entropy split rows": lambda: ce.ce_forward_fused(wide, y[:4], None, denom, -100, 0.0, 0.0, 0.0,
                                                                "sum", wide.dtype, True, False),
        "rescale": lambda: ce.rescale_(x, s),
        "softmax forward": lambda: softmax.softmax_forward(x, -1, False),
        "softmax split rows": lambda: softmax.softmax_forward(wide, -1, True),
        "log_softmax backward": lambda: softmax.softmax_backward(x, x, -1, True, x.dtype),
        "logprobs forward": lambda: logprobs.forward(x, y, 1.0, True),
        "logprobs backward": lambda: logprobs.backward(x, y, shift, lse, a, a, 0.7),
    }
    ok = True
    for label, op in ops.items():
        op()
        calls, n = spy.calls, len(fake.launches)
        op()
        names = sorted({r["name"] for r in fake.launches[n:]})
        good = spy.calls == calls and len(fake.launches) > n
        print(f"{'OK  ' if good else 'FAIL'} lean call site {label:30} {len(fake.launches) - n} launches "
              f"{names}, {spy.calls - calls} through the JIT on the second call")
        ok &= good
    return ok


def lean(fake, dev, cases) -> bool:
    """The lean launch path against JITFunction.run, for every production launch plan."""
    from crossent.backends.triton import logprobs
    spy = JitSpy([ce._ce_kernel, ce._rescale_kernel, split._ce_split_kernel, split._softmax_split_kernel,
                  softmax._softmax_fwd_kernel, softmax._softmax_bwd_kernel, logprobs._lp_fwd_kernel,
                  logprobs._lp_bwd_kernel])
    ok = _launch.ENABLED
    print(f"lean launch path enabled: {ok}")
    for op, (R, C), reduce in cases:
        path, fn, args, consts, grid, coop = production(op, R, C, reduce, dev)
        ok &= lean_check(fake, spy, fn, args, dict(consts, launch_cooperative_grid=coop), (grid,),
                         f"{op} {R}x{C} reduce={reduce} {path}")[0]
    # rescale: every int class Triton specialises on (== 1, % 16, beyond 32 bits) and pointer alignment
    g, s = torch.zeros(64, dtype=torch.bfloat16), torch.ones((), dtype=torch.float32)
    n = 8192 * 32000
    ok &= lean_variants(fake, spy, ce._rescale_kernel, (g, s, n), dict(BLOCK=4096, num_warps=8), (528,), "rescale", [
        ("n + 16", (g, s, n + 16)), ("n + 1", (g, s, n + 1)), ("n = 1", (g, s, 1)), ("n = 2**31 + 16", (g, s, 2**31 + 16)),
        ("misaligned grad", (_misaligned(g), s, n)), ("fp32 grad", (g.float(), s, n))])
    # cross-entropy: a misaligned target, ignore_index 1 / a multiple of 16 (-100 is neither)
    path, fn, args, consts, grid, coop = production("cross_entropy", 8192, 8192, 0, dev)
    consts = dict(consts, launch_cooperative_grid=coop)
    i_t, i_ii = fn.arg_names.index("t_ptr"), fn.arg_names.index("ignore_index")

    def variant(i, value):
        return args[:i] + (value,) + args[i + 1:]
    ok &= lean_variants(fake, spy, fn, args, consts, (grid,), f"cross_entropy 8192x8192 {path}", [
        ("misaligned target", variant(i_t, _misaligned(args[i_t]))), ("ignore_index 1", variant(i_ii, 1)),
        ("ignore_index 16", variant(i_ii, 16)), ("ignore_index -7", variant(i_ii, -7))])
    ok &= lean_state_checks(fake, spy, dev)
    ok &= lean_call_sites(fake, spy)
    return ok


# ----------------------------------------------------------------------------- launch plans (ce._launch)

def _signature(rec: dict, roles: dict) -> tuple:
    """A recorded launch, comparable across calls: grid, cooperative flag, the compiled kernel
    (constexprs and Triton's specialisation) and every argument, a tensor named by the input
    it is (``roles``: data_ptr -> name) or, one of crossent's own buffers, by its dtype."""
    return (rec["name"], rec["grid"], rec["cooperative"], rec["call"][4],
            tuple(roles.get(a.data_ptr(), a.dtype) if isinstance(a, torch.Tensor) else a for a in rec["call"][9:]))


def plans(fake) -> bool:
    """tests/_plan_cases.py through the fake driver, on the single-tile and split-row paths:
    each case, run after the case it differs from in one component of the plans' key, builds
    a new plan and launches exactly what it launches from a cold start (every cache cleared)."""
    import _plan_cases as P
    ok = True
    defaults = dict(_SINGLE_MAX=ce._SINGLE_MAX, _SPLIT_BLOCK=split._SPLIT_BLOCK, _ROW_PATH=ce._ROW_PATH)
    for knobs in ({}, dict(_SINGLE_MAX=16, _SPLIT_BLOCK=16, _ROW_PATH="split")):
        ce.configure(**{**defaults, **knobs})
        for label, (parent, kw) in P.cases().items():
            if parent is None:
                continue
            roles = {t.data_ptr(): name for name, t in kw.items() if isinstance(t, torch.Tensor)}

            def launched():
                n = len(fake.launches)
                P.call(ce, **kw)
                return [_signature(r, roles) for r in fake.launches[n:]]
            P.call(ce, **P.cases()[parent][1])
            before = set(ce._PLANS)
            warm = launched()
            new = [ce._PLANS[k].path for k in set(ce._PLANS) - before]
            ce.configure()
            cold = launched()
            good = len(new) == 1 and warm == cold and len(warm) > 0
            print(f"{'OK  ' if good else 'FAIL'} plan {label:26} after {parent:15} new plans {new} "
                  f"{len(warm)} launches{'' if warm == cold else ', not those of a cold start'}")
            ok &= good
    ce.configure(**defaults)
    return ok


def main() -> int:
    ok = True
    dev = torch.device("cuda", 0)
    fake = install_fake_device()
    cluster = _device.cluster_reductions(dev)
    here = _device.compiles_cluster_reduction(A.TARGET)
    print(f"cluster reductions through the active driver: {cluster} (triton.compile for sm_90: {here})")
    ok &= cluster == here
    if not here:   # refused for the cluster, not for the probe itself: one CTA compiles
        ok &= A.compile_one(_device._cluster_sum_probe, {"x_ptr": "*bf16", "out_ptr": "*fp32"}, {"BLOCK": 4096},
                            "the cluster probe with num_ctas=1", num_warps=4)
    cases = [("cross_entropy", shape, reduce) for shape, reduce in
             itertools.product(A.BENCH_SHAPES + [(8192, 8192)], (3, 0))] + \
            [("softmax", shape, 0) for shape in [(8192, 32000), (8192, 128256)]]
    if "--sweep" in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        ok &= sweep(fake, dev, cluster)
    elif "--lean" in sys.argv:
        ok &= lean(fake, dev, cases)
    elif "--plans" in sys.argv:
        ok &= plans(fake)
    else:
        for op, (R, C), reduce in cases:
            path = production(op, R, C, reduce, dev)[0]
            if path != expected_path(op, C, reduce, cluster):
                print(f"FAIL {R}x{C} {op} reduce={reduce}: path {path}, "
                      f"expected {expected_path(op, C, reduce, cluster)}")
                ok = False
            ok &= launch(fake, op, R, C, reduce, dev)
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
