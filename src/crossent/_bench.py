"""CPU benchmark runner behind ``crossent bench`` and ``benchmarks/cpu_bench.py``.

Every (provider, case) pair runs in a fresh Python subprocess (_bench_worker.py loaded
by path, see _spawn), so one provider's peak RSS, allocator state and page-fault history
cannot leak into the next measurement.  The parent only spawns workers, joins
their JSON results, computes ratios and prints the table.

What a worker measures: crossent/_bench_worker.py, the file each worker loads.
The helpers (stats, stamps, rows, table) are re-exported by benchmarks/harness.py.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

# The worker's helpers are re-exported: benchmarks/, examples/ and tests use crossent._bench as the
# one home of the stats, RSS and case helpers.
from ._bench_worker import (BYTES_FACTOR, OPS, PROVIDERS, _copy_bandwidth, _peak_kib, _reset_peak, _rss_kib,
                            gbps, median, parse_case, quantile, summarize)

__all__ = ["BYTES_FACTOR", "FULL_CASES", "OPS", "PROVIDERS", "QUICK_CASES", "_peak_kib", "_reset_peak", "_rss_kib",
           "add_arguments", "add_ratios", "env_stamp", "format_table", "gbps", "main", "median", "median_rows",
           "parse_case", "quantile", "run", "select_cases", "spawn_worker", "summarize", "write_json"]

FULL_CASES = ["ce-4096x32000", "ce-8192x50257", "ce-8x21x256x256",
              "nll-4096x32000", "softmax-4096x32000", "log_softmax-4096x32000"]
QUICK_CASES = ["ce-1024x32000"]
# cross_entropy is where torch.compile is the interesting rival; elsewhere it only adds compile time
DEFAULT_PROVIDERS = {"cross_entropy": PROVIDERS}


# ----------------------------------------------------------------------------- cases

def select_cases(patterns: str | None, quick: bool) -> list[str]:
    """Comma-separated names or globs ('ce-*'); a name that parses need not be a default."""
    defaults = QUICK_CASES if quick else FULL_CASES
    if not patterns:
        return list(defaults)
    out = []
    for p in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = fnmatch.filter(FULL_CASES + QUICK_CASES, p) if any(c in p for c in "*?[") else [p]
        if not hits:
            raise ValueError(f"--cases pattern {p!r} matches no known case")
        for h in hits:
            parse_case(h)  # validate early, before any worker starts
            if h not in out:
                out.append(h)
    return out


# ----------------------------------------------------------------------------- environment stamp

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def crossent_version() -> str:
    import crossent
    v = getattr(crossent, "__version__", None)
    if v:
        return v
    try:
        from importlib.metadata import version
        return version("crossent")
    except Exception:
        return "unknown"


def backend_name() -> str:
    try:
        from crossent import backends
        return backends.select("cpu").name
    except Exception as e:  # a broken backend should not stop the benchmark from reporting it
        return f"unavailable ({type(e).__name__})"


def env_stamp() -> dict:
    import torch
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "crossent": crossent_version(), "python": platform.python_version(),
            "git_commit": git_commit(), "backend": backend_name(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------- rows and table

def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_X = this row's median / provider X's median on the same case (<1: faster)."""
    med = {(r["case"], r["provider"], r.get("repeat", 0)): r.get("median_ms") for r in rows}
    for r in rows:
        for other in ("torch", "compile"):
            ref = med.get((r["case"], other, r.get("repeat", 0)))
            mine = r.get("median_ms")
            r[f"ratio_vs_{other}"] = mine / ref if mine and ref else None


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (case, provider): the median of each numeric column over rounds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["case"], r["provider"]), []).append(r)
    out = []
    for grp in groups.values():
        row = dict(grp[0])
        for k, v in grp[0].items():
            vals = [g.get(k) for g in grp if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool)]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and vals:
                row[k] = median(vals)
        out.append(row)
    return out


