"""Grid-wide steps that make a whole cross-entropy forward one launch (issue 10, item 2).

A 'mean' over class-index targets divides by W = sum of w[y] over the counted
positions, and the gradient baked into the forward is scaled by 1 / W: W must
be known before the first gradient element is written.  In a cooperative
launch (every program resident) each program sums its share of the targets,
publishes it, and passes a grid barrier; then every program adds the partials
in the same order, so all hold the same W.  The reduced loss is written by the
last program to finish (a ticket), from per-program partial sums added in
program order: deterministic, in the loss's own dtype, with no reduction,
division or cast launched after the kernel.

Counters live in a workspace crossent owns, zeroed once per device and stream
and reset by the kernels themselves (the barriers are sense-reversing; the
ticket is cleared by its last holder), so no memset is launched per call.
Under the interpreter, which runs programs one after another, a barrier would
spin forever: there the work before and after it runs as two launches (STAGE 1
and 2) of the same kernel.

Without a cooperative launch (``ce._MEAN_LAUNCH = "claim"``), W is formed by the one
program that claims it first while the others wait for it (``_claimed_denominator``):
that program is running, so the wait cannot deadlock, and the grid can be one program
per tile with no persistent loop (a cooperative grid is what fits at once, each program
looping over tiles: the two-pass kernel then holds 64 registers instead of 32-40).

Workspace layout (int32): [0] barrier arrivals, [1] barrier generation,
[2] loss ticket, [3] W's claim (0 free, 1 taken, 2 published), then (arrivals,
generation) per row for the split path's per-row exchange.  Partials (fp64): [0, nprog)
denominators, [nprog, 2 nprog) losses, [2 nprog] W when claimed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device

_LANES = tl.constexpr(1024)   # vector width of the O(N) and O(programs) loops


@triton.jit
def _barrier(cnt_ptr, n):
    # Sense-reversing barrier of n arrivals on (cnt_ptr[0] arrivals, cnt_ptr[1]
    # generation).  The last arrival resets the count and bumps the generation
    # (release); the others wait for the bump (acquire).  Every thread's stores
    # come before the arrival (CTA barrier first), every load after the wait.
    tl.debug_barrier()
    gen = tl.atomic_add(cnt_ptr + 1, 0, sem="relaxed")
    c = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if c == n - 1:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")
        tl.atomic_add(cnt_ptr + 1, 1, sem="release")
    else:
        g = gen
        while g == gen:
            g = tl.atomic_add(cnt_ptr + 1, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _den_partial(part_ptr, t_ptr, st_b, st_s, w_ptr, S, N, C, ignore_index, HAS_W: tl.constexpr):
    # This program's share of W (positions [pid * chunk, (pid + 1) * chunk)), stored
    # at part_ptr[pid].
    pid = tl.program_id(0)
    chunk = tl.cdiv(N, tl.num_programs(0))
    lo = pid.to(tl.int64) * chunk
    tl.store(part_ptr + pid, _den_sum(t_ptr, st_b, st_s, w_ptr, S, N, lo, tl.minimum(lo + chunk, N), C,
                                      ignore_index, HAS_W))


@triton.jit
def _den_sum(t_ptr, st_b, st_s, w_ptr, S, N, lo, hi, C, ignore_index, HAS_W: tl.constexpr):
    # sum of w[y] over the counted positions in [lo, hi) (fp64).  As torch: a counted
    # target outside [0, C) weighs w[0].
    acc = tl.zeros([_LANES], tl.float64)
    for i0 in range(lo, hi, _LANES):
        i = i0 + tl.arange(0, _LANES).to(tl.int64)
        # One batch ((R, C) rows): no (b, s) split of the position (an int64 division).
        # Not st_b == 0: an expanded K-dim target has batch stride 0 too.
        if S == N:
            y = tl.load(t_ptr + i * st_s, mask=i < hi, other=0).to(tl.int64)
        else:
            b = i // S
            y = tl.load(t_ptr + b * st_b + (i - b * S) * st_s, mask=i < hi, other=0).to(tl.int64)
        valid = (i < hi) & (y != ignore_index)
        if HAS_W:
            ok = (y >= 0) & (y < C)
            w = tl.load(w_ptr + tl.where(ok, y, 0), mask=valid, other=0.0).to(tl.float64)
        else:
            w = tl.where(valid, 1.0, 0.0).to(tl.float64)
        acc += w
    return tl.sum(acc, 0)


@triton.jit
def _claimed_denominator(ws_ptr, part_ptr, t_ptr, st_b, st_s, w_ptr, S, N, C, ignore_index,
                         HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    # W without a grid barrier, so without a cooperative launch (any grid, every program
    # its own tile at full occupancy): the first program to claim it (compare-and-swap
    # 0 -> 1 on ws_ptr[3]) sums all N targets and publishes W (-> 2, release); the others
    # wait for the 2 (acquire).  Nobody waits on a program that might not be running: the
    # claimer took the claim, so it runs.  The last program resets the claim (_finish).
    # W's slot: part_ptr[2 * programs], past the loss partials.
    slot = part_ptr + 2 * tl.num_programs(0)
    tl.debug_barrier()
    c = tl.atomic_cas(ws_ptr + 3, 0, 1, sem="acq_rel")
    if c == 0:
        tl.store(slot, _den_sum(t_ptr, st_b, st_s, w_ptr, S, N, 0, N, C, ignore_index, HAS_W))
        tl.debug_barrier()
        tl.atomic_xchg(ws_ptr + 3, 2, sem="release")
    else:
        s = c
        while s != 2:
            s = tl.atomic_add(ws_ptr + 3, 0, sem="acquire")
    tl.debug_barrier()
    den = tl.load(slot, cache_modifier=".cg").to(tl.float32)
    if SMOOTH:
        den = tl.where(den == 0.0, float("nan"), den)
    return den


@triton.jit
def _total(part_ptr, n):
    # sum of part_ptr[0:n) (fp64), in the same order in every program; .cg: at L2,
    # where the other programs' stores are.
    acc = tl.zeros([_LANES], tl.float64)
    for j0 in range(0, n, _LANES):
        j = j0 + tl.arange(0, _LANES)
        acc += tl.load(part_ptr + j, mask=j < n, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, 0)


@triton.jit
def _denominator(part_ptr, SMOOTH: tl.constexpr):
    # W in fp32, as torch's mean divides by it; with label smoothing torch's mean
    # of an all-ignored batch is NaN even where the smoothing sum alone would be inf.
    den = _total(part_ptr, tl.num_programs(0)).to(tl.float32)
    if SMOOTH:
        den = tl.where(den == 0.0, float("nan"), den)
    return den


@triton.jit
def _inverse(den):
    # 1 / den correctly rounded in fp32: equal to torch's 1.0 / denom.
    return tl.math.div_rn(tl.cast(1.0, tl.float32), den)


@triton.jit
def _finish(ws_ptr, part_ptr, out_ptr, den_ptr, partial, den, MEAN: tl.constexpr):
    # Publish this program's loss partial; the last program to take the ticket adds
    # them in program order and writes the reduced loss in out_ptr's dtype (the
    # roundings of torch's fp64 sum -> fp32 -> loss dtype) and the denominator
    # (saved for a backward that recomputes), then clears the ticket.
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    tl.store(part_ptr + n + pid, partial)
    tl.debug_barrier()
    t = tl.atomic_add(ws_ptr + 2, 1, sem="acq_rel")
    if t == n - 1:
        total = _total(part_ptr + n, n)
        if MEAN:
            total = total / den.to(tl.float64)
        tl.store(out_ptr, total.to(tl.float32).to(out_ptr.dtype.element_ty))
        tl.store(den_ptr, den)
        tl.atomic_xchg(ws_ptr + 3, 0, sem="relaxed")   # W's claim (_claimed_denominator), if taken
        tl.atomic_xchg(ws_ptr + 2, 0, sem="relaxed")


# ----------------------------------------------------------------------------- host side

_WORKSPACES: dict = {}
# The current stream's handle without building a torch.cuda.Stream (a few us per call).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream",
                      lambda index: torch.cuda.current_stream(index).cuda_stream)


def _stream_key(device: torch.device):
    """Key of the buffers cached for the current stream (launches on one stream run in
    order, so they can share them); None while a CUDA graph is captured: fresh buffers
    from the graph's pool then, so replays never share them with eager calls."""
    if device.type != "cuda":
        return device, 0
    if torch.cuda.is_current_stream_capturing():
        return None
    return device, _raw_stream(device.index)


