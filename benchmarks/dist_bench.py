"""Vocab-parallel cross-entropy vs all_gather-the-logits, on gloo/CPU.

    PYTHONPATH=src python benchmarks/dist_bench.py [--worlds 2 3] [--n 2048] [--v 16384]
                                                    [--reps 5] [--out dist_bench.jsonl]

Spawns ``world`` local processes (loopback only) per world size.  Each rank
holds an (N, V/world) fp32 logits shard and runs forward + backward of
  * vocab_parallel: crossent.distributed.vocab_parallel_cross_entropy
  * naive: all_gather the shards, crossent.cross_entropy on the full logits,
    keep this rank's slice of the gradient
Bytes are counted by wrapping torch.distributed's collectives: "payload" is
the size of what a rank hands to the collectives (all_reduce: the buffer;
all_gather: its own shard); "wire" estimates what a ring algorithm sends per
rank (all_reduce 2(w-1)/w x buffer, all_gather (w-1) x shard).  Time is the
median over reps of forward+backward, max over ranks.  Timings on a shared
machine are noisy: compare the two methods within one run.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counter:
    def __init__(self, dist, world):
        self.dist, self.world = dist, world
        self.payload = self.wire = self.calls = 0
        self._orig = {}

    def install(self):
        d, w = self.dist, self.world
        orig_ar, orig_ag, orig_agt = d.all_reduce, d.all_gather, d.all_gather_into_tensor
        self._orig = dict(all_reduce=orig_ar, all_gather=orig_ag, all_gather_into_tensor=orig_agt)

        def all_reduce(t, *a, **k):
            n = t.numel() * t.element_size()
            self.payload += n
            self.wire += 2 * (w - 1) * n // w
            self.calls += 1
            return orig_ar(t, *a, **k)

        def all_gather(lst, t, *a, **k):
            n = t.numel() * t.element_size()
            self.payload += n
            self.wire += (w - 1) * n
            self.calls += 1
            return orig_ag(lst, t, *a, **k)

        def all_gather_into_tensor(out, t, *a, **k):
            n = t.numel() * t.element_size()
            self.payload += n
            self.wire += (w - 1) * n
            self.calls += 1
            return orig_agt(out, t, *a, **k)

        d.all_reduce, d.all_gather, d.all_gather_into_tensor = all_reduce, all_gather, all_gather_into_tensor

    def reset(self):
        self.payload = self.wire = self.calls = 0


def worker(rank, world, port, n, v, reps, out):
    import torch
    import torch.distributed as dist

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    sizes = [v // world + (1 if r < v % world else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    g = torch.Generator().manual_seed(0)
    full = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    shard = full[:, lo:lo + sizes[rank]].contiguous()
    del full
    ctr = Counter(dist, world)
    ctr.install()

    def vp():
        x = shard.detach().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(x, target, label_smoothing=0.1)
        loss.backward()
        return loss, x.grad

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
        loss = crossent.cross_entropy(torch.cat(parts, 1), target, label_smoothing=0.1)
        loss.backward()
        return loss, x.grad

    rows = {}
    results = {}
    for name, fn in [("vocab_parallel", vp), ("naive_all_gather", naive)]:
        results[name] = fn()  # warm-up
        ctr.reset()
        fn()
        bytes_payload, bytes_wire, calls = ctr.payload, ctr.wire, ctr.calls
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows[name] = dict(method=name, time_s=statistics.median(times), payload_bytes=bytes_payload,
                          wire_bytes_est=bytes_wire, collectives=calls)
    l1, g1 = results["vocab_parallel"]
    l2, g2 = results["naive_all_gather"]
    agree = bool(torch.allclose(l1, l2, rtol=1e-5, atol=1e-6) and torch.allclose(g1, g2, rtol=1e-4, atol=1e-7))
    # Max time over ranks: a collective step is as slow as its slowest rank.
    tt = torch.tensor([rows[k]["time_s"] for k in rows], dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    for i, k in enumerate(rows):
        rows[k]["time_s"] = float(tt[i])
        rows[k]["agree"] = agree
    if rank == 0:
        with open(out, "w") as f:
            json.dump(list(rows.values()), f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=100)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "dist_bench.jsonl"))
    a = ap.parse_args()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    import torch
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), cpus=os.cpu_count(), torch=torch.__version__, backend="gloo",
                dtype="float32", label_smoothing=0.1)
    print(f"{'world':>5} {'N':>6} {'V':>7} {'method':>18} {'time ms':>9} {'payload/rank':>13} "
          f"{'wire/rank':>11} {'colls':>5} {'agree':>5}")
    all_rows = []
    for world in a.worlds:
        port = _free_port()
        tmp = tempfile.mkdtemp(prefix="dist_bench_")
        out = os.path.join(tmp, "rows.json")
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
            print(f"{world:>5} {a.n:>6} {a.v:>7} {r['method']:>18} {r['time_s'] * 1e3:>9.1f} "
                  f"{r['payload_bytes']:>13,} {r['wire_bytes_est']:>11,} {r['collectives']:>5} {str(r['agree']):>5}")
        vp_, nv = rows[0], rows[1]
        print(f"      naive/vocab_parallel: time x{nv['time_s'] / vp_['time_s']:.2f}, "
              f"wire bytes x{nv['wire_bytes_est'] / max(vp_['wire_bytes_est'], 1):.0f}")
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