def write_json(path: str | os.PathLike, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ms(v: float) -> str:
    """Milliseconds, two decimals, no exponents: 61640.30, 973.70, 0.04."""
    return f"{v:.2f}"


def format_table(rows: list[dict]) -> str:
    """Aligned text table, one line per row; every number to 2 decimals."""
    head = ["provider", "case", "median ms", "p10-p90 ms", "extra MiB", "extra/logits",
            "GB/s", "% copy", "vs torch", "vs compile"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["provider"], r["case"], "error: " + r["error"].splitlines()[-1][:60]]
                        + [""] * (len(head) - 3))
            continue
        body.append([r["provider"], r["case"], _ms(r["median_ms"]), f"{_ms(r['p10_ms'])}-{_ms(r['p90_ms'])}",
                     _fmt(r["extra_peak_mib"], ".2f"),
                     _fmt(r["peak_over_logits"], ".2f"), _fmt(r["gbps"], ".2f"),
                     _fmt(r.get("pct_of_copy"), ".2f"), _fmt(r.get("ratio_vs_torch"), ".2f"),
                     _fmt(r.get("ratio_vs_compile"), ".2f")])
    ok = [b for b in body if not b[2].startswith("error")]
    widths = [max([len(h)] + [len(b[i]) for b in ok]) for i, h in enumerate(head)]

    def line(cells):  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(head)]
    for b in body:
        lines.append(line(b) if b in ok else "  ".join([b[0].ljust(widths[0]), b[1].ljust(widths[1]), b[2]]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parent side

_WORKER_BOOT = """import sys, importlib.util as u
s = u.spec_from_file_location("crossent_bench_worker", sys.argv[1])
m = u.module_from_spec(s); s.loader.exec_module(m)
sys.exit(m.worker_main(sys.argv[2]))"""


def spawn_worker(cmd: list[str], timeout: float) -> dict:
    """Run a worker command in a fresh process (crossent's src on PYTHONPATH)
    and return the JSON of its last '@@RESULT ' line, or an error row."""
    env = dict(os.environ)
    import crossent  # the child must import the very crossent this process runs
    src = str(Path(crossent.__file__ or __file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    tail = (r.stderr or r.stdout).strip().splitlines()
    return {"error": f"worker exited {r.returncode}: {tail[-1] if tail else 'no output'}"}


def _spawn(spec: dict, timeout: float) -> dict:
    # Load the worker file by path rather than `-m crossent._bench_worker`: a torch/compile worker
    # then never imports crossent, so crossent's import cost and op registrations cannot touch
    # torch's numbers.
    return spawn_worker([sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).with_name("_bench_worker.py")),
                         json.dumps(spec)],
                        timeout)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"small shapes ({', '.join(QUICK_CASES)}), ~1 s per measurement")
    p.add_argument("--json", metavar="PATH", help="write one JSON row per measurement to PATH")
    p.add_argument("--cases", metavar="LIST",
                   help="comma-separated case names or globs, e.g. 'ce-*' or ce-64x1000 "
                        f"(OP-D0xD1..., OP in {', '.join(OPS)}); default: {', '.join(FULL_CASES)}")
    p.add_argument("--providers", metavar="LIST",
                   help=f"comma-separated subset of {', '.join(PROVIDERS)} "
                        "(default: all three for cross_entropy, crossent,torch otherwise)")
    p.add_argument("--iters", type=int, help="timed iterations (default: adaptive, >= 3)")
    p.add_argument("--seconds", type=float, help="target timed seconds per measurement when adaptive")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a worker is abandoned")
    p.add_argument("--small", action="store_true",
                   help="per-call cost at classifier sizes (32x10 ... 4096x10): cross_entropy, nll_loss and "
                        "their nn modules, fwd+bwd and forward-only, crossent vs torch eager interleaved in "
                        "one process (alone, or with --cases/--quick)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N competing CPU-bound processes (python busy loops) while measuring: "
                        "how crossent and torch hold up when other work holds cores")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the whole plan, providers interleaved; ratios are taken within a "
                        "round and their median over rounds is printed (damps drift on a shared machine)")


def _busy_loops(n: int) -> list[subprocess.Popen]:
    """n competing CPU-bound processes (stopped by run() when it is done)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _noisy_load(stamp: dict, own: int) -> float | None:
    """The 1-minute load average if it says other work is running (beyond our
    own ``own`` busy loops), else None."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return load if load is not None and load > 0.5 * (stamp["cores"] or 1) + own else None


