"""Host (Python) cost of crossent's triton call path, without a GPU (issue 10, item 3).

The eager CUDA call path is timed on the GPU by ``gpu_bench.py`` (its ``overhead`` rows,
target crossent <= torch + 20 us).  Without a GPU this script times the same call path
on tiny CPU tensors, with every Triton launch replaced by a no-op and the two checks
crossent makes only on CPU tensors (target bounds, a finite upstream gradient) switched
off as on CUDA: what is timed is crossent's Python from ``crossent.cross_entropy(...)``
to the launch calls and after them, plus the torch ops it runs (each of which is one more
launch on CUDA).  The best of several rounds of this thread's CPU time is reported: a shared CPU only adds time.

``--dispatch`` times launches instead: Triton's JIT dispatch (``kernel[grid](...)``)
against crossent's lean launch path (``backends/triton/_launch.py``) and the bare launcher
call, per launch of the production plans at the benchmark shapes, on the fake sm_90 driver
of tests/_launch_path.py (the kernels compile for real; the launcher records and returns);
then crossent's backend calls with the lean path off and on, on CPU tensors through that
driver, or on CUDA tensors where there is a GPU (then only these).  Same timing rule.

``--against OTHER/src`` compares this tree with another (e.g. ``git archive REV src | tar -x -C
/tmp/base``) in alternating subprocesses, best of each, with crossent's excess over torch.

    PYTHONPATH=src python benchmarks/gpu_host.py [--rounds 7] [--calls 300] [--dispatch | --against SRC]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ["CROSSENT_BACKEND"] = "triton"

import torch  # noqa: E402


def stub_launches() -> None:
    """Every Triton kernel of the backend becomes a launcher that does nothing; the
    CPU-only checks are switched off, as on CUDA."""
    from crossent import _autograd, _validate
    from crossent.backends.triton import ce, split

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    for mod in (ce, split):
        for name in dir(mod):
            if type(getattr(mod, name)).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(mod, name, Stub())
    _validate.check_target_bounds = lambda *a: None
    _autograd.ce._rescalable = lambda g: True


def _best_us(fn, calls: int, rounds: int) -> float:
    """Best per-call CPU time of this thread: on a shared machine wall time also counts
    the time other processes hold the core (torch runs single-threaded here, so the
    calling thread does all the work, the autograd engine's CPU backward included)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time_ns() - t0) / calls / 1e3)
    return best


def _fake_launches(fake, fake_gpu, calls: int, rounds: int) -> None:
    """us per launch of the production plans: Triton's JIT dispatch, the lean path, the launcher alone."""
    from crossent.backends.triton import _launch, ce
    dev = torch.device("cuda", 0)
    g = torch.zeros(16, dtype=torch.bfloat16)
    plans = [(f"{op} {R}x{C}{(' none', ' mean')[reduce > 0] if op == 'cross_entropy' else ''}",
              *fake_gpu.production(op, R, C, reduce, dev)[1:])
             for op, (R, C), reduce in [("cross_entropy", (8192, 32000), 3), ("cross_entropy", (8192, 32000), 0),
                                        ("cross_entropy", (8192, 128256), 3), ("softmax", (8192, 128256), 0)]]
    plans.append(("rescale", ce._rescale_kernel, (g, torch.ones(()), 8192 * 32000), dict(BLOCK=4096, num_warps=8),
                  528, False))
    print(f"{'launch':34} {'kernel':22} {'args':>4} {'JIT':>6} {'lean':>6} {'launcher':>8}")
    for label, fn, args, consts, grid, coop in plans:
        consts = dict(consts, launch_cooperative_grid=coop)
        lean = _launch.launcher(fn, **consts)
        lean((grid,), *args)
        run, function, packed, _ = next(iter(lean.cache.values()))

        def timed(f):
            def loop():
                f()
                fake.launches.clear()
            return _best_us(loop, calls, rounds)
        jit_us = timed(lambda: fn[(grid,)](*args, **consts))
        lean_us = timed(lambda: lean((grid,), *args))
        bare_us = timed(lambda: run(grid, 1, 1, 0, function, packed, None, None, None, *args, *lean.tail))
        print(f"{label:34} {fn.__name__:22} {len(args):4} {jit_us:6.1f} {lean_us:6.1f} {bare_us:8.1f}")


def _backend_calls(device: torch.device, calls: int, rounds: int, tidy) -> None:
    """us per call of crossent's triton backend functions (allocations, launch preparation and
    launches) with the lean path off (every launch through Triton's JIT) and on."""
    from crossent.backends.triton import _launch, ce, softmax
    x = torch.randn(64, 1000, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (64,), device=device)
    denom, one, lse = torch.zeros((), device=device), torch.ones((), device=device), torch.zeros(64, device=device)
    ops = {"cross_entropy mean, fwd + gradient": lambda: ce.ce_forward_fused(x, y, None, denom, -100, 0.0, 0.0, 0.0,
                                                                            "mean", x.dtype, True, False),
           "cross_entropy backward ('none')": lambda: ce.ce_backward(x, y, None, lse, -100, 0.0, 0.0, 0.0, lse),
           "rescale_ (upstream gradient 1)": lambda: ce.rescale_(x, one),
           "softmax forward": lambda: softmax.softmax_forward(x, -1, False)}
    print(f"\ncrossent's backend calls on {device} tensors 64x1000 bf16: us of CPU per call")
    print(f"{'call':36} {'JIT':>6} {'lean':>6} {'saved':>6}")
    enabled = _launch.ENABLED
    for label, op in ops.items():
        us = []
        for lean in (False, True):
            _launch.ENABLED = lean
            ce.configure()   # fresh plans and launchers, built with the path off / on

            def call():
                op()
                tidy()
            us.append(_best_us(call, calls, rounds))
        print(f"{label:36} {us[0]:6.1f} {us[1]:6.1f} {us[0] - us[1]:6.1f}")
    _launch.ENABLED = enabled
    ce.configure()


def _cuda_launch_costs(calls: int, rounds: int) -> None:
    """What one launch costs this machine's CPU: a torch op, and Triton's bare launcher for a
    3-argument kernel with and without the cooperative attribute (crossent's reduced losses
    launch cooperatively), so the backend calls' times can be split into launches and the rest."""
    from crossent.backends.triton import _launch, ce
    g = torch.zeros(16, device="cuda", dtype=torch.bfloat16)
    one = torch.ones((), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    rows = {"torch: g.mul_(1.0), one launch": lambda: g.mul_(1.0),
            "torch: torch.empty(64, device='cuda')": lambda: torch.empty(64, device="cuda")}
    for coop in (False, True):
        lean = _launch.launcher(ce._rescale_kernel, BLOCK=4096, num_warps=8, launch_cooperative_grid=coop)
        lean((1,), g, one, 16)
        if not lean.cache:   # the lean path is off here: the JIT launched it
            continue
        run, function, packed, _ = next(iter(lean.cache.values()))
        rows[f"triton bare launcher, 3 args, cooperative={coop}"] = (
            lambda run=run, function=function, packed=packed, lean=lean:
            run(1, 1, 1, stream, function, packed, None, None, None, g, one, 16, *lean.tail))
        rows[f"crossent lean launch, 3 args, cooperative={coop}"] = lambda lean=lean: lean((1,), g, one, 16)
    print(f"\none launch on {torch.cuda.get_device_name()}: us of CPU per call")
    for label, fn in rows.items():
        try:
            print(f"{label:52} {_best_us(fn, calls, rounds):6.1f}")
        except Exception as e:  # noqa: BLE001 - a probe: report and go on
            print(f"{label:52} failed: {type(e).__name__}: {e}")
    torch.cuda.synchronize()


def dispatch(calls: int, rounds: int) -> int:
    """Launch dispatch: on the fake sm_90 driver without a GPU (per launch, then per backend call
    on CPU tensors), on the GPU itself where there is one (per backend call on CUDA tensors)."""
    if torch.cuda.is_available():
        import triton
        print(f"Triton {triton.__version__}, {torch.cuda.get_device_name()}: best of {rounds} rounds")
        _backend_calls(torch.device("cuda"), calls, rounds, lambda: None)
        torch.cuda.synchronize()
        _cuda_launch_costs(calls, rounds)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        import _launch_path as fake_gpu   # unsets TRITON_INTERPRET before triton is imported
    except ImportError as e:
        print(f"--dispatch needs tests/_launch_path.py and Triton's NVIDIA backend: {e}")
        return 1
    import triton
    from crossent.backends.triton import _launch
    fake = fake_gpu.install_fake_device()
    print(f"Triton {triton.__version__}, fake sm_90 driver: best of {rounds} rounds, us of CPU per launch "
          f"(lean path enabled: {_launch.ENABLED})")
    _fake_launches(fake, fake_gpu, calls, rounds)
    _backend_calls(torch.device("cpu"), calls, rounds, fake.launches.clear)
    return 0


CASES = {"mean": {}, "sum": dict(reduction="sum"), "none": dict(reduction="none"),
         "mean+w+smooth": dict(weight=True, label_smoothing=0.1)}


def host_times(calls: int, rounds: int) -> dict:
    """case -> us per (crossent fwd+bwd, crossent forward without grad, torch fwd+bwd, torch
    forward), crossent's launches stubbed; torch's own call path with its CPU kernels (tiny:
    mostly host work) beside it, with the same arguments."""
    os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: CPU tensors
    import crossent
    torch.set_num_threads(1)
    stub_launches()
    # The (R, C) split path of the benchmark shapes, at a size where CPU allocations cost
    # what CUDA's caching allocator does: tiles shrunk to 16 classes
    from crossent.backends.triton import ce
    ce.configure(_SINGLE_MAX=16, _SPLIT_BLOCK=16)
    R, C = 4, 40
    x = torch.randn(R, C, requires_grad=True)
    y = torch.randint(0, C, (R,))
    out = {}
    for name, kw in CASES.items():
        kw = dict(kw, weight=torch.rand(C)) if kw.get("weight") else kw
        seed = torch.ones(R if kw.get("reduction") == "none" else ())
        us = []
        for f in (crossent.cross_entropy, torch.nn.functional.cross_entropy):
            def step():
                x.grad = None
                f(x, y, **kw).backward(seed)

            def forward():
                with torch.no_grad():
                    f(x, y, **kw)
            us += [_best_us(step, calls, rounds), _best_us(forward, calls, rounds)]
        out[name] = tuple(us)
    return out


def compare(against: str, calls: int, rounds: int) -> int:
    """This tree against another tree's sources (``against``: its src folder), in alternating
    subprocesses (crossent registers torch custom ops: one copy per process): the best of
    each, and crossent's excess over torch's call path (best over all runs)."""
    trees = {"before": str(Path(against).resolve()), "after": str(Path(__file__).resolve().parents[1] / "src")}
    best = {}
    for _ in range(rounds):
        for label, src in trees.items():
            env = dict(os.environ, PYTHONPATH=src)
            env.pop("TRITON_INTERPRET", None)
            res = subprocess.run([sys.executable, __file__, "--json", "--rounds", "1", "--calls", str(calls)],
                                 env=env, capture_output=True, text=True, check=True)
            for case, us in json.loads(res.stdout.splitlines()[-1]).items():
                old = best.setdefault(label, {}).get(case, (float("inf"),) * 4)
                best[label][case] = tuple(map(min, old, us))
    print(f"launches stubbed, CPU tensors 4x40: best of {rounds} alternating runs of {calls} calls, us per call")
    print(f"{'':16} {'fwd+bwd':^33}   {'forward (no grad)':^33}")
    print(f"{'case':16}" + f" {'before':>7} {'after':>7} {'torch':>7} {'excess':>8}  " * 2)
    for case in CASES:
        b, a = best["before"][case], best["after"][case]
        t = tuple(min(b[i], a[i]) for i in (2, 3))
        print(f"{case:16} {b[0]:7.1f} {a[0]:7.1f} {t[0]:7.1f} {a[0] - t[0]:+8.1f}   "
              f"{b[1]:7.1f} {a[1]:7.1f} {t[1]:7.1f} {a[1] - t[1]:+8.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--dispatch", action="store_true", help="time one launch: JIT vs lean path (fake sm_90)")
    ap.add_argument("--against", metavar="SRC", help="compare with another tree's src folder (alternating runs)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # compare()'s worker
    args = ap.parse_args()
    if args.dispatch:
        return dispatch(args.calls, args.rounds)
    if args.against:
        return compare(args.against, args.calls, args.rounds)
    times = host_times(args.calls, args.rounds)
    if args.json:
        print(json.dumps(times))
        return 0
    print(f"launches stubbed, CPU tensors 4x40: best of {args.rounds} rounds, us per call")
    print(f"{'case':16} {'fwd+bwd':>8} {'torch':>7} {'excess':>7}   {'fwd (no grad)':>13} {'torch':>7} {'excess':>7}")
    for name, (step, forward, t_step, t_forward) in times.items():
        print(f"{name:16} {step:8.1f} {t_step:7.1f} {step - t_step:+7.1f}   {forward:13.1f} {t_forward:7.1f} "
              f"{forward - t_forward:+7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
