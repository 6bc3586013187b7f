"""crossent.distributed on gloo/CPU with 2 and 3 local processes.

Spawning is expensive, so each world size is spawned once and every rank runs
a long list of cases inside it, comparing with single-process
crossent.cross_entropy / torch's F.cross_entropy on the full logits.  Workers
are this file run as a script (``--worker``), on loopback only; the parent
kills every rank as soon as one exits with an error, or at a deadline, so a
rank that raises never hangs the suite.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
DEADLINE_S = 150


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, deadline_s: float = DEADLINE_S, script: str = __file__):
    """Run ``world`` worker processes; returns (returncodes, results, logs, elapsed).

    As soon as one rank exits non-zero the others are killed (fail fast)."""
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    tmp = tempfile.mkdtemp(prefix="crossent_dist_")
    procs, outs, logs = [], [], []
    t0 = time.monotonic()
    for rank in range(world):
        out = os.path.join(tmp, f"rank{rank}.json")
        log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
        outs.append(out)
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--worker", str(rank), str(world), str(port), mode, out],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        while True:
            rcs = [p.poll() for p in procs]
            if all(rc is not None for rc in rcs):
                break
            if any(rc not in (None, 0) for rc in rcs) or time.monotonic() - t0 > deadline_s:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
    elapsed = time.monotonic() - t0
    results, texts = [], []
    for out, log in zip(outs, logs):
        log.seek(0)
        texts.append(log.read()[-4000:])
        log.close()
        results.append(json.load(open(out)) if os.path.exists(out) else None)
    return [p.returncode for p in procs], results, texts, elapsed


def _check(world: int, mode: str):
    rcs, results, logs, elapsed = launch(world, mode)
    msg = "\n".join(f"--- rank {r} rc={rc}\n{log}" for r, (rc, log) in enumerate(zip(rcs, logs)))
    assert all(rc == 0 for rc in rcs), f"a rank failed or timed out after {elapsed:.1f}s:\n{msg}"
    failures = [f for res in results for f in res["failures"]]
    n = results[0]["cases"]
    assert n > 0
    assert not failures, f"{len(failures)} of {n} case-rank checks failed:\n" + "\n".join(failures[:30])


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world):
    _check(world, "cases")


def test_rank_failure_fails_fast():
    """Rank 1 raises while rank 0 waits in a collective: no hang."""
    rcs, results, logs, elapsed = launch(2, "raise", deadline_s=60)
    assert rcs[1] not in (0, None) and rcs[0] != 0, (rcs, logs)
    assert "deliberate failure" in logs[1]
    assert elapsed < 45, elapsed


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------
def _splits(world: int):
    if world == 2:
        return [[4, 3], [1, 6], [6, 1], [4, 4]]
    return [[3, 3, 3], [1, 5, 2], [2, 1, 4], [0, 4, 3]]


class Checker:
    def __init__(self, rank):
        self.rank, self.failures, self.cases = rank, [], 0

    def close(self, name, a, b, rtol=1e-9, atol=1e-10):
        import torch
        ok = a.shape == b.shape and a.dtype == b.dtype and torch.allclose(
            a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)
        if not ok:
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shape"
            self.failures.append(f"rank {self.rank}: {name}: got {tuple(a.shape)} {a.dtype} vs "
                                 f"{tuple(b.shape)} {b.dtype}, max diff {diff}")


def _ce_cases(ck: Checker, rank: int, world: int, groups):
    import torch
    import torch.nn.functional as F

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy as vpce

    for si, sizes in enumerate(_splits(world)):
        C = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        combos = itertools.product(["2d", "kd", "1d"], ["class", "prob"], ["mean", "sum", "none"],
                                   [False, True], [0.0, 0.15], ["plain", "z", "cap", "zcap"])
        for ci, (shape, tk, red, weighted, eps, extra) in enumerate(combos):
            if ci % 3 != si % 3:  # every combination runs on at least one split
                continue
            seed = 1000 * si + ci
            g = torch.Generator().manual_seed(seed)
            full = {"2d": (6, C), "kd": (2, C, 3), "1d": (C,)}[shape]
            cdim = 0 if shape == "1d" else 1
            x = (torch.randn(full, generator=g, dtype=torch.float64) * 3)
            if tk == "prob":
                t = torch.softmax(torch.randn(full, generator=g, dtype=torch.float64), cdim)
                ii = -100
            else:
                tshape = full[:1] + full[2:] if shape != "1d" else ()
                t = torch.randint(0, C, tshape, generator=g)
                ii = [-100, 1][ci % 2]
                if t.dim():
                    t.view(-1)[0] = ii  # at least one ignored position
            w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1 if weighted else None
            kw = dict(reduction=red, label_smoothing=eps, ignore_index=ii,
                      z_loss=0.01 if "z" in extra else 0.0, softcap=4.0 if "cap" in extra else None)
            name = f"split={sizes} {shape} {tk} {red} w={weighted} eps={eps} {extra} ii={ii}"
            xs = x.narrow(cdim, lo, hi - lo).detach().clone().requires_grad_(True)
            ts = t.narrow(cdim, lo, hi - lo) if tk == "prob" else t
            group = groups[ci % len(groups)]
            vsi = lo if ci % 3 == 0 else None
            out = vpce(xs, ts, group=group, weight=w, vocab_start_index=vsi, **kw)
            xf = x.clone().requires_grad_(True)
            ref = crossent.cross_entropy(xf, t, w, **kw)
            ck.close(name + " value", out, ref)
            if extra == "plain":  # and torch itself where there are no extras
                ck.close(name + " value vs torch", out, F.cross_entropy(
                    x, t, w, ignore_index=ii, reduction=red, label_smoothing=eps))
            gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
            (gs,) = torch.autograd.grad(out, xs, gout)
            (gf,) = torch.autograd.grad(ref, xf, gout)
            ck.close(name + " grad", gs, gf.narrow(cdim, lo, hi - lo))
            ck.cases += 1


def _special_cases(ck: Checker, rank: int, world: int, groups):
    import torch

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy as vpce

    sizes = _splits(world)[1]
    C = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, C, generator=g, dtype=torch.float64)
    # Every position ignored: mean NaN, sum 0, zero gradient.
    t = torch.full((5,), -100)
    for red in ["mean", "sum"]:
        xs = x[:, lo:hi].clone().requires_grad_(True)
        out = vpce(xs, t, reduction=red, label_smoothing=0.1)
        ck.close(f"all ignored {red}", out, crossent.cross_entropy(x, t, reduction=red, label_smoothing=0.1))
        (gs,) = torch.autograd.grad(out, xs)
        ck.close(f"all ignored {red} grad", gs, torch.zeros_like(gs))
        ck.cases += 1
    # Out-of-range target: IndexError on every rank (after the same collectives).
    try:
        vpce(x[:, lo:hi], torch.tensor([0, C, 1, 2, 3]))
        ck.failures.append(f"rank {rank}: out-of-range target did not raise")
    except IndexError as e:
        if f"Target {C} is out of bounds" not in str(e):
            ck.failures.append(f"rank {rank}: wrong message {e}")
    ck.cases += 1
    # -inf padding columns (a padded vocab): finite loss, zero gradient there.
    xp = x.clone()
    xp[:, -1] = float("-inf")
    t = torch.tensor([0, 1, 2, 3, -100])
    xs = xp[:, lo:hi].clone().requires_grad_(True)
    xf = xp.clone().requires_grad_(True)
    out, ref = vpce(xs, t, z_loss=1e-3), crossent.cross_entropy(xf, t, z_loss=1e-3)
    ck.close("-inf column", out, ref)
    ck.close("-inf column grad", torch.autograd.grad(out, xs)[0], torch.autograd.grad(ref, xf)[0][:, lo:hi])
    ck.cases += 1
    # bf16 and fp32 logits: crossent's fp32 accumulation, same dtype out.
    for dt, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        xl = x.to(dt)
        t = torch.tensor([0, 1, C - 1, 3, -100])
        xs = xl[:, lo:hi].clone().requires_grad_(True)
        xf = xl.clone().requires_grad_(True)
        out = vpce(xs, t, label_smoothing=0.1, group=groups[-1])
        ref = crossent.cross_entropy(xf, t, label_smoothing=0.1)
        ck.close(f"{dt} value", out, ref, rtol=tol, atol=tol)
        ck.close(f"{dt} grad", torch.autograd.grad(out, xs)[0], torch.autograd.grad(ref, xf)[0][:, lo:hi],
                 rtol=tol, atol=tol)
        ck.cases += 1


def _linear_cases(ck: Checker, rank: int, world: int, groups):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import crossent
    from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

    try:  # the single-process fused version, where it exists
        from crossent.linear import linear_cross_entropy as lce
    except ImportError:
        lce = None
    D = 5
    for si, sizes in enumerate(_splits(world)[:3]):
        V = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        combos = itertools.product(["class", "prob"], ["mean", "sum", "none"], [False, True],
                                   [0.0, 0.1], [False, True], [True, False])
        for ci, (tk, red, weighted, eps, extras, reduce_dx) in enumerate(combos):
            if ci % 3 != si % 3:  # every combination on exactly one split
                continue
            g = torch.Generator().manual_seed(50_000 + 1000 * si + ci)
            x = torch.randn(3, 4, D, generator=g, dtype=torch.float64)
            W = torch.randn(V, D, generator=g, dtype=torch.float64)
            b = torch.randn(V, generator=g, dtype=torch.float64) if ci % 2 else None
            if tk == "prob":
                t = torch.softmax(torch.randn(3, 4, V, generator=g, dtype=torch.float64), -1)
                ts = t[..., lo:hi]
            else:
                t = torch.randint(0, V, (3, 4), generator=g)
                t[0, 0] = -100
                ts = t
            w = torch.rand(V, generator=g, dtype=torch.float64) + 0.1 if weighted else None
            kw = dict(reduction=red, label_smoothing=eps, weight=w,
                      z_loss=0.01 if extras else 0.0, softcap=5.0 if extras else None)
            name = f"linear split={sizes} {tk} {red} w={weighted} eps={eps} extras={extras} reduce={reduce_dx}"
            xs = x.clone().requires_grad_(True)
            Ws = W[lo:hi].clone().requires_grad_(True)
            bs = b[lo:hi].clone().requires_grad_(True) if b is not None else None
            out = vplce(xs, Ws, ts, group=groups[ci % len(groups)], linear_bias_shard=bs,
                        reduce_input_grad=reduce_dx, chunk_size=5, **kw)
            xf, Wf = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
            bf = b.clone().requires_grad_(True) if b is not None else None
            lg = F.linear(xf, Wf, bf)
            ref = None
            if lce is not None:
                try:
                    ii = {} if tk == "prob" else {"ignore_index": -100}
                    ref = lce(xf, Wf, t, linear_bias=bf, **ii, **kw)
                except TypeError:  # a signature we do not know: fall back to eager
                    ref = None
            if ref is None:
                ce = crossent.cross_entropy(lg.reshape(12, V), t.reshape(12, V) if tk == "prob" else t.reshape(12),
                                            w, reduction=red, label_smoothing=eps, z_loss=kw["z_loss"],
                                            softcap=kw["softcap"])
                ref = ce.reshape(3, 4) if red == "none" else ce
            ck.close(name + " value", out, ref)
            gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
            params = (xs, Ws) + ((bs,) if b is not None else ())
            fparams = (xf, Wf) + ((bf,) if b is not None else ())
            gs = torch.autograd.grad(out, params, gout)
            gf = torch.autograd.grad(ref, fparams, gout)
            dx = gs[0]
            if not reduce_dx:  # partial sums: their sum over ranks is the full gradient
                dx = dx.clone()
                dist.all_reduce(dx)
            ck.close(name + " dx", dx, gf[0])
            ck.close(name + " dW", gs[1], gf[1][lo:hi])
            if b is not None:
                ck.close(name + " db", gs[2], gf[2][lo:hi])
            ck.cases += 1


def _worker(rank: int, world: int, port: int, mode: str, out: str) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ck = Checker(rank)
    try:
        if mode == "raise":
            if rank == 1:
                raise RuntimeError("deliberate failure on rank 1")
            from crossent.distributed import vocab_parallel_cross_entropy
            x = torch.randn(4, 3)
            vocab_parallel_cross_entropy(x, torch.zeros(4, dtype=torch.long))  # blocks: rank 1 is gone
            return 3
        from torch.distributed.device_mesh import init_device_mesh
        groups = [None, dist.new_group(list(range(world))), init_device_mesh("cpu", (world,))]
        times = {}
        for fn in (_ce_cases, _special_cases, _linear_cases):
            t0 = time.perf_counter()
            fn(ck, rank, world, groups)
            times[fn.__name__] = round(time.perf_counter() - t0, 2)
        with open(out, "w") as f:
            json.dump({"failures": ck.failures, "cases": ck.cases, "times": times}, f)
        dist.barrier()
    finally:
        if mode != "raise" or rank == 0:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    try:
        code = _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # never wait for peers on the way out
    sys.stdout.flush()
    os._exit(code)