def _round_verdicts(rows: list[dict], noisy: bool) -> list[str]:
    """One line per case: the median ratio over rounds, the rounds' range, and a
    verdict that median supports (withheld when rounds straddle 1 on a noisy run)."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r["ratio_vs_torch"] for r in rows if r["case"] == case and r["provider"] == "crossent"
              and r.get("ratio_vs_torch")]
        if not rs:
            continue
        med, lo, hi = median(rs), min(rs), max(rs)
        if noisy and lo <= 1.0 < hi:
            v = "undecided: rounds disagree (noisy machine)"
        else:
            v = "crossent faster" if med < 1.0 else "torch eager faster"
        spread = f" (rounds {lo:.2f}-{hi:.2f})" if len(rs) > 1 else ""
        out.append(f"  {case}: crossent / torch eager = {med:.2f}{spread}: {v}")
    return out


def run(args) -> int:
    try:
        small_only = getattr(args, "small", False) and not args.cases and not args.quick
        cases = [] if small_only else select_cases(args.cases, args.quick)
        provs = [p.strip() for p in args.providers.split(",")] if args.providers else None
        bad = [p for p in provs or [] if p not in PROVIDERS]
        if bad:
            raise ValueError(f"unknown provider(s) {', '.join(bad)}; choose from {', '.join(PROVIDERS)}")
    except ValueError as e:
        print(f"crossent bench: error: {e}", file=sys.stderr)
        return 2
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 4.0)
    rounds = max(1, getattr(args, "repeat", 1) or 1)
    plan = [(r, c, p) for r in range(rounds) for c in cases
            for p in (provs or DEFAULT_PROVIDERS.get(parse_case(c)["op"], ("crossent", "torch")))]
    stamp = env_stamp()
    n_load = max(0, getattr(args, "load", 0) or 0)
    busy = _busy_loops(n_load)
    try:
        return _run_plan(args, plan, rounds, seconds, stamp, n_load)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def _run_plan(args, plan, rounds, seconds, stamp, n_load) -> int:
    noisy_at_start = _noisy_load(stamp, n_load)
    if noisy_at_start:
        print(f"warning: load average {noisy_at_start:.2f} on {stamp['cores']} cores: "
              "other work is running, timings will be noisy", file=sys.stderr)
    stamp = {**stamp, "competing_processes": n_load}
    rows, small_rows = [], []
    if getattr(args, "small", False):
        print("[small] per-call cost, crossent and torch interleaved in one process ...", file=sys.stderr, flush=True)
        res = _spawn({"kind": "small", "rounds": 10 * rounds + 11}, args.timeout)
        if res.get("error"):
            rows.append({**stamp, "case": "small", "provider": "crossent", **res})
        else:
            small_rows = [{**stamp, **r} for r in res["rows"]]
    copy_gbps = None
    if plan:
        print(f"[0/{len(plan)}] copy bandwidth ...", file=sys.stderr, flush=True)
        copy = _copy_bandwidth()  # in this process: it holds no measurement, and a spawn costs seconds
        copy_gbps = copy.get("copy_gbps")
    for i, (rnd, case, prov) in enumerate(plan, 1):
        c = parse_case(case)
        print(f"[{i}/{len(plan)}] {prov} {c['op']} {case.rpartition('-')[2]} ...",
              file=sys.stderr, flush=True)
        spec = {"case": case, "provider": prov, "iters": args.iters, "seconds": seconds}
        t0 = time.perf_counter()
        res = _spawn(spec, args.timeout)
        row = {**stamp, "case": case, "op": c["op"], "provider": prov, "copy_gbps": copy_gbps, **res,
               "worker_s": time.perf_counter() - t0, "repeat": rnd}
        if copy_gbps and row.get("gbps"):
            row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        rows.append(row)
    add_ratios(rows)
    noisy_load = noisy_at_start or _noisy_load(stamp, n_load)
    print(f"crossent {stamp['crossent']} (backend {stamp['backend']}), torch {stamp['torch']}, "
          f"{stamp['cpu']}, {stamp['cores']} cores, {stamp['torch_threads']} threads"
          + (f", {n_load} competing CPU-bound process(es)" if n_load else ""))
    if small_rows:
        spread = any(r["ratio_q3"] > 1.15 * r["ratio_q1"] for r in small_rows if r["provider"] == "crossent")
        noisy = bool(noisy_load) or spread
        print("\nsmall sizes, per call (us): medians over interleaved rounds; crossent/torch: median of the "
              "within-round ratios, middle half = their quartiles; fp32 CPU, int64 targets")
        from crossent._bench_small import format_small
        print(format_small(small_rows, noisy))
        if noisy:
            print("NOISY: " + (f"load average {noisy_load:.2f}; " if noisy_load else "")
                  + ("the middle half of some rows' round ratios spans over 15%; " if spread else "")
                  + "verdicts are withheld where the rounds disagree")
    if plan:
        print(f"\ncopy bandwidth (roofline): {_fmt(copy_gbps, '.2f')} GB/s")
        print("fwd+bwd; extra MiB = peak RSS during timing minus RSS before; "
              "vs X = median time / X's median (<1 is faster)")
        print(format_table(rows))
        if rounds > 1:
            print(f"median over {rounds} rounds (ratios taken within each round):")
            print(format_table(median_rows(rows)))
        print("verdicts (from the medians above):")
        print("\n".join(_round_verdicts(rows, bool(noisy_load) or rounds > 1)))
        if noisy_load:
            print(f"NOISY: load average {noisy_load:.2f} on {stamp['cores']} cores; rerun with --repeat 3 "
                  "on a quiet machine for numbers to quote")
    all_rows = small_rows + rows
    if args.json:
        write_json(args.json, all_rows)
        print(f"wrote {len(all_rows)} rows to {args.json}")
    return 1 if any(r.get("error") for r in rows) else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="crossent-bench", description="crossent CPU benchmark")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
