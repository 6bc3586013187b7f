"""What a step launches on the GPU, for the launch-count tests of tests/gpu."""
import torch


def device_kernels(step):
    """(step()'s result, the names of the CUDA kernels it launched): torch.profiler's device
    events, with implicit host syncs made errors (a forward or backward must not sync)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
