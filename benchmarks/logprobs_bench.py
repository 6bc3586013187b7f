"""Benchmark of RL log-probs + entropy (forward + backward): crossent vs the
eager formula RL trainers use and torch.compile of it.

Ops:
  linear  from hidden states h (N, D) and the head W (V, D):
          crossent.linear_log_probs(h, W, t, temperature=T, entropy=...)
          vs  lsm = log_softmax(F.linear(h, W).float() / T); lsm.gather(-1, t); -(exp(lsm) * lsm).sum(-1)
  logits  from logits (N, V): crossent.log_probs vs the same formula without the matmul.
Providers: crossent, eager, compiled (torch.compile of the eager function,
default Inductor; compile time excluded).  The step is a PPO-like
``(log_probs * adv).sum() - 0.01 * entropy.sum()`` and its backward.

All providers run in ONE process, interleaved round by round (the machine is
shared and noisy, so ratios within a round are what to trust).  Extra peak
memory: the RSS high-water mark during one step minus the RSS before it (the
kernel's VmHWM, reset through /proc/self/clear_refs; on CUDA torch's
max_memory_allocated over memory_allocated), i.e. what a step
allocates on top of its inputs, gradients included (the script re-executes
itself with MALLOC_MMAP_THRESHOLD_=1 MiB so that freed buffers leave the RSS).
"beyond" is that minus what any implementation returns (the gradients and the
outputs), also in units of crossent's CPU chunk budget (crossent._logprobs_ops.
_CPU_CHUNK_BYTES, 128 MiB: the fused head's promise is at most one, plus for
bf16 over several chunks dW's fp32 accumulator, V x D x 4 bytes).

  PYTHONPATH=src python benchmarks/logprobs_bench.py [--op linear] [--shape 4096x512x32000]
      [--entropy 1] [--temperature 0.7] [--rounds 3] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crossent import _bench as H  # noqa: E402  (stats / stamp / RSS helpers)

PROVIDERS = ("crossent", "eager", "compiled")


def _eager(entropy: bool, T: float, linear: bool):
    import torch
    import torch.nn.functional as F

    def fn(a, b, t):
        logits = F.linear(a, b) if linear else a
        lsm = torch.log_softmax(logits.float() / T, -1)
        lp = lsm.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        return lp, (-(lsm.exp() * lsm).sum(-1) if entropy else None)
    return fn


def _crossent(entropy: bool, T: float, linear: bool):
    import crossent

    def fn(a, b, t):
        if linear:
            return crossent.linear_log_probs(a, b, t, temperature=T, entropy=entropy)
        return crossent.log_probs(a, t, temperature=T, entropy=entropy)
    return fn


def main(argv=None) -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the
        # heap, so a warmed-up provider's chunk buffers would hide below the RSS baseline.
        # Serving every block >= 1 MiB by mmap makes each step's peak RSS its own.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=("linear", "logits"), default="linear")
    ap.add_argument("--shape", default="4096x512x32000", help="NxDxV (linear) or NxV (logits)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--entropy", type=int, choices=(0, 1), default=1)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: peak = max_memory_allocated)")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)

    import torch
    dims = [int(s) for s in a.shape.split("x")]
    linear = a.op == "linear"
    N, V = dims[0], dims[-1]
    dtype = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    if linear:
        D = dims[1]
        A = (torch.randn(N, D, generator=g, device=dev) * 0.5).to(dtype).requires_grad_()
        B = (torch.randn(V, D, generator=g, device=dev) / D ** 0.5).to(dtype).requires_grad_()
        params = (A, B)
    else:
        A = (torch.randn(N, V, generator=g, device=dev) * 2).to(dtype).requires_grad_()
        B = None
        params = (A,)
    t = torch.randint(0, V, (N,), generator=g, device=dev)
    adv = torch.randn(N, generator=g, device=dev)
    ent = bool(a.entropy)
    fns = {"crossent": _crossent(ent, a.temperature, linear), "eager": _eager(ent, a.temperature, linear)}
    if "compiled" in a.providers:
        fns["compiled"] = torch.compile(_eager(ent, a.temperature, linear))
    providers = [p for p in a.providers.split(",") if p in fns]

    def step(fn):
        for p in params:
            p.grad = None
        lp, h = fn(A, B, t)
        loss = (lp * adv).sum() - (0.01 * h.sum() if h is not None else 0.0)
        loss.backward()

    for p in providers:  # warm-up (and compilation), not timed
        step(fns[p])
    stamp = H.env_stamp()
    rows = []
    for rnd in range(a.rounds):
        for p in providers:
            for q in params:
                q.grad = None
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base, method = torch.cuda.memory_allocated(), "cuda_max_allocated"
            else:
                base, method = H._rss_kib("VmRSS"), H._reset_peak()
            t0 = time.perf_counter()
            step(fns[p])
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            peak = torch.cuda.max_memory_allocated() / 1024 if cuda else H._peak_kib(method)
            extra = max(0, peak - (base / 1024 if cuda else base)) / 1024
            rows.append({**stamp, "bench": "log_probs", "op": a.op, "provider": p, "shape": dims,
                         "device": a.device, "dtype": a.dtype, "temperature": a.temperature, "entropy": ent, "round": rnd,
                         "ms": ms, "extra_peak_mib": extra, "rss_method": method})
            print(f"[{rnd + 1}/{a.rounds}] {p:9} {ms:9.1f} ms {extra:8.1f} MiB", file=sys.stderr, flush=True)
    for r in rows:
        ref = [x for x in rows if x["provider"] == "eager" and x["round"] == r["round"]]
        r["ratio_vs_eager"] = r["ms"] / ref[0]["ms"] if ref else None

    out_mib = sum(q.numel() * q.element_size() for q in params) / 2 ** 20  # the gradients a step creates
    ret_mib = out_mib + N * 4 * (2 if ent else 1) / 2 ** 20  # ... and the outputs (fp32 log-probs, entropy)
    from crossent._logprobs_ops import _CPU_CHUNK_BYTES
    chunk_mib = _CPU_CHUNK_BYTES / 2 ** 20
    for r in rows:
        r["beyond_returned_mib"] = max(0.0, r["extra_peak_mib"] - ret_mib)
        r["beyond_returned_chunks"] = r["beyond_returned_mib"] / chunk_mib
    print(f"crossent {stamp['crossent']} (commit {stamp['git_commit']}), torch {stamp['torch']}, {stamp['cpu']}, "
          f"{stamp['cores']} cores, {stamp['torch_threads']} threads, load {stamp['loadavg_1m']}; "
          f"op={a.op} shape={a.shape} {a.dtype} T={a.temperature} entropy={ent}; fwd+bwd; "
          f"gradients + outputs = {ret_mib:.1f} MiB; N x V fp32 = {N * V * 4 / 2 ** 20:.1f} MiB; "
          f"chunk budget = {chunk_mib:.0f} MiB")
    print(f"{'provider':10} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'extra MiB':>10} {'beyond MiB':>11} "
          f"{'chunks':>7} {'median vs eager':>16} {'per-round ratios':>20}")
    for p in providers:
        mine = [r for r in rows if r["provider"] == p]
        ratios = [r["ratio_vs_eager"] for r in mine if r["ratio_vs_eager"] is not None]
        ms = sorted(r["ms"] for r in mine)
        med_ratio = H.median(ratios) if ratios else None
        beyond = min(r["beyond_returned_mib"] for r in mine)
        print(f"{p:10} {H.median(ms):>10.1f} {ms[0]:>9.1f} {ms[-1]:>9.1f} "
              f"{min(r['extra_peak_mib'] for r in mine):>10.1f} {beyond:>11.1f} {beyond / chunk_mib:>7.2f} "
              f"{'-' if med_ratio is None else format(med_ratio, '.3f'):>16} "
              f"{' '.join(format(x, '.2f') for x in ratios):>20}")
    if a.json:
        H.write_json(a.json, rows)
        print(f"wrote {len(rows)} rows to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
