"""Worker side of the CPU benchmark (crossent/_bench.py is the parent side).

Each (provider, case) pair runs in a fresh Python subprocess that loads this file by
path (see _bench._spawn): it imports only the standard library and torch at module
level, so a torch or torch.compile worker never imports crossent, and crossent's import
cost and op registrations cannot touch torch's numbers.  The parent imports it as
``crossent._bench_worker`` for the stats, the case parser and the copy roofline.

What a worker measures (fwd+bwd, fp32 unless the case says otherwise):
  time    per-iteration wall time (time.perf_counter) over k timed iterations
          after warm-up; k adapts so a case takes ~--seconds (at least 3; big
          cases whose first call alone takes over --seconds/3 get exactly 3).
  memory  extra peak RSS = peak RSS during the timed loop minus RSS right before
          it (inputs already built, warm-up done, grads cleared).  The peak is
          VmHWM from /proc/self/status after resetting it through
          /proc/self/clear_refs ("hwm"); where that reset is unavailable it is
          ru_maxrss ("ru_maxrss"), a lifetime peak, which is still right here
          because building the inputs peaks lower than one fwd+bwd does.
  GB/s    minimal bytes moved / median time: cross_entropy reads the logits
          once and writes the grad once (2*N*V*elt); nll_loss only writes the
          grad (1x); softmax/log_softmax read x, write y, then read g and y and
          write dx (4x).  "% copy" divides by the bandwidth of a large
          tensor.copy_ (bytes read + written) measured by the parent at the
          start of the same run: a practical roofline for this machine.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

OPS = {"ce": "cross_entropy", "nll": "nll_loss", "softmax": "softmax", "log_softmax": "log_softmax"}
BYTES_FACTOR = {"cross_entropy": 2, "nll_loss": 1, "softmax": 4, "log_softmax": 4}
PROVIDERS = ("crossent", "torch", "compile")
COPY_BYTES = 256 << 20  # large enough to defeat the caches of any current CPU


# ----------------------------------------------------------------------------- stats

def quantile(xs, q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    if not xs:
        raise ValueError("quantile of an empty sequence")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs) -> float:
    return quantile(xs, 0.5)


def summarize(times_s) -> dict:
    """Per-iteration times in seconds -> median/p10/p90 in milliseconds."""
    return {"median_ms": median(times_s) * 1e3, "p10_ms": quantile(times_s, 0.1) * 1e3,
            "p90_ms": quantile(times_s, 0.9) * 1e3}


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- cases

def parse_case(name: str) -> dict:
    """'ce-4096x32000' -> {op, shape}. For cross_entropy/nll_loss dim 1 is the class dim
    (so 'ce-8x21x256x256' is input (8,21,256,256), target (8,256,256)); softmax uses dim -1."""
    op, _, dims = name.rpartition("-")
    if op not in OPS or not dims:
        raise ValueError(f"bad case {name!r}: expected OP-D0xD1[x...] with OP in {', '.join(OPS)}")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        raise ValueError(f"bad case {name!r}: dimensions must be integers") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"bad case {name!r}: need at least 2 positive dimensions")
    return {"case": name, "op": OPS[op], "shape": shape}


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> str:
    """Reset the kernel's RSS high-water mark if we can; return the method used."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if _rss_kib("VmHWM") is not None:
            return "hwm"
    except OSError:
        pass
    return "ru_maxrss"


def _peak_kib(method: str) -> int:
    if method == "hwm":
        return _rss_kib("VmHWM")
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _copy_bandwidth(nbytes: int = COPY_BYTES, iters: int = 10) -> dict:
    """Roofline: GB/s of dst.copy_(src) on fp32 buffers far larger than the caches."""
    import torch
    try:
        n = nbytes // 4
        src, dst = torch.randn(n), torch.empty(n)
        dst.copy_(src)  # fault the pages in before timing
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return {"copy_gbps": gbps(2 * n * 4, median(times))}
    except RuntimeError as e:  # e.g. out of memory on a small machine: report, do not abort
        return {"error": f"{type(e).__name__}: {e}"}


def _build(op: str, shape: tuple, provider: str, seed: int):
    """Inputs and a zero-argument fwd+bwd step for one measurement."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    if provider == "crossent":
        import crossent as lib
        fn = getattr(lib, op)
    elif provider in ("torch", "compile"):
        fn = getattr(F, op)
        if provider == "compile":
            fn = torch.compile(fn)
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    x = torch.randn(shape, generator=g)
    C = shape[1]
    if op in ("cross_entropy", "nll_loss"):
        t = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
        if op == "nll_loss":  # nll_loss consumes log-probabilities; make them outside the timed region
            x = torch.log_softmax(x, dim=1)
        x.requires_grad_(True)

        def step():
            x.grad = None
            fn(x, t).backward()
    else:
        dy = torch.randn(shape, generator=g)
        x.requires_grad_(True)

        def step():
            x.grad = None
            fn(x, dim=-1).backward(dy)
    return x, step


def _measure_worker(spec: dict) -> dict:
    import gc
    import torch
    c = parse_case(spec["case"])
    op, shape, provider = c["op"], c["shape"], spec["provider"]
    x, step = _build(op, shape, provider, spec.get("seed", 0))
    t0 = time.perf_counter()
    step()  # first call: compiles (compile provider), faults pages in, primes caches
    first_s = time.perf_counter() - t0
    seconds, iters = spec.get("seconds", 4.0), spec.get("iters")
    if first_s < seconds / 3:
        t0 = time.perf_counter()
        step()  # a second warm-up, timed to size the loop: the first call carries one-off costs
        iters = iters or max(3, min(spec.get("max_iters", 50), int(seconds / max(time.perf_counter() - t0, 1e-6))))
    iters = iters or 3  # an expensive case (8192x50257 eager: seconds per call): one warm-up, 3 timed
    x.grad = None
    gc.collect()
    base = _rss_kib("VmRSS")
    method = _reset_peak()
    if base is None:  # no /proc: ru_maxrss is all there is
        import resource
        base, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _peak_kib(method)
    elt = x.element_size()
    numel = x.numel()
    out = {"op": op, "shape": list(shape), "dtype": str(x.dtype).replace("torch.", ""),
           "iters": iters, "first_call_ms": first_s * 1e3, **summarize(times),
           "extra_peak_mib": max(0, peak - base) / 1024, "logits_mib": numel * elt / 2**20,
           "rss_method": method, "bytes_moved": BYTES_FACTOR[op] * numel * elt,
           "threads": torch.get_num_threads()}
    out["peak_over_logits"] = out["extra_peak_mib"] / out["logits_mib"]
    out["gbps"] = gbps(out["bytes_moved"], out["median_ms"] / 1e3)
    return out


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        if spec.get("kind") == "small":
            from crossent import _bench_small
            res = {"rows": _bench_small.measure(rounds=spec.get("rounds", 21))}
        else:
            res = _measure_worker(spec)
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    print("@@RESULT " + json.dumps(res), flush=True)  # a marker line: libraries may print too
    return 0