def workspace(device: torch.device, rows: int, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 counters, fp64 partials) for a launch of ``programs`` programs over
    ``rows`` split rows: cached per device and stream, zeroed only when first made
    or grown (under graph capture: fresh, the counters zeroed by a memset node)."""
    key = _stream_key(device)
    if key is None:
        return (torch.zeros(4 + 2 * rows, device=device, dtype=torch.int32),
                torch.empty(2 * programs, device=device, dtype=torch.float64))
    return _workspace(key, device, rows, programs)


def split_workspace(device: torch.device, rows: int, programs: int,
                    floats: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``workspace`` plus the split kernels' slice partials (``scratch`` slot 0, >= floats),
    for one lookup of the stream."""
    key = _stream_key(device)
    if key is None:
        return (*workspace(device, rows, programs), torch.empty(floats, device=device, dtype=torch.float32))
    return (*_workspace(key, device, rows, programs), _scratch(key, device, floats, 0))


def _workspace(key, device: torch.device, rows: int, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_cnt = 4 + 2 * rows
    bufs = _WORKSPACES.get(key)
    if bufs is not None and bufs[0].numel() >= n_cnt and bufs[1].numel() >= 2 * programs:
        return bufs
    cnt, part = bufs or (None, None)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 2 * (0 if cnt is None else cnt.numel())), device=device, dtype=torch.int32)
    if part is None or part.numel() < 2 * programs:
        part = torch.empty(max(2 * programs, 4096), device=device, dtype=torch.float64)
    bufs = _WORKSPACES[key] = (cnt, part)
    return bufs


