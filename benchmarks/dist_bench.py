"""Vocab-parallel cross-entropy: bytes communicated and time, on gloo/CPU.

    PYTHONPATH=src python benchmarks/dist_bench.py [--worlds 2 3] [--n 1024] [--v 16384]
                                                    [--reps 3] [--out dist_bench.jsonl]

Spawns ``world`` local processes (loopback only) per world size.  Each rank
holds an (N, V/world) fp32 logits shard (uneven when world does not divide V)
and runs forward + backward of
  * crossent_vocab_parallel: crossent.distributed.vocab_parallel_cross_entropy
  * crossent_dtensor: crossent.cross_entropy on the Shard(1) DTensor
  * torch_loss_parallel: F.cross_entropy on the same DTensor inside
    torch.distributed.tensor.parallel.loss_parallel()
  * naive_all_gather: all_gather the shards, crossent.cross_entropy on the
    full logits, keep this rank's slice of the gradient
Bytes are counted by wrapping torch.distributed's collectives and the
functional ones (which loss_parallel uses): "payload" is what a rank hands
to the collectives (all_reduce: the buffer; all_gather: its own shard); "wire"
estimates what a ring sends per rank (all_reduce 2(w-1)/w x buffer, all_gather
(w-1) x shard).  Time: the median over reps of forward + backward, max over
ranks.  Timings on a shared machine are noisy: compare methods within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["crossent_vocab_parallel", "crossent_dtensor", "torch_loss_parallel", "naive_all_gather"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ByteCounter:
    """Counts the bytes handed to collectives by wrapping the functions every
    caller reaches them through: torch.distributed's and the functional ones
    (torch's loss_parallel and DTensor call those; a dispatch mode would not
    see them inside DTensor's handlers).  Use as a context manager."""

    NAMES = {"dist": ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"],
             "funcol": ["all_reduce", "all_gather_tensor", "reduce_scatter_tensor"]}

    def __init__(self, world: int):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        self.mods = {"dist": dist, "funcol": funcol}
        self.world, self.payload, self.wire, self.calls, self._orig = world, 0, 0, 0, []

    def _wrap(self, mod, name):
        orig, w = getattr(mod, name), self.world
        shard_arg = 1 if mod.__name__ == "torch.distributed" and "gather" in name else 0

        def counted(*args, **kwargs):
            t = args[shard_arg]
            n = t.numel() * t.element_size()
            self.payload += n
            self.wire += (w - 1) * n if "gather" in name else 2 * (w - 1) * n // w
            self.calls += 1
            return orig(*args, **kwargs)
        return orig, counted

    def __enter__(self):
        for key, names in self.NAMES.items():
            for name in names:
                orig, counted = self._wrap(self.mods[key], name)
                self._orig.append((self.mods[key], name, orig))
                setattr(self.mods[key], name, counted)
        return self

    def __exit__(self, *exc):
        for mod, name, orig in reversed(self._orig):
            setattr(mod, name, orig)


def worker(rank, world, port, n, v, reps, out):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    full = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    dfull = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)  # DTensor's (torch.chunk) split
    shard = dfull.to_local().contiguous()
    sizes = [0] * world
    sizes[rank] = shard.shape[1]
    sizes_t = torch.tensor(sizes)
    dist.all_reduce(sizes_t)
    sizes = sizes_t.tolist()
    del full

    def vp():
        x = shard.detach().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(x, target)
        loss.backward()
        return loss, x.grad

    def dtensor(lp=False):
        x = dfull.detach().requires_grad_(True)
        if lp:
            with loss_parallel():
                loss = F.cross_entropy(x, target)
                loss.backward()
        else:
            loss = crossent.cross_entropy(x, target)
            loss.backward()
        return loss.to_local(), x.grad.to_local()

    def naive():
        x = shard.detach().requires_grad_(True)
        # gloo's all_gather wants equal sizes: pad every shard to the largest.
        m = max(sizes)
        padded = torch.zeros(n, m)
        padded[:, :sizes[rank]] = x.detach()
        bufs = [torch.empty(n, m) for _ in sizes]
        dist.all_gather(bufs, padded)
        parts = [b[:, :s] for b, s in zip(bufs, sizes)]
        parts[rank] = x  # keep the graph through our own shard
        loss = crossent.cross_entropy(torch.cat(parts, 1), target)
        loss.backward()
        return loss, x.grad

    fns = dict(zip(METHODS, [vp, dtensor, lambda: dtensor(True), naive]))
    rows, results = {}, {}
    for name, fn in fns.items():
        results[name] = fn()  # warm-up
        with ByteCounter(world) as ctr:
            fn()
        rows[name] = dict(method=name, payload_bytes=ctr.payload, wire_bytes_est=ctr.wire, collectives=ctr.calls)
        rows[name]["times"] = []
    for _ in range(reps):  # interleaved rounds: load spikes hit every method alike
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            rows[name]["times"].append(time.perf_counter() - t0)
    l0, g0 = results[METHODS[0]]
    for name in METHODS:
        loss, grad = results[name]
        rows[name]["agree"] = bool(torch.allclose(loss, l0, rtol=1e-5, atol=1e-6)
                                   and torch.allclose(grad, g0, rtol=1e-4, atol=1e-7))
        rows[name]["time_s"] = statistics.median(rows[name].pop("times"))
    # Max time over ranks: a collective step is as slow as its slowest rank.
    tt = torch.tensor([rows[k]["time_s"] for k in METHODS], dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    for i, k in enumerate(METHODS):
        rows[k]["time_s"] = float(tt[i])
    if rank == 0:
        with open(out, "w") as f:
            json.dump([rows[k] for k in METHODS], f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "dist_bench.jsonl"))
    a = ap.parse_args()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    import torch
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), cpus=os.cpu_count(), torch=torch.__version__, backend="gloo",
                dtype="float32")
    print(f"{'world':>5} {'N':>6} {'V':>7} {'method':>24} {'time ms':>9} {'payload/rank':>13} "
          f"{'wire/rank':>11} {'colls':>5} {'agree':>5}")
    all_rows = []
    for world in a.worlds:
        port = _free_port()
        out = os.path.join(tempfile.mkdtemp(prefix="dist_bench_"), "rows.json")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port),
                                   str(a.n), str(a.v), str(a.reps), out], env=env) for r in range(world)]
        t0 = time.monotonic()
        while any(p.poll() is None for p in procs):
            if time.monotonic() - t0 > a.timeout or any(p.poll() not in (None, 0) for p in procs):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
        if not os.path.exists(out):
            print(f"world {world}: failed (return codes {[p.wait() for p in procs]})")
            continue
        rows = json.load(open(out))
        for r in rows:
            r.update(meta, world_size=world, N=a.n, V=a.v)
            print(f"{world:>5} {a.n:>6} {a.v:>7} {r['method']:>24} {r['time_s'] * 1e3:>9.1f} "
                  f"{r['payload_bytes']:>13,} {r['wire_bytes_est']:>11,} {r['collectives']:>5} {str(r['agree']):>5}")
        by = {r["method"]: r for r in rows}
        vp_ = by["crossent_vocab_parallel"]
        for other in METHODS[1:]:
            o = by[other]
            print(f"      {other}/crossent_vocab_parallel: time x{o['time_s'] / vp_['time_s']:.2f}, "
                  f"wire bytes x{o['wire_bytes_est'] / max(vp_['wire_bytes_est'], 1):.2f}")
        all_rows += rows
    with open(a.out, "a") as f:
        for r in all_rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(all_rows)} rows to {a.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, port, n, v, reps = map(int, sys.argv[2:8])
        worker(r, w, port, n, v, reps, sys.argv[8])
    else:
        main()
