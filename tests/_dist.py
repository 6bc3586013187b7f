"""Multi-process harness for the distributed tests (gloo, loopback only).

Spawning is expensive, so a test spawns ``world`` ranks once and every rank
runs a long list of cases inside it (comparing with single-process crossent
or torch on the full tensors) and writes its failures to a JSON file.  Worker
processes are the test file itself run as a script (``--worker``); the parent
kills every rank as soon as one exits with an error, or at a deadline, so a
rank that raises never hangs the suite.  CROSSENT_DIST_DEVICE=cuda runs the
same cases on CUDA tensors (all ranks share GPU 0, still through gloo, whose
documented CUDA collectives are all_reduce and broadcast: an all_gather_into_tensor
there killed both ranks with SIGSEGV once).
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
DEADLINE_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, world: int, mode: str, deadline_s: float = DEADLINE_S, device: str = "cpu"):
    """Run ``world`` ranks of ``script --worker``; returns (returncodes, results, logs, elapsed).

    As soon as one rank exits non-zero the others are killed (fail fast)."""
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               CROSSENT_DIST_DEVICE=device)
    tmp = tempfile.mkdtemp(prefix="crossent_dist_")
    procs, outs, logs = [], [], []
    t0 = time.monotonic()
    for rank in range(world):
        out = os.path.join(tmp, f"rank{rank}.json")
        log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
        outs.append(out)
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--worker", str(rank), str(world), str(port), mode, out,
             str(deadline_s)],
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


def check(script: str, world: int, mode: str, device: str = "cpu", min_cases: int = 1,
          deadline_s: float = DEADLINE_S) -> dict:
    """Launch, then assert every rank finished and no case failed; returns rank 0's result."""
    rcs, results, logs, elapsed = launch(script, world, mode, deadline_s, device)
    msg = "\n".join(f"--- rank {r} rc={rc}{_progress(res)}\n{log}"
                    for r, (rc, res, log) in enumerate(zip(rcs, results, logs)))
    assert all(rc == 0 for rc in rcs), f"a rank failed or timed out after {elapsed:.1f}s:\n{msg}"
    failures = [f for res in results for f in res["failures"]]
    n = results[0]["cases"]
    assert n >= min_cases, f"only {n} cases ran"
    assert not failures, f"{len(failures)} of {n} case-rank checks failed:\n" + "\n".join(failures[:30])
    return results[0]


def _progress(res: dict | None) -> str:
    """Where a rank that did not finish was: its case function, the cases done
    and the failures found up to there (the rest of the list never ran)."""
    if not res or not res.get("running"):
        return ""
    fails = "".join(f"\n    {f}" for f in res["failures"][:10])
    return f", in {res['running']} after {res['cases']} cases, {len(res['failures'])} failures before:{fails}"


class Checker:
    """Collects failures instead of raising, so one rank never leaves the
    others waiting in a collective."""

    def __init__(self, rank: int, device: str):
        self.rank, self.dev, self.failures, self.cases = rank, device, [], 0

    def close(self, name, a, b, rtol=1e-9, atol=1e-10):
        import torch
        ok = a.shape == b.shape and a.dtype == b.dtype and torch.allclose(
            a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol, equal_nan=True)
        if not ok:
            diff = (a.double().cpu() - b.double().cpu()).abs().max().item() if a.shape == b.shape else "shape"
            self.fail(f"{name}: got {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}, max diff {diff}")

    def true(self, name, cond, detail=""):
        if not cond:
            self.fail(f"{name} {detail}")

    def fail(self, msg):
        self.failures.append(f"rank {self.rank}: {msg}")


def _run(rank: int, world: int, port: int, mode: str, out: str, modes) -> int:
    import torch
    import torch.distributed as dist

    dev = os.environ.get("CROSSENT_DIST_DEVICE", "cpu")
    torch.set_num_threads(1)
    if dev == "cuda":
        torch.cuda.set_device(0)  # every rank shares one GPU; gloo moves the bytes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ck = Checker(rank, dev)
    times = {}

    def dump(running: str | None):
        with open(out, "w") as f:
            json.dump({"failures": ck.failures, "cases": ck.cases, "times": times, "running": running}, f)

    for fn in modes[mode]:  # an exception leaves without teardown: worker_main exits at once
        dump(fn.__name__)  # what a rank that dies in fn (a crash, a kill) had found: see _progress
        t0 = time.perf_counter()
        fn(ck, rank, world)
        times[fn.__name__] = round(time.perf_counter() - t0, 2)
    dump(None)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def worker_main(modes) -> None:
    """Entry point of ``script --worker rank world port mode out deadline_s``; ``modes``
    maps a mode name to the case functions fn(checker, rank, world) it runs."""
    # A crash in native code (a collective the backend cannot run on CUDA
    # tensors died with SIGSEGV once) prints every thread's Python stack into
    # the rank's log, which check() shows; so does a rank still running shortly
    # before launch() kills it at its deadline (a hang in a collective).
    faulthandler.enable(all_threads=True)
    faulthandler.dump_traceback_later(max(1.0, float(sys.argv[7]) - 10))
    try:
        code = _run(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], modes)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # never wait for peers on the way out
    sys.stdout.flush()
    os._exit(code)


def groups(world: int, dev: str):
    """The three ways to name the group: default (None), a ProcessGroup, a 1-D DeviceMesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    return [None, dist.new_group(list(range(world))), init_device_mesh(dev, (world,))]


def splits(world: int):
    """Uneven class splits per rank, including one- and zero-class shards."""
    if world == 2:
        return [[4, 3], [1, 6], [6, 1], [4, 4]]
    return [[3, 3, 3], [1, 5, 2], [2, 1, 4], [0, 4, 3]]


def ce_case(g, C: int, shape: str, tk: str, weighted: bool, rows: int, dev, ignore_index: int = -100):
    """(x, target, weight, class dim) of one cross-entropy case, all float64 except class targets.

    shape: "2d" (rows, C), "kd" (2, C, 3) or "1d" (C,); tk: "prob" (a softmax over the class
    dim) or "class" (random classes, the first position set to ``ignore_index``)."""
    import torch

    full = {"2d": (rows, C), "kd": (2, C, 3), "1d": (C,)}[shape]
    cdim = 0 if shape == "1d" else 1
    x = (torch.randn(full, generator=g, dtype=torch.float64) * 3).to(dev)
    if tk == "prob":
        t = torch.softmax(torch.randn(full, generator=g, dtype=torch.float64), cdim).to(dev)
    else:
        t = torch.randint(0, C, full[:cdim] + full[cdim + 1:], generator=g)
        if t.dim():
            t.view(-1)[0] = ignore_index  # at least one ignored position
        t = t.to(dev)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.1).to(dev) if weighted else None
    return x, t, w, cdim
