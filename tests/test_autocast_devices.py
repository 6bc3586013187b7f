"""torch.autocast's op lists differ by device type, and crossent follows each.

torch registers an autocast kernel per op and device type.  (log_)softmax are
fp32 ops of CUDA's autocast (and XPU's), not of the CPU's: crossent's
rule (_fast.AUTOCAST_FP32_SOFTMAX) must name exactly those device types.
cross_entropy is an fp32 op of the CPU's autocast only: on CUDA torch runs
log_softmax in the input's dtype (cross_entropy asks for it) and nll_loss in
fp32, so its loss is a mean of fp16/bf16-rounded log-probabilities; crossent
returns the fp32 loss of the same input values on every device (README,
deliberate differences), which the CUDA tests compare within that rounding
(tests/test_distributed.py autocast case, tests/gpu/test_gpu_autocast.py).
These read torch's registrations, so they run without the devices.
"""
import pytest
import torch

from crossent import _fast


def _autocast_kernel(op: str, device_type: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "Autocast" + device_type.upper())


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "xpu"])
@pytest.mark.parametrize("op", ["softmax.int", "log_softmax.int"])
def test_softmax_fp32_rule_is_torchs(op, device_type):
    assert _autocast_kernel(op, device_type) == (device_type in _fast.AUTOCAST_FP32_SOFTMAX)


def test_cross_entropy_fp32_op_on_cpu_only():
    # the premise of the CUDA comparisons' tolerance (see the module docstring)
    assert _autocast_kernel("cross_entropy_loss", "cpu") and not _autocast_kernel("cross_entropy_loss", "cuda")
    assert _autocast_kernel("nll_loss", "cpu") and _autocast_kernel("nll_loss", "cuda")


def test_softmax_under_cpu_autocast_keeps_the_input_dtype():
    x = torch.randn(4, 7).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fast.autocast_softmax_dtype(x, None) is None
        assert _fast.autocast_softmax_dtype(x, torch.float64) == torch.float64
        import crossent
        for ours, theirs in [(crossent.softmax, torch.softmax), (crossent.log_softmax, torch.log_softmax)]:
            assert ours(x, 1).dtype == theirs(x, 1).dtype == torch.bfloat16
