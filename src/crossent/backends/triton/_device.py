"""Host-side facts about the device that pick a launch path (all cached per device).

Features are probed by compiling, never read off a version string: the GPU
machine runs Triton 3.6 while CI compiles with 3.9, and what matters is what the
installed compiler accepts.
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host ints: recent Triton makes it a ConstexprFunction, whose
    host call costs ~2 us (in the backward's launch path)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 for host ints (0 for 0, as it), without its ~2 us call."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tests reach the multi-group paths with tiny shapes


@triton.jit
def _cluster_sum_probe(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # The construct the cluster path relies on: one 1-D block split across the
    # CTAs of a cluster and reduced through distributed shared memory.
    tl.store(out_ptr, tl.sum(tl.load(x_ptr + tl.arange(0, BLOCK)).to(tl.float32), 0))


@functools.lru_cache(maxsize=None)
def compiles_cluster_reduction(target) -> bool:
    """Does the installed Triton compile a reduction across a thread-block cluster
    for ``target`` (a triton GPUTarget)?  Triton 3.6 rejects it in
    TritonGPUPlanCTAPass ("parent layout must have at least rank >= 2"); 3.9 compiles it."""
    from triton.compiler import ASTSource
    src = ASTSource(fn=_cluster_sum_probe, signature={"x_ptr": "*bf16", "out_ptr": "*fp32"},
                    constexprs={"BLOCK": 4096})
    try:
        triton.compile(src, target=target, options={"num_warps": 4, "num_ctas": 2})
    except Exception:  # noqa: BLE001 - any compiler failure means "not supported here"
        return False
    return True


@functools.lru_cache(maxsize=None)
def cluster_reductions(device: torch.device) -> bool:
    """compiles_cluster_reduction for this CUDA device (clusters need sm_90+)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    with torch.cuda.device(device):
        return compiles_cluster_reduction(triton.runtime.driver.active.get_current_target())


_NO_COOPERATIVE: set = set()   # devices where a cooperative launch failed
_ON_PATH_CHANGE: list = []     # forget() of each cache of paths chosen with cooperative()


def on_path_change(forget) -> None:
    """Have ``forget()`` called whenever cooperative() changes its answer (ce's launch plans)."""
    _ON_PATH_CHANGE.append(forget)


def cooperative(device: torch.device) -> bool:
    """False once a cooperative launch failed on this device (the split path is then skipped)."""
    return device not in _NO_COOPERATIVE


def cooperative_failed(device: torch.device, err: Exception) -> None:
    warnings.warn(f"crossent: cooperative launch failed on {device} ({type(err).__name__}: {err}); "
                  "using the two-pass kernels there from now on", RuntimeWarning, stacklevel=3)
    _NO_COOPERATIVE.add(device)
    for forget in _ON_PATH_CHANGE:
        forget()


def resident_ctas(n_regs: int, shared: int, num_warps: int, device: torch.device) -> int:
    """CTAs of a kernel that fit on one SM at once (registers, shared memory, warps).

    The cooperative split path launches exactly what fits; CUDA refuses a
    cooperative grid that does not (an error, never a hang).
    """
    props = torch.cuda.get_device_properties(device)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256        # allocation unit: 256 registers per warp
    by_regs = (regs // per_warp) // num_warps
    by_smem = smem // shared if shared else 32
    return max(0, min(by_regs, by_smem, threads // (32 * num_warps), 32))