_SCRATCH: dict = {}


def scratch(device: torch.device, n: int, slot: int = 0) -> torch.Tensor:
    """An fp32 buffer of >= n elements that one launch writes before it reads (slot 0: the
    split kernels' slice partials) or never reads (slot 1: per-position outputs that the
    backward's rerun of the forward kernel writes and nobody wants): cached per device,
    stream and slot like ``workspace``, so a call allocates nothing."""
    key = _stream_key(device)
    if key is None:
        return torch.empty(n, device=device, dtype=torch.float32)
    return _scratch(key, device, n, slot)


def _scratch(key, device: torch.device, n: int, slot: int) -> torch.Tensor:
    key = (key, slot)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.empty(max(n, 2 * (0 if buf is None else buf.numel()), 4096),
                                          device=device, dtype=torch.float32)
    return buf


_RESIDENT: dict = {}


def resident(kernel, args, consts: dict, device: torch.device, per_sm_cap: int = 32) -> int:
    """Programs of ``kernel`` that fit on ``device`` at once (a cooperative launch must
    not ask for more; CUDA refuses it, never hangs), from the compiled kernel's
    registers and shared memory; cached per kernel, device and constants."""
    key = (kernel, device, tuple(consts.items()), per_sm_cap)
    n = _RESIDENT.get(key)
    if n is None:
        ck = kernel.warmup(*args, grid=(1,), launch_cooperative_grid=True, **consts)
        ck._init_handles()
        per_sm = min(per_sm_cap, _device.resident_ctas(ck.n_regs, ck.metadata.shared, consts["num_warps"],
                                                       device))
        if per_sm < 1:
            raise RuntimeError(f"crossent: {kernel.__name__} does not fit on one SM")
        n = _RESIDENT[key] = per_sm * _device.num_sms(device)
    return n
