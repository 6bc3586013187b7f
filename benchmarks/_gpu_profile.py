"""Where a GPU step's time goes, from torch.profiler (gpu_linear_bench.py --profile).

A step's wall time is its kernels' time plus the time the GPU sat idle between them.
Summing kernel times (what a key_averages table gives) cannot tell the two apart, so
this module reads the device timeline itself:

  kernels   the device events (kernels, memsets, copies) by total time;
  idle      the union of their intervals against the span from the first start to
            the last end, and the longest gaps, each with the kernels on either side
            and the innermost host op running at the gap's middle (what the GPU was
            waiting for: a slow launch, an allocation, a synchronising call);
  host      the time the Python calls took to return, against the device span: a
            host that enqueues slower than the GPU runs leaves the GPU idle;
  trace     a Chrome trace (chrome://tracing, ui.perfetto.dev) of the same steps;
  sync      one more step under CUDA's sync debug mode "error": the first host sync it
            makes (a D2H copy, .item(), nonzero, a synchronize), with the line that made it.
            A sync drains the launch queue, so the GPU then idles while the host catches up.

The timeline helpers take plain (start_us, end_us, name) tuples, so they are tested on CPU
(tests/test_bench_harness.py); only ``profile_steps`` needs CUDA.
"""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path


def device_intervals(events) -> list:
    """[(start_us, end_us, name)] of the device events of torch.profiler's
    ``prof.events()``, by start time."""
    from torch.autograd import DeviceType
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == DeviceType.CUDA)


def host_intervals(events) -> list:
    """[(start_us, end_us, name)] of the host (CPU) events, by start time."""
    from torch.autograd import DeviceType
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == DeviceType.CPU)


def idle_gaps(intervals, min_us: float = 5.0) -> tuple[float, float, list]:
    """(span_us, busy_us, gaps) of sorted device intervals: the span from the first
    start to the last end, the time covered by at least one interval (overlaps count
    once: kernels on other streams), and the gaps of at least ``min_us`` as
    (gap_us, gap_start_us, name before, name after), longest first."""
    if not intervals:
        return 0.0, 0.0, []
    span = max(e for _, e, _ in intervals) - intervals[0][0]
    busy, gaps = 0.0, []
    cur_s, cur_e, cur_name = intervals[0]
    for s, e, name in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= min_us:
                gaps.append((s - cur_e, cur_e, cur_name, name))
            cur_s, cur_e, cur_name = s, e, name
        elif e >= cur_e:
            cur_e, cur_name = e, name
    busy += cur_e - cur_s
    return span, busy, sorted(gaps, key=lambda g: -g[0])


def host_op_at(host, t: float) -> str:
    """The innermost (shortest) host event containing time ``t``, or, between events,
    '(between host ops, after <the last one that ended>)'."""
    inside = [(e - s, name) for s, e, name in host if s <= t <= e]
    if inside:
        return min(inside)[1]
    ended = [(e, name) for s, e, name in host if e < t]
    return f"(between host ops, after {max(ended)[1]})" if ended else "(before the first host op)"


def kernel_table(intervals, top: int = 15) -> list:
    """[(total_us, calls, name)] of device intervals by name, most time first."""
    by_name: dict = {}
    for s, e, name in intervals:
        us, n = by_name.get(name, (0.0, 0))
        by_name[name] = (us + e - s, n + 1)
    return sorted(((us, n, name) for name, (us, n) in by_name.items()), reverse=True)[:top]


def summarize(dev, host, host_call_ms: float, steps: int, top: int = 15, gaps: int = 6) -> list:
    """The report's lines for ``steps`` steps: kernels by time, the idle summary, the
    longest gaps with what the host was doing, and the host's own time per step."""
    span, busy, gap_list = idle_gaps(dev)
    total = sum(e - s for s, e, _ in dev) or 1.0
    lines = [f"device: {len(dev)} events; span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, "
             f"idle {(span - busy) / 1e3:.3f} ms over {steps} step(s); host calls returned after "
             f"{host_call_ms:.3f} ms per step (device span per step {span / 1e3 / max(1, steps):.3f} ms)"]
    for us, n, name in kernel_table(dev, top):
        lines.append(f"{us / 1e3:9.3f} ms {100 * us / total:5.1f}% {n:5}x  {name[:100]}")
    if gap_list:
        lines.append(f"longest idle gaps (of {len(gap_list)} >= 5 us, {sum(g[0] for g in gap_list) / 1e3:.3f} ms):")
    for us, t0, before, after in gap_list[:gaps]:
        lines.append(f"  {us / 1e3:7.3f} ms after {before[:40]!r} before {after[:40]!r}; host in "
                     f"{host_op_at(host, t0 + us / 2)[:60]!r}")
    return lines


def raise_site(tb, package: str = "crossent") -> str:
    """'file:line in function' of a traceback's innermost frame in ``package``'s
    source (else its innermost frame): the line that made a call torch refused."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "(no traceback)"
    ours = [f for f in frames if f"{os.sep}{package}{os.sep}" in f.filename]
    f = (ours or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def first_sync(step) -> str:
    """Run ``step()`` once with CUDA's sync debug mode "error": '' if it made no host
    sync that torch checks, else where the first one was and torch's message."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return f"{raise_site(e.__traceback__)}: {str(e).strip().splitlines()[0][:100]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return ""


def profile_steps(step, steps: int, title: str, trace: Path | None = None, top: int = 15) -> dict:
    """Profile ``steps`` back-to-back calls of ``step()`` (CPU and CUDA activities; call it
    once before, untimed), print the report, write the Chrome trace to ``trace``; returns
    the idle summary as a dict (for a JSON row)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host_ms = (time.perf_counter() - t0) * 1e3 / steps
        torch.cuda.synchronize()
    events = prof.events()
    dev, host = device_intervals(events), host_intervals(events)
    print(f"== profile: {title}, {steps} step(s) ==")
    for line in summarize(dev, host, host_ms, steps, top):
        print(line)
    if trace is not None:
        try:
            prof.export_chrome_trace(str(trace))
            print(f"chrome trace: {trace}")
        except Exception as e:  # noqa: BLE001 - the report is printed already
            print(f"chrome trace not written: {type(e).__name__}: {e}")
    span, busy, gap_list = idle_gaps(dev)
    return dict(steps=steps, span_ms=span / 1e3, busy_ms=busy / 1e3, idle_ms=(span - busy) / 1e3,
                host_call_ms=host_ms, gaps=len(gap_list))
